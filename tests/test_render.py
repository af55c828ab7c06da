"""pyattr.render, pyattr.colormaps and the compiled core pyattr._C: the C++ and NumPy backends
agree bit-for-bit, match hand-computed values, torch's interpolate / pyattr.postprocess, matplotlib
and OpenCV, and reject bad input clearly."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyattr import colormaps, render

BUILD = "pyattr._C is not built: run `pip install --no-build-isolation -e .` in the source tree"


@pytest.fixture(scope="module")
def C():
    """The compiled module; its absence is a failure, not a skip (only the fallback tests skip it)."""
    try:
        from pyattr import _C
    except ImportError as err:
        pytest.fail(f"{BUILD} ({err})")
    return _C


def both(fn, *args, **kwargs):
    """Results of a render function under both backends."""
    return fn(*args, backend="C++", **kwargs), fn(*args, backend="numpy", **kwargs)


# --- colormap LUTs ---


@pytest.mark.parametrize("name", colormaps.COLORMAPS)
def test_lut_cpp_equals_numpy(C, name):
    table = colormaps.lut(name)
    assert table.shape == (256, 3) and table.dtype == np.uint8
    np.testing.assert_array_equal(C.colormap_lut(name), table)
    assert C.colormap_names() == list(colormaps.COLORMAPS)


MATPLOTLIB_COLORMAPS = [name for name in colormaps.COLORMAPS if name != "jet_opencv"]


def test_colormap_names():
    assert colormaps.COLORMAPS == (
        "jet", "hot", "gray", "bwr", "seismic", "jet_opencv", "viridis", "inferno", "magma", "turbo"
    )
    assert colormaps.DIVERGING <= set(colormaps.COLORMAPS)


@pytest.mark.parametrize("name", MATPLOTLIB_COLORMAPS)
def test_lut_within_one_level_of_matplotlib(C, name):
    import matplotlib
    reference = np.floor(matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5)
    for table in (colormaps.lut(name), C.colormap_lut(name)):
        assert np.abs(table.astype(int) - reference.astype(int)).max() <= 1
    # matplotlib's own uint8 path (bytes=True truncates instead of rounding): within one level too
    truncated = matplotlib.colormaps[name](np.arange(256) / 255, bytes=True)[:, :3]
    assert np.abs(colormaps.lut(name).astype(int) - truncated).max() <= 1


def test_jet_opencv_within_one_level_of_opencv(C):
    cv2 = pytest.importorskip("cv2", reason="OpenCV (installed with the test extra's grad-cam) is the reference")
    bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0]
    for table in (colormaps.lut("jet_opencv"), C.colormap_lut("jet_opencv")):
        assert np.abs(table.astype(int) - bgr[:, ::-1].astype(int)).max() <= 1
    # through colorize, with the index rounding int(v * 255 + 0.5) that cv2 gets as uint8 input
    maps = np.random.default_rng(3).random((2, 9, 11), dtype=np.float32)
    ours = render.colorize(maps, "jet_opencv")
    theirs = np.stack([
        cv2.applyColorMap((m * np.float32(255) + np.float32(0.5)).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
        for m in maps
    ])
    assert np.abs(ours.astype(int) - theirs).max() <= 1


def test_diverging_colormaps_are_white_in_the_middle():
    for name in ("bwr", "seismic"):
        table = colormaps.lut(name)
        assert table[127].min() >= 253 and table[128].min() >= 253, table[126:130]
    assert colormaps.lut("bwr")[0].tolist() == [0, 0, 255] and colormaps.lut("bwr")[255].tolist() == [255, 0, 0]


def test_lut_known_entries():
    jet = colormaps.lut("jet")
    assert jet[0].tolist() == [0, 0, 128]  # blue 0.5
    assert jet[255].tolist() == [128, 0, 0]  # red 0.5
    assert jet[128].tolist() == [125, 255, 122]  # 0.502: the green plateau
    np.testing.assert_array_equal(
        colormaps.lut("gray"), np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)
    )
    assert colormaps.lut("hot")[0].tolist() == [11, 0, 0]  # 0.0416 * 255 = 10.6
    assert colormaps.lut("hot")[255].tolist() == [255, 255, 255]


def test_lut_is_read_only():
    with pytest.raises(ValueError, match="read-only"):
        colormaps.lut("jet")[0, 0] = 1


# --- hand-computed cases ---


@pytest.mark.parametrize("name", colormaps.COLORMAPS)
@pytest.mark.parametrize("backend", ["C++", "numpy"])
def test_colorize_constant_maps(C, name, backend):
    table = colormaps.lut(name)
    zeros, ones = np.zeros((2, 3, 4), np.float32), np.ones((2, 3, 4), np.float32)
    assert (render.colorize(zeros, name, backend=backend) == table[0]).all()
    assert (render.colorize(ones, name, backend=backend) == table[255]).all()
    # out-of-range and infinite values are clipped
    wild = np.array([[-1e30, -np.inf, 7.0, np.inf]], np.float32)
    assert render.colorize(wild, name, backend=backend).tolist() == [
        [table[0].tolist()] * 2 + [table[255].tolist()] * 2
    ]


@pytest.mark.parametrize("backend", ["C++", "numpy"])
def test_colorize_index_rounding(C, backend):
    # index = int(v * 255 + 0.5): 0.5/255 is the first value to reach entry 1
    maps = np.array([[0.49 / 255, 0.51 / 255, 127.4 / 255, 127.6 / 255]], np.float32)
    assert render.colorize(maps, "gray", backend=backend)[0, :, 0].tolist() == [0, 1, 127, 128]


@pytest.mark.parametrize("backend", ["C++", "numpy"])
def test_overlay_alpha_extremes_and_midpoint(C, backend):
    rng = np.random.default_rng(0)
    maps = rng.uniform(-0.2, 1.2, (3, 5, 6)).astype(np.float32)
    images = rng.integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(render.overlay(maps, images, alpha=0.0, backend=backend), images)
    colors = render.colorize(maps, backend=backend)
    np.testing.assert_array_equal(render.overlay(maps, images, alpha=1.0, backend=backend), colors)
    # gray, map 1 -> color 255: 0.5 * 100 + 0.5 * 255 + 0.5 = 178
    out = render.overlay(
        np.ones((2, 2)), np.full((2, 2, 3), 100, np.uint8), alpha=0.5, cmap="gray", backend=backend
    )
    assert out.shape == (2, 2, 3) and (out == 178).all()
    # alpha 0.25, image 10, jet at 0 = (0, 0, 128): 0.75 * 10 + 0.25 * c + 0.5
    out = render.overlay(np.zeros((1, 1)), np.full((1, 1, 3), 10, np.uint8), alpha=0.25, backend=backend)
    assert out.tolist() == [[[8, 8, 40]]]


def test_torch_tensors_accepted(C):
    import torch
    maps = torch.rand(2, 4, 5, requires_grad=True)
    images = torch.randint(0, 256, (2, 4, 5, 3), dtype=torch.uint8)
    expected = render.overlay(maps.detach().numpy(), images.numpy(), 0.3)
    np.testing.assert_array_equal(render.overlay(maps, images, 0.3), expected)
    half = maps.to(torch.bfloat16)  # a dtype NumPy lacks: converted through float32
    np.testing.assert_array_equal(render.colorize(half), render.colorize(half.detach().float().numpy()))


def test_zero_size_batch(C):
    for backend in ("C++", "numpy"):
        assert render.colorize(np.zeros((0, 3, 4)), backend=backend).shape == (0, 3, 4, 3)
        out = render.overlay(np.zeros((0, 3, 4)), np.zeros((0, 3, 4, 3), np.uint8), backend=backend)
        assert out.shape == (0, 3, 4, 3) and out.dtype == np.uint8
    assert C.colorize(np.zeros((0, 5, 5), np.float32))[0].shape == (0, 5, 5, 3)


def test_results_do_not_depend_on_thread_count(C):
    rng = np.random.default_rng(1)
    maps = rng.uniform(-0.1, 1.1, (3, 97, 131)).astype(np.float32)  # big enough to split
    images = rng.integers(0, 256, (3, 97, 131, 3), dtype=np.uint8)
    reference = render.overlay(maps, images, 0.4, backend="numpy")
    for threads in (1, 2, 3, 7, 0):
        np.testing.assert_array_equal(render.overlay(maps, images, 0.4, num_threads=threads), reference)
        np.testing.assert_array_equal(
            render.colorize(maps, num_threads=threads), render.colorize(maps, backend="numpy")
        )


# --- C++ == NumPy, bit for bit ---


def test_rounding_boundaries_agree(C):
    # float32 neighbours of every boundary (k + 0.5) / 255 between two LUT entries
    edges = ((np.arange(256) + 0.5) / 255).astype(np.float32)
    maps = np.stack([np.nextafter(edges, -np.inf), edges, np.nextafter(edges, np.inf)])[None]
    cpp, ref = both(render.colorize, maps, "gray")
    np.testing.assert_array_equal(cpp, ref)
    assert len(np.unique(cpp[0, 1, :, 0])) > 200  # the boundaries do fall on both sides


@pytest.mark.parametrize("alpha", [0.1, 0.25, 1 / 3, 0.5, 0.7, 0.9, 0.123456789])
def test_overlay_all_image_color_pairs_agree(C, alpha):
    # gray maps i / 255 give every color 0..255; pair each with every image value 0..255
    maps = np.broadcast_to(np.arange(256, dtype=np.float32) / 255, (256, 256))[None]
    images = np.repeat(
        np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 256))[None, ..., None], 3, -1
    )
    cpp, ref = both(render.overlay, maps, images, alpha, "gray")
    np.testing.assert_array_equal(cpp, ref)
    exact = (1 - alpha) * images[..., 0].astype(np.float64) + alpha * np.arange(256)
    assert np.abs(cpp[..., 0] - np.floor(exact + 0.5)).max() <= 1  # float32 vs exact rounding


DYADIC_ALPHAS = sorted({m / 2**k for k in range(6) for m in range(2**k + 1)} | {1 / 256, 77 / 256, 129 / 256, 255 / 256})


def test_overlay_dyadic_alphas_exact(C):
    """alpha = m / 2^k (k <= 8) takes the C++ core's integer blend: equal to the float formula for every
    (image, color) pair."""
    maps = np.broadcast_to(np.arange(256, dtype=np.float32) / 255, (256, 256))[None]
    images = np.repeat(
        np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 256))[None, ..., None], 3, -1
    )
    for alpha in DYADIC_ALPHAS:
        cpp, ref = both(render.overlay, maps, images, alpha, "gray")
        np.testing.assert_array_equal(cpp, ref, err_msg=f"alpha {alpha}")


map_values = st.one_of(
    st.floats(0, 1, width=32),
    st.floats(allow_nan=False, allow_infinity=True, width=32),
    st.sampled_from([0.0, 1.0, -np.inf, np.inf, 0.5 / 255, 254.5 / 255]),
)
map_arrays = st.tuples(st.integers(0, 4), st.integers(1, 40), st.integers(1, 40)).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=map_values)
)


@settings(max_examples=150, deadline=None)
@given(maps=map_arrays, cmap=st.sampled_from(colormaps.COLORMAPS), threads=st.integers(0, 3))
def test_colorize_cpp_equals_numpy(C, maps, cmap, threads):
    cpp, ref = both(render.colorize, maps, cmap, threads)
    assert cpp.shape == maps.shape + (3,) and cpp.dtype == np.uint8
    np.testing.assert_array_equal(cpp, ref)


@settings(max_examples=150, deadline=None)
@given(
    maps=map_arrays,
    seed=st.integers(0, 2**32 - 1),
    alpha=st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 0.5])),
    cmap=st.sampled_from(colormaps.COLORMAPS),
)
def test_overlay_cpp_equals_numpy(C, maps, seed, alpha, cmap):
    images = np.random.default_rng(seed).integers(0, 256, maps.shape + (3,), dtype=np.uint8)
    cpp, ref = both(render.overlay, maps, images, alpha, cmap)
    np.testing.assert_array_equal(cpp, ref)


# --- NaN and bad input ---


@pytest.mark.parametrize("backend", ["C++", "numpy"])
def test_nan_raises(C, backend):
    maps = np.zeros((2, 3, 3), np.float32)
    maps[1, 2, 0] = maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"maps contain NaN \(2 values\)"):
        render.colorize(maps, backend=backend)
    with pytest.raises(ValueError, match="maps contain NaN"):
        render.overlay(maps, np.zeros((2, 3, 3, 3), np.uint8), backend=backend)


def test_cpp_counts_nan(C):
    maps = np.full((3, 4, 5), np.nan, np.float32)
    maps[0] = 0.5
    out, nan = C.colorize(maps)
    assert nan == 40 and (out[1:] == colormaps.lut("jet")[0]).all()  # NaN pixels get lut[0]
    assert C.overlay(maps, np.zeros((3, 4, 5, 3), np.uint8), 0.5)[1] == 40
    assert C.colorize(np.zeros((3, 4, 5), np.float32))[1] == 0


maps3, images4 = np.zeros((2, 4, 5), np.float32), np.zeros((2, 4, 5, 3), np.uint8)
# fmt: off
BAD_INPUTS = [  # (function, args, kwargs, error, message)
    (render.colorize, (np.zeros(5),), {}, ValueError, r"maps must have shape \(N, H, W\) or \(H, W\), got"),
    (render.colorize, (np.zeros((1, 2, 3, 4)),), {}, ValueError, r"got shape \(1, 2, 3, 4\)"),
    (render.colorize, (np.zeros((2, 2), complex),), {}, TypeError, "maps must hold real numbers"),
    (render.colorize, (maps3, "parula"), {}, ValueError, "unknown colormap 'parula'; known colormaps: jet"),
    (render.colorize, (maps3,), {"num_threads": -1}, ValueError, r"num_threads must be >= 0"),
    (render.colorize, (maps3,), {"backend": "cuda"}, ValueError, r"backend must be 'auto', 'C\+\+' or 'nump"),
    (render.overlay, (maps3, images4.astype(np.float32)), {}, TypeError, "images must be uint8 RGB"),
    (render.overlay, (maps3, images4[0]), {}, ValueError, r"images must have shape \(N, H, W, 3\)"),
    (render.overlay, (maps3[0], images4), {}, ValueError, r"images must have shape \(H, W, 3\)"),
    (render.overlay, (maps3, images4[..., :1]), {}, ValueError, "images must be RGB with 3 channels"),
    (render.overlay, (maps3, np.zeros((3, 4, 5, 3), np.uint8)), {}, ValueError, r"must agree in \(N, H, W\)"),
    (render.overlay, (maps3, np.zeros((2, 4, 6, 3), np.uint8)), {}, ValueError, r"must agree in \(N, H, W\)"),
    (render.overlay, (maps3, images4), {"alpha": 1.5}, ValueError, r"alpha must lie in \[0, 1\], got 1.5"),
    (render.overlay, (maps3, images4), {"alpha": float("nan")}, ValueError, r"alpha must lie in \[0, 1\]"),
    (render.overlay, (maps3, images4), {"alpha": -0.1}, ValueError, r"alpha must lie in \[0, 1\]"),
    (render.overlay, (maps3, images4), {"cmap": "Jet"}, ValueError, "unknown colormap 'Jet'"),
]
# fmt: on


@pytest.mark.parametrize("backend", ["C++", "numpy"])
@pytest.mark.parametrize(("fn", "args", "kwargs", "error", "message"), BAD_INPUTS)
def test_bad_input_raises(C, backend, fn, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        fn(*args, **{"backend": backend, **kwargs})


# fmt: off
C_BAD_INPUTS = [  # (function of _C, args, error, message)
    ("colorize", (maps3.astype(np.float64),), TypeError,
     r"maps must have dtype float32 or float16, got float64; convert with np.ascontiguousarray\(maps, dtype=np.fl"),
    ("colorize", (maps3.tolist(),), TypeError, "maps must be a numpy.ndarray of dtype float32 or float16, got list"),
    ("colorize", (maps3.transpose(0, 2, 1),), ValueError, "maps must be C-contiguous and aligned"),
    ("colorize", (maps3[0],), ValueError, r"maps must have shape \(N, H, W\), got shape \(4, 5\)"),
    ("colorize", (maps3, "nope"), ValueError, "unknown colormap 'nope'; known colormaps: jet, hot, gray, bwr"),
    ("colorize", (maps3, "jet", -2), ValueError, "num_threads must be >= 0"),
    ("overlay", (maps3, images4.astype(np.int32)), TypeError, "images must have dtype uint8, got int32"),
    ("overlay", (maps3, images4[:, ::-1]), ValueError, "images must be C-contiguous"),
    ("overlay", (maps3, images4[0]), ValueError, r"images must have shape \(N, H, W, 3\)"),
    ("overlay", (maps3, np.zeros((2, 4, 5, 4), np.uint8)), ValueError, "images must be RGB with 3 channels"),
    ("overlay", (maps3, np.zeros((2, 5, 5, 3), np.uint8)), ValueError, r"maps and images must agree in \(N"),
    ("overlay", (maps3, np.zeros((3, 4, 5, 3), np.uint8)), ValueError, "maps and images must have the same batch"),
    ("overlay", (maps3, images4, 2.0), ValueError, r"alpha must lie in \[0, 1\]"),
    ("overlay", (maps3, images4, float("nan")), ValueError, r"alpha must lie in \[0, 1\]"),
    ("colormap_lut", ("parula",), ValueError, "unknown colormap 'parula'; known colormaps: jet, hot, gray"),
]
# fmt: on


@pytest.mark.parametrize(("name", "args", "error", "message"), C_BAD_INPUTS)
def test_cpp_rejects_bad_input_without_copying(C, name, args, error, message):
    with pytest.raises(error, match=message):
        getattr(C, name)(*args)


def test_colormap_unknown_name():
    known = "jet, hot, gray, bwr, seismic, jet_opencv, viridis, inferno, magma, turbo"
    with pytest.raises(ValueError, match=f"unknown colormap 'parula'; known colormaps: {known}$"):
        colormaps.lut("parula")


# --- the stub and the fallback ---


def test_stub_lists_every_function(C):
    stub = ast.parse((Path(render.__file__).parent / "_C.pyi").read_text())
    stubbed = {
        node.name: [a.arg for a in node.args.args] for node in stub.body if isinstance(node, ast.FunctionDef)
    }
    public = {name for name in dir(C) if not name.startswith("_") and callable(getattr(C, name))}
    assert set(stubbed) == public
    for name in public:  # pybind11 puts "name(arg: type, ...) -> ret" on the docstring's first line
        signature = re.match(rf"{name}\((.*)\) ->", getattr(C, name).__doc__).group(1)
        assert _argument_names(signature) == stubbed[name], name


def _argument_names(signature: str) -> list[str]:
    """Names of the arguments in "a: T, b: tuple[int, int] = ...", split at top-level commas."""
    parts, depth, current = [], 0, ""
    for char in signature:
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.split(":")[0].strip() for part in parts if part.strip()]


FALLBACK = textwrap.dedent(
    """
    import sys, warnings
    import numpy as np
    sys.modules["pyattr._C"] = None  # as if the extension were not built
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from pyattr import render
        import pyattr.render  # a second import must not warn again
    missing = [w for w in caught if issubclass(w.category, render.ExtensionMissingWarning)]
    assert len(missing) == 1 and issubclass(render.ExtensionMissingWarning, UserWarning), caught
    print(missing[0].message)
    assert render.HAVE_C is False and render.backend() == "numpy"
    rng = np.random.default_rng(7)
    maps = rng.uniform(-0.5, 1.5, (3, 17, 19)).astype(np.float32)
    images = rng.integers(0, 256, (3, 17, 19, 3), dtype=np.uint8)
    np.save(sys.argv[1], np.stack([render.overlay(maps, images, 0.35), render.colorize(maps, "hot")]))
    try:
        render.colorize(maps, backend="C++")
    except ImportError as err:
        print("C++ refused:", err)
    """
)


def test_fallback_without_extension(tmp_path):
    out = tmp_path / "out.npy"
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK, str(out)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "pyattr._C, the compiled extension, is missing" in message
    assert "results are identical but slower" in message and "pip install ." in message
    assert "C++17 compiler and CMake" in message
    assert "C++ refused: backend='C++' needs the compiled extension" in message

    rng = np.random.default_rng(7)
    maps = rng.uniform(-0.5, 1.5, (3, 17, 19)).astype(np.float32)
    images = rng.integers(0, 256, (3, 17, 19, 3), dtype=np.uint8)
    expected = np.stack([render.overlay(maps, images, 0.35), render.colorize(maps, "hot")])
    np.testing.assert_array_equal(np.load(out), expected)


def test_render_works_without_torch():
    # run render.py and colormaps.py without executing pyattr/__init__.py (which may import
    # torch for the methods), in a process where importing torch fails
    code = textwrap.dedent(
        f"""
        import sys, types
        import numpy as np
        sys.modules["torch"] = None
        package = types.ModuleType("pyattr")
        package.__path__ = [{str(Path(render.__file__).parent)!r}]
        sys.modules["pyattr"] = package
        from pyattr import render
        out = render.overlay(np.ones((2, 2)), np.full((2, 2, 3), 100, np.uint8), 0.5, "gray")
        print(render.backend(), out[0, 0].tolist())
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0].endswith("[178, 178, 178]")


# --- resize, normalize and the fused path ---

RESIZE_SHAPES = [  # (h, w, H, W): up, down, same, 1-pixel, non-square, extreme ratios
    (7, 7, 224, 224), (8, 8, 64, 64), (5, 9, 3, 17), (64, 64, 7, 7), (1, 1, 5, 5), (3, 3, 1, 1),
    (10, 10, 10, 10), (2, 7, 100, 3), (100, 100, 33, 47), (1, 30, 1, 301), (37, 1, 5, 2),
]


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(("h", "w", "H", "W"), RESIZE_SHAPES)
def test_resize_matches_torch_interpolate(C, align_corners, h, w, H, W):
    import torch
    import torch.nn.functional as F
    maps = np.random.default_rng(h * 1000 + W).uniform(-1, 1, (3, h, w)).astype(np.float32)
    reference = F.interpolate(torch.from_numpy(maps)[:, None], size=(H, W), mode="bilinear",
                              align_corners=align_corners)[:, 0].numpy()
    cpp, ref = both(render.resize, maps, (H, W), align_corners)
    np.testing.assert_array_equal(cpp, ref)
    assert cpp.shape == (3, H, W) and cpp.dtype == np.float32
    np.testing.assert_allclose(cpp, reference, rtol=0, atol=1e-5)


def test_resize_same_size_is_identity_and_2d_maps(C):
    maps = np.random.default_rng(0).standard_normal((2, 6, 5)).astype(np.float32)
    for align_corners in (False, True):
        np.testing.assert_array_equal(render.resize(maps, (6, 5), align_corners), maps)
    np.testing.assert_array_equal(render.resize(maps[0], (9, 4)), render.resize(maps, (9, 4))[0])
    # align_corners=True keeps the corners exactly
    up = render.resize(maps, (31, 17), align_corners=True)
    np.testing.assert_array_equal(up[:, [0, 0, -1, -1], [0, -1, 0, -1]], maps[:, [0, 0, -1, -1], [0, -1, 0, -1]])


def test_postprocess_in_graph_equals_host(C):
    """pyattr.postprocess (the in-graph torch ops) == the C++ kernels == the NumPy fallback."""
    import torch

    from pyattr import postprocess
    rng = np.random.default_rng(5)
    for (h, w, H, W) in [(8, 8, 64, 64), (7, 7, 224, 224), (14, 10, 33, 33)]:
        raw = rng.gamma(1.0, 1.0, (4, h, w)).astype(np.float32) * rng.uniform(0.1, 50, (4, 1, 1)).astype(np.float32)
        graph = postprocess.normalize_minmax(postprocess.resize_bilinear(torch.from_numpy(raw), (H, W))).numpy()
        for backend in ("C++", "numpy"):
            host = render.normalize(render.resize(raw, (H, W), backend=backend), backend=backend)
            np.testing.assert_allclose(host, graph, rtol=0, atol=1e-5)
            np.testing.assert_allclose(render.normalize(raw, backend=backend),
                                       postprocess.normalize_minmax(torch.from_numpy(raw)).numpy(), rtol=0, atol=1e-6)
        # the fused path colors exactly what the steps give
        colors = render.heatmap(raw, (H, W), "jet")
        np.testing.assert_array_equal(colors, render.colorize(host, "jet"))
        # and within one LUT step of coloring the torch maps
        index_gap = np.abs(render.colorize(graph, "gray").astype(int) - render.colorize(host, "gray").astype(int))
        assert index_gap.max() <= 1


@pytest.mark.parametrize("backend", ["C++", "numpy"])
def test_normalize_hand_computed(C, backend):
    maps = np.array([[[-2.0, -1.0], [0.0, 2.0]]], np.float32)

    def norm(**kwargs):
        return render.normalize(maps, backend=backend, **kwargs)[0].ravel().tolist()

    assert norm() == [0.0, 0.25, 0.5, 1.0]
    assert norm(sign="absolute") == [1.0, 0.5, 0.0, 1.0]
    assert norm(sign="positive") == [0.0, 0.0, 0.0, 1.0]
    assert norm(sign="negative") == [1.0, 0.5, 0.0, 0.0]
    assert norm(sign="centered") == [0.0, 0.25, 0.5, 1.0]
    assert norm(value_range=(0, 4)) == [0.0, 0.0, 0.0, 0.5]
    assert norm(sign="absolute", value_range=(0, 1)) == [1.0, 1.0, 0.0, 1.0]
    # constant and zero maps: min-max gives zeros, centered puts zero at 0.5
    assert render.normalize(np.full((2, 3), 7.0), backend=backend).tolist() == [[0.0] * 3] * 2
    assert render.normalize(np.zeros((2, 3)), sign="centered", backend=backend).tolist() == [[0.5] * 3] * 2
    assert render.normalize(np.full((1, 2), -3.0), sign="centered", backend=backend).tolist() == [[0.0, 0.0]]
    # extreme magnitudes: hi - lo overflows float32, the ends are halved
    big = np.float32(3e38)
    out = render.normalize(np.array([[-big, 0.0, big]], np.float32), backend=backend)
    assert out.tolist() == [[0.0, 0.5, 1.0]]


@pytest.mark.parametrize("backend", ["C++", "numpy"])
def test_outlier_percentiles(C, backend):
    rng = np.random.default_rng(11)
    maps = rng.standard_normal((3, 20, 30)).astype(np.float32)
    maps[0, 0, 0] = 1e4  # an outlier that would flatten plain min-max
    p = 2.0
    for sign in render.SIGNS:
        out = render.normalize(maps, sign=sign, outlier_perc=p, backend=backend)
        for s in range(3):
            t = {"absolute": np.abs, "positive": lambda v: np.maximum(v, 0),
                 "negative": lambda v: np.maximum(-v, 0)}.get(sign, lambda v: v)(maps[s].astype(np.float64))
            if sign == "centered":
                hi = np.percentile(np.abs(t), 100 - p)
                lo = -hi
            else:
                hi = np.percentile(t, 100 - p)
                lo = np.percentile(t, p) if sign == "all" else t.min()
            expected = np.clip((t - lo) / (hi - lo), 0, 1)
            np.testing.assert_allclose(out[s], expected, rtol=0, atol=2e-6, err_msg=sign)
            saturated = (out[s] == 1.0) | ((out[s] == 0.0) if sign == "centered" else False)
            assert saturated.sum() >= 0.01 * out[s].size  # the top p% (of |t| for centered) saturate
    # with the outlier clipped, the rest of map 0 keeps its contrast
    plain = render.normalize(maps, backend=backend)
    assert np.median(plain[0]) < 0.001
    assert np.median(render.normalize(maps, outlier_perc=p, backend=backend)[0]) > 0.3


normalize_options = st.fixed_dictionaries({
    "sign": st.sampled_from(render.SIGNS),
    "outlier_perc": st.sampled_from([0.0, 0.0, 0.5, 2.0, 10.0, 49.9]),
    "value_range": st.sampled_from([None, None, None, (0.0, 1.0), (-3.0, 0.5)]),
})
finite_values = st.one_of(
    st.floats(-1e6, 1e6, width=32),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1.0]),
)
finite_maps = st.tuples(st.integers(0, 3), st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=finite_values)
)


@settings(max_examples=120, deadline=None)
@given(maps=finite_maps, options=normalize_options, threads=st.integers(0, 3))
def test_normalize_cpp_equals_numpy(C, maps, options, threads):
    cpp, ref = both(render.normalize, maps, num_threads=threads, **options)
    assert cpp.shape == maps.shape and cpp.dtype == np.float32
    np.testing.assert_array_equal(cpp, ref)
    assert ((cpp >= 0) & (cpp <= 1)).all()


@settings(max_examples=100, deadline=None)
@given(maps=finite_maps, out_h=st.integers(1, 40), out_w=st.integers(1, 40), align_corners=st.booleans())
@example(maps=np.full((1, 1, 2), np.finfo(np.float32).max, np.float32), out_h=9, out_w=1, align_corners=False)
def test_resize_cpp_equals_numpy_and_torch(C, maps, out_h, out_w, align_corners):
    import torch
    import torch.nn.functional as F
    cpp, ref = both(render.resize, maps, (out_h, out_w), align_corners)
    np.testing.assert_array_equal(cpp, ref)
    if maps.size:
        with np.errstate(over="ignore"):
            reference = F.interpolate(torch.from_numpy(maps)[:, None], size=(out_h, out_w), mode="bilinear",
                                      align_corners=align_corners)[:, 0].numpy()
        # Next to float32's largest values torch's order of operations can overflow to +-inf where ours rounds
        # to the largest float: there both must sit at the top of the range, with the same sign.
        overflow = ~np.isfinite(reference)
        top = np.finfo(np.float32).max * (1 - 1e-6)
        assert (np.abs(cpp[overflow]) >= top).all() and (np.sign(cpp[overflow]) == np.sign(reference[overflow])).all()
        scale = max(1.0, float(np.abs(maps).max()))
        assert np.abs(cpp.astype(np.float64)[~overflow] - reference[~overflow]).max(initial=0) <= 1e-5 * scale


@settings(max_examples=120, deadline=None)
@given(
    maps=finite_maps,
    size=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    options=normalize_options,
    alpha=st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0])),
    cmap=st.sampled_from(colormaps.COLORMAPS),
    align_corners=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    threads=st.integers(0, 3),
)
def test_fused_equals_steps(C, maps, size, options, alpha, cmap, align_corners, seed, threads):
    """The fused path == resize -> normalize -> colorize -> overlay, bit for bit, in both backends."""
    images = np.random.default_rng(seed).integers(0, 256, (len(maps), *size, 3), dtype=np.uint8)
    steps = render.normalize(render.resize(maps, size, align_corners, backend="numpy"), backend="numpy", **options)
    kw = {"align_corners": align_corners, "num_threads": threads, **options}
    cpp, ref = both(render.heatmap_overlay, maps, images, alpha, cmap, **kw)
    np.testing.assert_array_equal(cpp, render.overlay(steps, images, alpha, cmap, backend="numpy"))
    np.testing.assert_array_equal(cpp, ref)
    cpp, ref = both(render.heatmap, maps, size, cmap, **kw)
    np.testing.assert_array_equal(cpp, render.colorize(steps, cmap, backend="numpy"))
    np.testing.assert_array_equal(cpp, ref)


def test_fused_large_batch_and_threads(C):
    """Both threading layouts of the fused path (whole samples per thread / rows of one sample)."""
    rng = np.random.default_rng(2)
    maps = rng.standard_normal((5, 7, 7)).astype(np.float32)
    images = rng.integers(0, 256, (5, 224, 160, 3), dtype=np.uint8)
    reference = render.heatmap_overlay(maps, images, 0.45, "turbo", outlier_perc=1.0, backend="numpy")
    for threads in (1, 2, 3, 8, 0):
        for batch in (slice(0, 1), slice(0, 5)):
            out = render.heatmap_overlay(maps[batch], images[batch], 0.45, "turbo", outlier_perc=1.0, num_threads=threads)
            np.testing.assert_array_equal(out, reference[batch])
        np.testing.assert_array_equal(render.normalize(maps, num_threads=threads), render.normalize(maps, backend="numpy"))
        np.testing.assert_array_equal(render.resize(maps, (300, 200), num_threads=threads),
                                      render.resize(maps, (300, 200), backend="numpy"))


def test_float16_maps_read_exactly(C):
    # every finite float16 value, through the identity resize (which returns the values themselves)
    every = np.arange(2**16, dtype=np.uint16).view(np.float16)
    every = every[np.isfinite(every)]
    maps = every[: 256 * 120].reshape(1, 256, 120)
    np.testing.assert_array_equal(C.resize(maps, (256, 120)), maps.astype(np.float32))
    rng = np.random.default_rng(4)
    half = rng.uniform(-2, 2, (3, 9, 13)).astype(np.float16)
    images = rng.integers(0, 256, (3, 40, 30, 3), dtype=np.uint8)
    single = half.astype(np.float32)
    np.testing.assert_array_equal(C.normalize(half, "centered", 5.0), C.normalize(single, "centered", 5.0))
    np.testing.assert_array_equal(C.render(half, images), C.render(single, images))
    unit = np.clip(half, 0, 1)
    np.testing.assert_array_equal(C.colorize(unit)[0], C.colorize(unit.astype(np.float32))[0])
    small = np.ascontiguousarray(images[:, :9, :13])
    np.testing.assert_array_equal(C.overlay(unit, small)[0], C.overlay(unit.astype(np.float32), small)[0])
    for backend in ("C++", "numpy"):  # render.* accepts float16 in both backends
        np.testing.assert_array_equal(render.heatmap_overlay(half, images, backend=backend),
                                      C.render(single, images))


@pytest.mark.parametrize("backend", ["C++", "numpy"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises_in_arithmetic_paths(C, backend, bad):
    maps = np.zeros((2, 3, 3), np.float32)
    maps[1, 2, 0] = maps[0, 1, 1] = bad
    images = np.zeros((2, 6, 6, 3), np.uint8)
    message = r"maps contain 2 non-finite values \(NaN or \+/-inf\).*np.nan_to_num"
    with pytest.raises(ValueError, match=message):
        render.normalize(maps, backend=backend)
    with pytest.raises(ValueError, match=message):
        render.resize(maps, (6, 6), backend=backend)
    with pytest.raises(ValueError, match=message):
        render.heatmap_overlay(maps, images, backend=backend)
    with pytest.raises(ValueError, match=message):
        render.heatmap(maps.astype(np.float16), (4, 4), backend=backend)
    # the NaN-free, inf-only maps still colorize (inf clipped), as documented
    if not np.isnan(bad):
        assert render.colorize(maps, backend=backend).shape == (2, 3, 3, 3)


def test_zero_size(C):
    for backend in ("C++", "numpy"):
        assert render.resize(np.zeros((0, 3, 4)), (5, 6), backend=backend).shape == (0, 5, 6)
        assert render.normalize(np.zeros((0, 3, 4)), backend=backend).shape == (0, 3, 4)
        out = render.heatmap_overlay(np.zeros((0, 3, 4)), np.zeros((0, 8, 8, 3), np.uint8), backend=backend)
        assert out.shape == (0, 8, 8, 3) and out.dtype == np.uint8
        for fn, args in ((render.resize, ((5, 6),)), (render.normalize, ()), (render.heatmap, ((5, 5),))):
            with pytest.raises(ValueError, match=r"maps have no pixels \(shape \(2, 0, 4\)\)"):
                fn(np.zeros((2, 0, 4)), *args, backend=backend)


maps_2x3x4 = np.zeros((2, 3, 4), np.float32)
images_2x8 = np.zeros((2, 8, 8, 3), np.uint8)
# fmt: off
FUSED_BAD_INPUTS = [  # (function, args, kwargs, error, message)
    (render.resize, (maps_2x3x4, (0, 5)), {}, ValueError, r"size must be \(H, W\) with 1 <= H, W <= 65536, got \(0, 5\)"),
    (render.resize, (maps_2x3x4, (5, 70000)), {}, ValueError, r"1 <= H, W <= 65536, got \(5, 70000\)"),
    (render.resize, (maps_2x3x4, (60000, 60000)), {}, ValueError, r"output of 2 x 60000 x 60000 pixels is too large"),
    (render.resize, (maps_2x3x4, (5,)), {}, TypeError, r"size must be a pair of ints \(H, W\), got \(5,\)"),
    (render.resize, (maps_2x3x4, (5.5, 3)), {}, TypeError, "size must be a pair of ints"),
    (render.resize, (np.zeros(4), (5, 5)), {}, ValueError, r"maps must have shape \(N, H, W\) or \(H, W\)"),
    (render.normalize, (maps_2x3x4,), {"sign": "abs"}, ValueError, "unknown sign 'abs'; use one of all, absolute"),
    (render.normalize, (maps_2x3x4,), {"outlier_perc": 50}, ValueError, r"outlier_perc must lie in \[0, 50\)"),
    (render.normalize, (maps_2x3x4,), {"outlier_perc": -1}, ValueError, r"outlier_perc must lie in \[0, 50\)"),
    (render.normalize, (maps_2x3x4,), {"outlier_perc": float("nan")}, ValueError, "outlier_perc must lie"),
    (render.normalize, (maps_2x3x4,), {"value_range": (1, 1)}, ValueError, r"value_range must be finite \(lo, hi\) wi"),
    (render.normalize, (maps_2x3x4,), {"value_range": (0, np.inf)}, ValueError, "value_range must be finite"),
    (render.normalize, (maps_2x3x4,), {"value_range": (0, 1e39)}, ValueError, "value_range must be finite"),
    (render.normalize, (maps_2x3x4,), {"value_range": 1.0}, TypeError, "value_range must be a pair of numbers"),
    (render.heatmap_overlay, (maps_2x3x4, images_2x8[:1]), {}, ValueError, "must have the same batch size"),
    (render.heatmap_overlay, (maps_2x3x4, images_2x8[0]), {}, ValueError, r"images must have shape \(N, H, W, 3\)"),
    (render.heatmap_overlay, (maps_2x3x4, images_2x8.astype(np.int16)), {}, TypeError, "images must be uint8 RGB"),
    (render.heatmap_overlay, (maps_2x3x4, images_2x8[..., :2]), {}, ValueError, "images must be RGB with 3 channels"),
    (render.heatmap_overlay, (maps_2x3x4, images_2x8), {"alpha": 2}, ValueError, r"alpha must lie in \[0, 1\]"),
    (render.heatmap_overlay, (maps_2x3x4, images_2x8), {"cmap": "Viridis"}, ValueError, "unknown colormap 'Viridis'"),
    (render.heatmap, (maps_2x3x4, (4, 4)), {"num_threads": -3}, ValueError, "num_threads must be >= 0"),
    (render.heatmap, (maps_2x3x4.astype(complex), (4, 4)), {}, TypeError, "maps must hold real numbers"),
]
# fmt: on


@pytest.mark.parametrize("backend", ["C++", "numpy"])
@pytest.mark.parametrize(("fn", "args", "kwargs", "error", "message"), FUSED_BAD_INPUTS)
def test_fused_bad_input_raises(C, backend, fn, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        fn(*args, **{"backend": backend, **kwargs})


# fmt: off
C_FUSED_BAD_INPUTS = [  # (function of _C, args, kwargs, error, message)
    ("normalize", (maps3.astype(np.float64),), {}, TypeError, "maps must have dtype float32 or float16, got float64"),
    ("normalize", (maps3[:, :, ::2],), {}, ValueError, "maps must be C-contiguous and aligned"),
    ("normalize", (maps3[0],), {}, ValueError, r"maps must have shape \(N, H, W\), got shape \(4, 5\)"),
    ("normalize", (maps3, "up"), {}, ValueError, "unknown sign 'up'"),
    ("normalize", (maps3, "all", 60.0), {}, ValueError, r"outlier_perc must lie in \[0, 50\)"),
    ("normalize", (maps3, "all", 0.0, (2.0, 1.0)), {}, ValueError, "value_range must be finite"),
    ("normalize", (maps3, "all", 0.0, None, -1), {}, ValueError, "num_threads must be >= 0"),
    ("normalize", (np.zeros((2, 0, 3), np.float32),), {}, ValueError, "maps have no pixels"),
    ("resize", (maps3, (0, 3)), {}, ValueError, r"size must be \(H, W\) with 1 <= H, W <= 65536"),
    ("resize", (maps3, (-5, 3)), {}, ValueError, r"size must be \(H, W\)"),
    ("resize", (maps3, (65536, 65536)), {}, ValueError, "pixels is too large"),
    ("resize", (np.zeros((1, 4, 0), np.float32), (3, 3)), {}, ValueError, "maps have no pixels"),
    ("resize", (maps3.astype(np.int32), (3, 3)), {}, TypeError, "maps must have dtype float32 or float16"),
    ("resize", (np.full((1, 2, 2), np.nan, np.float32), (3, 3)), {}, ValueError, "maps contain 4 non-finite"),
    ("render", (maps3, np.zeros((3, 6, 6, 3), np.uint8)), {}, ValueError, "must have the same batch size"),
    ("render", (maps3, np.zeros((2, 6, 6), np.uint8)), {}, ValueError, r"images must have shape \(N, H, W, 3\)"),
    ("render", (maps3, np.zeros((2, 6, 6, 3), np.uint8)[:, ::-1]), {}, ValueError, "images must be C-contiguous"),
    ("render", (maps3, np.zeros((2, 6, 6, 3), np.float32)), {}, TypeError, "images must have dtype uint8"),
    ("render", (maps3, np.zeros((2, 6, 6, 3), np.uint8)), {"size": (5, 5)}, ValueError,
     r"size \(5, 5\) differs from the images' \(H, W\)"),
    ("render", (maps3, np.zeros((2, 6, 6, 3), np.uint8)), {"alpha": -0.5}, ValueError, r"alpha must lie in \[0, 1\]"),
    ("render", (maps3,), {"size": (1, 100000)}, ValueError, r"size must be \(H, W\)"),
    ("render", (maps3,), {"cmap": "nope"}, ValueError, "unknown colormap 'nope'"),
    ("render", (maps3,), {"sign": "nope"}, ValueError, "unknown sign 'nope'"),
    ("render", (np.full((2, 4, 5), np.inf, np.float32),), {}, ValueError, "maps contain 40 non-finite values"),
]
# fmt: on


@pytest.mark.parametrize(("name", "args", "kwargs", "error", "message"), C_FUSED_BAD_INPUTS)
def test_cpp_fused_rejects_bad_input(C, name, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        getattr(C, name)(*args, **kwargs)


def test_gil_is_released(C):
    """Another Python thread keeps running while the kernels work (a held GIL would stop it)."""
    import threading

    rng = np.random.default_rng(0)
    maps = rng.random((48, 7, 7), dtype=np.float32)
    images = rng.integers(0, 256, (48, 224, 224, 3), dtype=np.uint8)
    done = threading.Event()

    def work():
        for _ in range(3):
            C.render(maps, images, num_threads=1)
        done.set()

    worker = threading.Thread(target=work)
    ticks = 0
    worker.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.0005)
    worker.join()
    assert ticks >= 10, ticks


# --- signed overlays: opacity proportional to |value| on a diverging colormap ---


@settings(max_examples=40, deadline=None)
@given(maps=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),
                       elements=st.floats(-0.5, 1.5, width=32)),
       alpha=st.floats(0, 1), cmap=st.sampled_from(["bwr", "seismic", "jet"]), seed=st.integers(0, 2**16))
def test_overlay_signed_cpp_equals_numpy_and_formula(C, maps, alpha, cmap, seed):
    images = np.random.default_rng(seed).integers(0, 256, (*maps.shape, 3), dtype=np.uint8)
    cpp, numpy = both(render.overlay_signed, maps, images, alpha, cmap)
    np.testing.assert_array_equal(cpp, numpy)
    m = np.clip(maps.astype(np.float64), 0, 1)
    a = (alpha * np.abs(2 * m - 1))[..., None]
    colors = render.colorize(maps, cmap, backend="numpy").astype(np.float64)
    assert np.abs(numpy - ((1 - a) * images + a * colors)).max() <= 1.0


@pytest.mark.parametrize("backend", ["C++", "numpy"])
def test_overlay_signed_zero_keeps_the_image_and_extremes_blend_alpha(C, backend):
    images = np.array([[[10, 200, 30], [10, 200, 30], [10, 200, 30]]], np.uint8)[None]
    out = render.overlay_signed(np.array([[[0.0, 0.5, 1.0]]]), images, alpha=0.5, cmap="bwr", backend=backend)
    assert out[0, 0, 1].tolist() == [10, 200, 30]  # zero: the photo, not bleached white
    assert out[0, 0, 0].tolist() == [5, 100, 143]  # 0.5 * (10, 200, 30) + 0.5 * blue (0, 0, 255), rounded
    assert out[0, 0, 2].tolist() == [133, 100, 15]  # ... + 0.5 * red (255, 0, 0)
    plain = render.overlay(np.array([[[0.5]]]), images[:, :, :1], alpha=0.5, cmap="bwr", backend=backend)
    assert plain[0, 0, 0].tolist() == [133, 227, 142]  # a plain overlay: half-way to bwr[128] = (255, 254, 254)


@pytest.mark.parametrize("backend", ["C++", "numpy"])
def test_heatmap_overlay_signed_is_the_steps(C, backend):
    rng = np.random.default_rng(4)
    raw = rng.normal(size=(2, 4, 5)).astype(np.float32)
    images = rng.integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
    fused = render.heatmap_overlay_signed(raw, images, 0.7, outlier_perc=1.0, backend=backend)
    unit = render.normalize(render.resize(raw, (9, 7), backend=backend), sign="centered", outlier_perc=1.0,
                            backend=backend)
    np.testing.assert_array_equal(fused, render.overlay_signed(unit, images, 0.7, backend=backend))
    with pytest.raises(ValueError, match="NaN"):
        render.overlay_signed(np.full((1, 1), np.nan), np.zeros((1, 1, 3), np.uint8), backend=backend)
