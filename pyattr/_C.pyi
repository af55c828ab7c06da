# ruff: noqa: N999  (the module is named _C on purpose: private, compiled)
"""Type stub of pyattr._C, the compiled post-processing core (csrc/bindings.cpp), with eager DeepLIFT's two rule
kernels (relu_rescale, maxpool_rescale_backward: float32 arrays, used by pyattr.methods.deeplift).

Inputs must already be C-contiguous, aligned arrays of an accepted dtype (the module never
copies them): maps float32 or float16, images and colors uint8, boxes float64. Wrong dtype raises
TypeError, wrong layout, shape or option ValueError; NaN or +/-inf in maps raise ValueError in
normalize, resize and render (colorize and overlay clip infinities and return the NaN count), and
+/-inf in boxes in draw_boxes. Use :mod:`pyattr.render`, which converts its inputs, raises on NaN
and has a NumPy fallback with identical results.
"""

from typing import TypeAlias

import numpy as np
import numpy.typing as npt

Maps: TypeAlias = npt.NDArray[np.float32] | npt.NDArray[np.float16]

def colormap_names() -> list[str]: ...
def colormap_lut(name: str) -> npt.NDArray[np.uint8]: ...
def colorize(maps: Maps, cmap: str = "jet", num_threads: int = 0) -> tuple[npt.NDArray[np.uint8], int]: ...
def overlay(
    maps: Maps,
    images: npt.NDArray[np.uint8],
    alpha: float = 0.5,
    cmap: str = "jet",
    num_threads: int = 0,
) -> tuple[npt.NDArray[np.uint8], int]: ...
def normalize(
    maps: Maps,
    sign: str = "all",
    outlier_perc: float = 0.0,
    value_range: tuple[float, float] | None = None,
    num_threads: int = 0,
) -> npt.NDArray[np.float32]: ...
def resize(
    maps: Maps, size: tuple[int, int], align_corners: bool = False, num_threads: int = 0
) -> npt.NDArray[np.float32]: ...
def render(
    maps: Maps,
    images: npt.NDArray[np.uint8] | None = None,
    size: tuple[int, int] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    sign: str = "all",
    outlier_perc: float = 0.0,
    value_range: tuple[float, float] | None = None,
    align_corners: bool = False,
    num_threads: int = 0,
) -> npt.NDArray[np.uint8]: ...
def draw_boxes(
    images: npt.NDArray[np.uint8],
    boxes: npt.NDArray[np.float64],
    colors: npt.NDArray[np.uint8] | None = None,
    thickness: int = 2,
    num_threads: int = 0,
) -> npt.NDArray[np.uint8]: ...
def box_palette() -> npt.NDArray[np.uint8]: ...
def relu_rescale(
    u: npt.NDArray[np.float32],
    ur: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    eps: float,
    num_threads: int = 0,
) -> None: ...
def maxpool_rescale_backward(
    x: npt.NDArray[np.float32],
    xr: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    yr: npt.NDArray[np.float32],
    grad: npt.NDArray[np.float32],
    tol_x: npt.NDArray[np.float32],
    tol_r: npt.NDArray[np.float32],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    eps: float,
    result: npt.NDArray[np.float32],
    num_threads: int = 0,
) -> None: ...
