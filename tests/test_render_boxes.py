"""pyattr.render.draw_boxes: hand-worked outlines, the pixel convention, clipping, padding rows, colors,
the C++ and NumPy backends bit-identical (and equal to an independent per-pixel reference), thread
count independence, inputs left alone, and clear errors."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyattr import render

BACKENDS = ["C++", "numpy"]
RED = (255, 0, 0)


@pytest.fixture(scope="module")
def C():
    """The compiled module; its absence is a failure, not a skip."""
    try:
        from pyattr import _C
    except ImportError as err:
        pytest.fail(f"pyattr._C is not built: run ./dev_build.sh ({err})")
    return _C


def drawn(out: np.ndarray, background: int = 0) -> list[list[int]]:
    """1 where a pixel differs from the background."""
    return (out != background).any(-1).astype(int).tolist()


def reference(images, boxes, colors, thickness):
    """Per pixel, from the definition and nothing of the implementations: pixel (r, c) covers
    [c, c + 1) x [r, r + 1); a box covers the pixels whose square meets its open interior; a covered
    pixel is on the outline when fewer than `thickness` covered pixels separate it from the box's
    first or last covered row or column. Later boxes over earlier ones."""
    out = images.copy()
    n, h, w, _ = images.shape
    span = np.arange(-40, 80)  # every covered index of the boxes drawn below lies in here
    for s in range(n):
        for j, (x1, y1, x2, y2) in enumerate(boxes[s]):
            if not (x2 > x1 and y2 > y1):
                continue
            cols = span[(span + 1 > x1) & (span < x2)]
            rows = span[(span + 1 > y1) & (span < y2)]
            for r in range(h):
                for c in range(w):
                    if not (rows[0] <= r <= rows[-1] and cols[0] <= c <= cols[-1]):
                        continue
                    if min(r - rows[0], rows[-1] - r, c - cols[0], cols[-1] - c) < thickness:
                        out[s, r, c] = render.BOX_PALETTE[j % 10] if colors is None else colors[s, j]
    return out


# --- hand-worked cases on a 6x6 image ---


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pixel_outline(C, backend):
    image = np.full((6, 6, 3), 7, np.uint8)
    out = render.draw_boxes(image, [[1, 0.5, 5.5, 5]], RED, thickness=1, backend=backend)
    # columns floor(1) .. ceil(5.5) - 1 = 1 .. 5, rows floor(0.5) .. ceil(5) - 1 = 0 .. 4
    assert drawn(out, 7) == [
        [0, 1, 1, 1, 1, 1],
        [0, 1, 0, 0, 0, 1],
        [0, 1, 0, 0, 0, 1],
        [0, 1, 0, 0, 0, 1],
        [0, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],
    ]
    assert out[0, 1].tolist() == [255, 0, 0] and out[4, 5].tolist() == [255, 0, 0]
    assert out[2, 3].tolist() == [7, 7, 7] and out[5, 0].tolist() == [7, 7, 7]
    assert set(map(tuple, out.reshape(-1, 3).tolist())) == {(7, 7, 7), RED}


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_pixel_outline(C, backend):
    image = np.zeros((6, 6, 3), np.uint8)
    out = render.draw_boxes(image, [[0, 0, 6, 6], [1, 1, 4, 3]], [[10, 20, 30], [40, 50, 60]], thickness=2,
                            backend=backend)
    # box 0 (1 below): the 6x6 image, a 2-pixel ring around rows/cols 2..3; box 1 (2): cols 1..3, rows 1..2,
    # no more than 2 * 2 pixels across, so filled, and drawn over box 0
    expected = np.array([
        [1, 1, 1, 1, 1, 1],
        [1, 2, 2, 2, 1, 1],
        [1, 2, 2, 2, 1, 1],
        [1, 1, 0, 0, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
    ])
    table = np.array([[0, 0, 0], [10, 20, 30], [40, 50, 60]], np.uint8)
    np.testing.assert_array_equal(out, table[expected])


@pytest.mark.parametrize("backend", BACKENDS)
def test_thick_outline_clipped_to_the_box(C, backend):
    image = np.zeros((6, 6, 3), np.uint8)
    # 5 columns, 4 rows, thickness 2: rows 0-1 and 2-3 are bands; middle rows do not exist -> filled
    out = render.draw_boxes(image, [[0, 0, 5, 4]], RED, thickness=2, backend=backend)
    assert drawn(out) == [[1] * 5 + [0]] * 4 + [[0] * 6] * 2
    # 5 columns, 6 rows, thickness 2: rows 2-3 keep column 2 (the middle one) free
    out = render.draw_boxes(image, [[0, 0, 5, 6]], RED, thickness=2, backend=backend)
    assert drawn(out)[2] == drawn(out)[3] == [1, 1, 0, 1, 1, 0]
    assert drawn(out)[0] == drawn(out)[5] == [1, 1, 1, 1, 1, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("box", "rows", "cols"), [
    ([1.0, 1.0, 3.0, 3.0], [1, 2], [1, 2]),          # integer edges: the right/bottom edge pixel is not covered
    ([0.999, 1.0, 3.0, 3.001], [1, 2, 3], [0, 1, 2]),  # any overlap with a pixel covers it
    ([1.001, 1.5, 3.001, 2.5], [1, 2], [1, 2, 3]),
    ([2.2, 2.2, 2.8, 2.8], [2], [2]),                # inside one pixel: that pixel
    ([2.0, 2.0, 2.5, 3.0], [2], [2]),
])
def test_pixel_convention(C, backend, box, rows, cols):
    out = render.draw_boxes(np.zeros((6, 6, 3), np.uint8), [box], RED, thickness=6, backend=backend)
    covered = np.zeros((6, 6), int)
    covered[np.ix_(rows, cols)] = 1  # thickness 6 fills the box: the covered pixels
    assert drawn(out) == covered.tolist()


# --- clipping, padding, colors ---


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping(C, backend):
    image = np.zeros((6, 6, 3), np.uint8)
    # cols and rows -2 .. 2: only the right and bottom edges are visible; edges outside are not moved in
    out = render.draw_boxes(image, [[-2, -2, 3, 3]], RED, thickness=1, backend=backend)
    assert drawn(out) == [[0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]] + [[0] * 6] * 3
    # cols 4 .. 99, rows 3 .. 99, thickness 2: the top and left bands are what is visible
    out = render.draw_boxes(image, [[4, 3, 100, 100]], RED, thickness=2, backend=backend)
    assert drawn(out) == [[0] * 6] * 3 + [[0, 0, 0, 0, 1, 1]] * 3
    # wholly outside, on every side and touching the border from outside: nothing
    outside = [[6, 0, 8, 3], [-3, -3, 0, 0], [0, 6, 6, 9], [0, -5, 6, 0], [-1e300, -1e300, -1e299, 5]]
    np.testing.assert_array_equal(render.draw_boxes(image, outside, RED, backend=backend), image)
    # huge finite coordinates: edges far outside draw nothing, a one-row box spans the image
    out = render.draw_boxes(image, [[-1e300, -1e300, 1e300, 1e300], [-1e300, 2, 1e300, 3]], RED, thickness=1,
                            backend=backend)
    assert drawn(out) == [[0] * 6] * 2 + [[1] * 6] + [[0] * 6] * 3
    out = render.draw_boxes(image, [[-1e300, -1e300, 1e300, 1e300]], RED, thickness=render.MAX_THICKNESS,
                            backend=backend)
    assert drawn(out) == [[0] * 6] * 6  # still 2**31 - 1 < 1e300 pixels from the visible part


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_rows_skipped_and_palette_by_index(C, backend):
    nan = float("nan")
    boxes = [[nan] * 4, [0, 0, 0, 0], [1, 1, 1, 5], [1, 1, 5, 1], [nan, 0, 4, 4], [2, 3, 1, 5], [1, 1, 3, 3]]
    out = render.draw_boxes(np.zeros((6, 6, 3), np.uint8), boxes, thickness=1, backend=backend)
    expected = np.zeros((6, 6, 3), np.uint8)
    expected[1:3, 1:3] = render.BOX_PALETTE[6]  # the only real box, index 6: its palette color
    np.testing.assert_array_equal(out, expected)


def test_palette(C):
    np.testing.assert_array_equal(C.box_palette(), render.BOX_PALETTE)
    assert render.BOX_PALETTE.shape == (10, 3) and len({tuple(c) for c in render.BOX_PALETTE.tolist()}) == 10
    assert render.BOX_PALETTE[0].tolist() == [31, 119, 180]  # tab10 blue
    with pytest.raises(ValueError, match="read-only"):
        render.BOX_PALETTE[0, 0] = 0
    # box j gets BOX_PALETTE[j % 10]: 12 one-pixel boxes on a row
    boxes = np.array([[j, 0, j + 1, 1] for j in range(12)], float)
    for backend in BACKENDS:
        out = render.draw_boxes(np.zeros((1, 12, 3), np.uint8), boxes, backend=backend)
        np.testing.assert_array_equal(out[0], render.BOX_PALETTE[np.arange(12) % 10])


@pytest.mark.parametrize("backend", BACKENDS)
def test_colors_forms_and_drawing_order(C, backend):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    boxes = np.array([[[0, 0, 4, 4], [2, 2, 6, 6]], [[1, 0, 3, 6], [0, 1, 6, 3]]], float)
    per_image = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    out = render.draw_boxes(images, boxes, per_image, thickness=1, backend=backend)
    np.testing.assert_array_equal(out, reference(images, boxes, per_image, 1))
    # the overlaps take the later box's color
    assert out[0, 2, 3].tolist() == per_image[0, 1].tolist() and out[0, 3, 2].tolist() == per_image[0, 1].tolist()
    assert out[1, 1, 1].tolist() == per_image[1, 1].tolist()
    # (B, 3) is the same in every image, (3,) the same for every box; plain ints are fine
    per_box = np.array([[1, 2, 3], [250, 251, 252]], np.uint8)
    np.testing.assert_array_equal(render.draw_boxes(images, boxes, per_box.tolist(), 1, backend=backend),
                                  reference(images, boxes, np.stack([per_box, per_box]), 1))
    one = render.draw_boxes(images, boxes, [9, 8, 7], 1, backend=backend)
    np.testing.assert_array_equal(one, reference(images, boxes, np.full((2, 2, 3), [9, 8, 7], np.uint8), 1))
    np.testing.assert_array_equal(
        render.draw_boxes(images, boxes, np.array([9, 8, 7], np.uint8), 1, backend=backend), one
    )


# --- C++ == NumPy == the reference ---

coordinate = st.one_of(
    st.floats(-4.0, 12.0, allow_nan=False), st.integers(-4, 12).map(float), st.just(float("nan"))
)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), b=st.integers(0, 5),
    thickness=st.integers(1, 4), threads=st.sampled_from([1, 2, 3]), palette=st.booleans(),
    seed=st.integers(0, 2**32 - 1), data=st.data(),
)
def test_cpp_equals_numpy_equals_reference(C, n, h, w, b, thickness, threads, palette, seed, data):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    flat = data.draw(st.lists(coordinate, min_size=4 * n * b, max_size=4 * n * b))
    boxes = np.array(flat, float).reshape(n, b, 4)
    if b:  # well-formed boxes most of the time: x1 < x2, y1 < y2
        boxes = np.where(rng.random((n, b, 1)) < 0.7, np.concatenate(
            [np.fmin(boxes[..., :2], boxes[..., 2:]), np.fmax(boxes[..., :2], boxes[..., 2:])], -1), boxes)
    colors = None if palette else rng.integers(0, 256, (n, b, 3), dtype=np.uint8)
    cpp = render.draw_boxes(images, boxes, colors, thickness, threads, backend="C++")
    ref = render.draw_boxes(images, boxes, colors, thickness, backend="numpy")
    np.testing.assert_array_equal(cpp, ref)
    np.testing.assert_array_equal(ref, reference(images, boxes, colors, thickness))


def test_results_do_not_depend_on_thread_count(C):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (3, 97, 131, 3), dtype=np.uint8)  # big enough to split by rows
    corners = rng.uniform(-20, 150, (3, 40, 2, 2))
    boxes = np.concatenate([corners.min(2), corners.max(2)], -1)
    boxes[:, ::7] = np.nan
    expected = render.draw_boxes(images, boxes, thickness=3, backend="numpy")
    assert (expected != images).any(-1).mean() > 0.2  # the boxes do draw a lot
    for threads in (1, 2, 3, 7, 0):
        np.testing.assert_array_equal(render.draw_boxes(images, boxes, thickness=3, num_threads=threads,
                                                        backend="C++"), expected)


# --- inputs, shapes, errors ---


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_unchanged_and_output_new(C, backend):
    import torch

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    boxes = np.array([[[1, 1, 6, 6]], [[0, 0, 8, 8]]], np.float32)
    colors = np.array([200, 100, 0], np.uint8)
    kept = images.copy(), boxes.copy(), colors.copy()
    out = render.draw_boxes(images, boxes, colors, backend=backend)
    for before, after in zip(kept, (images, boxes, colors)):
        np.testing.assert_array_equal(before, after)
    assert not np.shares_memory(out, images) and (out != images).any()
    tensor = torch.from_numpy(images.copy())
    from_torch = render.draw_boxes(tensor, torch.from_numpy(boxes), torch.from_numpy(colors), backend=backend)
    np.testing.assert_array_equal(from_torch, out)
    np.testing.assert_array_equal(tensor.numpy(), images)
    # a strided (non-contiguous) image and integer boxes
    flipped = render.draw_boxes(images[:, ::-1], boxes.astype(np.int64), colors, backend=backend)
    np.testing.assert_array_equal(flipped, render.draw_boxes(images[:, ::-1].copy(), boxes, colors, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(C, backend):
    images = np.full((2, 3, 4, 3), 5, np.uint8)
    out = render.draw_boxes(images, np.zeros((2, 0, 4)), backend=backend)
    np.testing.assert_array_equal(out, images)
    assert render.draw_boxes(np.zeros((0, 3, 4, 3), np.uint8), np.zeros((0, 2, 4)), backend=backend).shape == (
        0, 3, 4, 3)
    assert render.draw_boxes(np.zeros((1, 0, 4, 3), np.uint8), [[[0, 0, 2, 2]]], backend=backend).shape == (
        1, 0, 4, 3)


images6 = np.zeros((2, 6, 6, 3), np.uint8)
boxes6 = np.zeros((2, 1, 4))
# fmt: off
BAD_INPUTS = [  # (args, kwargs, error, message)
    ((images6.astype(np.float32), boxes6), {}, TypeError, "images must be uint8 RGB, got dtype float32"),
    ((images6[..., :2], boxes6), {}, ValueError, r"images must be uint8 RGB of shape \(N, H, W, 3\) or \(H, W, 3\)"),
    ((images6[0, 0], boxes6), {}, ValueError, r"images must be uint8 RGB of shape .* got shape \(6, 3\)"),
    ((images6, boxes6[0]), {}, ValueError, r"boxes must have shape \(N, B, 4\) .* got shape \(1, 4\)"),
    ((images6[0], boxes6), {}, ValueError, r"boxes must have shape \(B, 4\) .* got shape \(2, 1, 4\)"),
    ((images6, np.zeros((2, 1, 5))), {}, ValueError, r"boxes must have shape \(N, B, 4\)"),
    ((images6, np.zeros((3, 1, 4))), {}, ValueError, "boxes and images must have the same batch size"),
    ((images6, boxes6.astype(complex)), {}, TypeError, "boxes must hold real numbers"),
    ((images6, np.array([[[0, 0, np.inf, 2]], [[-np.inf, 0, 1, 1]]])), {}, ValueError,
     "boxes contain 2 infinite coordinates"),
    ((images6, boxes6), {"thickness": 0}, ValueError, r"thickness must lie in \[1, 2147483647\], got 0"),
    ((images6, boxes6), {"thickness": 2**31}, ValueError, r"thickness must lie in \[1, 2147483647\]"),
    ((images6, boxes6), {"thickness": 1.5}, TypeError, "thickness must be an int, got 1.5"),
    ((images6, boxes6), {"num_threads": -1}, ValueError, "num_threads must be >= 0"),
    ((images6, boxes6), {"colors": [1.0, 0.0, 0.0]}, TypeError, r"colors must be uint8 RGB \(or integers"),
    ((images6, boxes6), {"colors": [300, 0, 0]}, ValueError, r"colors must lie in \[0, 255\], got values from 0 to"),
    ((images6, boxes6), {"colors": np.zeros((2, 3), np.uint8)}, ValueError,
     r"colors must have shape \(3,\), \(B, 3\) or \(N, B, 3\) \(\(3,\), \(1, 3\), \(2, 1, 3\) here\)"),
    ((images6[0], boxes6[0]), {"colors": np.zeros((1, 1, 3), np.uint8)}, ValueError,
     r"colors must have shape \(3,\), \(B, 3\) \(\(3,\), \(1, 3\) here\), got shape \(1, 1, 3\)"),
]
# fmt: on


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("args", "kwargs", "error", "message"), BAD_INPUTS)
def test_bad_input_raises(C, backend, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        render.draw_boxes(*args, **{"backend": backend, **kwargs})


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be 'auto', 'C\+\+' or 'numpy'"):
        render.draw_boxes(images6, boxes6, backend="cuda")


# fmt: off
C_BAD_INPUTS = [  # (args, kwargs, error, message)
    ((images6, boxes6.astype(np.float32)), {}, TypeError, "boxes must have dtype float64, got float32"),
    ((images6, boxes6.tolist()), {}, TypeError, "boxes must be a numpy.ndarray of dtype float64, got list"),
    ((images6, np.zeros((2, 4, 2)).transpose(0, 2, 1)), {}, ValueError, "boxes must be C-contiguous"),
    ((images6, boxes6[0]), {}, ValueError, r"boxes must have shape \(N, B, 4\), got shape \(1, 4\)"),
    ((images6, np.zeros((2, 1, 3))), {}, ValueError, r"boxes must have shape \(N, B, 4\) \(x1, y1, x2, y2"),
    ((images6, np.zeros((3, 1, 4))), {}, ValueError, r"boxes and images must have the same batch size: boxes 3"),
    ((images6.astype(np.int32), boxes6), {}, TypeError, "images must have dtype uint8, got int32"),
    ((images6, boxes6, np.zeros((2, 1, 3), np.int64)), {}, TypeError, "colors must have dtype uint8, got int64"),
    ((images6, boxes6, np.zeros((2, 2, 3), np.uint8)), {}, ValueError,
     r"colors must have shape \(N, B, 3\) = \(2, 1, 3\) to go with boxes \(2, 1, 4\), got shape \(2, 2, 3\)"),
    ((images6, np.full((2, 1, 4), np.inf)), {}, ValueError, "boxes contain 8 infinite coordinates"),
    ((images6, boxes6), {"thickness": 0}, ValueError, r"thickness must lie in \[1, 2147483647\], got 0"),
    ((images6, boxes6), {"thickness": 2**31}, ValueError, r"thickness must lie in \[1, 2147483647\]"),
    ((images6, boxes6), {"num_threads": -2}, ValueError, "num_threads must be >= 0"),
]
# fmt: on


@pytest.mark.parametrize(("args", "kwargs", "error", "message"), C_BAD_INPUTS)
def test_cpp_rejects_bad_input(C, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        C.draw_boxes(*args, **kwargs)


def test_docstring_example(C):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    (test,) = finder.find(render.draw_boxes, "draw_boxes", globs={})
    assert test.examples and runner.run(test).failed == 0
