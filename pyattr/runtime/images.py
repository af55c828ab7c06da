"""Image decoding shared by ``pyattr explain`` and the torch-free runtime (``pyattr run``).

One function turns a file, a PIL image or an array into RGB uint8 ``(H, W, 3)``, the same way for
both command lines. Torch-free: NumPy and Pillow only.

* the size in the file's header is checked before any pixel is decoded: more than
  :data:`MAX_IMAGE_PIXELS` pixels (Pillow's own warning threshold, about 89 million) is refused as a
  possible decompression bomb; Pillow's ``DecompressionBombError`` / ``DecompressionBombWarning``
  become the same :class:`~pyattr.errors.InputError`;
* the EXIF orientation is applied (a portrait phone photo comes out upright);
* every mode is converted by its meaning, not by Pillow's clipping ``convert("RGB")``:

  - 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) is scaled ``round(v * 255 / 65535)``;
  - 32-bit integer grey (``I``) is read as 16-bit when its values lie in ``[0, 65535]`` (how Pillow
    opens many 16-bit PNGs and TIFFs), otherwise scaled linearly from its min..max;
  - float grey (``F``) is read as intensities in ``[0, 1]`` when its values lie there, otherwise
    scaled from its min..max; NaN or infinities are refused;
  - modes with transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, palette or grey images with a
    ``transparency`` entry) are composited over white;
  - ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``RGBX`` ... by Pillow's conversion to RGB;
* animated files (GIF, APNG, multi-page TIFF): the first frame;
* every failure is an :class:`~pyattr.errors.InputError` that names the file.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> from pyattr.runtime.images import load_image
    >>> grey16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    >>> load_image(grey16)[0].tolist()
    [[0, 0, 0], [255, 255, 255]]
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pyattr.errors import InputError

__all__ = ["MAX_IMAGE_PIXELS", "ImageLike", "check_image_header", "check_image_size", "load_image", "load_mask",
           "pil_filter", "preprocess_rgb", "read_image", "to_rgb"]

MAX_IMAGE_PIXELS = 89_478_485
"""Largest ``width * height`` accepted (Pillow's ``Image.MAX_IMAGE_PIXELS``: 3 bytes a pixel, 256 MiB)."""

ImageLike = Any  # a path, a PIL image, or an (H, W, 3) / (H, W) uint8 array

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_BACKGROUND = 255  # transparent pixels are composited over white


def load_image(image: ImageLike, name: str | None = None) -> np.ndarray:
    """An image as RGB uint8 ``(H, W, 3)``: a file path, a PIL image, or a uint8 array ``(H, W, 3)`` /
    ``(H, W)``.

    Args:
        image: what to load.
        name: how errors name it (default: the path, or ``"image"``).

    Raises:
        InputError: a missing or unreadable file, a decompression bomb, an unsupported mode or array.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, Image.Image):
        label = name or "image"
        check_image_size(image.size, label)
        return to_rgb(image, label)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise InputError(f"image arrays must be uint8 RGB, got dtype {array.dtype}")
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise InputError(f"image arrays must have shape (H, W, 3) or (H, W), got {array.shape}")
    return array


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode the image file ``path`` to RGB uint8 ``(H, W, 3)`` (see the module docstring).

    Raises:
        InputError: naming ``path``: no such file, not a file, not an image Pillow can read, more than
            :data:`MAX_IMAGE_PIXELS` pixels, an unsupported mode.
    """
    return _open_checked(path, to_rgb)


def check_image_header(path: str | os.PathLike) -> None:
    """Identify the image file ``path`` and check its declared size from the header, decoding no pixels
    (a whole run's inputs are checked this way before any work). Raises :class:`InputError` as
    :func:`read_image` does."""
    _open_checked(path, lambda im, label: None)


def _open_checked(path: str | os.PathLike, use: Any) -> Any:
    """Open ``path`` with Pillow, check its size from the header, and return ``use(image, label)``; every
    failure an :class:`InputError` naming the file."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, from the header
            with Image.open(path) as im:
                check_image_size(im.size, str(path))  # from the header: nothing decoded yet
                return use(im, str(path))
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(f"{path}: over the limit of {MAX_IMAGE_PIXELS} pixels, refused as a possible "
                         f"decompression bomb ({err})") from err
    except MemoryError as err:
        raise InputError(f"{path}: not enough memory to decode this image") from err
    except Exception as err:  # Pillow's decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise InputError(f"{path} is not an image that Pillow can read ({type(err).__name__}"
                         f"{': ' + detail if detail else ''})") from err


def load_mask(mask: ImageLike, size: tuple[int, int], name: str | None = None) -> np.ndarray:
    """A region mask as float32 (H, W) of 0 and 1 at ``size`` = (H, W): a mask image file, a PIL image,
    or an (H0, W0) bool / number array, resized with nearest neighbour (no blending of the mask's edge).

    A pixel is in the region when any of its colour channels is non-zero (white-on-black, 0/1 and
    0/255 masks, palette and 16-bit masks alike) and, for images with transparency, it is not fully
    transparent.

    Example:
        >>> load_mask(np.array([[0, 255], [0, 0]], np.uint8), (4, 4))[:, 2:].tolist()
        [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    """
    from PIL import Image

    if isinstance(mask, (str, os.PathLike)):
        return _open_checked(mask, lambda im, label: _mask_of(im, size, label))
    if isinstance(mask, Image.Image):
        label = name or "mask"
        check_image_size(mask.size, label)
        return _mask_of(mask, size, label)
    array = np.asarray(mask)
    if array.ndim != 2 or array.dtype.kind not in "biuf":
        raise InputError(f"{name or 'a mask'} must be an (H, W) array of bools or numbers, a mask image file or a "
                         f"PIL image; got {array.dtype} {array.shape}")
    check_image_size(array.shape[::-1], name or "mask")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{name or 'the mask'} holds NaN or infinite values")
    return _mask_of(Image.fromarray((array != 0).astype(np.uint8) * 255), size, name or "mask")


def _mask_of(im: Any, size: tuple[int, int], label: str) -> np.ndarray:
    from PIL import Image

    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    if im.mode in ("P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
    bands = im.getbands()
    values = np.asarray(im)
    if values.ndim == 2:
        values = values[..., None]
    if "A" in bands or "a" in bands:
        alpha = bands.index("A" if "A" in bands else "a")
        colours = np.delete(values, alpha, axis=-1)
        inside = (colours != 0).any(-1) & (values[..., alpha] != 0)
    else:
        inside = (values != 0).any(-1)
    if inside.shape != (size[0], size[1]):
        inside = np.asarray(Image.fromarray(inside.astype(np.uint8)).resize((size[1], size[0]), Image.NEAREST)) > 0
    return inside.astype(np.float32)


def check_image_size(size: tuple[int, int], label: str) -> None:
    """An :class:`InputError` for an image of no pixels or of more than :data:`MAX_IMAGE_PIXELS` (a possible
    decompression bomb: a few kB of PNG can declare gigapixels); ``size`` is Pillow's (W, H)."""
    width, height = size
    if width < 1 or height < 1:
        raise InputError(f"{label}: the image has no pixels ({width} x {height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{label}: {width} x {height} = {width * height} pixels is over the limit of "
                         f"{MAX_IMAGE_PIXELS} (refused as a possible decompression bomb); downscale it first")


def to_rgb(im: Any, label: str = "image") -> np.ndarray:
    """A PIL image -> RGB uint8 ``(H, W, 3)``: first frame, EXIF orientation applied, every mode
    converted by its meaning (see the module docstring)."""
    from PIL import ImageOps

    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    try:
        im = ImageOps.exif_transpose(im) or im
    except Exception as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise InputError(f"{label} is not an image that Pillow can read ({type(err).__name__}"
                         f"{': ' + detail if detail else ''}; while applying its EXIF orientation)") from err
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        return _grey(_scale16(np.asarray(im).astype(np.float64)))
    if mode == "I":
        values = np.asarray(im).astype(np.float64)
        if values.size and 0 <= values.min() and values.max() <= 65535:
            return _grey(_scale16(values))
        return _grey(_minmax(values))
    if mode == "F":
        values = np.asarray(im).astype(np.float64)
        if not np.isfinite(values).all():
            raise InputError(f"{label}: the float image holds NaN or infinite values")
        if values.size and 0 <= values.min() and values.max() <= 1:
            return _grey(np.floor(values * 255 + 0.5))
        return _grey(_minmax(values))
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA")).astype(np.float64)
        alpha = rgba[..., 3:] / 255
        rgb = rgba[..., :3] * alpha + _BACKGROUND * (1 - alpha)
        return np.floor(rgb + 0.5).astype(np.uint8)
    if mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def _scale16(values: np.ndarray) -> np.ndarray:
    return np.floor(values * 255 / 65535 + 0.5)


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros_like(values)
    return np.floor((values - lo) * 255 / (hi - lo) + 0.5)


def _grey(values: np.ndarray) -> np.ndarray:
    grey = np.clip(values, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))


def pil_filter(name: str):
    """The Pillow resampling filter of a metadata ``resize`` name; an :class:`InputError` for others."""
    from PIL import Image

    filters = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC,
               "lanczos": Image.LANCZOS, "box": Image.BOX}
    if name not in filters:
        raise InputError(f"unsupported resize {name!r} in the metadata; known: {', '.join(filters)}")
    return filters[name]


def preprocess_rgb(rgb: np.ndarray, preprocessing: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (H0, W0, 3) -> float32 graph input (3, H, W) (or (H, W, 3) for ``"NHWC"``), by a filled-in
    preprocessing dict (``color``, ``scale``, ``mean``, ``std``, ``resize``, ``layout``): Pillow resize to
    ``size`` = (H, W), ``x * scale``, ``(x - mean) / std`` -- what ``pyattr explain`` does."""
    from PIL import Image

    p = preprocessing
    h, w = size
    if rgb.shape[:2] != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), pil_filter(p["resize"])))
    if p["color"] == "BGR":
        rgb = rgb[..., ::-1]
    x = rgb.astype(np.float32) * np.float32(p["scale"])
    x = (x - np.asarray(p["mean"], np.float32)) / np.asarray(p["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)) if p["layout"] == "NCHW" else x
