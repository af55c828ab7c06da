"""pyattr.runtime and ``pyattr run`` on graphs exported with segmentation and similarity targets.

Tiny random-init models (a segmenter and an embedder, as in ``tests/test_targets.py``) are exported once
per module with ``pyattr.export(..., target=...)``. The runtime's results are held against the eager
method on the same preprocessed input (given and predicted regions; reference arrays and a reference
image embedded by the graph itself), at batches 1 and 3; then the errors, the command line end to end
(files, JSON lines, one-line errors, nothing partial left behind), a hostile ``.npy`` and the torch-free
import.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from target_models import D, tiny_embedder, tiny_segmenter
from torch import nn
from torchfree import run_without_torch

import pyattr
from pyattr.errors import InputError
from pyattr.runtime import AttributionRuntime
from pyattr.runtime.cli import main
from pyattr.runtime.images import load_mask
from pyattr.targets import SegmentationTarget, SimilarityTarget

SIZE = 32
CLASSES = ["background", "disc", "square", "ring"]
PREPROCESSING = {"color": "RGB", "scale": 1 / 255, "mean": [0.45, 0.5, 0.55], "std": [0.25, 0.2, 0.3],
                 "size": [SIZE, SIZE], "resize": "bilinear", "layout": "NCHW"}
IMAGE_SIZES = [(32, 32), (40, 60), (50, 30)]  # (H, W)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime_targets")
    seg, emb = tiny_segmenter(), tiny_embedder()
    example = torch.rand(1, 3, SIZE, SIZE)
    seg_method, sim_method = pyattr.GradCAM(seg, "down"), pyattr.GradCAM(emb, "features.4")
    paths = {
        "seg": pyattr.export(seg_method, example, root / "seg.onnx", target=SegmentationTarget(),
                             class_names=CLASSES, preprocessing=PREPROCESSING),
        "sim": pyattr.export(sim_method, example, root / "sim.onnx", target=SimilarityTarget(),
                             preprocessing=PREPROCESSING),
        "cls": pyattr.export(pyattr.Saliency(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 3)).eval()),
                             example, root / "cls.onnx", preprocessing=PREPROCESSING),
    }
    # a class graph as exported before targets existed: no "target", "inputs", "outputs" in its metadata
    model = onnx.load(str(paths["cls"]))
    entry = next(e for e in model.metadata_props if e.key == "pyattr")
    meta = json.loads(entry.value)
    for key in ("target", "target_convention", "inputs", "outputs"):
        meta.pop(key)
    entry.value = json.dumps(meta)
    paths["old"] = root / "old.onnx"
    onnx.save(model, str(paths["old"]))

    rng = np.random.default_rng(1)
    images = []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        array[h // 4: h // 2, w // 4: w // 2] = [255, 40, 40]
        images.append(root / f"img{i}.png")
        Image.fromarray(array).save(images[-1])
    reference = root / "ref.png"
    Image.fromarray(rng.integers(0, 256, (36, 28, 3), dtype=np.uint8)).save(reference)
    mask = np.zeros((48, 48), np.uint8)
    mask[6:30, 12:40] = 255  # drawn at another size than the graph's: resized nearest
    Image.fromarray(mask).save(root / "mask.png")
    return {"root": root, "paths": paths, "seg": seg_method, "sim": sim_method, "emb": emb, "images": images,
            "reference": reference, "mask": root / "mask.png"}


@pytest.fixture(scope="module")
def runtimes(setup):
    return {name: AttributionRuntime(path, num_threads=1) for name, path in setup["paths"].items()}


def box_region(n: int) -> np.ndarray:
    """Per-sample regions at the graph's size: a box, the predicted region (all -1), soft weights."""
    out = np.zeros((n, SIZE, SIZE), np.float32)
    for i in range(n):
        if i % 3 == 0:
            out[i, 4:18, 6:24] = 1.0
        elif i % 3 == 1:
            out[i] = -1.0
        else:
            out[i, SIZE // 2:] = 0.5
    return out


def assert_clear_argmax(model: nn.Module, x: torch.Tensor) -> None:
    """Precondition of comparing predicted regions: every pixel's top class leads by far more than float32
    rounding (a near-tie may flip between the graph and eager, moving a pixel between regions)."""
    out = model(x)["out"].detach()
    top2 = out.topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-3 * float(out.abs().max()) / 100


def assert_same(got: list, eager, region: np.ndarray | None = None) -> None:
    """Runtime explanations == the eager result (maps, raw, scores, class)."""
    for i, e in enumerate(got):
        assert e.explained_class == int(eager.target[i])
        np.testing.assert_allclose(e.scores, eager.scores[i].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(e.raw, eager.raw[i].numpy(), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(e.map, eager.maps[i].numpy(), rtol=0, atol=1e-4)
        if region is not None:
            if (region[i] >= 0).any():
                np.testing.assert_array_equal(e.region, region[i])
            else:
                assert e.region is None


# --------------------------------------------------------------------------------------------------
# The runtime equals eager pyattr
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
def test_segmentation_given_and_predicted_regions_match_eager(setup, runtimes, n):
    runtime = runtimes["seg"]
    assert runtime.target_kind == "segmentation" and runtime.region_size == (SIZE, SIZE)
    files = setup["images"][:n]
    x = torch.from_numpy(runtime.preprocess(files))
    classes = [1, 2, -1][:n]
    region = box_region(n)
    assert_clear_argmax(setup["seg"].model, x)
    got = runtime.explain(files, classes, region=region, batch_size=2)
    assert_same(got, setup["seg"](x, SegmentationTarget(torch.tensor(classes), torch.from_numpy(region))), region)
    assert [e.overlay.shape for e in got] == [(h, w, 3) for h, w in IMAGE_SIZES[:n]]
    assert all(e.probability is None and e.target_kind == "segmentation" for e in got)
    assert got[0].summary()["region"] == "given" and "probability" not in got[0].summary()
    # region=None: the predicted region everywhere (fed as -1)
    predicted = runtime.explain(files, 2)
    assert_same(predicted, setup["seg"](x, SegmentationTarget(torch.full((n,), 2))))
    assert all(e.region is None and e.summary()["region"] == "predicted" for e in predicted)
    # run() directly, a bool (H, W) mask broadcast to every image
    mask = region[0] > 0
    out = runtime.run(x.numpy(), classes, region=mask)
    eager = setup["seg"](x, SegmentationTarget(torch.tensor(classes), torch.from_numpy(mask).float()))
    np.testing.assert_allclose(out.maps, eager.maps.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.scores, eager.scores.numpy(), rtol=1e-4, atol=1e-5)
    assert out.embedding is None


def test_segmentation_mask_files_are_resized_nearest(setup, runtimes):
    runtime = runtimes["seg"]
    files = setup["images"]
    x = torch.from_numpy(runtime.preprocess(files))
    assert_clear_argmax(setup["seg"].model, x)
    # the expected mask, independently: Pillow nearest resize of the 48x48 drawing to 32x32
    drawn = np.asarray(Image.open(setup["mask"]).resize((SIZE, SIZE), Image.NEAREST)) > 0
    assert 0 < drawn.mean() < 1
    np.testing.assert_array_equal(load_mask(setup["mask"], (SIZE, SIZE)), drawn)
    got = runtime.explain(files, "square", region=str(setup["mask"]))
    assert_same(got, setup["seg"](x, SegmentationTarget(torch.full((3,), 2), torch.from_numpy(drawn).float())))
    # one mask per image: a file, None (predicted), a PIL image
    mixed = runtime.explain(files, [1, 2, 3], region=[setup["mask"], None, Image.open(setup["mask"])])
    expected = np.stack([drawn, np.full_like(drawn, -1.0, dtype=np.float32), drawn]).astype(np.float32)
    assert_same(mixed, setup["seg"](x, SegmentationTarget(torch.tensor([1, 2, 3]), torch.from_numpy(expected))),
                expected)


@pytest.mark.parametrize("n", [1, 3])
def test_similarity_reference_array_and_reference_image_match_eager(setup, runtimes, n):
    runtime = runtimes["sim"]
    assert runtime.target_kind == "similarity" and runtime.reference_dim == D and runtime.measure == "cosine"
    files = setup["images"][:n]
    x = torch.from_numpy(runtime.preprocess(files))
    # the embedding of the reference image, by the graph == the eager model's
    embedded = runtime.embed(setup["reference"])
    r = torch.from_numpy(runtime.preprocess([setup["reference"]]))
    np.testing.assert_allclose(embedded, setup["emb"](r).detach().numpy(), rtol=1e-4, atol=1e-5)
    got = runtime.explain(files, reference=embedded)
    eager = setup["sim"](x, SimilarityTarget(torch.from_numpy(embedded)))
    assert_same(got, eager)
    for i, e in enumerate(got):
        cosine = F.cosine_similarity(setup["emb"](x[i:i + 1]), torch.from_numpy(embedded)).item()
        assert e.similarity == pytest.approx(cosine, rel=1e-5, abs=1e-6) and e.score == e.similarity
        assert e.summary() == {"image": f"img{i}", "target_kind": "similarity", "similarity": e.similarity}
        np.testing.assert_allclose(e.embedding, setup["emb"](x[i:i + 1])[0].detach().numpy(), rtol=1e-4, atol=1e-5)
    # one reference per image, (D,) for all, through run()
    per_image = np.random.default_rng(n).standard_normal((n, D)).astype(np.float32)
    assert_same(runtime.explain(files, reference=per_image),
                setup["sim"](x, SimilarityTarget(torch.from_numpy(per_image))))
    out = runtime.run(x.numpy(), reference=per_image[0])
    np.testing.assert_allclose(out.maps, setup["sim"](x, SimilarityTarget(torch.from_numpy(per_image[0]))).maps.numpy(),
                               rtol=0, atol=1e-4)
    assert out.embedding.shape == (n, D) and out.scores.shape == (n, 1)


def test_class_graphs_keep_working(setup, runtimes):
    """A graph whose metadata has no target (exported before targets existed) and a new class graph."""
    files = setup["images"]
    old, new = runtimes["old"], runtimes["cls"]
    assert "target" not in old.metadata and old.target_kind == "class" == new.target_kind
    a, b = old.explain(files, 1), new.explain(files, 1)
    for e, f in zip(a, b):
        np.testing.assert_array_equal(e.map, f.map)
        assert e.summary() == f.summary() and set(e.summary()) == {
            "image", "explained_class", "class_name", "score", "probability", "predicted_class"}
        assert 0 < e.probability < 1


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_bad_target_inputs_raise_clear_errors(setup, runtimes):
    seg, sim, old = runtimes["seg"], runtimes["sim"], runtimes["old"]
    x = seg.preprocess(setup["images"][:2])
    nan_region = np.zeros((SIZE, SIZE), np.float32)
    nan_region[0, 0] = np.nan
    mixed = np.zeros((SIZE, SIZE), np.float32)
    mixed[0, 0], mixed[1, 1] = -1, 1
    ones = np.ones(D, np.float32)
    cases = [
        (old, {"region": np.ones((SIZE, SIZE))}, "takes no region"),
        (sim, {"region": np.ones((SIZE, SIZE)), "reference": ones}, "takes no region"),
        (old, {"reference": ones}, "takes no reference"),
        (seg, {"reference": ones}, "takes no reference"),
        (sim, {}, "give reference="),
        (seg, {"region": np.ones((16, 16))}, f"at the graph's input size {SIZE}x{SIZE}"),
        (seg, {"region": np.ones((3, SIZE, SIZE))}, "with N = 2"),
        (seg, {"region": nan_region}, "NaN or infinite"),
        (seg, {"region": mixed}, "negative values"),
        (seg, {"region": np.zeros((SIZE, SIZE))}, "empty"),
        (seg, {"region": np.array(["a"] * SIZE)}, "array of numbers"),
        (sim, {"reference": np.ones(D + 1)}, f"embeds images in {D} dimensions"),
        (sim, {"reference": np.ones((3, D))}, "with N = 2"),
        (sim, {"reference": np.ones((2, 1, D))}, "reference must be an embedding"),
        (sim, {"reference": np.full(D, np.inf)}, "NaN or infinite"),
        (sim, {"reference": np.zeros(D)}, "all-zero"),
        (sim, {"reference": "ref.png"}, "runtime.embed"),
        (sim, {"target": 2, "reference": ones}, "takes no class target"),
    ]
    for runtime, kwargs, words in cases:
        with pytest.raises(InputError) as info:
            runtime.run(x, **kwargs)
        assert words in str(info.value), f"{kwargs}: {info.value}"
    with pytest.raises(InputError, match="returns no embedding"):
        seg.embed(setup["images"][:1])
    with pytest.raises(InputError, match="one region per image"):
        seg.explain(setup["images"][:2], region=[setup["mask"]])
    with pytest.raises(InputError, match="takes no region"):
        old.explain(setup["images"][:1], region=setup["mask"])
    with pytest.raises(InputError, match="embeds images in"):
        sim.explain(setup["images"][:1], reference=np.ones((1, D + 2)))


def test_load_mask_reads_masks_by_meaning(tmp_path):
    grey = np.array([[0, 1], [0, 255]], np.uint8)  # 0/1 and 0/255 masks alike
    assert load_mask(grey, (2, 2)).tolist() == [[0, 1], [0, 1]]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = [255, 255, 255, 0]  # white but fully transparent: outside
    rgba[1, 1] = [0, 255, 0, 255]
    assert load_mask(Image.fromarray(rgba), (2, 2)).tolist() == [[0, 0], [0, 1]]
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), mode="L").convert("P")
    assert load_mask(palette, (1, 2)).tolist() == [[0, 1]]
    sixteen = tmp_path / "m16.png"
    Image.fromarray(np.array([[0, 300]], np.uint16)).save(sixteen)
    assert load_mask(sixteen, (1, 4)).tolist() == [[0, 0, 1, 1]]
    with pytest.raises(InputError, match="NaN"):
        load_mask(np.array([[np.nan, 1.0]]), (1, 2))
    with pytest.raises(InputError, match="no such file"):
        load_mask(tmp_path / "missing.png", (1, 2))


# --------------------------------------------------------------------------------------------------
# pyattr run
# --------------------------------------------------------------------------------------------------


def cli(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = main([str(a) for a in argv], prog="pyattr run")
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    return code, lines, captured.err


def one_error(capsys, words: str, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:  # argparse errors exit, the others return 2
        raise SystemExit(main([str(a) for a in argv], prog="pyattr run"))
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("pyattr: error: "), captured.err
    assert words in captured.err, captured.err
    return captured.err


def test_cli_segmentation_region_file_folder_and_predicted(setup, runtimes, tmp_path, capsys):
    files = setup["images"]
    out = tmp_path / "seg"
    code, lines, err = cli(capsys, setup["paths"]["seg"], *files, "--region", setup["mask"], "--target", "square",
                           "--out", out, "--batch-size", "2", "--threads", "1")
    assert code == 0 and err == ""
    expected = runtimes["seg"].explain(files, "square", region=setup["mask"])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"img{i}_gradcam_{kind}.png" for i in range(3) for kind in ("overlay", "figure"))
    for line, e, (h, w) in zip(lines, expected, IMAGE_SIZES):
        assert line["target_kind"] == "segmentation" and line["region"] == "given"
        assert line["class_name"] == "square" and line["score"] == pytest.approx(e.score, rel=1e-5)
        np.testing.assert_array_equal(np.asarray(Image.open(line["overlay"])), e.overlay)
        # image | mask | heatmap | overlay, each 256 high at the image's aspect
        figure = np.asarray(Image.open(line["figure"]))
        pw = round(w * 256 / h)
        assert figure.shape == (256 + 38, 4 * pw + 5 * 8, 3)
        mask_panel = figure[30 + 20:30 + 256, 8 + pw + 8 + 2: 8 + 2 * pw + 8 - 2]
        assert set(np.unique(mask_panel)) <= {0, 255} and 0 < (mask_panel == 255).mean() < 1

    # a folder of masks, matched by file stem; a missing one is an error
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, f in enumerate(files):
        drawing = np.zeros((SIZE, SIZE), np.uint8)
        drawing[i * 8: i * 8 + 10, 4:20] = 1
        Image.fromarray(drawing).save(masks / f"{f.stem}.png")
    code, lines, _ = cli(capsys, setup["paths"]["seg"], *files, "--region", masks, "--out", tmp_path / "folder")
    regions = np.stack([load_mask(masks / f"{f.stem}.png", (SIZE, SIZE)) for f in files])
    expected = runtimes["seg"].explain(files, region=regions)
    assert code == 0 and [line["score"] for line in lines] == pytest.approx([e.score for e in expected], rel=1e-5)
    (masks / "img1.png").unlink()
    one_error(capsys, "no mask for the image img1.png", setup["paths"]["seg"], *files, "--region", masks,
              "--out", tmp_path / "missing")
    assert not (tmp_path / "missing").exists()

    # no --region: the predicted region, a figure of three panels
    code, lines, _ = cli(capsys, setup["paths"]["seg"], files[1], "--out", tmp_path / "pred")
    assert code == 0 and lines[0]["region"] == "predicted"
    assert np.asarray(Image.open(lines[0]["figure"])).shape[1] == 3 * round(60 * 256 / 40) + 4 * 8


def test_cli_similarity_reference_image_and_embedding(setup, runtimes, tmp_path, capsys):
    files, sim = setup["images"], runtimes["sim"]
    out = tmp_path / "sim"
    code, lines, err = cli(capsys, setup["paths"]["sim"], *files, "--reference", setup["reference"], "--out", out)
    assert code == 0 and err == ""
    embedded = sim.embed(setup["reference"])
    expected = sim.explain(files, reference=embedded)
    for line, e, (h, w) in zip(lines, expected, IMAGE_SIZES):
        assert line["target_kind"] == "similarity" and line["reference"] == str(setup["reference"])
        assert line["similarity"] == pytest.approx(e.similarity, rel=1e-5) and "class_name" not in line
        figure = np.asarray(Image.open(line["figure"]))  # image | reference (36x28) | heatmap | overlay
        assert figure.shape[1] == 3 * round(w * 256 / h) + round(28 * 256 / 36) + 5 * 8
    # the same reference as a .npy embedding: (D,), and one row per image
    npy = tmp_path / "ref.npy"
    np.save(npy, embedded[0])
    code, again, _ = cli(capsys, setup["paths"]["sim"], *files, "--reference-embedding", npy, "--out", tmp_path / "e",
                         "--save-maps")
    assert code == 0 and [line["similarity"] for line in again] == pytest.approx([e.similarity for e in expected],
                                                                                  rel=1e-5)
    for line, e in zip(again, expected):
        saved = np.load(line["maps"])
        np.testing.assert_allclose(saved["embedding"], e.embedding, rtol=1e-6)
        np.testing.assert_allclose(saved["map"], e.map, rtol=0, atol=1e-6)
    rows = np.random.default_rng(5).standard_normal((3, D))
    np.save(npy, rows)
    code, per_image, _ = cli(capsys, setup["paths"]["sim"], *files, "--reference-embedding", npy,
                             "--out", tmp_path / "rows")
    assert code == 0 and [line["similarity"] for line in per_image] == pytest.approx(
        [e.similarity for e in sim.explain(files, reference=rows)], rel=1e-5)


class _WritesMarker:
    """Unpickling this object creates a file: what a hostile .npy of object dtype can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cli_refuses_a_hostile_npy(setup, tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.npy"
    payload = np.empty(1, dtype=object)
    payload[0] = _WritesMarker(marker)
    np.save(hostile, payload, allow_pickle=True)
    out = tmp_path / "out"
    one_error(capsys, "object array", setup["paths"]["sim"], setup["images"][0], "--reference-embedding", hostile,
              "--out", out)
    assert not marker.exists() and not out.exists()
    # the file is hostile indeed: loading it with pickles allowed runs the payload
    np.load(hostile, allow_pickle=True)
    assert marker.exists()


def test_cli_errors_are_one_line_and_write_nothing(setup, tmp_path, capsys):
    seg, sim, old = (setup["paths"][k] for k in ("seg", "sim", "old"))
    image = setup["images"][0]
    out = tmp_path / "out"
    text = tmp_path / "text.npy"
    text.write_text("not numpy")
    npz = tmp_path / "two.npz"
    np.savez(npz, a=np.ones(D))
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones(D + 1, np.float32))
    truncated = tmp_path / "truncated.npy"
    np.save(truncated, np.ones(D, np.float32))
    truncated.write_bytes(truncated.read_bytes()[:-5])
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full(D, np.nan))
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(blank)
    cases = [
        ("--region does not apply", old, "--region", setup["mask"]),
        ("--region does not apply", sim, "--region", setup["mask"]),
        ("--reference does not apply", seg, "--reference", setup["reference"]),
        ("--reference-embedding does not apply", old, "--reference-embedding", wrong),
        ("give --reference IMAGE or --reference-embedding", sim),
        ("not allowed with argument", sim, "--region", setup["mask"], "--reference", setup["reference"]),
        ("not allowed with argument", sim, "--reference", setup["reference"], "--reference-embedding", wrong),
        ("--target does not apply", sim, "--reference", setup["reference"], "--target", "1"),
        ("no such file or folder", seg, "--region", tmp_path / "nope.png"),
        ("has no region pixels", seg, "--region", blank),
        ("is not a .npy file", sim, "--reference-embedding", text),
        ("not a readable .npy", sim, "--reference-embedding", truncated),
        (".npz archive", sim, "--reference-embedding", npz),
        (f"embeds images in {D} dimensions", sim, "--reference-embedding", wrong),
        ("NaN or infinite", sim, "--reference-embedding", nan),
        ("no such file", sim, "--reference", tmp_path / "nope.png"),
        ("is not an image", sim, "--reference", text),
    ]
    for words, model, *options in cases:
        one_error(capsys, words, model, image, *options, "--out", out)
        assert not out.exists(), words


def test_cli_failure_mid_run_leaves_no_partial_output(setup, tmp_path, capsys, monkeypatch):
    import pyattr.runtime.cli as runtime_cli

    calls = []
    real = runtime_cli._figure

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise InputError("the disk is full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime_cli, "_figure", failing)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    one_error(capsys, "simulated", setup["paths"]["sim"], *setup["images"], "--reference", setup["reference"],
              "--batch-size", "1", "--out", out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


# --------------------------------------------------------------------------------------------------
# Torch-free
# --------------------------------------------------------------------------------------------------



def test_targets_run_without_torch(setup, tmp_path):
    """The runtime (explain with a region, embed + explain with a reference) and the CLI with --region and
    --reference, in a process where importing torch fails; same numbers as in this process."""
    code = (
        """
        import json, sys
        import numpy as np
        from pyattr.runtime import AttributionRuntime
        from pyattr.runtime.cli import main

        seg, sim, mask, ref, out, *images = sys.argv[1:]
        a = AttributionRuntime(seg, num_threads=1).explain(images, 1, region=mask)
        s = AttributionRuntime(sim, num_threads=1)
        b = s.explain(images, reference=s.embed(ref))
        assert main([seg, *images, "--region", mask, "--out", out + "/seg", "--threads", "1"]) == 0
        assert main([sim, *images, "--reference", ref, "--out", out + "/sim", "--threads", "1"]) == 0
        print(json.dumps({"seg": [e.score for e in a], "sim": [e.similarity for e in b],
                          "torch": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))}))
        """
    )
    files = [str(f) for f in setup["images"]]
    result = run_without_torch(code, setup["paths"]["seg"], setup["paths"]["sim"], setup["mask"], setup["reference"],
                               tmp_path, *files)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    got = json.loads(lines[-1])
    assert got["torch"] == []
    seg = AttributionRuntime(setup["paths"]["seg"], num_threads=1)
    sim = AttributionRuntime(setup["paths"]["sim"], num_threads=1)
    assert got["seg"] == pytest.approx([e.score for e in seg.explain(files, 1, region=setup["mask"])], rel=1e-6)
    assert got["sim"] == pytest.approx([e.similarity for e in sim.explain(files, reference=sim.embed(
        setup["reference"]))], rel=1e-6)
    assert len(list((tmp_path / "seg").glob("*_figure.png"))) == 3 == len(list((tmp_path / "sim").glob("*_figure.png")))
