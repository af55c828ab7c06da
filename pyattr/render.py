"""Host-side post-processing of attribution maps: resize, normalize, colormaps and overlays.

The work is done by the compiled extension :mod:`pyattr._C` (C++, multi-threaded, GIL
released, no copy of contiguous float32/float16 inputs) when it is importable, else by NumPy.
Both backends give bit-identical results: the NumPy code performs the same float32 operations
in the same order as ``csrc/``.

Functions:

* :func:`resize` -- bilinear, ``align_corners`` False or True, the index math of
  ``torch.nn.functional.interpolate`` (within 1e-5 of it; tested);
* :func:`normalize` -- per-sample min-max to ``[0, 1]``, with sign handling (``all``,
  ``absolute``, ``positive``, ``negative``, ``centered`` for diverging colormaps), percentile
  clipping of outliers (``outlier_perc``) or a fixed ``value_range``; the default equals
  :func:`pyattr.postprocess.normalize_minmax`;
* :func:`colorize`, :func:`overlay` -- maps already in ``[0, 1]`` -> LUT colors / alpha blend;
* :func:`heatmap`, :func:`heatmap_overlay` -- the fused path, raw maps of any size ->
  resize -> normalize -> colorize (-> overlay) in one C++ pass, equal to the steps run one by one;
* :func:`draw_boxes` -- box outlines (e.g. detections) drawn on uint8 images, padding rows skipped;
* :func:`overlay_signed`, :func:`heatmap_overlay_signed` -- signed maps (evidence for and against)
  on a diverging colormap with an opacity that grows with ``|value|``: the image shows through
  unchanged where the map is 0 (a plain overlay of a white-at-zero colormap bleaches it).

Conventions, shared by both backends:

* maps are real-valued ``(N, H, W)`` or ``(H, W)`` arrays (float32 or float16 are used as
  they are, other real dtypes are converted to float32).
* NaN and infinities: :func:`colorize` / :func:`overlay` clip ``+inf``/``-inf`` to ``[0, 1]``
  like any other value and raise ``ValueError`` on NaN; the functions that compute with the
  values (:func:`resize`, :func:`normalize`, :func:`heatmap`, :func:`heatmap_overlay`) raise
  ``ValueError`` on any NaN or infinity, before any output is written.
* images are uint8 RGB ``(N, H, W, 3)`` or ``(H, W, 3)``, matching the maps' ``(N, H, W)``.
* color index = ``int(clip(v, 0, 1) * 255 + 0.5)`` into a 256-entry LUT (:mod:`pyattr.colormaps`).

Inputs may be NumPy arrays or torch tensors (this module never imports torch).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from pyattr import colormaps

__all__ = [
    "BOX_PALETTE", "HAVE_C", "SIGNS", "ExtensionMissingWarning", "backend", "colorize", "draw_boxes", "heatmap",
    "heatmap_overlay",
    "heatmap_overlay_signed", "normalize", "overlay", "overlay_signed", "resize",
]

Backend = Literal["auto", "C++", "numpy"]
Sign = Literal["all", "absolute", "positive", "negative", "centered"]

SIGNS: tuple[str, ...] = ("all", "absolute", "positive", "negative", "centered")
"""Sign rules of :func:`normalize`, in the C++ core's order."""

MAX_SIDE = 1 << 16
"""Largest output side accepted by :func:`resize` and the fused path (larger is a mistake)."""
MAX_PIXELS = 1 << 31
"""Largest ``N * H * W`` accepted per call by :func:`resize` and the fused path."""

MAX_THICKNESS = 2**31 - 1
"""Largest outline ``thickness`` accepted by :func:`draw_boxes`."""

BOX_PALETTE: np.ndarray = np.array(
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
     [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]],
    dtype=np.uint8,
)
"""The default colors of :func:`draw_boxes`, box ``j`` of each image in ``BOX_PALETTE[j % 10]``: matplotlib's
``tab10`` (blue, orange, green, red, purple, brown, pink, gray, olive, cyan), as in ``csrc/``'s ``box_palette``."""
BOX_PALETTE.flags.writeable = False

_FLT_MIN = np.float32(np.finfo(np.float32).tiny)

_BUILD_HINT = (
    "rebuild it with `pip install .` (or `pip install --no-build-isolation -e .`) from the "
    "pyattr source tree; this needs a C++17 compiler and CMake"
)


class ExtensionMissingWarning(UserWarning):
    """The compiled extension ``pyattr._C`` could not be imported; NumPy is used instead."""


try:
    from pyattr import _C
except ImportError as err:
    _C = None
    warnings.warn(
        f"pyattr._C, the compiled extension, is missing ({err}). pyattr.render falls back to "
        f"NumPy: results are identical but slower. To get it back, {_BUILD_HINT}.",
        ExtensionMissingWarning,
        stacklevel=2,
    )

HAVE_C: bool = _C is not None
"""Whether the compiled extension ``pyattr._C`` is available."""


def backend() -> str:
    """The backend used by default: ``"C++"`` if :mod:`pyattr._C` is importable, else ``"numpy"``."""
    return "C++" if HAVE_C else "numpy"


def colorize(maps: Any, cmap: str = "jet", num_threads: int = 0, *, backend: Backend = "auto") -> np.ndarray:
    """Color attribution maps with a colormap LUT.

    ``out[..., :] = lut[int(clip(m, 0, 1) * 255 + 0.5)]``, computed in float32. ``+/-inf`` are
    clipped to 1 / 0; NaN raises.

    Args:
        maps: ``(N, H, W)`` or ``(H, W)`` real values (NumPy array or torch tensor), normally
            in ``[0, 1]``; float16 stays float16, other dtypes become float32.
        cmap: colormap name, one of :data:`pyattr.colormaps.COLORMAPS` (``"jet"``, ``"viridis"``, ...).
        num_threads: threads of the C++ backend; 0 means all cores. Ignored by NumPy.
        backend: ``"auto"`` (C++ if built, else NumPy), ``"C++"`` or ``"numpy"``.

    Returns:
        uint8 RGB array of shape ``maps.shape + (3,)``.

    Raises:
        ValueError: NaN in maps, wrong rank, unknown colormap, negative num_threads.
        TypeError: maps that are not real numbers.

    Example:
        >>> import numpy as np
        >>> from pyattr.render import colorize
        >>> colorize(np.array([[0.0, 1.0]]), cmap="jet").tolist()
        [[[0, 0, 128], [128, 0, 0]]]
    """
    maps = _as_maps(maps)
    lut, num_threads, use_c = _check_options(cmap, num_threads, backend)
    batch = maps[None] if maps.ndim == 2 else maps
    if use_c:
        out, nan = _C.colorize(batch, cmap, num_threads)
    else:
        out, nan = _colorize_numpy(batch.astype(np.float32, copy=False), lut)
    _raise_on_nan(nan)
    return out[0] if maps.ndim == 2 else out


def overlay(
    maps: Any,
    images: Any,
    alpha: float = 0.5,
    cmap: str = "jet",
    num_threads: int = 0,
    *,
    backend: Backend = "auto",
) -> np.ndarray:
    """Alpha-blend colored attribution maps over uint8 RGB images.

    Per channel, in float32 and in this order:
    ``out = uint8(floor((1 - alpha) * image + alpha * colorize(map) + 0.5))``.
    So ``alpha=0`` returns the images and ``alpha=1`` the colored maps, exactly.

    Args:
        maps: ``(N, H, W)`` or ``(H, W)`` real values (see :func:`colorize`; NaN raises,
            ``+/-inf`` are clipped).
        images: uint8 RGB, ``(N, H, W, 3)`` with 3-D maps or ``(H, W, 3)`` with 2-D maps;
            same ``(N, H, W)`` as the maps (resize the maps to the image size first).
        alpha: weight of the colored map, in ``[0, 1]``.
        cmap: colormap name, one of :data:`pyattr.colormaps.COLORMAPS`.
        num_threads: threads of the C++ backend; 0 means all cores. Ignored by NumPy.
        backend: ``"auto"`` (C++ if built, else NumPy), ``"C++"`` or ``"numpy"``.

    Returns:
        uint8 RGB array shaped like ``images``.

    Raises:
        ValueError: NaN in maps, mismatched shapes or ranks, images without 3 channels, alpha
            outside ``[0, 1]``, unknown colormap, negative num_threads.
        TypeError: images that are not uint8, maps that are not real numbers.

    Example:
        >>> import numpy as np
        >>> from pyattr.render import overlay
        >>> image = np.full((2, 2, 3), 100, dtype=np.uint8)
        >>> overlay(np.ones((2, 2)), image, alpha=0.5, cmap="gray")[0, 0].tolist()
        [178, 178, 178]
    """
    maps, images = _same_pixels(maps, images)
    alpha = _check_alpha(alpha)
    lut, num_threads, use_c = _check_options(cmap, num_threads, backend)

    batch, image_batch = (maps[None], images[None]) if maps.ndim == 2 else (maps, images)
    if use_c:
        out, nan = _C.overlay(batch, image_batch, alpha, cmap, num_threads)
    else:
        out, nan = _overlay_numpy(batch.astype(np.float32, copy=False), image_batch, alpha, lut)
    _raise_on_nan(nan)
    return out[0] if maps.ndim == 2 else out


def overlay_signed(
    maps: Any,
    images: Any,
    alpha: float = 0.5,
    cmap: str = "bwr",
    num_threads: int = 0,
    *,
    backend: Backend = "auto",
) -> np.ndarray:
    """Overlay centred signed maps (0.5 = zero, as :func:`normalize` with ``sign="centered"`` makes
    them) with an opacity proportional to the magnitude.

    Per pixel, in float32: ``a = alpha * |2 * clip(m, 0, 1) - 1|``, then per channel
    ``out = uint8(floor((1 - a) * image + a * colorize(m) + 0.5))``. So a zero attribution (``m = 0.5``)
    leaves the pixel exactly as it was, and ``m = 0`` or ``1`` (the largest ``|value|``) blends the
    colormap's end with weight ``alpha``. The colors come from :func:`colorize` (C++ or NumPy, equal);
    the blend is NumPy, the same for both backends.

    Args:
        maps: ``(N, H, W)`` or ``(H, W)`` values in ``[0, 1]``, 0.5 meaning zero; NaN raises.
        images: uint8 RGB, ``(N, H, W, 3)`` or ``(H, W, 3)``, the same ``(N, H, W)`` as the maps.
        alpha: opacity at the largest magnitude, in ``[0, 1]``.
        cmap: a colormap, normally a diverging one (``"bwr"``, ``"seismic"``).
        num_threads, backend: as in :func:`colorize`.

    Returns:
        uint8 RGB array shaped like ``images``.

    Example:
        >>> import numpy as np
        >>> from pyattr.render import overlay_signed
        >>> image = np.full((1, 3, 3), 100, np.uint8)
        >>> overlay_signed(np.array([[0.0, 0.5, 1.0]]), image, alpha=1.0, cmap="bwr").tolist()
        [[[0, 0, 255], [100, 100, 100], [255, 0, 0]]]
    """
    maps, images = _same_pixels(maps, images)
    alpha = _check_alpha(alpha)
    colors = colorize(maps, cmap, num_threads, backend=backend)  # validates cmap and threads, raises on NaN
    m = maps.astype(np.float32)
    m = np.where(m > np.float32(0), m, np.float32(0))
    m = np.where(m < np.float32(1), m, np.float32(1))
    a = (np.float32(alpha) * np.abs(np.float32(2) * m - np.float32(1)))[..., None]
    blended = images.astype(np.float32) * (np.float32(1) - a) + colors.astype(np.float32) * a
    blended += np.float32(0.5)
    return np.floor(blended).astype(np.uint8)


def heatmap_overlay_signed(
    maps: Any,
    images: Any,
    alpha: float = 0.5,
    cmap: str = "bwr",
    *,
    outlier_perc: float = 0.0,
    align_corners: bool = False,
    num_threads: int = 0,
    backend: Backend = "auto",
) -> np.ndarray:
    """Raw signed maps of any size -> overlays on the images: :func:`resize` to the images' size ->
    :func:`normalize` with ``sign="centered"`` (0 -> 0.5, ``+-max|value|`` -> 1 / 0) ->
    :func:`overlay_signed`.

    Example:
        >>> import numpy as np
        >>> from pyattr.render import heatmap_overlay_signed
        >>> image = np.full((1, 3, 3), 100, np.uint8)
        >>> heatmap_overlay_signed(np.array([[-2.0, 0.0, 2.0]]), image, alpha=1.0)[0, 1].tolist()
        [100, 100, 100]
    """
    maps = _as_maps(maps)
    images = _as_images(images, maps)
    batch, image_batch = _same_batch(maps, images)
    resized = resize(batch, image_batch.shape[1:3], align_corners, num_threads, backend=backend)
    unit = normalize(resized, "centered", outlier_perc, None, num_threads, backend=backend)
    out = overlay_signed(unit, image_batch, alpha, cmap, num_threads, backend=backend)
    return out[0] if maps.ndim == 2 else out


def normalize(
    maps: Any,
    sign: Sign = "all",
    outlier_perc: float = 0.0,
    value_range: tuple[float, float] | None = None,
    num_threads: int = 0,
    *,
    backend: Backend = "auto",
) -> np.ndarray:
    """Normalize each map to ``[0, 1]`` (per sample), float32.

    Each value ``v`` becomes ``t`` by the sign rule -- ``all`` and ``centered``: ``v``;
    ``absolute``: ``|v|``; ``positive``: ``max(v, 0)``; ``negative``: ``max(-v, 0)`` (negative
    evidence shown as large values) -- then ``out = clip((t - lo) / max(hi - lo, tiny), 0, 1)``
    in float32, ``tiny`` the smallest normal float32, with ``[lo, hi]`` per sample:

    * ``value_range=(lo, hi)``: fixed (finite, ``lo < hi``); values outside are clipped;
    * ``all``: ``[min t, max t]``; with ``outlier_perc=p``: ``[P(p), P(100 - p)]``;
    * ``absolute``, ``positive``, ``negative``: ``[min t, max t]`` or ``[min t, P(100 - p)]``;
    * ``centered``: ``[-s, s]`` with ``s = max |t|`` (or ``P_|t|(100 - p)``), at least ``tiny``:
      zero maps to 0.5, for the diverging colormaps ``bwr`` / ``seismic``.

    ``P(q)`` is the ``q``-th percentile of the sample's values with NumPy's default ``"linear"``
    method (computed in float64 from the two closest ranks, then rounded to float32). The clipped
    share ``outlier_perc`` plays the role of captum's ``outlier_perc`` (which clips by cumulative
    mass rather than by value rank). If ``hi - lo`` overflows float32, both ends are halved first.
    With the defaults this equals :func:`pyattr.postprocess.normalize_minmax`: a constant map
    becomes all zeros.

    Args:
        maps: ``(N, H, W)`` or ``(H, W)`` real values; NaN or infinities raise ``ValueError``.
        sign: ``"all"`` (default), ``"absolute"``, ``"positive"``, ``"negative"`` or ``"centered"``.
        outlier_perc: percent of values clipped at the top (and, for ``"all"``, at the bottom),
            in ``[0, 50)``.
        value_range: a fixed ``(lo, hi)`` instead of the per-sample range.
        num_threads: threads of the C++ backend; 0 means all cores.
        backend: ``"auto"``, ``"C++"`` or ``"numpy"``.

    Returns:
        float32 array shaped like ``maps``, in ``[0, 1]``.

    Example:
        >>> import numpy as np
        >>> from pyattr.render import normalize
        >>> normalize(np.array([[-2.0, 0.0, 2.0]]), sign="centered").tolist()
        [[0.0, 0.5, 1.0]]
    """
    maps = _as_maps(maps)
    options = _check_normalization(sign, outlier_perc, value_range)
    _, num_threads, use_c = _check_options("jet", num_threads, backend)
    batch = maps[None] if maps.ndim == 2 else maps
    _check_has_pixels(batch)
    if use_c:
        out = _C.normalize(batch, sign, options[1], options[2], num_threads)
    else:
        out = _normalize_numpy(_finite_float32(batch), *options)
    return out[0] if maps.ndim == 2 else out


def resize(
    maps: Any,
    size: Sequence[int],
    align_corners: bool = False,
    num_threads: int = 0,
    *,
    backend: Backend = "auto",
) -> np.ndarray:
    """Bilinear resize of maps to ``size = (H, W)``, float32.

    The index math of ``torch.nn.functional.interpolate(mode="bilinear")`` on CPU, in float32:
    with ``align_corners=False`` the source of output pixel ``d`` is ``max((d + 0.5) * in / out - 0.5, 0)``
    (``(d + 0.5) * scale - 0.5`` rounded once, as torch's fused multiply-add does), with ``True``
    ``d * (in - 1) / (out - 1)``; neighbours ``i0 = floor(src)`` and ``i0 + 1`` (clamped), weights
    ``l1 = src - i0`` and ``l0 = 1 - l1``, and
    ``out = l0y * (l0x * m[y0, x0] + l1x * m[y0, x1]) + l1y * (l0x * m[y1, x0] + l1x * m[y1, x1])``.
    Matches torch within 1e-5 (tested); same size returns the values unchanged.

    Args:
        maps: ``(N, h, w)`` or ``(h, w)`` real values with ``h, w >= 1``; NaN or infinities raise.
        size: ``(H, W)``, each in ``[1, 65536]``, with ``N * H * W <= 2**31``.
        align_corners: as in ``torch.nn.functional.interpolate``.
        num_threads: threads of the C++ backend; 0 means all cores.
        backend: ``"auto"``, ``"C++"`` or ``"numpy"``.

    Returns:
        float32 array ``(N, H, W)`` or ``(H, W)``.

    Example:
        >>> import numpy as np
        >>> from pyattr.render import resize
        >>> resize(np.array([[0.0, 1.0]]), (1, 4)).tolist()
        [[0.0, 0.25, 0.75, 1.0]]
    """
    maps = _as_maps(maps)
    batch = maps[None] if maps.ndim == 2 else maps
    size = _check_size(size, len(batch))
    _, num_threads, use_c = _check_options("jet", num_threads, backend)
    _check_has_pixels(batch)
    if use_c:
        out = _C.resize(batch, size, bool(align_corners), num_threads)
    else:
        out = _resize_numpy(_finite_float32(batch), size, bool(align_corners))
    return out[0] if maps.ndim == 2 else out


def heatmap(
    maps: Any,
    size: Sequence[int] | None = None,
    cmap: str = "jet",
    *,
    sign: Sign = "all",
    outlier_perc: float = 0.0,
    value_range: tuple[float, float] | None = None,
    align_corners: bool = False,
    num_threads: int = 0,
    backend: Backend = "auto",
) -> np.ndarray:
    """Raw maps of any size -> colored heatmaps ``(N, H, W, 3)`` uint8, fused.

    Equal, pixel for pixel, to ``colorize(normalize(resize(maps, size), ...), cmap)``; the C++
    backend does it in one pass per sample without intermediate arrays. ``size`` defaults to the
    maps' own size. Options as in :func:`resize` and :func:`normalize`.

    Example:
        >>> import numpy as np
        >>> from pyattr.render import heatmap
        >>> heatmap(np.array([[0.0, 5.0]]), (1, 3), cmap="gray")[..., 0].tolist()
        [[0, 128, 255]]
    """
    maps = _as_maps(maps)
    batch = maps[None] if maps.ndim == 2 else maps
    size = _check_size(batch.shape[1:] if size is None else size, len(batch))
    out = _render(batch, None, size, 1.0, cmap, sign, outlier_perc, value_range, align_corners, num_threads,
                  backend)
    return out[0] if maps.ndim == 2 else out


def heatmap_overlay(
    maps: Any,
    images: Any,
    alpha: float = 0.5,
    cmap: str = "jet",
    *,
    sign: Sign = "all",
    outlier_perc: float = 0.0,
    value_range: tuple[float, float] | None = None,
    align_corners: bool = False,
    num_threads: int = 0,
    backend: Backend = "auto",
) -> np.ndarray:
    """Raw maps of any size -> overlays on the images, fused: resize to the images' size ->
    normalize -> colorize -> alpha blend.

    Equal, pixel for pixel, to ``overlay(normalize(resize(maps, images' (H, W)), ...), images,
    alpha, cmap)``; the C++ backend does it in one pass per sample over the output pixels. Use
    ``value_range=(0, 1)`` for maps already normalized (e.g. an exported graph's ``maps``): the
    resized values are then only clipped, as ``resize(...).clip(0, 1)`` would.

    Args:
        maps: ``(N, h, w)`` with images ``(N, H, W, 3)``, or ``(h, w)`` with ``(H, W, 3)``;
            NaN or infinities raise ``ValueError``.
        images: uint8 RGB.
        alpha: weight of the colored map, in ``[0, 1]``.
        cmap: colormap name, one of :data:`pyattr.colormaps.COLORMAPS`.
        sign, outlier_perc, value_range: see :func:`normalize`.
        align_corners: see :func:`resize`.
        num_threads: threads of the C++ backend; 0 means all cores.
        backend: ``"auto"``, ``"C++"`` or ``"numpy"``.

    Returns:
        uint8 RGB array shaped like ``images``.

    Example:
        >>> import numpy as np
        >>> from pyattr.render import heatmap_overlay
        >>> raw = np.array([[1.0, 3.0], [3.0, 5.0]])           # a 2x2 map
        >>> image = np.zeros((4, 4, 3), np.uint8)
        >>> heatmap_overlay(raw, image, alpha=1.0, cmap="gray")[..., 0].tolist()[0]
        [0, 32, 96, 128]
    """
    maps = _as_maps(maps)
    images = _as_images(images, maps)
    batch, image_batch = _same_batch(maps, images)
    alpha = _check_alpha(alpha)
    size = _check_size(image_batch.shape[1:3], len(batch))
    out = _render(batch, image_batch, size, alpha, cmap, sign, outlier_perc, value_range, align_corners,
                  num_threads, backend)
    return out[0] if maps.ndim == 2 else out


def draw_boxes(
    images: Any,
    boxes: Any,
    colors: Any = None,
    thickness: int = 2,
    num_threads: int = 0,
    *,
    backend: Backend = "auto",
) -> np.ndarray:
    """Draw box outlines (e.g. detections) on uint8 RGB images; returns a new array.

    Coordinates are ``(x1, y1, x2, y2)`` in pixels, pixel ``(r, c)`` covering ``[c, c + 1) x [r, r + 1)``;
    a box covers the pixels its interior meets, columns ``floor(x1) .. ceil(x2) - 1`` and rows
    ``floor(y1) .. ceil(y2) - 1`` (so ``[1, 1, 3, 3]`` covers columns and rows 1 and 2, and
    ``[1.2, 0, 2.7, 1]`` columns 1 and 2 of row 0). The outline lies inside the box, ``thickness``
    pixels inward from each edge (a box at most ``2 * thickness`` pixels across is filled). It is
    computed for the whole box, then clipped to the image: a box partly outside is drawn where
    visible (edges outside the image are not moved in), a box wholly outside draws nothing. Rows
    with a NaN coordinate or ``x2 <= x1`` or ``y2 <= y1`` are skipped, so padded detections
    (``NaN`` or zero rows) can be passed as they are. Boxes are drawn in order, later over earlier.

    Args:
        images: uint8 RGB, ``(N, H, W, 3)`` or ``(H, W, 3)`` (NumPy array or torch tensor); not modified.
        boxes: real numbers, ``(N, B, 4)`` with ``(N, H, W, 3)`` images or ``(B, 4)`` with ``(H, W, 3)``;
            ``+/-inf`` raise ``ValueError``.
        colors: ``None`` for :data:`BOX_PALETTE` by box index (``j % 10``), one color ``(3,)`` for all
            boxes, ``(B, 3)`` per box (the same in every image) or ``(N, B, 3)``; uint8, or integers in
            ``[0, 255]``.
        thickness: outline width in pixels, in ``[1, 2**31 - 1]``.
        num_threads: threads of the C++ backend (by image rows); 0 means all cores. Ignored by NumPy.
        backend: ``"auto"`` (C++ if built, else NumPy), ``"C++"`` or ``"numpy"``; both give the same pixels.

    Returns:
        uint8 RGB array shaped like ``images``.

    Raises:
        ValueError: wrong ranks or shapes, images without 3 channels, infinite coordinates, colors
            outside ``[0, 255]``, thickness < 1, negative num_threads, unknown backend.
        TypeError: images that are not uint8, boxes that are not real numbers, colors that are not
            integers, a thickness that is not an int.

    Example:
        >>> import numpy as np
        >>> from pyattr.render import draw_boxes
        >>> image = np.zeros((4, 5, 3), np.uint8)
        >>> out = draw_boxes(image, [[0.5, 0, 4, 3]], colors=[255, 0, 0], thickness=1)
        >>> (out[..., 0] > 0).astype(int).tolist()
        [[1, 1, 1, 1, 0], [1, 0, 0, 1, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    """
    images = _as_numpy(images)
    if images.dtype != np.uint8:
        raise TypeError(
            f"images must be uint8 RGB, got dtype {images.dtype}; convert floats in [0, 1] with "
            "(images * 255).round().astype(np.uint8)"
        )
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 RGB of shape (N, H, W, 3) or (H, W, 3), got shape {images.shape}")
    single = images.ndim == 3
    boxes = _as_numpy(boxes)
    if boxes.dtype.kind not in "biuf":
        raise TypeError(f"boxes must hold real numbers (xyxy pixel coordinates), got dtype {boxes.dtype}")
    layout = "(B, 4)" if single else "(N, B, 4)"
    if boxes.ndim != images.ndim - 1 or boxes.shape[-1] != 4:
        raise ValueError(
            f"boxes must have shape {layout} (x1, y1, x2, y2 per box) to go with images of shape {images.shape}, "
            f"got shape {boxes.shape}"
        )
    image_batch, box_batch = (images[None], boxes[None]) if single else (images, boxes)
    if len(box_batch) != len(image_batch):
        raise ValueError(
            f"boxes and images must have the same batch size: boxes {boxes.shape}, images {images.shape}"
        )
    box_batch = np.ascontiguousarray(box_batch, dtype=np.float64)
    infinite = int(np.count_nonzero(np.isinf(box_batch)))
    if infinite:
        raise ValueError(
            f"boxes contain {infinite} infinite coordinates; give finite xyxy pixel coordinates (NaN rows are "
            "skipped as padding), e.g. clip them to the image first"
        )
    n, b = box_batch.shape[:2]
    color_batch = None if colors is None else _box_colors(colors, n, b, single)
    try:
        thickness = operator.index(thickness)
    except TypeError:
        raise TypeError(f"thickness must be an int, got {thickness!r}") from None
    if not 1 <= thickness <= MAX_THICKNESS:
        raise ValueError(f"thickness must lie in [1, {MAX_THICKNESS}], got {thickness}")
    _, num_threads, use_c = _check_options("jet", num_threads, backend)
    image_batch = np.ascontiguousarray(image_batch)
    if use_c:
        out = _C.draw_boxes(image_batch, box_batch, color_batch, thickness, num_threads)
    else:
        out = _draw_boxes_numpy(image_batch, box_batch, color_batch, thickness)
    return out[0] if single else out


def _box_colors(colors: Any, n: int, b: int, single: bool) -> np.ndarray:
    """colors (3,), (B, 3) or (N, B, 3) -> C-contiguous uint8 (N, B, 3)."""
    colors = _as_numpy(colors)
    if colors.dtype.kind not in "iu":
        raise TypeError(f"colors must be uint8 RGB (or integers in [0, 255]), got dtype {colors.dtype}")
    allowed = [(3,), (b, 3)] + ([] if single else [(n, b, 3)])
    if colors.shape not in allowed:
        shapes = ", ".join(str(s) for s in allowed)
        raise ValueError(f"colors must have shape (3,), (B, 3){'' if single else ' or (N, B, 3)'} ({shapes} here), "
                         f"got shape {colors.shape}")
    if colors.dtype != np.uint8 and colors.size and (colors.min() < 0 or colors.max() > 255):
        raise ValueError(f"colors must lie in [0, 255], got values from {colors.min()} to {colors.max()}")
    return np.ascontiguousarray(np.broadcast_to(colors.astype(np.uint8, copy=False), (n, b, 3)))


def _render(batch, image_batch, size, alpha, cmap, sign, outlier_perc, value_range, align_corners,
            num_threads, backend) -> np.ndarray:
    options = _check_normalization(sign, outlier_perc, value_range)
    lut, num_threads, use_c = _check_options(cmap, num_threads, backend)
    _check_has_pixels(batch)
    if use_c:
        return _C.render(batch, image_batch, size, alpha, cmap, sign, options[1], options[2],
                         bool(align_corners), num_threads)
    resized = _resize_numpy(_finite_float32(batch), size, bool(align_corners))
    normalized = _normalize_numpy(resized, *options)
    if image_batch is None:
        return _colorize_numpy(normalized, lut)[0]
    return _overlay_numpy(normalized, image_batch, alpha, lut)[0]


# --- NumPy backend: the same float32 operations, in the same order, as csrc/postprocess.cpp ---


def _colorize_numpy(maps: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, int]:
    nan = int(np.count_nonzero(np.isnan(maps)))
    zero, one = np.float32(0), np.float32(1)
    v = np.where(maps > zero, maps, zero)  # NaN -> 0, like the C++ comparisons
    v = np.where(v < one, v, one)
    index = (v * np.float32(255) + np.float32(0.5)).astype(np.intp)  # truncation, like (int)
    return lut[index], nan


def _overlay_numpy(
    maps: np.ndarray, images: np.ndarray, alpha: float, lut: np.ndarray
) -> tuple[np.ndarray, int]:
    colors, nan = _colorize_numpy(maps, lut)
    a = np.float32(alpha)
    b = np.float32(1) - a
    blended = images.astype(np.float32) * b + colors.astype(np.float32) * a
    blended += np.float32(0.5)
    return np.floor(blended).astype(np.uint8), nan


def _transform(t: np.ndarray, sign: str) -> np.ndarray:
    zero = np.float32(0)
    if sign == "absolute":
        return np.abs(t)
    if sign == "positive":
        return np.where(t > zero, t, zero)
    if sign == "negative":
        return np.where(t < zero, -t, zero)
    return t


def _percentile(values: np.ndarray, q: float) -> np.float32:
    """q-th percentile, linear between closest ranks, as csrc's percentile()."""
    m = values.size
    pos = q / 100.0 * float(m - 1)
    i = min(math.floor(pos), m - 1)
    f = pos - i
    if f > 0.0 and i + 1 < m:
        part = np.partition(values, (i, i + 1))
        a, b = float(part[i]), float(part[i + 1])
        return np.float32(a + (b - a) * f)
    return np.partition(values, i)[i]


def _sample_range(t: np.ndarray, sign: str, p: float, value_range) -> tuple[np.float32, np.float32]:
    if value_range is not None:
        return np.float32(value_range[0]), np.float32(value_range[1])
    if sign == "centered":
        s = _percentile(np.abs(t), 100.0 - p) if p > 0.0 else max(abs(t.min()), abs(t.max()))
        s = max(np.float32(s), _FLT_MIN)
        return -s, s
    if p > 0.0:
        hi = _percentile(t, 100.0 - p)
        lo = _percentile(t, p) if sign == "all" else t.min()
        return np.float32(lo), np.float32(hi)
    return t.min(), t.max()


def _normalize_numpy(maps: np.ndarray, sign: str, p: float, value_range) -> np.ndarray:
    """maps: finite float32 (N, H, W)."""
    out = np.empty(maps.shape, np.float32)
    zero, one = np.float32(0), np.float32(1)
    with np.errstate(over="ignore"):
        for s in range(len(maps)):
            t = _transform(maps[s], sign)
            lo, hi = _sample_range(t.ravel(), sign, p, value_range)
            k = np.float32(1)
            d = hi - lo
            if np.isinf(d):  # hi - lo overflows float32: halve both ends
                k = np.float32(0.5)
                d = hi * k - lo * k
            d = max(d, _FLT_MIN)
            x = (t * k - lo * k) / d
            x = np.where(x > zero, x, zero)
            out[s] = np.where(x < one, x, one)
    return out


def _axis_plan(n_in: int, n_out: int, align_corners: bool):
    f32 = np.float32
    dst = np.arange(n_out)
    if n_in == n_out:
        i0, l1 = dst, np.zeros(n_out, f32)
    else:
        if align_corners:
            scale = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0)
            src = scale * dst.astype(f32)
        else:  # rounded once, like a fused multiply-add (exact in float64)
            scale = f32(n_in) / f32(n_out)
            src = np.maximum((np.float64(scale) * (dst + 0.5) - 0.5).astype(f32), f32(0))
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        l1 = np.minimum(np.maximum(src - i0.astype(f32), f32(0)), f32(1))
    i1 = i0 + (i0 < n_in - 1)
    return i0, i1, f32(1) - l1, l1


def _resize_numpy(maps: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
    """maps: finite float32 (N, h, w) -> (N, H, W), as csrc's resize_row()."""
    _, h, w = maps.shape
    y0, y1, l0y, l1y = _axis_plan(h, size[0], align_corners)
    x0, x1, l0x, l1x = _axis_plan(w, size[1], align_corners)
    r0, r1 = maps[:, y0, :], maps[:, y1, :]
    top = l0x * r0[:, :, x0] + l1x * r0[:, :, x1]
    bottom = l0x * r1[:, :, x0] + l1x * r1[:, :, x1]
    return l0y[:, None] * top + l1y[:, None] * bottom


def _box_extents(boxes: np.ndarray, h: int, w: int, thickness: int):
    """(valid, r0, r1, c0, c1) per box of boxes (N, B, 4) float64, as csrc's box_extent()."""
    with np.errstate(invalid="ignore"):
        valid = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])  # False with NaN
    boxes = np.where(valid[..., None], boxes, 0.0)
    t = float(thickness)

    def clamp(v: np.ndarray, side: int) -> np.ndarray:
        return np.minimum(np.maximum(v, -1.0 - t), float(side) + t).astype(np.int64)

    r0, r1 = clamp(np.floor(boxes[..., 1]), h), clamp(np.ceil(boxes[..., 3]) - 1.0, h)
    c0, c1 = clamp(np.floor(boxes[..., 0]), w), clamp(np.ceil(boxes[..., 2]) - 1.0, w)
    valid &= (r1 >= 0) & (r0 < h) & (c1 >= 0) & (c0 < w)
    return valid, r0, r1, c0, c1


def _draw_boxes_numpy(images: np.ndarray, boxes: np.ndarray, colors: np.ndarray | None, thickness: int) -> np.ndarray:
    """images (N, H, W, 3) uint8, boxes (N, B, 4) float64, colors (N, B, 3) uint8 or None: the outline of
    each box painted as four rectangles (top, bottom, left, right bands), clipped to the image."""
    out = images.copy()
    _, h, w, _ = images.shape
    t = thickness
    valid, r0s, r1s, c0s, c1s = _box_extents(boxes, h, w, t)
    for s, j in zip(*np.nonzero(valid)):  # row-major: image by image, boxes in order
        r0, r1, c0, c1 = int(r0s[s, j]), int(r1s[s, j]), int(c0s[s, j]), int(c1s[s, j])
        color = BOX_PALETTE[j % len(BOX_PALETTE)] if colors is None else colors[s, j]
        for top, bottom, left, right in (
            (r0, min(r0 + t - 1, r1), c0, c1),
            (max(r1 - t + 1, r0), r1, c0, c1),
            (r0, r1, c0, min(c0 + t - 1, c1)),
            (r0, r1, max(c1 - t + 1, c0), c1),
        ):
            top, bottom, left, right = max(top, 0), min(bottom, h - 1), max(left, 0), min(right, w - 1)
            if top <= bottom and left <= right:
                out[s, top:bottom + 1, left:right + 1] = color
    return out


# --- input handling shared by both backends ---


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, without importing torch
        x = x.detach().cpu()
        try:
            x = x.numpy()
        except TypeError:  # dtypes NumPy lacks, e.g. bfloat16
            x = x.float().numpy()
    return np.asarray(x)


def _as_maps(maps: Any) -> np.ndarray:
    """C-contiguous float32 or float16 maps (no copy when they already are)."""
    maps = _as_numpy(maps)
    if maps.dtype.kind not in "biuf":
        raise TypeError(f"maps must hold real numbers (float, int or bool), got dtype {maps.dtype}")
    if maps.ndim not in (2, 3):
        raise ValueError(f"maps must have shape (N, H, W) or (H, W), got shape {maps.shape}")
    dtype = np.float16 if maps.dtype == np.float16 else np.float32
    return np.ascontiguousarray(maps, dtype=dtype)


def _as_images(images: Any, maps: np.ndarray) -> np.ndarray:
    images = _as_numpy(images)
    if images.dtype != np.uint8:
        raise TypeError(
            f"images must be uint8 RGB, got dtype {images.dtype}; convert floats in [0, 1] with "
            "(images * 255).round().astype(np.uint8)"
        )
    layout = "(H, W, 3)" if maps.ndim == 2 else "(N, H, W, 3)"
    if images.ndim != maps.ndim + 1:
        raise ValueError(
            f"images must have shape {layout} to go with maps of shape {maps.shape}, got shape {images.shape}"
        )
    if images.shape[-1] != 3:
        raise ValueError(f"images must be RGB with 3 channels in the last axis, got shape {images.shape}")
    return np.ascontiguousarray(images)


def _same_pixels(maps: Any, images: Any) -> tuple[np.ndarray, np.ndarray]:
    """Maps and uint8 images that must agree in (N, H, W) (overlays of maps already at the image size)."""
    maps = _as_maps(maps)
    images = _as_images(images, maps)
    if images.shape[:-1] != maps.shape:
        raise ValueError(f"maps and images must agree in (N, H, W): maps {maps.shape}, images {images.shape}")
    return maps, images


def _same_batch(maps: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps, images) with a leading batch axis on both (added to a single map and image), their batch
    sizes checked equal (the maps are resized to the images' size later)."""
    batch, image_batch = (maps[None], images[None]) if maps.ndim == 2 else (maps, images)
    if len(image_batch) != len(batch):
        raise ValueError(f"maps and images must have the same batch size: maps {maps.shape}, images {images.shape}")
    return batch, image_batch


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha


def _check_has_pixels(batch: np.ndarray) -> None:
    if len(batch) and (batch.shape[1] == 0 or batch.shape[2] == 0):
        raise ValueError(f"maps have no pixels (shape {batch.shape}); each map needs h, w >= 1")


def _check_size(size: Any, n: int) -> tuple[int, int]:
    try:
        h, w = (operator.index(v) for v in size)
    except (TypeError, ValueError):
        raise TypeError(f"size must be a pair of ints (H, W), got {size!r}") from None
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise ValueError(f"size must be (H, W) with 1 <= H, W <= {MAX_SIDE}, got ({h}, {w})")
    if n * h * w > MAX_PIXELS:
        raise ValueError(
            f"output of {n} x {h} x {w} pixels is too large (limit {MAX_PIXELS} pixels per call); split the batch"
        )
    return h, w


def _check_normalization(sign: str, outlier_perc: float, value_range) -> tuple[str, float, tuple | None]:
    if sign not in SIGNS:
        raise ValueError(f"unknown sign {sign!r}; use one of {', '.join(SIGNS)}")
    outlier_perc = float(outlier_perc)
    if not 0.0 <= outlier_perc < 50.0:
        raise ValueError(
            f"outlier_perc must lie in [0, 50) (percent of values clipped at each end), got {outlier_perc}"
        )
    if value_range is not None:
        try:
            lo, hi = (float(v) for v in value_range)
        except (TypeError, ValueError):
            raise TypeError(f"value_range must be a pair of numbers (lo, hi), got {value_range!r}") from None
        with np.errstate(over="ignore"):
            lo32, hi32 = np.float32(lo), np.float32(hi)
        if not (np.isfinite(lo32) and np.isfinite(hi32) and lo32 < hi32):
            raise ValueError(f"value_range must be finite (lo, hi) with lo < hi, got {value_range!r}")
        value_range = (float(lo32), float(hi32))
    return sign, outlier_perc, value_range


def _finite_float32(maps: np.ndarray) -> np.ndarray:
    """float32 maps for the NumPy backend; NaN or infinities raise as in the C++ core."""
    maps = maps.astype(np.float32, copy=False)
    bad = maps.size - int(np.count_nonzero(np.isfinite(maps)))
    if bad:
        raise ValueError(
            f"maps contain {bad} non-finite values (NaN or +/-inf); resize and normalize need finite maps; "
            "replace them first, e.g. np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)"
        )
    return maps


def _check_options(cmap: str, num_threads: int, backend: str) -> tuple[np.ndarray, int, bool]:
    """Validate the options common to colorize and overlay; return (lut, num_threads, use_c)."""
    lut = colormaps.lut(cmap)
    num_threads = operator.index(num_threads)
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0 (0 = all cores), got {num_threads}")
    if backend == "auto":
        return lut, num_threads, HAVE_C
    if backend == "numpy":
        return lut, num_threads, False
    if backend == "C++":
        if not HAVE_C:
            raise ImportError(f"backend='C++' needs the compiled extension pyattr._C; {_BUILD_HINT}")
        return lut, num_threads, True
    raise ValueError(f"backend must be 'auto', 'C++' or 'numpy', got {backend!r}")


def _raise_on_nan(nan: int) -> None:
    if nan:
        raise ValueError(
            f"maps contain NaN ({nan} values); replace them first, e.g. np.nan_to_num(maps, nan=0.0) "
            "(+/-inf are allowed and clipped to [0, 1])"
        )
