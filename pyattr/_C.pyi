"""Type stub of pyattr._C, the compiled post-processing core (csrc/bindings.cpp).

Inputs must already be C-contiguous, aligned arrays of the exact dtype (the module never
copies them): wrong dtype raises TypeError, wrong layout or shape ValueError. Use
:mod:`pyattr.render`, which converts its inputs and raises on NaN.
"""

import numpy as np
import numpy.typing as npt

def colormap_names() -> list[str]: ...
def colormap_lut(name: str) -> npt.NDArray[np.uint8]: ...
def colorize(
    maps: npt.NDArray[np.float32], cmap: str = "jet", num_threads: int = 0
) -> tuple[npt.NDArray[np.uint8], int]: ...
def overlay(
    maps: npt.NDArray[np.float32],
    images: npt.NDArray[np.uint8],
    alpha: float = 0.5,
    cmap: str = "jet",
    num_threads: int = 0,
) -> tuple[npt.NDArray[np.uint8], int]: ...
