"""`pyattr explain --task segmentation|similarity` and `pyattr export --task ...` on the built-in models."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import pyattr
from pyattr.cli import main
from pyattr.targets import SegmentationTarget, SimilarityTarget


@pytest.fixture(scope="module")
def shapes_files(tmp_path_factory):
    """Two generated query images (2-3 shapes each), the reference of the first pair, and a mask file."""
    folder = tmp_path_factory.mktemp("task_images")
    pairs = pyattr.zoo.generate_similarity(2, seed=123)
    paths = []
    for i in range(2):
        path = folder / f"query{i}.png"
        Image.fromarray(pairs.queries[i]).save(path)
        paths.append(str(path))
    reference = folder / "reference.png"
    Image.fromarray(pairs.references[0]).save(reference)
    mask = folder / "mask.png"
    Image.fromarray(pairs.shared_masks[0].astype(np.uint8) * 255).save(mask)
    return paths, str(reference), str(mask), pairs


def to_input(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def test_explain_segmentation_generated_samples(tmp_path, capsys):
    assert main(["explain", "--task", "segmentation", "--samples", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert len(list(tmp_path.glob("*_gradcam_figure.png"))) == 3
    lines = out.splitlines()[:-1]
    assert len(lines) == 3
    # each sample explains the shape with the most predicted pixels, over those pixels
    for line in lines:
        explained = re.search(r"why (\w+) over its (\d+) predicted pixels", line)
        assert explained and explained.group(1) in pyattr.zoo.SHAPE_CLASSES, line
        contains = re.search(r"\[contains: ([\w, ]+)\]", line).group(1).split(", ")
        assert explained.group(1) in contains, line
    figure = Image.open(next(tmp_path.glob("*_figure.png")))
    assert figure.width > 4 * 256  # image | mask | heatmap | overlay


def test_explain_segmentation_matches_the_python_api(tmp_path, shapes_files, capsys):
    paths, _, mask, pairs = shapes_files
    k = int(pairs.shared_classes[0]) + 1  # segmenter classes: background, then the shapes
    assert main(["explain", paths[0], "--task", "segmentation", "--region", mask, "--target", str(k),
                 "--out", str(tmp_path)]) == 0
    printed = float(re.search(r"score (-?[\d.]+)\)", capsys.readouterr().out).group(1))
    model = pyattr.zoo.load_builtin_segmenter()
    region = torch.from_numpy(pairs.shared_masks[0]).float()
    result = pyattr.GradCAM(model, pyattr.zoo.SHAPESSEG_LAYER)(to_input(pairs.queries[0]),
                                                               SegmentationTarget(k, region))
    assert abs(printed - float(result.scores[0, k])) < 0.06
    overlay = np.asarray(Image.open(tmp_path / "query0_gradcam_overlay.png"))
    assert overlay.shape == (64, 64, 3)


def test_explain_similarity_with_a_reference(tmp_path, shapes_files, capsys):
    paths, reference, _, pairs = shapes_files
    assert main(["explain", *paths, "--task", "similarity", "--reference", reference, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    cosines = [float(v) for v in re.findall(r"cosine (-?[\d.]+)\)", out)]
    embed = pyattr.zoo.load_builtin_embedding()
    with torch.no_grad():
        ref = embed(to_input(pairs.references[0]))
        want = [float(torch.nn.functional.cosine_similarity(embed(to_input(q)), ref)) for q in pairs.queries]
    assert np.allclose(cosines, want, atol=6e-4), (cosines, want)
    assert len(list(tmp_path.glob("*_figure.png"))) == 2


def test_explain_similarity_generated_pairs(tmp_path, capsys):
    assert main(["explain", "--task", "similarity", "--samples", "2", "--method", "saliency",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("[shared: ") == 2 and "why similar to reference_00" in out


@pytest.mark.parametrize("argv, words", [
    (["--task", "similarity", "IMG"], "--reference IMAGE"),
    (["--task", "segmentation", "--reference", "IMG", "IMG"], "--reference is an option of --task similarity"),
    (["--region", "MASK", "IMG"], "--region is an option of --task segmentation"),
    (["--task", "segmentation", "--method", "cam"], "CAM"),
    (["--task", "similarity", "--target", "1"], "--target has no meaning"),
    (["--task", "segmentation", "--target", "7"], "out of range"),
])
def test_task_errors_are_one_line(tmp_path, shapes_files, capsys, argv, words):
    paths, _, mask, _ = shapes_files
    argv = [paths[0] if a == "IMG" else mask if a == "MASK" else a for a in argv]
    assert main(["explain", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyattr: error:") and words in err[0], err
    assert not (tmp_path / "o").exists()


def test_export_tasks(tmp_path, capsys):
    seg, sim = tmp_path / "seg.onnx", tmp_path / "sim.onnx"
    assert main(["export", str(seg), "--task", "segmentation"]) == 0
    assert main(["export", str(sim), "--task", "similarity", "--method", "saliency"]) == 0
    assert pyattr.read_metadata(seg)["inputs"] == ["images", "target", "region"]
    meta = pyattr.read_metadata(sim)
    assert meta["inputs"][-1] == "reference" and meta["outputs"][-1] == "embedding"
    assert meta["class_names"] is None
    assert pyattr.read_metadata(seg)["class_names"] == ["background", *pyattr.zoo.SHAPE_CLASSES]
    # a classifier cannot be explained as a segmenter
    assert main(["export", str(tmp_path / "bad.onnx"), "--task", "segmentation", "--model", "torchvision:resnet18",
                 "--size", "32"]) == 2
    assert "segmentation model" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()
    # the embedding the graph returns is the model's
    import onnxruntime as ort

    x = torch.rand(2, 3, 64, 64)
    out = ort.InferenceSession(str(sim)).run(None, {"images": x.numpy(), "target": np.zeros(2, np.int64),
                                                     "reference": np.ones((2, 128), np.float32)})
    with torch.no_grad():
        want = pyattr.zoo.load_builtin_embedding()(x)
    np.testing.assert_allclose(out[-1], want.numpy(), rtol=1e-4, atol=1e-5)
    eager = pyattr.Saliency(pyattr.zoo.load_builtin_embedding())(x, SimilarityTarget(torch.ones(128)))
    np.testing.assert_allclose(out[0], eager.scores.numpy(), rtol=1e-4, atol=1e-6)
