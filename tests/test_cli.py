"""The pyattr command: the main job, export, and clear errors that leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pyattr.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyattr", *args], capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture()
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(64, 64), (90, 120)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_explain_generated_samples(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["explain", "--samples", "3", "--out", str(out)]) == 0
    figures = sorted(out.glob("*_figure.png"))
    overlays = sorted(out.glob("*_overlay.png"))
    assert len(figures) == 3 and len(overlays) == 3
    assert Image.open(overlays[0]).size == (64, 64)
    fig = Image.open(figures[0])
    assert fig.size[0] > 3 * 256 and fig.size[1] > 256
    text = capsys.readouterr().out
    assert "sample_00: gradcam: explains" in text and "[contains:" in text


def test_explain_files_keep_their_size_and_target(tmp_path, image_files, capsys):
    out = tmp_path / "out"
    assert main(["explain", *image_files, "--method", "saliency", "--target", "2", "--out", str(out)]) == 0
    over = np.asarray(Image.open(out / "img1_saliency_overlay.png"))
    assert over.shape == (90, 120, 3)
    assert "explains triangle" in capsys.readouterr().out  # class 2 of the built-in model


def test_overlay_matches_api(tmp_path, image_files):
    """The overlay PNG is exactly render.overlay of the API's map on the image."""
    import torch

    import pyattr
    from pyattr import render

    out = tmp_path / "out"
    assert main(["explain", image_files[0], "--out", str(out), "--quiet"]) == 0
    image = np.asarray(Image.open(image_files[0]).convert("RGB"))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    maps = pyattr.GradCAM(pyattr.zoo.load_builtin(), "layer3")(x).maps.numpy()
    expected = render.overlay(maps, image[None], alpha=0.5, cmap="jet")[0]
    got = np.asarray(Image.open(out / "img0_gradcam_overlay.png"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_lrp_overlay_is_signed_relevance_on_a_diverging_colormap(tmp_path, image_files):
    """LRP's relevance is signed: 0 sits at the white middle of seismic, +-max|R| at its ends."""
    import torch

    import pyattr
    from pyattr import render

    out = tmp_path / "out"
    assert main(["explain", image_files[0], "--method", "lrp_epsilon_plus", "--out", str(out), "--quiet"]) == 0
    image = np.asarray(Image.open(image_files[0]).convert("RGB"))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    raw = pyattr.LRP(pyattr.zoo.load_builtin(), "epsilon_plus")(x).raw
    assert float(raw.min()) < 0 < float(raw.max())
    unit = (0.5 + 0.5 * raw / raw.abs().amax()).numpy()
    expected = render.overlay(unit, image[None], alpha=0.5, cmap="seismic")[0]
    got = np.asarray(Image.open(out / "img0_lrp_epsilon_plus_overlay.png"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "missing.png"], "no such file: missing.png"),
        (["explain", "{bad}"], "is not an image"),
        (["explain", "{img}", "--method", "gradcam", "--layer", "layer9"], "no layer named 'layer9'. Close names: layer"),
        (["explain", "{img}", "--target", "6"], "out of range: the model has 6 classes"),
        (["explain", "{img}", "--model", "torchvision:resnet18:{weights}"], "do not fit the model"),
        (["explain", "{img}", "--model", "torchvision:resnet19"], "Did you mean"),
        (["explain", "{img}", "--model", "nothing.pt"], "unknown model 'nothing.pt'"),
        (["explain", "{img}", "--cmap", "rainbow"], "unknown colormap 'rainbow'"),
        (["export", "{out}/graph.txt"], "name the output .onnx, .pt or .pt2"),
    ],
)
def test_bad_input_one_line_no_output(tmp_path, image_files, args, message):
    import torch

    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    weights = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, weights)
    out = tmp_path / "out"
    out.mkdir()
    filled = [a.format(img=image_files[0], bad=bad, weights=weights, out=out) for a in args]
    if filled[0] == "explain":
        filled += ["--out", str(out)]
    proc = run_cli(*filled)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pyattr: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []


def test_unknown_method_is_rejected():
    proc = run_cli("explain", "--method", "lime")
    assert proc.returncode == 2 and "invalid choice: 'lime'" in proc.stderr


def test_export_command_writes_metadata(tmp_path):
    import onnx

    path = tmp_path / "gradcam.onnx"
    assert main(["export", str(path), "--method", "gradcam"]) == 0
    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["pyattr"])
    assert meta["method"] == "gradcam" and meta["layer"] == "layer3"
    assert meta["class_names"][:2] == ["circle", "square"]
    assert meta["preprocessing"]["size"] == [64, 64]
    assert [p.name for p in tmp_path.iterdir()] == ["gradcam.onnx"]


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "explain" in proc.stdout and "export" in proc.stdout
