"""The pyattr command: the main job, export, and clear errors that leave nothing behind."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import pyattr
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


@pytest.mark.parametrize(("name", "build"), [
    ("lrp_epsilon_plus", lambda m: __import__("pyattr").LRP(m, "epsilon_plus")),
    ("integratedgradients", lambda m: __import__("pyattr").IntegratedGradients(m, chunk_size=16)),
    ("inputxgradient", lambda m: __import__("pyattr").InputXGradient(m)),
])
def test_signed_overlay_is_centred_and_keeps_the_photo(tmp_path, image_files, name, build):
    """Signed methods: 0 at the white middle of bwr, +-max|A| at its ends, opacity |A| / max|A|; where the
    attribution is 0 the photo is unchanged (the old min-max + jet put 0 mid-scale, green/cyan)."""
    import torch

    import pyattr
    from pyattr import render

    out = tmp_path / "out"
    assert main(["explain", image_files[0], "--method", name, "--out", str(out), "--quiet"]) == 0
    image = np.asarray(Image.open(image_files[0]).convert("RGB"))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    raw = build(pyattr.zoo.load_builtin())(x).raw
    assert float(raw.min()) < 0 < float(raw.max())
    unit = (0.5 + 0.5 * raw / raw.abs().amax()).numpy()
    expected = render.overlay_signed(unit, image[None], alpha=1.0, cmap="bwr")[0]
    got = np.asarray(Image.open(out / f"img0_{name}_overlay.png"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    zero = np.abs(raw[0].numpy()) < 1e-3 * float(raw.abs().max())
    assert zero.sum() > 0
    assert np.abs(got[zero].astype(int) - image[zero].astype(int)).max() <= 2
    strongest = np.unravel_index(int(raw[0].abs().argmax()), raw.shape[1:])
    color = got[strongest].astype(int)
    assert (color[0] > 200 and color[1] < 60) if raw[0][strongest] > 0 else (color[2] > 200 and color[1] < 60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "missing.png"], "no such file: missing.png"),
        (["explain", "{bad}"], "is not an image"),
        (["explain", "{img}", "--method", "gradcam", "--layer", "layer9"], "no layer named 'layer9'. Close names: layer"),
        (["explain", "{img}", "--target", "6"], "out of range: the model has 6 classes"),
        (["explain", "{img}", "--model", "torchvision:resnet18:{weights}"],
         ("do not fit the model: 121 missing keys: conv1.weight, bn1.weight, bn1.bias, ... (118 more); "
          "1 shape mismatch: fc.weight (file (3, 3), model (1000, 512))")),
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


def test_misspelt_method_gets_a_close_name_on_one_line():
    proc = run_cli("explain", "--method", "gradcm")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("pyattr: error: argument --method: unknown method 'gradcm'. Did you mean 'gradcam'")
    assert "usage:" not in proc.stderr and "Traceback" not in proc.stderr


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


# --- every failure: one `pyattr: error:` line, exit 2, nothing written (in-process, fast) ---------------


def one_error(capsys, argv: list[str], message: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("pyattr: error:")]
    assert code == 2, err
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and "usage:" not in err
    return errors[0]


def test_out_is_a_file(tmp_path, image_files, capsys):
    out = tmp_path / "out"
    out.write_text("a file")
    one_error(capsys, ["explain", image_files[0], "--out", str(out)], "is a file, not a folder")
    assert out.read_text() == "a file"


@pytest.mark.parametrize("folder", ["/proc/self", "/proc/self/pyattr_out/x"])
def test_unwritable_output_folder(image_files, capsys, folder):
    """/proc/self exists but takes no new files, even for root; below it no folder can be made."""
    one_error(capsys, ["explain", image_files[0], "--out", folder], f"output folder {folder}")


def test_export_path_is_a_directory(tmp_path, capsys):
    target = tmp_path / "graph.onnx"
    target.mkdir()
    one_error(capsys, ["export", str(target)], "is a folder; give the file to write")
    assert list(target.iterdir()) == []


def test_decompression_bomb_image(tmp_path, image_files, capsys):
    from test_images import png_header_only

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(30_000, 30_000))
    out = tmp_path / "out"
    one_error(capsys, ["explain", image_files[0], str(bomb), "--out", str(out)], "decompression bomb")
    assert not out.exists()


def test_cuda_without_a_gpu(tmp_path, image_files, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    one_error(capsys, ["explain", image_files[0], "--device", "cuda", "--out", str(out)],
              "--device cuda: no CUDA GPU is usable here")
    one_error(capsys, ["export", str(tmp_path / "g.onnx"), "--device", "cuda"], "no CUDA GPU")
    one_error(capsys, ["explain", image_files[0], "--device", "gpu0", "--out", str(out)], "is not a torch device")
    assert not out.exists() and not (tmp_path / "g.onnx").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--size", "60000"], "--size must be in [8, 4096], got 60000"),
    (["--size", "-1"], "--size must be in [8, 4096]"),
    (["--batch-size", "0"], "--batch-size must be in [1, 4096]"),
    (["--alpha", "nan"], "--alpha must be in [0, 1]"),
    (["--steps", "0"], "--steps must be in [1, 100000]"),
    (["--cmap", "viridiss"], "unknown colormap 'viridiss'. Did you mean 'viridis'?"),
    (["--method", "Integrated-Gradients", "--steps", "2", "--target", "nope"], "unknown class name 'nope'"),
    (["--method", "gradcam", "--steps", "2"], "--steps is an option of integratedgradients"),
])
def test_bounded_options(tmp_path, image_files, capsys, args, message):
    out = tmp_path / "out"
    one_error(capsys, ["explain", image_files[0], *args, "--out", str(out)], message)
    assert not out.exists()


def test_torchscript_model_that_is_not_an_image_model(tmp_path, image_files, capsys):
    import torch

    path = tmp_path / "linear.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), str(path))
    out = tmp_path / "out"
    one_error(capsys, ["explain", image_files[0], "--model", str(path), "--out", str(out)],
              f"{path} is not an image classifier: it fails on a (1, 3, 224, 224) image")
    assert not out.exists()


def test_run_with_non_json_metadata_is_one_line(tmp_path, image_files, capsys):
    """`pyattr run` on an ONNX file whose pyattr metadata is not JSON: one error line, exit 2."""
    import onnx

    graph = tmp_path / "g.onnx"
    assert main(["export", str(graph), "--method", "gradcam"]) == 0
    # on the way: `pyattr run` and `pyattr explain` report the same score (the logit) for the same image
    assert main(["run", str(graph), image_files[0], "--out", str(tmp_path / "run"), "--target", "1"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["explain", image_files[0], "--out", str(tmp_path / "explain"), "--target", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"score {record['score']:.2f}," in printed, (record, printed)
    # ... and the same probability: the built-in model is multi-label (sigmoid), recorded in the metadata
    assert pyattr.read_metadata(graph)["multilabel"] is True
    assert f"probability {record['probability']:.2f})" in printed, (record, printed)
    assert abs(record["probability"] - 1 / (1 + math.exp(-record["score"]))) < 1e-5
    model = onnx.load(str(graph))
    for prop in model.metadata_props:
        if prop.key == "pyattr":
            prop.value = "{not json"
    onnx.save(model, str(graph))
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["run", str(graph), image_files[0], "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and ": error:" in err and "Traceback" not in err
    assert not out.exists() or list(out.iterdir()) == []


def test_broken_pipe_is_one_line_and_the_outputs_are_whole(tmp_path):
    """`pyattr explain ... | head -0`: stdout closed before the first line."""
    import os

    out = tmp_path / "out"
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "pyattr", "explain", "--samples", "2", "--out", str(out)],
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=600, check=False)
    os.close(write)
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.startswith("pyattr: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "broken pipe" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(list(out.glob("*.png"))) == 4


def test_target_by_class_name(tmp_path, image_files, capsys):
    by_id, by_name = tmp_path / "id", tmp_path / "name"
    assert main(["explain", image_files[0], "--target", "2", "--out", str(by_id), "--quiet"]) == 0
    assert main(["explain", image_files[0], "--target", "Triangle", "--out", str(by_name), "--quiet"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(by_id / "img0_gradcam_overlay.png")),
                                  np.asarray(Image.open(by_name / "img0_gradcam_overlay.png")))


def test_colliding_stems_get_distinct_names(tmp_path, capsys):
    rng = np.random.default_rng(1)
    paths = []
    for name in ("a.png", "a.jpg", "a_1.png"):
        paths.append(str(tmp_path / name))
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "out"
    assert main(["explain", *paths, "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.glob("*_overlay.png")) == [
        "a_1_gradcam_overlay.png", "a_2_gradcam_overlay.png", "a_gradcam_overlay.png"]


def test_failure_mid_run_leaves_nothing(tmp_path, image_files, capsys, monkeypatch):
    """An error in the second batch: no file of the first batch is left (outputs are staged)."""
    import pyattr.figures

    calls = []
    real = pyattr.figures.side_by_side

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(pyattr.figures, "side_by_side", failing)
    out = tmp_path / "out"
    one_error(capsys, ["explain", *image_files, "--batch-size", "1", "--out", str(out), "--quiet"],
              "No space left on device")
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("x")
    calls.clear()
    one_error(capsys, ["explain", *image_files, "--batch-size", "1", "--out", str(kept), "--quiet"], "No space")
    assert sorted(p.name for p in kept.iterdir()) == ["mine.txt"]


def test_out_of_memory_names_the_options(tmp_path, image_files, capsys, monkeypatch):
    import torch

    from pyattr.methods import gradient

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")

    monkeypatch.setattr(gradient.IntegratedGradients, "_integrate", oom)
    line = one_error(capsys, ["explain", image_files[0], "--method", "integratedgradients", "--steps", "64",
                              "--out", str(tmp_path / "out")], "out of memory running integratedgradients")
    assert "--batch-size (now 16)" in line and "--internal-batch (now 16" in line and "--steps (now 64)" in line


def test_steps_and_internal_batch_reach_integrated_gradients(tmp_path, image_files, capsys, monkeypatch):
    from pyattr.methods import gradient

    seen = []
    real = gradient.IntegratedGradients.__init__

    @functools.wraps(real)  # keeps the signature, which the CLI reads
    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append((self.steps, self.chunk_size))

    monkeypatch.setattr(gradient.IntegratedGradients, "__init__", spy)
    assert main(["explain", *image_files, "--method", "integratedgradients", "--steps", "5", "--internal-batch",
                 "6", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert seen == [(5, 3)]  # 6 inputs per pass / 2 images


def test_scores_are_logits_and_model_probabilities(tmp_path, image_files, capsys):
    """`explain` prints score (the logit, as `pyattr run` records) and probability (the built-in model is
    multi-label: its sigmoid, as `pyattr run` shows)."""
    import re

    import torch

    import pyattr

    assert main(["explain", image_files[0], "--target", "1", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    score, probability = map(float, re.search(r"score (-?[\d.]+), probability ([\d.]+)", text).groups())
    image = np.asarray(Image.open(image_files[0]).convert("RGB"))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        logits = pyattr.zoo.load_builtin()(x)[0]
    assert abs(score - float(logits[1])) < 0.006
    assert abs(probability - float(torch.sigmoid(logits[1]))) < 0.006


def test_progress_from_the_first_image_with_passes(tmp_path, image_files, capsys):
    assert main(["explain", image_files[0], "--method", "scorecam", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "1/1" in err and "model pass" in err
    passes = max(int(n) for n in __import__("re").findall(r"model pass (\d+)", err))
    assert passes >= 2  # Score-CAM: one pass for the scores, then its masked passes


def test_sigterm_mid_run_leaves_nothing(tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pyattr", "explain", "--samples", "300", "--batch-size", "1",
                             "--method", "saliency", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob(".pyattr-staging-*/*.png")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "pyattr: terminated" in err
    assert not out.exists()


def test_staging_left_by_a_killed_run_is_swept(tmp_path, image_files, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    stale = out / f".pyattr-staging-{dead.pid}-abc"
    stale.mkdir(parents=True)
    (stale / "x_gradcam_overlay.png").write_bytes(b"partial")
    alive = out / ".pyattr-staging-1-abc"  # pid 1 runs: another run's staging is left alone
    alive.mkdir()
    assert main(["explain", image_files[0], "--out", str(out), "--quiet"]) == 0
    assert not stale.exists() and alive.exists()
    assert sorted(p.name for p in out.iterdir()) == [".pyattr-staging-1-abc", "img0_gradcam_figure.png",
                                                     "img0_gradcam_overlay.png"]
