"""Host-side rendering of attribution maps: colormaps and overlays on uint8 RGB images.

The work is done by the compiled extension :mod:`pyattr._C` (C++, multi-threaded, GIL
released) when it is importable, else by NumPy. Both backends give bit-identical results:
the NumPy code performs the same float32 operations in the same order as ``csrc/``.

Conventions, shared by both backends:

* maps are real-valued ``(N, H, W)`` or ``(H, W)`` arrays, used as float32 and clipped to
  ``[0, 1]``; ``+inf``/``-inf`` are clipped like any other value, NaN raises ``ValueError``.
* images are uint8 RGB ``(N, H, W, 3)`` or ``(H, W, 3)``, matching the maps' ``(N, H, W)``.
* color index = ``int(v * 255 + 0.5)`` into a 256-entry LUT (:mod:`pyattr.colormaps`).

Inputs may be NumPy arrays or torch tensors (this module never imports torch).
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Literal

import numpy as np

from pyattr import colormaps

__all__ = ["HAVE_C", "ExtensionMissingWarning", "backend", "colorize", "overlay"]

Backend = Literal["auto", "C++", "numpy"]

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
            in ``[0, 1]``; converted to float32.
        cmap: colormap name, one of :data:`pyattr.colormaps.COLORMAPS` (``"jet"``, ``"hot"``, ``"gray"``).
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
        out, nan = _colorize_numpy(batch, lut)
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
    maps = _as_maps(maps)
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
    if images.shape[:-1] != maps.shape:
        raise ValueError(f"maps and images must agree in (N, H, W): maps {maps.shape}, images {images.shape}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    lut, num_threads, use_c = _check_options(cmap, num_threads, backend)

    images = np.ascontiguousarray(images)
    batch, image_batch = (maps[None], images[None]) if maps.ndim == 2 else (maps, images)
    if use_c:
        out, nan = _C.overlay(batch, image_batch, alpha, cmap, num_threads)
    else:
        out, nan = _overlay_numpy(batch, image_batch, alpha, lut)
    _raise_on_nan(nan)
    return out[0] if maps.ndim == 2 else out


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
    maps = _as_numpy(maps)
    if maps.dtype.kind not in "biuf":
        raise TypeError(f"maps must hold real numbers (float, int or bool), got dtype {maps.dtype}")
    if maps.ndim not in (2, 3):
        raise ValueError(f"maps must have shape (N, H, W) or (H, W), got shape {maps.shape}")
    return np.ascontiguousarray(maps, dtype=np.float32)


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
