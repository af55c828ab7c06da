"""Colormap lookup tables (256 x RGB uint8), the NumPy twin of ``csrc/postprocess.cpp``.

Entry ``i`` of a table is the colormap at ``x = i / 255``, interpolated linearly in float64
on matplotlib's segment data and rounded as ``floor(v * 255 + 0.5)``. The C++ core computes
the same tables from the same numbers; ``tests/test_render.py`` checks that they are equal and
within one uint8 level of matplotlib.
"""

from __future__ import annotations

from functools import cache

import numpy as np

# (x, y) anchors per channel (R, G, B), from matplotlib's _cm.py (_jet_data, _hot_data,
# _gray_data). All their anchors are continuous (y0 == y1), so one y per anchor.
_SEGMENTS: dict[str, tuple[tuple[tuple[float, float], ...], ...]] = {
    "jet": (
        ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
        ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
        ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
    ),
    "hot": (
        ((0.0, 0.0416), (0.365079, 1.0), (1.0, 1.0)),
        ((0.0, 0.0), (0.365079, 0.0), (0.746032, 1.0), (1.0, 1.0)),
        ((0.0, 0.0), (0.746032, 0.0), (1.0, 1.0)),
    ),
    "gray": (
        ((0.0, 0.0), (1.0, 1.0)),
        ((0.0, 0.0), (1.0, 1.0)),
        ((0.0, 0.0), (1.0, 1.0)),
    ),
}

COLORMAPS: tuple[str, ...] = tuple(_SEGMENTS)
"""Names accepted by :func:`lut` (and by ``cmap=`` in :mod:`pyattr.render`)."""


def lut(name: str) -> np.ndarray:
    """The (256, 3) uint8 RGB lookup table of colormap ``name`` (read-only, cached).

    Example:
        >>> from pyattr.colormaps import lut
        >>> lut("jet")[[0, 255]].tolist()
        [[0, 0, 128], [128, 0, 0]]
    """
    if not isinstance(name, str) or name not in _SEGMENTS:
        raise ValueError(f"unknown colormap {name!r}; known colormaps: {', '.join(COLORMAPS)}")
    return _lut(name)


@cache
def _lut(name: str) -> np.ndarray:
    x = np.arange(256, dtype=np.float64) / 255.0
    channels = []
    for anchors in _SEGMENTS[name]:
        xs, ys = np.array(anchors, dtype=np.float64).T
        # first segment [xs[k-1], xs[k]] with x <= xs[k], as in the C++ core
        k = np.clip(np.searchsorted(xs, x, side="left"), 1, len(xs) - 1)
        v = ys[k - 1] + (x - xs[k - 1]) / (xs[k] - xs[k - 1]) * (ys[k] - ys[k - 1])
        channels.append(np.clip(np.floor(v * 255.0 + 0.5), 0.0, 255.0))
    table = np.stack(channels, axis=1).astype(np.uint8)
    table.flags.writeable = False
    return table
