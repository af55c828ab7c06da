"""pyattr.runtime: an exported .onnx graph run without torch gives the eager method's results.

The graph is exported once per module (Grad-CAM on a seeded, untrained ShapesNet: the runtime's
job does not depend on the weights). The torch-free checks run in subprocesses where a
``sys.meta_path`` finder makes ``import torch`` raise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchfree import run_without_torch

import pyattr
from pyattr import render
from pyattr.errors import InputError
from pyattr.runtime import AttributionRuntime, default_providers
from pyattr.zoo import SHAPE_CLASSES, ShapesNet

PREPROCESSING = {"color": "RGB", "scale": 1 / 255, "mean": [0.45, 0.5, 0.55], "std": [0.25, 0.2, 0.3],
                 "size": [64, 64], "resize": "bilinear", "layout": "NCHW"}
SIZES = [(64, 64), (90, 120), (50, 40), (64, 64), (200, 150)]  # (H, W) of the test images



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(0)
    model = ShapesNet().eval()
    method = pyattr.GradCAM(model, "layer3")
    path = root / "gradcam.onnx"
    pyattr.export(method, torch.rand(1, 3, 64, 64), path, class_names=SHAPE_CLASSES, preprocessing=PREPROCESSING)
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate(SIZES):
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        array[h // 4: h // 2, w // 4: w // 2] = [255, 40, 40]  # a flat patch, something to look at
        file = root / f"img{i}.png"
        Image.fromarray(array).save(file)
        images.append(file)
    return {"root": root, "path": path, "method": method, "images": images}


def preprocess_reference(file: Path) -> np.ndarray:
    """What `pyattr explain` does: Pillow bilinear resize to 64x64, / 255, (x - mean) / std."""
    rgb = np.array(Image.open(file).convert("RGB").resize((64, 64), Image.BILINEAR))
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    mean = torch.tensor(PREPROCESSING["mean"])[:, None, None]
    std = torch.tensor(PREPROCESSING["std"])[:, None, None]
    return ((x - mean) / std).numpy()


def test_runtime_without_torch_matches_eager(setup, tmp_path):
    out = tmp_path / "out.npz"
    code = """
    import sys
    import numpy as np
    from pyattr.runtime import AttributionRuntime

    runtime = AttributionRuntime(sys.argv[1])
    explained = runtime.explain(sys.argv[3:], batch_size=2)
    arrays = {"x": runtime.preprocess(sys.argv[3:]), "providers": np.array(runtime.providers)}
    for i, e in enumerate(explained):
        arrays[f"map{i}"], arrays[f"raw{i}"], arrays[f"scores{i}"] = e.map, e.raw, e.scores
        arrays[f"overlay{i}"], arrays[f"class{i}"] = e.overlay, np.array(e.explained_class)
    np.savez(sys.argv[2], **arrays)
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")))
    print(runtime)
    """
    result = run_without_torch(code, str(setup["path"]), str(out), *map(str, setup["images"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "[]"  # torch was never imported
    assert "CUDA" not in result.stderr and "rror" not in result.stderr, result.stderr  # no provider noise
    got = np.load(out)
    assert got["providers"].tolist() == ["CPUExecutionProvider"]

    # preprocessing: the same numbers as pyattr explain's
    x = np.stack([preprocess_reference(f) for f in setup["images"]])
    np.testing.assert_allclose(got["x"], x, rtol=0, atol=1e-5)

    # the graph in onnxruntime vs the eager method on the same input
    eager = setup["method"](torch.from_numpy(x))
    for i, (h, w) in enumerate(SIZES):
        assert int(got[f"class{i}"]) == int(eager.target[i])
        np.testing.assert_allclose(got[f"scores{i}"], eager.scores[i].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[f"raw{i}"], eager.raw[i].numpy(), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(got[f"map{i}"], eager.maps[i].numpy(), rtol=0, atol=1e-4)
        # overlays at the image's own size, from the eager map drawn the same way
        image = np.asarray(Image.open(setup["images"][i]).convert("RGB"))
        expected = render.heatmap_overlay(eager.maps[i].numpy(), image, 0.5, "jet", value_range=(0, 1))
        overlay = got[f"overlay{i}"]
        assert overlay.shape == (h, w, 3) and overlay.dtype == np.uint8
        diff = np.abs(overlay.astype(int) - expected)
        assert np.mean(diff > 0) < 0.002 and diff.max() <= 8, (np.mean(diff > 0), diff.max())  # LUT-step flips only


def test_cli_entry_point_without_torch(setup, tmp_path):
    code = """
    import runpy, sys
    sys.argv = ["pyattr.runtime", *sys.argv[1:]]
    runpy.run_module("pyattr.runtime", run_name="__main__")
    """
    out = tmp_path / "overlays"
    files = [str(f) for f in setup["images"][:3]]
    result = run_without_torch(code, str(setup["path"]), *files, "--out", str(out), "--save-maps", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == ["img0", "img1", "img2"]
    runtime = AttributionRuntime(setup["path"])
    for line, explained in zip(lines, runtime.explain(files, batch_size=2)):  # the CLI's batches
        assert line["explained_class"] == explained.explained_class
        assert line["class_name"] == SHAPE_CLASSES[explained.explained_class]
        assert line["predicted_class"] == explained.predicted_class
        png = np.asarray(Image.open(line["overlay"]))
        np.testing.assert_array_equal(png, explained.overlay)
        saved = np.load(line["maps"])
        np.testing.assert_array_equal(saved["map"], explained.map)
        np.testing.assert_array_equal(saved["raw"], explained.raw)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"img{i}_gradcam_{kind}" for i in range(3) for kind in ("overlay.png", "maps.npz")
    )


def test_pyattr_run_subcommand(setup, tmp_path, capsys):
    from pyattr.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    for f in setup["images"][:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "notes.txt").write_text("not an image")  # folders: image files only
    assert main(["run", str(setup["path"]), str(folder), "--out", str(tmp_path / "o"), "--target", "star"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["image"], line["class_name"]) for line in lines] == [("img0", "star"), ("img1", "star")]

    assert main(["run", str(setup["path"]), str(tmp_path / "missing.png")]) == 2
    assert "pyattr: error: no such file" in capsys.readouterr().err
    assert main(["run", str(setup["images"][0]), str(setup["images"][0])]) == 2
    assert "the runtime runs ONNX graphs (.onnx)" in capsys.readouterr().err
    assert main(["run", str(setup["path"]), str(setup["images"][0]), "--target", "dog"]) == 2
    assert "unknown class name 'dog'; the graph has 6 classes, e.g. 'circle', 'square'" in capsys.readouterr().err
    assert main(["run", str(setup["path"]), str(setup["images"][0]), "--cmap", "nope"]) == 2
    assert "unknown colormap 'nope'" in capsys.readouterr().err


def test_targets_and_batches(setup):
    runtime = AttributionRuntime(setup["path"])
    x = runtime.preprocess(setup["images"])
    whole = runtime.run(x)
    # dynamic batch: each image's outputs do not depend on its batch
    for start, stop in [(0, 1), (1, 4), (2, 5)]:
        part = runtime.run(x[start:stop])
        np.testing.assert_allclose(part.maps, whole.maps[start:stop], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(part.explained_class, whole.explained_class[start:stop])
    assert runtime.run(x, target=3).explained_class.tolist() == [3] * 5
    assert runtime.run(x, target="ring").explained_class.tolist() == [5] * 5
    assert runtime.run(x, target=[0, 1, -1, 2, 4]).explained_class.tolist()[:2] == [0, 1]
    explained = runtime.explain(setup["images"][:2], target=[2, "cross"], names=["a", "b"])
    assert [(e.name, e.class_name) for e in explained] == [("a", "triangle"), ("b", "cross")]
    with pytest.raises(InputError, match=r"target 6 is out of range: the model has 6 classes"):
        runtime.run(x, target=6)
    with pytest.raises(InputError, match="give one target per image: 2 targets for 5 images"):
        runtime.run(x, target=[1, 2])
    with pytest.raises(InputError, match=r"the graph takes images of shape \(N, 3, 64, 64\)"):
        runtime.run(x[:, :, :32])


def test_overlay_sources(setup):
    runtime = AttributionRuntime(setup["path"])
    files = setup["images"][1:3]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    out = runtime.run(runtime.preprocess(files))
    from_maps = runtime.explain(files, cmap="viridis", alpha=0.3)
    from_raw = runtime.explain(files, source="raw", cmap="bwr", sign="centered", outlier_perc=1.0)
    for i, image in enumerate(images):
        resized = np.clip(render.resize(out.maps[i], image.shape[:2]), 0, 1)
        np.testing.assert_array_equal(from_maps[i].overlay, render.overlay(resized, image, 0.3, "viridis"))
        np.testing.assert_array_equal(
            from_raw[i].overlay,
            # signed (centred) raw maps: opacity ~ |value|, the photo unchanged where the map is zero
            render.heatmap_overlay_signed(out.raw[i], image, 0.5, "bwr", outlier_perc=1.0),
        )
    with pytest.raises(InputError, match="source must be 'maps' or 'raw'"):
        runtime.explain(files, source="grad")


def test_providers_and_bad_files(setup, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    assert default_providers() == ["CPUExecutionProvider"]  # this machine has no NVIDIA driver
    runtime = AttributionRuntime(setup["path"], providers=["CPUExecutionProvider"], num_threads=1)
    assert runtime.providers == ["CPUExecutionProvider"] and runtime.input_size == (64, 64)
    assert runtime.metadata["method"] == "gradcam" and runtime.metadata["layer"] == "layer3"
    assert "method='gradcam', layer='layer3'" in repr(runtime)

    with pytest.raises(InputError, match="no such model file"):
        AttributionRuntime(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    with pytest.raises(InputError, match="onnxruntime cannot load broken.onnx"):
        AttributionRuntime(broken)
    # a valid ONNX model that pyattr did not write
    node = helper.make_node("Identity", ["images"], ["maps"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("maps", TensorProto.FLOAT, [1, 3])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), foreign)
    with pytest.raises(InputError, match="foreign.onnx holds no pyattr metadata"):
        AttributionRuntime(foreign)
    entry = onnx.load(foreign)
    entry.metadata_props.add(key="pyattr", value=json.dumps({"method": "x"}))
    onnx.save(entry, foreign)
    with pytest.raises(InputError, match="foreign.onnx is not a pyattr attribution graph"):
        AttributionRuntime(foreign)
    with pytest.raises(InputError, match="image arrays must be uint8 RGB"):
        runtime.explain([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(InputError, match="not an image that Pillow can read"):
        runtime.explain([broken])


def test_missing_preprocessing_warns(setup, tmp_path):
    import onnx

    model = onnx.load(setup["path"])
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "pyattr"))
    meta["preprocessing"] = {}
    del model.metadata_props[:]
    model.metadata_props.add(key="pyattr", value=json.dumps(meta))
    path = tmp_path / "bare.onnx"
    onnx.save(model, path)
    with pytest.warns(UserWarning, match="holds no preprocessing: images are scaled to"):
        runtime = AttributionRuntime(path)
    assert runtime.preprocessing["mean"] == [0.0] * 3 and runtime.input_size == (64, 64)
    x = runtime.preprocess([setup["images"][0]])
    rgb = np.asarray(Image.open(setup["images"][0]).convert("RGB"))
    np.testing.assert_allclose(x[0], rgb.transpose(2, 0, 1) / 255, rtol=0, atol=1e-6)


def test_lrp_graphs_are_drawn_signed_by_default(setup, tmp_path, capsys):
    """An exported LRP graph's relevance is drawn from the raw map, centred on bwr with opacity ~ |value| (as
    `pyattr explain` does, the photo unchanged where the relevance is zero); other graphs keep the normalized
    maps on jet."""
    from pyattr.cli import main

    torch.manual_seed(0)
    path = tmp_path / "lrp.onnx"
    pyattr.export(pyattr.LRP(ShapesNet().eval(), "epsilon_plus"), torch.rand(1, 3, 64, 64), path,
                  class_names=SHAPE_CLASSES, preprocessing=PREPROCESSING)
    file = setup["images"][1]
    assert main(["run", str(path), str(file), "--out", str(tmp_path / "o"), "--alpha", "0.6"]) == 0
    capsys.readouterr()
    runtime = AttributionRuntime(path)
    raw = runtime.run(runtime.preprocess([file])).raw[0]
    assert raw.min() < 0 < raw.max()
    image = np.asarray(Image.open(file).convert("RGB"))
    expected = render.heatmap_overlay_signed(raw, image, 0.6, "bwr")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / f"{file.stem}_{runtime.method}_overlay.png")),
                                  expected)
