"""Fuzzing the `pyattr` command and the image decoder (hypothesis, bounded to keep the suite fast).

Properties:
* image bytes (valid images of every mode, truncated, bit-flipped, random) decode to RGB uint8 or raise
  InputError naming the file: never another exception;
* `pyattr explain` with random images and options (valid, out of range, misspelt) either succeeds and writes
  exactly its two PNGs per image into --out, or prints exactly one `pyattr: error:` line and exits 2 with no
  new file; never a traceback, never a file outside --out.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pyattr.cli import main
from pyattr.errors import InputError
from pyattr.runtime.images import read_image

MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I", "I;16", "F", "YCbCr", "PA"]
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp",
           "PPM": ".ppm"}


@st.composite
def image_bytes(draw) -> tuple[bytes, str]:
    """(file content, suffix): an encoded image of a random mode and size, maybe corrupted, or random bytes."""
    kind = draw(st.sampled_from(["valid", "truncated", "flipped", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=300)), draw(st.sampled_from(list(FORMATS.values())))
    mode = draw(st.sampled_from(MODES))
    fmt = draw(st.sampled_from(list(FORMATS)))
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    try:
        im.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):  # a mode this format cannot store: save it as PNG/TIFF instead
        buffer = io.BytesIO()
        fmt = "TIFF" if mode in ("CMYK", "YCbCr", "F") else "PNG"
        try:
            im.save(buffer, format=fmt)
        except (OSError, ValueError, KeyError):
            im.convert("RGB").save(buffer, format="PNG")
            fmt = "PNG"
    data = buffer.getvalue()
    if kind == "truncated":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "flipped" and data:
        array = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(array) - 1))
            array[i] ^= draw(st.integers(1, 255))
        data = bytes(array)
    return data, FORMATS[fmt]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=image_bytes())
def test_image_bytes_decode_or_raise_input_error(content):
    data, suffix = content
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(data)
        try:
            rgb = read_image(path)
        except InputError as err:
            assert str(path) in str(err)
            return
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


OPTIONS = st.fixed_dictionaries({}, optional={
    "--method": st.sampled_from(["gradcam", "saliency", "inputxgradient", "lrp_epsilon_plus", "GradCAM",
                                 "grad-cam", "gradcm", "", "../x", "integratedgradients"]),
    "--target": st.sampled_from(["0", "5", "6", "-1", "triangle", "Star", "nope", "1.5", "", "99999999999999999999"]),
    "--size": st.sampled_from(["8", "16", "7", "60000", "-3", "x", "32"]),
    "--alpha": st.sampled_from(["0", "1", "0.3", "nan", "inf", "-0.1", "2"]),
    "--batch-size": st.sampled_from(["1", "2", "0", "-1", "5000", "b"]),
    "--cmap": st.sampled_from(["jet", "bwr", "viridis", "rainbow", ""]),
    "--steps": st.sampled_from(["1", "2", "0"]),
    "--internal-batch": st.sampled_from(["1", "3", "0"]),
    "--device": st.sampled_from(["cpu", "cuda:99", "tpu", "", "cpu:0"]),
    "--layer": st.sampled_from(["layer3", "layer9", "", "..", "layer1.0"]),
})


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=st.lists(image_bytes(), min_size=0, max_size=2), good=st.integers(0, 2), options=OPTIONS,
       out_name=st.sampled_from(["out", "nested/out", "out.png"]))
def test_explain_succeeds_whole_or_fails_with_one_line(images, good, options, out_name):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        paths = []
        rng = np.random.default_rng(good)
        for i in range(good):
            p = root / f"good{i}.png"
            Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(p)
            paths.append(str(p))
        for i, (data, suffix) in enumerate(images):
            p = root / f"fuzz{i}{suffix}"
            p.write_bytes(data)
            paths.append(str(p))
        if not paths:
            options = {**options, "--samples": "2"}
        argv = ["explain", *paths, "--out", str(root / out_name)]
        for key, value in options.items():
            argv += [key, value]
        before = files_under(root)
        err = io.StringIO()
        out = io.StringIO()
        import contextlib

        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exit_:  # pragma: no cover - main returns; argparse's --help would exit
                code = exit_.code
        stderr = err.getvalue()
        assert "Traceback" not in stderr
        new = files_under(root) - before
        out_dir = root / out_name
        if code == 0:
            pngs = sorted(n for n in new if n.endswith(".png") and (root / n).is_file())
            expected = 2 * (len(paths) or 2)
            assert len(pngs) == expected, (argv, new)
            assert all((root / n).resolve().is_relative_to(out_dir.resolve()) for n in new
                       if (root / n).is_file()), new
            assert not [n for n in new if Path(n).name.startswith(".")], new  # no staging or temp file left
        else:
            assert code == 2, (argv, stderr)
            errors = [ln for ln in stderr.splitlines() if ln.startswith("pyattr: error:")]
            assert len(errors) == 1, (argv, stderr)
            assert not new, (argv, new)  # not even an empty folder


def test_fuzz_examples_cover_both_outcomes():
    """The option strategy is not all-failing: a plain draw succeeds, a bad one fails (guards the fuzz test)."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        p = root / "a.png"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
        assert main(["explain", str(p), "--out", str(root / "o"), "--quiet", "--size", "16"]) == 0
        assert main(["explain", str(p), "--out", str(root / "o2"), "--quiet", "--size", "7"]) == 2
        assert sorted(os.listdir(root / "o")) == ["a_gradcam_figure.png", "a_gradcam_overlay.png"]
        assert not (root / "o2").exists()
