"""Graphs that explain T targets of every image in one run (``pyattr.export(..., targets_per_input=T)``).

The graph's ``target`` input is (N, T); its ``explained_class`` (N, T) and ``maps`` / ``raw`` (N, T, ...) equal the
eager call with the same (N, T) target, for a method that computes the T targets from one forward pass (Grad-CAM)
and one that repeats the batch (LRP), in onnxruntime (both) and TorchScript (Grad-CAM; .pt2 shares the ONNX
export's capture; ``python benchmarks/many_targets.py`` checks Saliency and the other formats); the torch-free runtime and ``pyattr run`` give one explanation per (image, target).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from contract import FORMATS, run_exported
from PIL import Image

import pyattr
from pyattr.errors import InputError
from pyattr.runtime import AttributionRuntime
from pyattr.zoo import SHAPE_CLASSES, ShapesNet

T = 3
TARGETS = torch.tensor([[0, -1, 2], [1, 1, 5], [-1, 4, 0]])  # -1: the arg-max; a class twice in a row


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ShapesNet().eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def check(fmt, path, method, x, t):
    ref = method(x, t)
    scores, explained, raw, maps = run_exported(fmt, path, x, t)[:4]
    assert explained.shape == t.shape and torch.equal(explained.long(), ref.target)
    assert maps.shape == (len(x), T, 64, 64) == ref.maps.shape
    assert float((scores - ref.scores).abs().max() / ref.scores.abs().max()) < 1e-5
    assert float((maps - ref.maps).abs().max()) < 1e-4
    assert float((raw - ref.raw).abs().max() / ref.raw.abs().max()) < 1e-3
    return ref


@pytest.mark.parametrize("name", ["gradcam", "lrp"])
def test_onnx_graph_equals_eager(model, images, tmp_path, name):
    method = pyattr.GradCAM(model, "layer3") if name == "gradcam" else pyattr.METHODS[name](model)
    path = tmp_path / f"{name}.onnx"
    pyattr.export(method, images[:1], path, targets_per_input=T)
    assert pyattr.read_metadata(path)["targets_per_input"] == T
    for b in (1, 3):
        ref = check("onnx", path, method, images[:b], TARGETS[:b])
    # each column is that target's own map: column j equals a one-target call for TARGETS[:, j]
    for j in range(T):
        single = method(images, TARGETS[:, j])
        np.testing.assert_allclose(ref.maps[:, j].numpy(), single.maps.numpy(), atol=1e-5)


def test_torchscript_equals_eager(model, images, tmp_path):
    fmt = "torchscript"
    method = pyattr.GradCAM(model, "layer3")
    path = tmp_path / f"gradcam{FORMATS[fmt]}"
    pyattr.export(method, images[:1], path, targets_per_input=T)
    for b in (1, 3):
        check(fmt, path, method, images[:b], TARGETS[:b])


def test_runtime_and_cli(model, images, tmp_path, capsys):
    method = pyattr.GradCAM(model, "layer3")
    path = tmp_path / "g.onnx"
    preprocessing = {"color": "RGB", "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3, "size": [64, 64],
                     "resize": "bilinear", "layout": "NCHW"}
    pyattr.export(method, images[:1], path, targets_per_input=T, class_names=SHAPE_CLASSES, preprocessing=preprocessing)
    runtime = AttributionRuntime(path)
    assert runtime.targets_per_input == T
    out = runtime.run(images.numpy(), target=TARGETS.numpy())
    ref = method(images, TARGETS)
    np.testing.assert_allclose(out.maps, ref.maps.numpy(), atol=1e-4)
    # T ids (or names) for every image
    same = runtime.run(images.numpy(), target=["circle", 4, "ring"])
    assert same.explained_class.tolist() == [[0, 4, 5]] * 3
    with pytest.raises(InputError, match=r"explains 3 targets per image: give 3 class ids"):
        runtime.run(images.numpy(), target=[1, 2])
    with pytest.raises(InputError, match=r"explains 3 targets per image"):
        runtime.run(images.numpy(), target=2)
    with pytest.raises(InputError, match="target 6 is out of range"):
        runtime.run(images.numpy(), target=[0, 1, 6])

    files = []
    for i in range(2):
        rgb = (np.random.default_rng(i).random((48 + 16 * i, 64, 3)) * 255).astype(np.uint8)
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(rgb).save(files[-1])
    explained = runtime.explain(files, target=[2, 0, 1], names=["a", "b"])
    assert [(e.name, e.explained_class) for e in explained] == [
        ("a_t0", 2), ("a_t1", 0), ("a_t2", 1), ("b_t0", 2), ("b_t1", 0), ("b_t2", 1)]
    assert [e.overlay.shape[:2] for e in explained] == [(48, 64)] * 3 + [(64, 64)] * 3

    from pyattr.cli import main

    assert main(["run", str(path), *map(str, files), "--target", "triangle,0,1", "--out", str(tmp_path / "o")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["image"], line["class_name"]) for line in lines] == [
        ("img0_t0", "triangle"), ("img0_t1", "circle"), ("img0_t2", "square"),
        ("img1_t0", "triangle"), ("img1_t1", "circle"), ("img1_t2", "square")]
    assert all((tmp_path / "o" / f"img{i}_t{j}_gradcam_overlay.png").is_file() for i in range(2) for j in range(T))
    assert main(["run", str(path), str(files[0]), "--target", "0,1", "--out", str(tmp_path / "o2")]) == 2
    assert "explains 3 targets per image; give 3 comma-separated class ids" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()

    from pyattr.runtime.batch import (
        run_batch,  # one row per image: a T-target graph is refused before any work
    )

    with pytest.raises(InputError, match="explains 3 targets per image; the batch pipeline writes one row per image"):
        run_batch(path, files, tmp_path / "batch")
    assert not (tmp_path / "batch").exists()


@pytest.mark.parametrize("value", [0, -1, 1025, 2.0, True, "3"])
def test_bad_targets_per_input(model, images, tmp_path, value):
    with pytest.raises(InputError, match="targets_per_input must be an int from 1 to 1024"):
        pyattr.export(pyattr.Saliency(model), images[:1], tmp_path / "s.onnx", targets_per_input=value)
    assert not list(tmp_path.iterdir())
