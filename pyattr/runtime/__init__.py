"""Run exported attribution graphs without PyTorch: onnxruntime + NumPy/Pillow + ``pyattr._C``.

A server that has no torch and no model code loads an ``.onnx`` file written by
:func:`pyattr.export`, reads its metadata (method, layer, preprocessing, class names), and turns
images into attribution maps and overlays::

    from pyattr.runtime import AttributionRuntime

    runtime = AttributionRuntime("gradcam.onnx")          # CUDA provider when available, else CPU
    for e in runtime.explain(["cat.jpg", "dog.png"], cmap="jet", alpha=0.5):
        print(e.class_name, e.score)                       # the explained class and its score
        e.overlay                                          # uint8 (H, W, 3) at the image's own size

or from a pipeline: ``python -m pyattr.runtime gradcam.onnx *.jpg --out overlays/`` (also
``pyattr run ...``).

This package imports numpy, Pillow, onnxruntime and :mod:`pyattr.render` (which uses the compiled
``pyattr._C`` when built, else its NumPy twin) -- never torch (``tests/test_runtime.py`` runs it
in a process where importing torch fails).

Steps, for each batch of images:

1. preprocessing from the metadata: RGB uint8 -> Pillow bilinear resize to ``size`` ->
   ``x * scale`` -> ``(x - mean) / std`` -> float32 ``NCHW`` (the same steps as ``pyattr explain``);
2. the graph: ``images`` + ``target`` (-1 = each image's arg-max class) -> ``scores``,
   ``explained_class``, ``raw``, ``maps`` (normalized to [0, 1] at the model's input size);
3. overlays with :func:`pyattr.render.heatmap_overlay` at each image's own size: by default the
   graph's ``maps`` resized and clipped (``value_range=(0, 1)``, as ``pyattr explain`` does), or
   ``source="raw"`` to normalize the raw map on the host (``sign``, ``outlier_perc``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pyattr import render
from pyattr.errors import InputError
from pyattr.runtime.images import ImageLike, load_image

__all__ = [
    "AttributionRuntime",
    "Explanation",
    "GraphOutputs",
    "default_providers",
    "load_image",
    "read_onnx_metadata",
]

METADATA_KEY = "pyattr"
IMAGE_INPUT, TARGET_INPUT = "images", "target"
OUTPUTS = ("scores", "explained_class", "raw", "maps")


class GraphOutputs(NamedTuple):
    """The four outputs of an exported graph, for a batch of N images."""

    scores: np.ndarray  # (N, K) float32
    explained_class: np.ndarray  # (N,) int64
    raw: np.ndarray  # the method's raw map, e.g. (N, 16, 16) for Grad-CAM on the built-in model
    maps: np.ndarray  # (N, H, W) float32 in [0, 1] at the model's input size


@dataclass
class Explanation:
    """The explanation of one image.

    Attributes:
        name: the image's name (file stem, or ``image_<i>``).
        explained_class: the class the map explains (the target, or the arg-max).
        class_name: its name from the metadata (``"class <k>"`` without names).
        score: the model's score (logit) for that class.
        predicted_class: the arg-max of the scores.
        scores: (K,) all scores.
        raw: the method's raw map (e.g. (16, 16) for Grad-CAM on the built-in model).
        map: (H, W) float32 in [0, 1], at the model's input size.
        overlay: (H0, W0, 3) uint8, the heatmap over the image at its own size.
    """

    name: str
    explained_class: int
    class_name: str
    score: float
    predicted_class: int
    scores: np.ndarray
    raw: np.ndarray
    map: np.ndarray
    overlay: np.ndarray

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict (without the arrays)."""
        return {"image": self.name, "explained_class": self.explained_class, "class_name": self.class_name,
                "score": self.score, "predicted_class": self.predicted_class}


def default_providers() -> list[str]:
    """onnxruntime providers to ask for, explicitly: CUDA then CPU when this onnxruntime has the CUDA
    provider and the machine has an NVIDIA driver, else CPU only. (onnxruntime-gpu lists its CUDA
    provider on machines without a GPU too, and then logs an error when a session asks for it.)"""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and _nvidia_driver_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _nvidia_driver_present() -> bool:
    import ctypes
    import sys

    try:
        ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return False
    return True


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The pyattr metadata of an ``.onnx`` file, read with onnxruntime (no onnx package needed)."""
    session = _open_session(Path(path), ["CPUExecutionProvider"], None)
    return _metadata_of(session, Path(path))


class AttributionRuntime:
    """An exported attribution graph (``.onnx``) loaded in onnxruntime, with its metadata.

    Args:
        path: the ``.onnx`` file written by :func:`pyattr.export` (or ``pyattr export``).
        providers: onnxruntime execution providers; default :func:`default_providers` (CUDA when
            usable, else CPU).
        num_threads: onnxruntime intra-op threads and ``pyattr._C`` threads; 0 = all cores.

    Attributes:
        metadata: the file's pyattr metadata (``method``, ``layer``, ``preprocessing``,
            ``class_names``, ...).
        input_size: (H, W) the images are resized to.
        providers: the providers the session runs with.

    Example:
        >>> runtime = AttributionRuntime("gradcam.onnx")                  # doctest: +SKIP
        >>> outputs = runtime.run(runtime.preprocess([image]))             # doctest: +SKIP
        >>> outputs.maps.shape                                             # doctest: +SKIP
        (1, 64, 64)
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, num_threads: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"no such model file: {path}")
        if self.path.suffix != ".onnx":
            raise InputError(f"{self.path.name}: the runtime runs ONNX graphs (.onnx); for .pt use libtorch "
                             "(see export/README.md), for .pt2 torch.export.load")
        self.num_threads = int(num_threads)
        if self.num_threads < 0:
            raise InputError(f"num_threads must be >= 0 (0 = all cores), got {num_threads}")
        self.session = _open_session(self.path, list(providers) if providers else default_providers(),
                                     self.num_threads)
        self.providers = self.session.get_providers()
        self.metadata = _metadata_of(self.session, self.path)
        names = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if names != {IMAGE_INPUT, TARGET_INPUT} or outputs != list(OUTPUTS):
            raise InputError(f"{self.path.name} is not a pyattr attribution graph: inputs {sorted(names)}, "
                             f"outputs {outputs} (expected {IMAGE_INPUT}, {TARGET_INPUT} -> {', '.join(OUTPUTS)})")
        self.preprocessing = _preprocessing(self.metadata, self.session)
        self.input_size: tuple[int, int] = tuple(self.preprocessing["size"])  # type: ignore[assignment]
        self.class_names: list[str] | None = self.metadata.get("class_names")

    @property
    def method(self) -> str:
        return str(self.metadata.get("method", "?"))

    def class_name(self, k: int) -> str:
        names = self.class_names
        return names[k] if names is not None and 0 <= k < len(names) else f"class {k}"

    def class_index(self, target: int | str) -> int:
        """A class id from an id or a class name of the metadata."""
        if isinstance(target, str) and not target.lstrip("-").isdigit():
            if not self.class_names or target not in self.class_names:
                known = ", ".join(self.class_names or []) or "none in the metadata"
                raise InputError(f"unknown class name {target!r}; known: {known}")
            return self.class_names.index(target)
        k = int(target)
        n = self._num_classes()
        if k != -1 and not (0 <= k < n):
            raise InputError(f"target {k} is out of range: the model has {n} classes (0..{n - 1}; -1 = arg-max)")
        return k

    def _num_classes(self) -> int:
        shape = self.session.get_outputs()[0].shape
        if isinstance(shape[-1], int):
            return shape[-1]
        return len(self.class_names) if self.class_names else 2**31

    # --- the three steps -------------------------------------------------------------------------

    def preprocess(self, images: Iterable[ImageLike]) -> np.ndarray:
        """Images (paths, PIL images or uint8 arrays of any size) -> float32 (N, C, H, W) graph input."""
        arrays = [self._preprocess_one(load_image(image)) for image in images]
        if not arrays:
            return np.zeros((0, 3, *self.input_size), np.float32)
        return np.stack(arrays)

    def _preprocess_one(self, rgb: np.ndarray) -> np.ndarray:
        from PIL import Image

        p = self.preprocessing
        h, w = self.input_size
        if rgb.shape[:2] != (h, w):
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), _pil_filter(p["resize"])))
        if p["color"] == "BGR":
            rgb = rgb[..., ::-1]
        x = rgb.astype(np.float32) * np.float32(p["scale"])
        x = (x - np.asarray(p["mean"], np.float32)) / np.asarray(p["std"], np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1)) if p["layout"] == "NCHW" else x

    def run(self, batch: np.ndarray, target: int | str | Sequence[int] | np.ndarray | None = None) -> GraphOutputs:
        """Run the graph on a preprocessed float32 batch; ``target``: None / -1 (arg-max), a class id
        or name for every image, or one id per image."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        expected = tuple(self.session.get_inputs()[0].shape[1:])
        if batch.ndim != 4 or any(isinstance(e, int) and e != s for e, s in zip(expected, batch.shape[1:])):
            raise InputError(f"the graph takes images of shape (N, {', '.join(map(str, expected))}), "
                             f"got {batch.shape}")
        targets = self._targets(target, len(batch))
        outputs = self.session.run(list(OUTPUTS), {IMAGE_INPUT: batch, TARGET_INPUT: targets})
        return GraphOutputs(*[np.asarray(o) for o in outputs])

    def _targets(self, target, n: int) -> np.ndarray:
        if target is None:
            return np.full(n, -1, np.int64)
        if isinstance(target, (int, str, np.integer)):
            return np.full(n, self.class_index(target), np.int64)
        ids = np.asarray([self.class_index(t) for t in np.asarray(target).ravel().tolist()], np.int64)
        if len(ids) != n:
            raise InputError(f"give one target per image: {len(ids)} targets for {n} images")
        return ids

    def explain(self, images: Sequence[ImageLike], target: int | str | Sequence[int] | None = None, *,
                alpha: float = 0.5, cmap: str = "jet", source: str = "maps", sign: str = "all",
                outlier_perc: float = 0.0, batch_size: int = 32, names: Sequence[str] | None = None,
                ) -> list[Explanation]:
        """Explain images: preprocess, run the graph in batches, and overlay the maps on each image
        at its own size.

        Args:
            images: paths, PIL images or uint8 RGB arrays, of any sizes.
            target: None (each image's top class), a class id or name, or one id per image.
            alpha, cmap: the overlay (see :func:`pyattr.render.heatmap_overlay`).
            source: ``"maps"`` (the graph's normalized maps, resized and clipped -- what
                ``pyattr explain`` draws) or ``"raw"`` (the raw map, resized and normalized here
                with ``sign`` and ``outlier_perc``; e.g. ``cmap="bwr", sign="centered"`` for
                signed maps).
            batch_size: images per graph run.
            names: one name per image (default: file stems, else ``image_<i>``).
        """
        if source not in ("maps", "raw"):
            raise InputError(f"source must be 'maps' or 'raw', got {source!r}")
        if batch_size < 1:
            raise InputError("batch_size must be at least 1")
        images = list(images)
        names = list(names) if names is not None else [_name_of(image, i) for i, image in enumerate(images)]
        if len(names) != len(images):
            raise InputError(f"give one name per image: {len(names)} names for {len(images)} images")
        targets = None if target is None or isinstance(target, (int, str, np.integer)) else list(target)
        if targets is not None and len(targets) != len(images):
            raise InputError(f"give one target per image: {len(targets)} targets for {len(images)} images")
        results: list[Explanation] = []
        for start in range(0, len(images), batch_size):
            chunk = [load_image(image) for image in images[start:start + batch_size]]
            batch_target = target if targets is None else targets[start:start + batch_size]
            out = self.run(np.stack([self._preprocess_one(rgb) for rgb in chunk]), batch_target)
            overlays = self._overlays(out, chunk, alpha, cmap, source, sign, outlier_perc)
            for j, rgb in enumerate(chunk):
                k = int(out.explained_class[j])
                results.append(Explanation(
                    name=names[start + j], explained_class=k, class_name=self.class_name(k),
                    score=float(out.scores[j, k]), predicted_class=int(out.scores[j].argmax()),
                    scores=out.scores[j], raw=out.raw[j], map=out.maps[j], overlay=overlays[j],
                ))
        return results

    def _overlays(self, out: GraphOutputs, images: list[np.ndarray], alpha, cmap, source, sign, outlier_perc):
        maps = out.maps if source == "maps" else out.raw
        if maps.ndim != 3:
            raise InputError(f"overlays need (N, H, W) maps; this graph's {source} have shape {maps.shape} "
                             "(export a method with one map per image)")
        options = {"value_range": (0.0, 1.0)} if source == "maps" else {"sign": sign, "outlier_perc": outlier_perc}
        overlays: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for j, rgb in enumerate(images):
            by_size.setdefault(rgb.shape[:2], []).append(j)
        for indices in by_size.values():  # one fused call per image size
            drawn = render.heatmap_overlay(maps[indices], np.stack([images[j] for j in indices]), alpha, cmap,
                                           num_threads=self.num_threads, **options)
            for j, overlay in zip(indices, drawn):
                overlays[j] = overlay
        return overlays

    def __repr__(self) -> str:
        layer = self.metadata.get("layer")
        return (f"AttributionRuntime({str(self.path)!r}, method={self.method!r}"
                f"{f', layer={layer!r}' if layer else ''}, input_size={self.input_size}, providers={self.providers})")


# --- helpers ------------------------------------------------------------------------------------


def _open_session(path: Path, providers: list[str], num_threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no provider chatter on CPU-only machines
    if num_threads:
        options.intra_op_num_threads = num_threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"onnxruntime cannot load {path.name}: {first[:300]}") from err


def _metadata_of(session, path: Path) -> dict[str, Any]:
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise InputError(f"{path.name} holds no pyattr metadata (was it written by pyattr.export?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path.name}: its pyattr metadata is not valid JSON ({err})") from err


def _preprocessing(metadata: dict[str, Any], session) -> dict[str, Any]:
    """The metadata's preprocessing with defaults filled in and checked."""
    import warnings

    given = dict(metadata.get("preprocessing") or {})
    shape = session.get_inputs()[0].shape  # ['batch', C, H, W]
    channels = shape[1] if isinstance(shape[1], int) else 3
    if not given:
        warnings.warn("the graph's metadata holds no preprocessing: images are scaled to [0, 1] and not "
                      "normalized (export with preprocessing=... to record it)", stacklevel=3)
    size = given.get("size") or [s for s in shape[2:4]]
    p = {
        "color": given.get("color", "RGB"),
        "scale": float(given.get("scale", 1 / 255)),
        "mean": [float(v) for v in given.get("mean", [0.0] * channels)],
        "std": [float(v) for v in given.get("std", [1.0] * channels)],
        "size": [int(s) for s in size],
        "resize": given.get("resize", "bilinear"),
        "layout": given.get("layout", "NCHW"),
    }
    if p["color"] not in ("RGB", "BGR") or p["layout"] not in ("NCHW", "NHWC") or len(p["size"]) != 2:
        raise InputError(f"unsupported preprocessing in the metadata: {given}")
    if channels != 3 or len(p["mean"]) != 3 or len(p["std"]) != 3 or not all(p["std"]):
        raise InputError(f"the runtime handles 3-channel images with 3 means and non-zero stds; got {given} "
                         f"for an input of shape {shape}")
    _pil_filter(p["resize"])
    return p


def _pil_filter(name: str):
    from PIL import Image

    filters = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC,
               "lanczos": Image.LANCZOS, "box": Image.BOX}
    if name not in filters:
        raise InputError(f"unsupported resize {name!r} in the metadata; known: {', '.join(filters)}")
    return filters[name]


def _name_of(image: ImageLike, i: int) -> str:
    return Path(image).stem if isinstance(image, (str, os.PathLike)) else f"image_{i}"
