"""`pyattr explain --task detection` and `pyattr export --task detection` on the built-in detector."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import pyattr
from pyattr.cli import main
from pyattr.targets import DetectionTarget


def test_explain_detection_generated_samples(tmp_path, capsys):
    assert main(["explain", "--task", "detection", "--samples", "3", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]
    assert len(lines) == 3 and len(list(tmp_path.glob("*_gradcam_figure.png"))) == 3
    for line in lines:
        found = re.findall(r"#\d+ (\w+) ([\d.]+) \[", line)
        contains = re.search(r"\[contains: ([\w, ]+)\]", line).group(1).split(", ")
        assert found, line
        # the shipped detector (held-out mAP@0.5 1.0) finds exactly the shapes the sample holds
        assert sorted(name for name, _ in found) == sorted(contains), line
        assert all(float(score) > 0.3 for _, score in found) and "(no match)" not in line, line
    figure = Image.open(next(tmp_path.glob("sample_00_gradcam_figure.png")))
    boxes = len(re.findall(r"#\d+ ", lines[0]))
    assert figure.width > (1 + boxes) * 192  # detections | one overlay per box


def test_explain_detection_matches_the_python_api(tmp_path, capsys):
    """The figure's per-box overlay is the map pyattr's Python API gives for that box."""
    batch = pyattr.zoo.generate(1, seed=321)
    path = tmp_path / "in.png"
    Image.fromarray(batch.images[0]).save(path)
    assert main(["explain", str(path), "--task", "detection", "--max-boxes", "1", "--out", str(tmp_path / "o"),
                 "--alpha", "1"]) == 0
    printed = re.search(r"#1 (\w+) ([\d.]+) \[(\d+), (\d+), (\d+), (\d+)\]", capsys.readouterr().out)
    model = pyattr.zoo.load_builtin_detector()
    x = torch.from_numpy(batch.images[0]).permute(2, 0, 1)[None].float() / 255
    det = pyattr.zoo.detect(model, x)[0]
    assert pyattr.zoo.DET_CLASSES[int(det["labels"][0])] == printed.group(1)
    assert abs(float(det["scores"][0]) - float(printed.group(2))) < 0.006
    target = DetectionTarget(boxes=det["boxes"][:1], box_classes=det["labels"][:1],
                             decode=pyattr.zoo.decode_detections)
    result = pyattr.GradCAM(model, pyattr.zoo.DETMODEL_LAYER)(x, target)
    assert result.maps.shape == (1, 1, 64, 64) and bool(result.outputs["matched"].all())
    # the saved overlay at alpha 1 is the colorized map (boxes drawn 1 px wide on the border: compare inside)
    saved = np.asarray(Image.open(tmp_path / "o" / "in_gradcam_overlay.png"))
    expected = pyattr.render.colorize(result.maps[0, :1].numpy(), cmap="jet")[0]
    x1, y1, x2, y2 = (int(v) for v in printed.groups()[2:])
    rows, cols = np.mgrid[0:64, 0:64]
    near_x = (np.abs(cols - x1) <= 2) | (np.abs(cols - x2) <= 2)
    near_y = (np.abs(rows - y1) <= 2) | (np.abs(rows - y2) <= 2)
    in_x = (cols >= x1 - 2) & (cols <= x2 + 2)
    in_y = (rows >= y1 - 2) & (rows <= y2 + 2)
    inside = ~((near_x & in_y) | (near_y & in_x))  # away from the drawn outline
    assert np.abs(saved[inside].astype(int) - expected[inside].astype(int)).max() <= 1


@pytest.mark.parametrize("argv, message", [
    (["explain", "--max-boxes", "3"], "options of --task detection"),
    (["explain", "--score-threshold", "0.5", "--task", "segmentation"], "options of --task detection"),
    (["explain", "--task", "detection", "--model", "torchvision:resnet18"], "built-in detector"),
    (["explain", "--task", "detection", "--max-boxes", "0"], "--max-boxes"),
    (["explain", "--task", "detection", "--score-threshold", "2"], "--score-threshold"),
    (["explain", "--task", "detection", "--method", "cam"], "CAM"),
])
def test_detection_option_errors(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyattr: error:") and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_explain_detection_no_detection(tmp_path, capsys):
    """A blank image: no box above the threshold -> a figure that says so, no map, no error."""
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path)
    assert main(["explain", str(path), "--task", "detection", "--out", str(tmp_path / "o")]) == 0
    assert "no detection above the score threshold" in capsys.readouterr().out
    assert (tmp_path / "o" / "blank_gradcam_figure.png").is_file()


def test_export_detection_runs_in_onnxruntime(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "det.onnx"
    assert main(["export", str(path), "--task", "detection", "--max-boxes", "3"]) == 0
    meta = pyattr.runtime.metadata.read_metadata(str(path)) if hasattr(pyattr, "runtime") else None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["images", "boxes", "box_classes"], names
    batch = pyattr.zoo.generate(2, seed=77)
    x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255
    model = pyattr.zoo.load_builtin_detector()
    dets = pyattr.zoo.detect(model, x)
    boxes = torch.zeros(2, 3, 4)
    labels = torch.full((2, 3), -1, dtype=torch.long)
    for j, d in enumerate(dets):
        k = min(3, len(d["labels"]))
        boxes[j, :k], labels[j, :k] = d["boxes"][:k], d["labels"][:k]
    outs = dict(zip([o.name for o in session.get_outputs()],
                    session.run(None, {"images": x.numpy(), "boxes": boxes.numpy(), "box_classes": labels.numpy()})))
    eager = pyattr.GradCAM(model, pyattr.zoo.DETMODEL_LAYER)(
        x, DetectionTarget(boxes=boxes, box_classes=labels, decode=pyattr.zoo.decode_detections))
    assert outs["maps"].shape == (2, 3, 64, 64)
    np.testing.assert_allclose(outs["maps"], eager.maps.numpy(), atol=1e-4)
    np.testing.assert_array_equal(outs["matched"], eager.outputs["matched"].numpy())
    assert meta is None or meta["target"]["kind"] == "detection"
