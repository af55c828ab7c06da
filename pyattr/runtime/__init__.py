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

import difflib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pyattr import render
from pyattr.errors import InputError
from pyattr.runtime.images import MAX_IMAGE_PIXELS, ImageLike, check_image_size, load_image

from .metadata import parse_metadata, validate_metadata

__all__ = [
    "MAX_IMAGE_PIXELS",
    "AttributionRuntime",
    "Explanation",
    "GraphOutputs",
    "check_image_size",
    "default_providers",
    "load_image",
    "max_threads",
    "read_onnx_metadata",
]

METADATA_KEY = "pyattr"
IMAGE_INPUT, TARGET_INPUT = "images", "target"
OUTPUTS = ("scores", "explained_class", "raw", "maps")

# Limits on what a caller or a file can make the runtime allocate (see SECURITY.md).
MAX_BATCH = 4096  # images per graph run (the export's dynamic batch goes to 4096)
MAX_CLASSES_SHOWN = 5  # close class names suggested for an unknown --target


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
        probability: its probability: softmax over the scores (sigmoid for graphs whose metadata says
            ``"multilabel": true``).
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
    probability: float
    predicted_class: int
    scores: np.ndarray
    raw: np.ndarray
    map: np.ndarray
    overlay: np.ndarray

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict (without the arrays)."""
        return {"image": self.name, "explained_class": self.explained_class, "class_name": self.class_name,
                "score": self.score, "probability": self.probability, "predicted_class": self.predicted_class}


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
    """The pyattr metadata of an ``.onnx`` file, read as data and checked against the schema
    (:func:`pyattr.runtime.metadata.read_metadata`)."""
    from .metadata import read_metadata

    if Path(path).suffix.lower() != ".onnx":
        raise InputError(f"{Path(path).name} is not an .onnx file")
    return read_metadata(path)


def max_threads() -> int:
    """The most threads the runtime accepts: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_num_threads(num_threads: Any) -> int:
    """``num_threads`` as an int from 0 (all cores) to :func:`max_threads`, else an :class:`InputError`
    (onnxruntime crashes or hangs when asked for more threads than it can create)."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise InputError(f"num_threads must be an int, got {type(num_threads).__name__} {num_threads!r}")
    n, limit = int(num_threads), max_threads()
    if not 0 <= n <= limit:
        raise InputError(f"num_threads must be from 0 (all cores) to {limit} (the CPUs this process may use), "
                         f"got {n}")
    return n


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
            raise InputError(f"{self.path.name}: the runtime runs ONNX graphs (.onnx) only. TorchScript (.pt) and "
                             ".pt2 files execute code when loaded: load them with libtorch / torch.export.load "
                             "only if you trust their source (see SECURITY.md)")
        self.num_threads = check_num_threads(num_threads)
        self.session = _open_session(self.path, list(providers) if providers else default_providers(),
                                     self.num_threads)
        self.providers = self.session.get_providers()
        self.metadata = _metadata_of(self.session, self.path)
        names = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if names != {IMAGE_INPUT, TARGET_INPUT} or outputs != list(OUTPUTS):
            raise InputError(f"{self.path.name} is not a pyattr attribution graph: inputs {sorted(names)}, "
                             f"outputs {outputs} (expected {IMAGE_INPUT}, {TARGET_INPUT} -> {', '.join(OUTPUTS)})")
        validate_metadata(self.metadata, input_shape=self.session.get_inputs()[0].shape,
                          num_classes=self._graph_classes())
        self.preprocessing = _preprocessing(self.metadata, self.session)
        self.input_size: tuple[int, int] = tuple(self.preprocessing["size"])  # type: ignore[assignment]
        self.class_names: list[str] | None = self.metadata.get("class_names")

    def _graph_classes(self) -> int | None:
        shape = self.session.get_outputs()[0].shape
        return shape[-1] if shape and isinstance(shape[-1], int) else None

    @property
    def method(self) -> str:
        return str(self.metadata.get("method", "?"))

    def class_name(self, k: int) -> str:
        names = self.class_names
        return names[k] if names is not None and 0 <= k < len(names) else f"class {k}"

    def class_index(self, target: int | str) -> int:
        """A class id from an id (an int, or a string of digits) or a class name of the metadata;
        -1 = each image's arg-max. Floats and bools are refused, not truncated."""
        if isinstance(target, str):
            text = target.strip()
            if self.class_names and text in self.class_names:
                return self.class_names.index(text)
            if re.fullmatch(r"[+-]?\d+", text):
                return self._check_id(int(text))
            if not self.class_names:
                raise InputError(f"unknown class {target!r}: this graph's metadata holds no class names; "
                                 "give a class id")
            close = difflib.get_close_matches(text, self.class_names, n=MAX_CLASSES_SHOWN, cutoff=0.6)
            hint = (f"did you mean {', '.join(map(repr, close))}?" if close
                    else f"the graph has {len(self.class_names)} classes, e.g. "
                         f"{', '.join(map(repr, self.class_names[:MAX_CLASSES_SHOWN]))}")
            raise InputError(f"unknown class name {target!r}; {hint}")
        if isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, np.integer)):
            raise InputError(f"a target must be a class id (int) or a class name (str); got "
                             f"{type(target).__name__} {target!r}")
        return self._check_id(int(target))

    def _check_id(self, k: int) -> int:
        n = self._num_classes()
        if k != -1 and not (0 <= k < n):
            raise InputError(f"target {k} is out of range: the model has {n} classes (0..{n - 1}; -1 = arg-max)")
        return k

    def _num_classes(self) -> int:
        k = self._graph_classes()
        if k is not None:
            return k
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
        if len(batch) > MAX_BATCH:
            raise InputError(f"at most {MAX_BATCH} images per graph run, got {len(batch)}; run them in batches")
        targets = self._targets(target, len(batch))
        try:
            outputs = self.session.run(list(OUTPUTS), {IMAGE_INPUT: batch, TARGET_INPUT: targets})
        except Exception as err:  # onnxruntime's own types: a graph that fails or cannot allocate
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"onnxruntime failed running {self.path.name}: {first[:300]}") from err
        return self._checked(GraphOutputs(*[np.asarray(o) for o in outputs]), len(batch))

    def _checked(self, out: GraphOutputs, n: int) -> GraphOutputs:
        """The graph's outputs must have the documented shapes and types (a foreign or crafted graph may
        return anything): scores (N, K) float, explained_class (N,) ints in [0, K), maps (N, ...) floats."""
        k = out.scores.shape[-1] if out.scores.ndim == 2 else 0
        problems = []
        if out.scores.ndim != 2 or out.scores.shape[0] != n or k < 1 or out.scores.dtype.kind != "f":
            problems.append(f"scores {out.scores.dtype} {out.scores.shape}, expected float (N={n}, K)")
        if out.explained_class.shape != (n,) or out.explained_class.dtype.kind not in "iu":
            problems.append(f"explained_class {out.explained_class.dtype} {out.explained_class.shape}, expected "
                            f"int ({n},)")
        elif k and not np.all((out.explained_class >= 0) & (out.explained_class < k)):
            problems.append(f"explained_class values outside 0..{k - 1}")
        for name, value in (("raw", out.raw), ("maps", out.maps)):
            if value.ndim < 1 or value.shape[0] != n or value.dtype.kind != "f":
                problems.append(f"{name} {value.dtype} {value.shape}, expected float (N={n}, ...)")
        if problems:
            raise InputError(f"{self.path.name} returned outputs that are not a pyattr graph's: {'; '.join(problems)}")
        return out

    def _targets(self, target, n: int) -> np.ndarray:
        if target is None:
            return np.full(n, -1, np.int64)
        if isinstance(target, (int, str, float, np.integer, np.floating, np.bool_)):
            return np.full(n, self.class_index(target), np.int64)
        values = np.asarray(target, dtype=object).ravel().tolist()
        ids = np.asarray([self.class_index(t) for t in values], np.int64)
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
                signed maps, drawn with :func:`pyattr.render.heatmap_overlay_signed`: opacity ~ |value|).
            batch_size: images per graph run.
            names: one name per image (default: file stems, else ``image_<i>``).
        """
        if source not in ("maps", "raw"):
            raise InputError(f"source must be 'maps' or 'raw', got {source!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or not 1 <= batch_size <= MAX_BATCH:
            raise InputError(f"batch_size must be an int from 1 to {MAX_BATCH}, got {batch_size!r}")
        images = list(images)
        names = list(names) if names is not None else [_name_of(image, i) for i, image in enumerate(images)]
        if len(names) != len(images):
            raise InputError(f"give one name per image: {len(names)} names for {len(images)} images")
        single = target is None or isinstance(target, (int, str, float, np.integer, np.floating, np.bool_))
        targets = None if single else list(self._targets(target, len(images)))
        if single and target is not None:
            target = self.class_index(target)
        results: list[Explanation] = []
        for start in range(0, len(images), batch_size):
            chunk = [load_image(image) for image in images[start:start + batch_size]]
            batch_target = target if targets is None else targets[start:start + batch_size]
            out = self.run(np.stack([self._preprocess_one(rgb) for rgb in chunk]), batch_target)
            overlays = self._overlays(out, chunk, alpha, cmap, source, sign, outlier_perc)
            probabilities = self.probabilities(out.scores)
            for j, rgb in enumerate(chunk):
                k = int(out.explained_class[j])
                results.append(Explanation(
                    name=names[start + j], explained_class=k, class_name=self.class_name(k),
                    score=float(out.scores[j, k]), probability=float(probabilities[j, k]),
                    predicted_class=int(out.scores[j].argmax()),
                    scores=out.scores[j], raw=out.raw[j], map=out.maps[j], overlay=overlays[j],
                ))
        return results

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """(N, K) scores -> probabilities: softmax over K, or sigmoid for multi-label graphs
        (metadata ``"multilabel": true``); computed in float64, returned as float32."""
        s = np.asarray(scores, np.float64)
        if self.metadata.get("multilabel", False):
            return (0.5 * (1.0 + np.tanh(0.5 * s))).astype(np.float32)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)

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
        # signed maps drawn centred (zero at the colormap's middle) with opacity ~ |value|, so the photo stays
        # visible where the evidence is zero (as pyattr explain draws them)
        signed = source == "raw" and sign == "centered"
        for indices in by_size.values():  # one fused call per image size
            stacked = np.stack([images[j] for j in indices])
            if signed:
                drawn = render.heatmap_overlay_signed(maps[indices], stacked, alpha, cmap,
                                                      outlier_perc=outlier_perc, num_threads=self.num_threads)
            else:
                drawn = render.heatmap_overlay(maps[indices], stacked, alpha, cmap,
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

    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown or not providers:
        raise InputError(f"unknown onnxruntime provider(s) {unknown or providers}; this onnxruntime has "
                         f"{', '.join(available)}")

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
    return parse_metadata(text, path.name)


def _preprocessing(metadata: dict[str, Any], session) -> dict[str, Any]:
    """The metadata's preprocessing with defaults filled in and checked."""
    import warnings

    given = dict(metadata.get("preprocessing") or {})
    shape = session.get_inputs()[0].shape  # ['batch', C, H, W]
    channels = shape[1] if isinstance(shape[1], int) else 3
    if not given:
        warnings.warn("the graph's metadata holds no preprocessing: images are scaled to [0, 1] and not "
                      "normalized (export with preprocessing=... to record it)", stacklevel=3)
    size = given.get("size") or list(shape[2:4])
    if len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in size):
        raise InputError(f"metadata field 'preprocessing.size' is needed: the graph's input {shape} has no fixed "
                         "(H, W)")
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
