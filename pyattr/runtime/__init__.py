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

Graphs exported with a target (``pyattr.export(..., target=SegmentationTarget())`` or
``target=SimilarityTarget()``) take the target's run-time inputs, read from the metadata's ``"target"``
and ``"inputs"``::

    seg = AttributionRuntime("gradcam_seg.onnx")
    seg.explain(["street.png"], target="road", region="road_mask.png")   # a region; None: where the model
                                                                         # predicts the class
    sim = AttributionRuntime("gradcam_embed.onnx")
    reference = sim.embed(["query.png"])                                  # (1, D): the same graph's embedding
    for e in sim.explain(["a.png", "b.png"], reference=reference):
        print(e.similarity)                                               # cosine similarity to the reference

Detection graphs (``pyattr export --task detection``) take boxes, in each image's pixels, given or found by a
detector graph (:mod:`pyattr.runtime.detection`: any number per image, run in chunks of the graph's B)::

    det = AttributionRuntime("det.onnx")
    found = Detector("detector.onnx").detect(["a.png"])                   # boxes, labels, scores per image
    e = det.explain(["a.png"], boxes=found)[0]                            # or boxes=[[x0, y0, x1, y1]], box_classes=["star"]
    e.maps, e.matched, e.overlays                                         # one map and one overlay per box

Graphs of a method and its faithfulness metrics (:class:`pyattr.metrics.graph.MethodWithMetrics`, metadata
``metrics``) return the metric outputs after the maps: ``run()`` gives them as ``GraphOutputs.metrics`` (name ->
(N,) or (N, K + 1) array) and ``explain()`` as each ``Explanation.metrics``::

    scored = AttributionRuntime("gradcam_metrics.onnx")
    e = scored.explain(["cat.jpg"])[0]
    e.metrics["deletion_auc"], e.metrics["insertion_auc"], e.metrics["average_drop"]

This package imports numpy, Pillow, onnxruntime (or openvino: ``AttributionRuntime(path, backend="openvino")``,
:mod:`pyattr.runtime.backends`) and :mod:`pyattr.render` (which uses the compiled ``pyattr._C`` when built, else
its NumPy twin) -- never torch (``tests/test_runtime.py`` runs it in a process where importing torch fails;
``tests/test_torchfree_install.py`` installs pyattr in a fresh environment without torch).

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
from pyattr.runtime.images import (
    MAX_IMAGE_PIXELS,
    ImageLike,
    check_image_size,
    load_image,
    load_mask,
    pil_filter,
    preprocess_rgb,
)

from .backends import BACKENDS, GraphSession, check_backend, open_graph
from .detection import DETECTOR_METADATA_KEY, DetectionExplanation, DetectionOutputs, Detector
from .metadata import parse_metadata, validate_metadata

__all__ = [
    "BACKENDS",
    "MAX_IMAGE_PIXELS",
    "AttributionRuntime",
    "DetectionExplanation",
    "DetectionOutputs",
    "Detector",
    "Explanation",
    "GraphOutputs",
    "check_image_size",
    "default_providers",
    "load_image",
    "max_threads",
    "read_onnx_metadata",
    "select_providers",
]

METADATA_KEY = "pyattr"
IMAGE_INPUT, TARGET_INPUT = "images", "target"
REGION_INPUT, REFERENCE_INPUT = "region", "reference"
BOXES_INPUT, BOX_CLASSES_INPUT = "boxes", "box_classes"
OUTPUTS = ("scores", "explained_class", "raw", "maps")
EMBEDDING_OUTPUT = "embedding"
TARGET_OUTPUTS = {"similarity": (EMBEDDING_OUTPUT,), "detection": ("matched", "iou")}
"""The outputs, after :data:`OUTPUTS`, of the target kinds with outputs of their own."""

# Limits on what a caller or a file can make the runtime allocate (see SECURITY.md).
MAX_BATCH = 4096  # images per graph run (the export's dynamic batch goes to 4096)
MAX_CLASSES_SHOWN = 5  # close class names suggested for an unknown --target


class GraphOutputs(NamedTuple):
    """The outputs of an exported graph, for a batch of N images: four, and the embedding of a
    similarity graph."""

    scores: np.ndarray  # (N, K) float32; segmentation: class scores summed over the region; similarity: (N, 1)
    explained_class: np.ndarray  # (N,) int64 (0 for similarity)
    raw: np.ndarray  # the method's raw map, e.g. (N, 16, 16) for Grad-CAM on the built-in model
    maps: np.ndarray  # (N, H, W) float32 in [0, 1] at the model's input size
    embedding: np.ndarray | None = None  # (N, D) float32 for similarity graphs, else None
    metrics: dict[str, np.ndarray] | None = None  # method-with-metrics graphs: name -> (N,) or (N, P), else None


@dataclass
class Explanation:
    """The explanation of one image.

    Attributes:
        name: the image's name (file stem, or ``image_<i>``).
        explained_class: the class the map explains (the target, or the arg-max); 0 for similarity.
        class_name: its name from the metadata (``"class <k>"`` without names); ``"similarity"`` for
            similarity graphs.
        score: the model's score (logit) for that class; segmentation: the class's scores summed over
            the region; similarity: the similarity to the reference.
        probability: its probability: softmax over the scores (sigmoid for graphs whose metadata says
            ``"multilabel": true``); None for segmentation and similarity graphs (their scores are
            not logits of one decision).
        predicted_class: the arg-max of the scores (segmentation: the class with the largest summed
            score).
        scores: (K,) all scores.
        raw: the method's raw map (e.g. (16, 16) for Grad-CAM on the built-in model).
        map: (H, W) float32 in [0, 1], at the model's input size.
        overlay: (H0, W0, 3) uint8, the heatmap over the image at its own size.
        target_kind: the graph's target kind: ``"class"``, ``"segmentation"`` or ``"similarity"``.
        region: segmentation: the (H, W) region fed to the graph at its input size, or None for the
            region the model predicts.
        similarity: similarity graphs: the similarity to the reference (the same as ``score``).
        embedding: similarity graphs: the image's (D,) embedding.
        metrics: method-with-metrics graphs (:class:`pyattr.metrics.graph.MethodWithMetrics`): the image's metric
            values by output name, e.g. ``deletion_auc`` (a 0-d array), ``deletion_curve`` ((K + 1,) scores),
            ``average_drop``; None for other graphs.
    """

    name: str
    explained_class: int
    class_name: str
    score: float
    probability: float | None
    predicted_class: int
    scores: np.ndarray
    raw: np.ndarray
    map: np.ndarray
    overlay: np.ndarray
    target_kind: str = "class"
    region: np.ndarray | None = None
    similarity: float | None = None
    embedding: np.ndarray | None = None
    metrics: dict[str, np.ndarray] | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict (without the arrays): for class graphs image, explained_class, class_name,
        score, probability, predicted_class; segmentation graphs add ``target_kind`` and ``region``
        (``"given"`` or ``"predicted"``) and have no probability; similarity graphs give image,
        ``target_kind`` and ``similarity``; method-with-metrics graphs add ``metrics``: each metric as a number
        (a curve as a list; NaN, an image the graph could not score, as null)."""
        if self.target_kind == "similarity":
            return {"image": self.name, "target_kind": self.target_kind, "similarity": self.similarity}
        line = {"image": self.name, "explained_class": self.explained_class, "class_name": self.class_name,
                "score": self.score, "probability": self.probability, "predicted_class": self.predicted_class}
        if self.target_kind != "class":
            del line["probability"]
            line = {"image": self.name, "target_kind": self.target_kind, **line}
            if self.target_kind == "segmentation":
                line["region"] = "predicted" if self.region is None else "given"
        if self.metrics is not None:
            line["metrics"] = {name: _json_numbers(value) for name, value in self.metrics.items()}
        return line


def _json_numbers(value: np.ndarray) -> Any:
    """A metric value as JSON: a float (a list of floats for a curve), null for NaN / infinity."""
    array = np.asarray(value, np.float64)
    if array.ndim == 0:
        return float(array) if np.isfinite(array) else None
    return [_json_numbers(v) for v in array]


def default_providers() -> list[str]:
    """onnxruntime providers to ask for, explicitly: CUDA then CPU when this onnxruntime has the CUDA
    provider and the machine has an NVIDIA driver, else CPU only. (onnxruntime-gpu lists its CUDA
    provider on machines without a GPU too, and then logs an error when a session asks for it.)"""
    import onnxruntime as ort

    return select_providers(ort.get_available_providers(), _nvidia_driver_present)


def select_providers(available: Sequence[str], driver_present: Any = True) -> list[str]:
    """The providers :func:`default_providers` asks for, given onnxruntime's ``available`` providers and whether an
    NVIDIA driver loads (a bool, or a function asked only when the CUDA provider is available): CUDA then CPU,
    else CPU.

    Example:
        >>> select_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], driver_present=True)
        ['CUDAExecutionProvider', 'CPUExecutionProvider']
        >>> select_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], driver_present=False)
        ['CPUExecutionProvider']
    """
    if "CUDAExecutionProvider" in available and (driver_present() if callable(driver_present) else driver_present):
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
    """An exported attribution graph (``.onnx``) loaded in onnxruntime (or OpenVINO), with its metadata.

    Args:
        path: the ``.onnx`` file written by :func:`pyattr.export` (or ``pyattr export``).
        providers: onnxruntime execution providers; default :func:`default_providers` (CUDA when
            usable, else CPU). With ``backend="openvino"``: one OpenVINO device, default ``["GPU"]``
            where OpenVINO lists a GPU, else ``["CPU"]``.
        num_threads: the backend's intra-op threads and ``pyattr._C`` threads; 0 = all cores.
        backend: ``"onnxruntime"`` (default) or ``"openvino"`` (``pip install openvino``): the same file
            compiled by OpenVINO, in float32 (:mod:`pyattr.runtime.backends`).

    Attributes:
        metadata: the file's pyattr metadata (``method``, ``layer``, ``preprocessing``,
            ``class_names``, ``target``, ``inputs``, ``outputs``, ...).
        input_size: (H, W) the images are resized to.
        providers: the providers the session runs with (OpenVINO: the device).
        backend: the backend's name; ``graph`` the loaded graph (:class:`~pyattr.runtime.backends.GraphSession`)
            and ``session`` the backend's own object (``onnxruntime.InferenceSession`` /
            ``openvino.CompiledModel``).
        target_kind: what the graph explains, from the metadata's ``target``: ``"class"`` (also for
            graphs exported before targets existed), ``"segmentation"`` (the graph takes a ``region``
            (N, H, W)), ``"similarity"`` (it takes a ``reference`` (N, D) and returns ``embedding``) or
            ``"detection"`` (boxes and their classes; one map per box).
        reference_dim: D, the embedding size of a similarity graph (None otherwise).
        max_boxes: B, the boxes per run of a detection graph (``target_kind == "detection"``: inputs
            ``images, boxes, box_classes``; None otherwise); :meth:`run` and :meth:`explain` take any number.

    Example:
        >>> runtime = AttributionRuntime("gradcam.onnx")                  # doctest: +SKIP
        >>> outputs = runtime.run(runtime.preprocess([image]))             # doctest: +SKIP
        >>> outputs.maps.shape                                             # doctest: +SKIP
        (1, 64, 64)
        >>> AttributionRuntime("gradcam.onnx", backend="openvino").run(x).maps  # the same maps  # doctest: +SKIP

        A segmentation graph, a given region and the model's predicted region::

        >>> seg = AttributionRuntime("gradcam_seg.onnx")                  # doctest: +SKIP
        >>> x = seg.preprocess([image, image])                             # doctest: +SKIP
        >>> mask = np.zeros(seg.input_size, bool); mask[10:30, 5:40] = True  # doctest: +SKIP
        >>> seg.run(x, target=[3, 3], region=np.stack([mask, np.full(seg.input_size, -1.0)]))  # doctest: +SKIP

        A similarity graph: the reference embedding from the same graph::

        >>> sim = AttributionRuntime("gradcam_embed.onnx")                # doctest: +SKIP
        >>> ref = sim.embed(["reference.png"])                             # (1, D)  # doctest: +SKIP
        >>> sim.explain(["query.png"], reference=ref)[0].similarity        # doctest: +SKIP
        0.83
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, num_threads: int = 0,
                 backend: str = "onnxruntime"):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"no such model file: {path}")
        if self.path.suffix != ".onnx":
            raise InputError(f"{self.path.name}: the runtime runs ONNX graphs (.onnx) only. TorchScript (.pt) and "
                             ".pt2 files execute code when loaded: load them with libtorch / torch.export.load "
                             "only if you trust their source (see SECURITY.md)")
        self.num_threads = check_num_threads(num_threads)
        self.backend = check_backend(backend)
        self.graph = open_graph(self.path, self.backend, providers, self.num_threads)
        self.session = self.graph.native
        self.providers = self.graph.providers
        self.metadata = _metadata_of(self.graph, self.path)
        self.target_kind, self.input_names, self.output_names = _interface(self.metadata, self.path.name)
        self.metric_names: tuple[str, ...] = self.output_names[len(OUTPUTS):] if "metrics" in self.metadata else ()
        inputs = {i.name: i for i in self.graph.inputs}
        outputs = [o.name for o in self.graph.outputs]
        if set(inputs) != set(self.input_names) or outputs != list(self.output_names):
            raise InputError(f"{self.path.name} is not a pyattr attribution graph: inputs {sorted(inputs)}, "
                             f"outputs {outputs} (expected {', '.join(self.input_names)} -> "
                             f"{', '.join(self.output_names)})")
        validate_metadata(self.metadata, input_shape=inputs[IMAGE_INPUT].shape,
                          num_classes=None if self.target_kind == "similarity" else self._graph_classes())
        self.targets_per_input: int | None = self.metadata.get("targets_per_input")
        """T for graphs exported with ``targets_per_input=T`` (their ``target`` is (N, T)); None otherwise."""
        self.preprocessing = _preprocessing(self.metadata, self.graph)
        self.input_size: tuple[int, int] = tuple(self.preprocessing["size"])  # type: ignore[assignment]
        self.class_names: list[str] | None = self.metadata.get("class_names")
        self.reference_dim: int | None = None
        self.measure: str | None = None
        if self.target_kind == "similarity":
            self.reference_dim = _fixed(inputs[REFERENCE_INPUT].shape, 1) or _fixed(
                self.graph.outputs[-1].shape, 1)
            self.measure = str(self.metadata["target"].get("measure", "cosine"))
        self.max_boxes: int | None = None
        if self.target_kind == "detection":
            self.max_boxes = _detection_boxes(self.metadata, inputs[BOXES_INPUT].shape, self.path.name)
        self.region_size: tuple[int, int] | None = None
        if self.target_kind == "segmentation":
            shape = inputs[REGION_INPUT].shape
            given = (_fixed(shape, 1), _fixed(shape, 2)) if len(shape) == 3 else (None, None)
            self.region_size = (given[0] or self.input_size[0], given[1] or self.input_size[1])

    def _graph_classes(self) -> int | None:
        if self.target_kind == "detection":  # its scores are one per box; its classes are the metadata's names
            return None
        shape = self.graph.outputs[0].shape
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

    def _box_classes(self) -> int | None:
        """K of a detection graph: its metadata's ``target.num_classes`` (recorded by pyattr.export), else the
        number of class names, else None (ids are then only checked to be >= 0)."""
        k = self.metadata.get("target", {}).get("num_classes")
        if k is not None:
            return int(k)
        return len(self.class_names) if self.class_names else None

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
        return preprocess_rgb(rgb, self.preprocessing, self.input_size)

    def run(self, batch: np.ndarray, target: int | str | Sequence[int] | np.ndarray | None = None,
            region: np.ndarray | None = None, reference: np.ndarray | None = None, *,
            boxes: np.ndarray | None = None, box_classes: np.ndarray | None = None,
            ) -> GraphOutputs | DetectionOutputs:
        """Run the graph on a preprocessed float32 batch (N, C, H, W).

        Args:
            batch: from :meth:`preprocess`.
            target: None / -1 (arg-max), a class id or name for every image, or one id per image.
                Similarity graphs: None, 0 or -1 (they explain one score).
            region: segmentation graphs only: (N, H, W) or (H, W) (one for all images), bool or float
                >= 0 at the graph's input size (:attr:`region_size`); a sample whose region is all
                negative (e.g. -1), and ``region=None``, use the pixels the model predicts as the class.
            reference: similarity graphs only, required: the reference embedding(s) (N, D), or (1, D)
                / (D,) for every image; D = :attr:`reference_dim`.
            boxes, box_classes: detection graphs only, required: boxes (N, C, 4) or (C, 4) xyxy in the graph's
                input pixels and class ids (N, C) or (C,) (-1: a padded box), for any C: C < B is padded,
                C > B runs the graph over chunks of B boxes (:attr:`max_boxes`), C = 0 returns empty outputs.

        Returns:
            :class:`GraphOutputs`; ``embedding`` (N, D) for similarity graphs; detection graphs:
            :class:`~pyattr.runtime.detection.DetectionOutputs` (maps (N, C, H, W), matched, iou).

        Raises:
            InputError: a region or a reference the graph does not take, a missing reference, a region of
            another size, a reference of another dimension, NaN or infinite values, an empty region.

        Example:
            >>> out = runtime.run(runtime.preprocess(["a.png"]), target="road", region=mask)  # doctest: +SKIP
            >>> out.scores.shape, out.maps.shape                                            # doctest: +SKIP
            ((1, 7), (1, 64, 64))
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        expected = tuple(self.graph.inputs[0].shape[1:])
        if batch.ndim != 4 or any(isinstance(e, int) and e != s for e, s in zip(expected, batch.shape[1:])):
            raise InputError(f"the graph takes images of shape (N, {', '.join(map(str, expected))}), "
                             f"got {batch.shape}")
        if len(batch) > MAX_BATCH:
            raise InputError(f"at most {MAX_BATCH} images per graph run, got {len(batch)}; run them in batches")
        self._check_kind_arguments(target, region, reference, boxes, box_classes)
        if self.target_kind == "detection":
            return self._run_detection(batch, boxes, box_classes)
        feed = {IMAGE_INPUT: batch, TARGET_INPUT: self._targets(target, len(batch)),
                **self._target_inputs(region, reference, len(batch))}
        outputs = self.graph.run(self.output_names, feed, self.path.name)
        if self.metric_names:
            named = dict(zip(self.metric_names, outputs[len(OUTPUTS):]))
            return self._checked(GraphOutputs(*outputs[:len(OUTPUTS)], metrics=named), len(batch))
        return self._checked(GraphOutputs(*outputs), len(batch))

    def _check_kind_arguments(self, target: Any, region: Any, reference: Any, boxes: Any, box_classes: Any) -> None:
        """A detection graph takes boxes and their classes only; other graphs take no boxes."""
        if self.target_kind == "detection":
            if target is not None or region is not None or reference is not None:
                raise InputError(f"{self.path.name} explains boxes (a detection graph): give boxes=... and "
                                 "box_classes=..., no target, region or reference")
        elif boxes is not None or box_classes is not None:
            raise InputError(f"{self.path.name} explains a {self.target_kind} target and takes no boxes; boxes are for "
                             "graphs exported with target=DetectionTarget(...) (pyattr export --task detection)")

    def _run_detection(self, batch: np.ndarray, boxes: Any, box_classes: Any) -> DetectionOutputs:
        """A detection graph on (N, C, 4) boxes, in chunks of :attr:`max_boxes` (padded with class -1)."""
        n, b = len(batch), int(self.max_boxes or 1)
        if boxes is None or box_classes is None:
            raise InputError(f"{self.path.name} explains boxes: give boxes=(N, C, 4) xyxy in input pixels and "
                             "box_classes=(N, C) class ids")
        xyxy = _numbers(boxes, "boxes")
        if xyxy.ndim == 2:
            xyxy = np.broadcast_to(xyxy[None], (n, *xyxy.shape))
        if xyxy.ndim != 3 or xyxy.shape[0] != n or xyxy.shape[2] != 4:
            raise InputError(f"boxes must be (N, C, 4) or (C, 4) xyxy (4 numbers per box) with N = {n}; got shape "
                             f"{np.shape(boxes)}")
        count = xyxy.shape[1]
        classes = np.asarray(box_classes)
        if classes.dtype.kind not in "iu" and classes.size:
            raise InputError(f"box_classes must be integer class ids (-1: padding), got dtype {classes.dtype}")
        classes = classes.astype(np.int64)
        if classes.ndim == 1:
            classes = np.broadcast_to(classes[None], (n, len(classes)))
        if classes.shape != (n, count):
            raise InputError(f"box_classes must be ({n}, {count}) or ({count},): one class id per box; got shape "
                             f"{np.shape(box_classes)}")
        k = self._box_classes()
        if (classes < -1).any() or (k is not None and (classes >= k).any()):
            raise InputError(f"box_classes holds ids outside {'0..' + str(k - 1) if k else '>= 0'} (-1: padding)")
        parts: list[list[np.ndarray]] = []
        for start in range(0, count, b):
            stop = min(start + b, count)
            chunk_boxes = np.zeros((n, b, 4), np.float32)
            chunk_classes = np.full((n, b), -1, np.int64)
            chunk_boxes[:, :stop - start] = xyxy[:, start:stop]
            chunk_classes[:, :stop - start] = classes[:, start:stop]
            feed = {IMAGE_INPUT: batch, BOXES_INPUT: chunk_boxes, BOX_CLASSES_INPUT: chunk_classes}
            outputs = self.graph.run(self.output_names, feed, self.path.name)
            self._check_detection(outputs, n, b)
            parts.append([o[:, :stop - start] for o in outputs])
        h, w = self.input_size
        if not parts:  # no box: nothing to run
            raw_shape = [s if isinstance(s, int) else 1 for s in self.graph.outputs[2].shape[2:]]
            return DetectionOutputs(np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64),
                                    np.zeros((n, 0, *raw_shape), np.float32), np.zeros((n, 0, h, w), np.float32),
                                    np.zeros((n, 0), bool), np.zeros((n, 0), np.float32))
        scores, _, raw, maps, matched, iou = (np.concatenate(group, axis=1) for group in zip(*parts))
        explained = np.broadcast_to(np.arange(count, dtype=np.int64)[None], (n, count)).copy()
        return DetectionOutputs(scores, explained, raw, maps, matched.astype(bool), iou)

    def _check_detection(self, outputs: list[np.ndarray], n: int, b: int) -> None:
        """A detection graph's outputs must have the documented shapes (N, B, ...)."""
        h, w = self.input_size
        expected = {"scores": ((n, b), "f"), "explained_class": ((n, b), "iu"), "matched": ((n, b), "b"),
                    "iou": ((n, b), "f"), "maps": ((n, b, h, w), "f")}
        problems = [f"{name} {value.dtype} {value.shape}" for name, value in zip(self.output_names, outputs)
                    if name in expected and (value.shape != expected[name][0]
                                             or value.dtype.kind not in expected[name][1])]
        raw = outputs[2]
        if raw.ndim < 2 or raw.shape[:2] != (n, b) or raw.dtype.kind != "f":
            problems.append(f"raw {raw.dtype} {raw.shape}")
        if problems:
            raise InputError(f"{self.path.name} returned outputs that are not a pyattr detection graph's "
                             f"(expected (N={n}, B={b}, ...)): {'; '.join(problems)}")

    def _target_inputs(self, region: Any, reference: Any, n: int) -> dict[str, np.ndarray]:
        """The target's graph inputs for a batch of ``n``, checked (see :meth:`run`)."""
        kind = self.target_kind
        if region is not None and kind != "segmentation":
            raise InputError(f"{self.path.name} explains a {kind} target and takes no region; a region is for graphs "
                             "exported with target=SegmentationTarget()")
        if reference is not None and kind != "similarity":
            raise InputError(f"{self.path.name} explains a {kind} target and takes no reference; a reference "
                             "embedding is for graphs exported with target=SimilarityTarget()")
        if kind == "segmentation":
            return {REGION_INPUT: self._region(region, n)}
        if kind == "similarity":
            if reference is None:
                raise InputError(f"{self.path.name} explains the similarity to a reference embedding: give "
                                 f"reference=... ({self.reference_dim or 'D'} numbers, or one row per image), e.g. "
                                 "runtime.embed([reference_image])")
            return {REFERENCE_INPUT: self._reference(reference, n)}
        return {}

    def _region(self, region: Any, n: int) -> np.ndarray:
        h, w = self.region_size or self.input_size
        if region is None:
            return np.full((n, h, w), -1.0, np.float32)
        r = _numbers(region, "region")
        if r.ndim == 2:
            r = r[None]
        if r.ndim != 3 or r.shape[1:] != (h, w) or r.shape[0] not in (1, n):
            raise InputError(f"region must be (N, {h}, {w}) or ({h}, {w}) (one for all images), at the graph's input "
                             f"size {h}x{w}, with N = {n}; got shape {np.shape(region)}" + (
                                 " (resize the mask to the input size, or give a mask image to explain(), which "
                                 "resizes it)" if r.ndim == 3 and r.shape[1:] != (h, w) else ""))
        r = np.ascontiguousarray(np.broadcast_to(r, (n, h, w)), dtype=np.float32)
        negative = (r < 0).reshape(n, -1)
        mixed = negative.any(1) & ~negative.all(1)
        if mixed.any():
            raise InputError(f"region {int(np.argmax(mixed))} holds negative values: give a 0/1 mask or non-negative "
                             "weights (a region that is all negative, e.g. -1, or region=None uses the pixels the "
                             "model predicts as the class)")
        empty = (r.reshape(n, -1) == 0).all(1)
        if empty.any():
            raise InputError(f"region {int(np.argmax(empty))} is empty (all zeros): its score and its map would be 0; "
                             "give a mask with pixels in it, or -1 / None for the region the model predicts")
        return r

    def _reference(self, reference: Any, n: int) -> np.ndarray:
        if isinstance(reference, (str, os.PathLike)) or _is_pil(reference):
            raise InputError("reference must be an embedding array (N, D) or (D,); for a reference image, give "
                             "runtime.embed([image])")
        r = _numbers(reference, "reference")
        if r.ndim == 1:
            r = r[None]
        d = self.reference_dim
        if r.ndim != 2 or r.shape[0] not in (1, n) or r.shape[1] < 1:
            raise InputError(f"reference must be an embedding (N, D), (1, D) or (D,) with N = {n}"
                             f"{f' and D = {d}' if d else ''}; got shape {np.shape(reference)}")
        if d is not None and r.shape[1] != d:
            raise InputError(f"the reference embedding has dimension {r.shape[1]} but {self.path.name} embeds images "
                             f"in {d} dimensions: compute the reference with the same model (runtime.embed)")
        r = np.ascontiguousarray(np.broadcast_to(r, (n, r.shape[1])), dtype=np.float32)
        if self.measure == "cosine" and (np.abs(r).max(1) == 0).any():
            raise InputError("reference holds an all-zero embedding: its cosine similarity has no direction")
        return r

    def embed(self, images: Sequence[ImageLike] | ImageLike, batch_size: int = 32) -> np.ndarray:
        """The embeddings of images, computed by a similarity graph (its ``embedding`` output): the
        reference for :meth:`explain` / :meth:`run` from a reference image.

        Args:
            images: paths, PIL images or uint8 RGB arrays (one image, or a list of them).
            batch_size: images per graph run.

        Returns:
            (N, D) float32, one row per image.

        Example:
            >>> ref = runtime.embed("reference.png")                         # doctest: +SKIP
            >>> runtime.explain(["query.png"], reference=ref)                # doctest: +SKIP
        """
        if self.target_kind != "similarity":
            raise InputError(f"{self.path.name} explains a {self.target_kind} target and returns no embedding; "
                             "embed() needs a graph exported with target=SimilarityTarget()")
        if self.reference_dim is None:
            raise InputError(f"{self.path.name}: its reference input has no fixed dimension D")
        if isinstance(images, (str, os.PathLike)) or _is_pil(images) or (
                isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (2, 3)):
            images = [images]
        _check_batch_size(batch_size)
        images = list(images)
        rows = [np.zeros((0, self.reference_dim), np.float32)]
        for start in range(0, len(images), batch_size):
            batch = self.preprocess(images[start:start + batch_size])
            # the graph needs a reference to run; the embedding does not depend on it
            out = self.run(batch, reference=np.ones(self.reference_dim, np.float32))
            rows.append(out.embedding)
        return np.concatenate(rows)

    def _checked(self, out: GraphOutputs, n: int) -> GraphOutputs:
        """The graph's outputs must have the documented shapes and types (a foreign or crafted graph may
        return anything): scores (N, K) float, explained_class (N,) ints in [0, K), maps (N, ...) floats."""
        k = out.scores.shape[-1] if out.scores.ndim == 2 else 0
        problems = []
        if out.scores.ndim != 2 or out.scores.shape[0] != n or k < 1 or out.scores.dtype.kind != "f":
            problems.append(f"scores {out.scores.dtype} {out.scores.shape}, expected float (N={n}, K)")
        lead = (n,) if self.targets_per_input is None else (n, self.targets_per_input)
        if out.explained_class.shape != lead or out.explained_class.dtype.kind not in "iu":
            problems.append(f"explained_class {out.explained_class.dtype} {out.explained_class.shape}, expected "
                            f"int {lead}")
        elif k and not np.all((out.explained_class >= 0) & (out.explained_class < k)):
            problems.append(f"explained_class values outside 0..{k - 1}")
        for name, value in (("raw", out.raw), ("maps", out.maps)):
            if value.ndim < 1 or value.shape[0] != n or value.dtype.kind != "f":
                problems.append(f"{name} {value.dtype} {value.shape}, expected float (N={n}, ...)")
        if self.target_kind == "similarity":
            e, d = out.embedding, self.reference_dim
            if e is None or e.ndim != 2 or e.shape[0] != n or e.dtype.kind != "f" or (d and e.shape[1] != d):
                problems.append(f"embedding {getattr(e, 'dtype', None)} {getattr(e, 'shape', None)}, expected float "
                                f"(N={n}, D={d})")
            if k != 1:
                problems.append(f"scores of a similarity graph must be (N, 1), got {out.scores.shape}")
        for name, value in (out.metrics or {}).items():
            if value.ndim not in (1, 2) or value.shape[0] != n or value.dtype.kind != "f":
                problems.append(f"metric {name} {value.dtype} {value.shape}, expected float (N={n},) or (N={n}, P)")
        if problems:
            raise InputError(f"{self.path.name} returned outputs that are not a pyattr graph's: {'; '.join(problems)}")
        return out

    def _targets(self, target, n: int) -> np.ndarray:
        if self.target_kind == "similarity":
            if target is None or (not isinstance(target, (bool, np.bool_)) and isinstance(target, (int, np.integer))
                                  and int(target) in (0, -1)):
                return np.zeros(n, np.int64)
            raise InputError(f"{self.path.name} explains a similarity (one score): it takes no class target "
                             f"(give None, 0 or -1), got {target!r}")
        if self.targets_per_input is not None:
            return self._target_columns(target, n)
        if target is None:
            return np.full(n, -1, np.int64)
        if isinstance(target, (int, str, float, np.integer, np.floating, np.bool_)):
            return np.full(n, self.class_index(target), np.int64)
        values = np.asarray(target, dtype=object).ravel().tolist()
        ids = np.asarray([self.class_index(t) for t in values], np.int64)
        if len(ids) != n:
            raise InputError(f"give one target per image: {len(ids)} targets for {n} images")
        return ids

    def _target_columns(self, target, n: int) -> np.ndarray:
        """The (n, T) ids of a graph exported with ``targets_per_input=T``: from T ids (or names) for every image,
        or an (n, T) array of ids; None: -1 (each image's arg-max) in every column."""
        t = self.targets_per_input
        if target is None:
            return np.full((n, t), -1, np.int64)
        values = np.asarray(target, dtype=object)
        if values.ndim == 1 and len(values) == t:
            values = np.broadcast_to(values, (n, t))
        if values.shape != (n, t):
            raise InputError(f"{self.path.name} explains {t} targets per image: give {t} class ids (or names) for every "
                             f"image, or an ({n}, {t}) array of them; got shape {values.shape}")
        return np.asarray([[self.class_index(v) for v in row] for row in values.tolist()], np.int64).reshape(n, t)

    def explain(self, images: Sequence[ImageLike], target: int | str | Sequence[int] | None = None, *,
                region: Any = None, reference: Any = None, boxes: Any = None, box_classes: Any = None,
                alpha: float = 0.5, cmap: str = "jet", source: str = "maps", sign: str = "all",
                outlier_perc: float = 0.0, batch_size: int = 32, names: Sequence[str] | None = None,
                ) -> list[Explanation] | list[DetectionExplanation]:
        """Explain images: preprocess, run the graph in batches, and overlay the maps on each image
        at its own size.

        Args:
            images: paths, PIL images or uint8 RGB arrays, of any sizes.
            target: None (each image's top class), a class id or name, or one id per image.
            region: segmentation graphs: None (the region the model predicts as the class); one mask
                for every image: a mask image file or PIL image (non-zero pixels are the region, resized
                nearest to the graph's input size) or an (H, W) array at the input size; an (N, H, W)
                array; or a list of one mask per image (each a file, PIL image, (H, W) array, or None
                for the predicted region). Arrays may be bool or float weights >= 0.
            reference: similarity graphs, required: the reference embedding (D,), (1, D) or one row per
                image (N, D), e.g. ``runtime.embed([reference_image])``.
            boxes, box_classes: detection graphs, required: the boxes to explain, xyxy in each image's own
                pixels (scaled here to the graph's input size): a (B, 4) array for every image, (N, B, 4), or a
                list of one (B_i, 4) per image (any B_i, 0 included; more than the graph's B run in chunks);
                their classes: ids or class names, one per box (or one for all), shaped like the boxes. Or
                ``boxes=`` one dict per image with ``boxes``, ``labels`` (and ``scores``), e.g.
                :meth:`Detector.detect`'s result, and ``box_classes=None``. Returns one
                :class:`~pyattr.runtime.detection.DetectionExplanation` per image (maps (B_i, H, W)).
            alpha, cmap: the overlay (see :func:`pyattr.render.heatmap_overlay`).
            source: ``"maps"`` (the graph's normalized maps, resized and clipped -- what
                ``pyattr explain`` draws) or ``"raw"`` (the raw map, resized and normalized here
                with ``sign`` and ``outlier_perc``; e.g. ``cmap="bwr", sign="centered"`` for
                signed maps, drawn with :func:`pyattr.render.heatmap_overlay_signed`: opacity ~ |value|).
            batch_size: images per graph run.
            names: one name per image (default: file stems, else ``image_<i>``).

        Example:
            >>> seg = AttributionRuntime("gradcam_seg.onnx")                       # doctest: +SKIP
            >>> e = seg.explain(["street.png"], target="road", region="road_mask.png")[0]  # doctest: +SKIP
            >>> e.score, e.region.shape, e.overlay.shape                             # doctest: +SKIP
            (412.5, (64, 64), (480, 640, 3))
            >>> sim = AttributionRuntime("gradcam_embed.onnx")                     # doctest: +SKIP
            >>> sim.explain(["query.png"], reference=sim.embed("reference.png"))[0].similarity  # doctest: +SKIP
            0.83
        """
        if source not in ("maps", "raw"):
            raise InputError(f"source must be 'maps' or 'raw', got {source!r}")
        _check_batch_size(batch_size)
        images = list(images)
        names = list(names) if names is not None else [_name_of(image, i) for i, image in enumerate(images)]
        if len(names) != len(images):
            raise InputError(f"give one name per image: {len(names)} names for {len(images)} images")
        self._check_kind_arguments(target, region, reference, boxes, box_classes)
        if self.target_kind == "detection":
            return self._explain_detection(images, names, boxes, box_classes, alpha=alpha, cmap=cmap, source=source,
                                           sign=sign, outlier_perc=outlier_perc, batch_size=batch_size)
        single = target is None or isinstance(target, (int, str, float, np.integer, np.floating, np.bool_))
        if self.targets_per_input is not None:  # T ids (or an (N, T) array): each image's T explanations
            single = False
        targets = None if single else list(self._targets(target, len(images)))
        if single and target is not None and self.target_kind != "similarity":
            target = self.class_index(target)
        # every target input checked for the whole list before the first graph run
        regions = self._explain_regions(region, len(images)) if region is not None else None
        extra = self._target_inputs(regions, reference, len(images)) if images else {}
        references = extra.get(REFERENCE_INPUT)
        results: list[Explanation] = []
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            chunk = [load_image(image) for image in images[start:stop]]
            batch_target = target if targets is None else targets[start:stop]
            out = self.run(np.stack([self._preprocess_one(rgb) for rgb in chunk]), batch_target,
                           region=None if regions is None else regions[start:stop],
                           reference=None if references is None else references[start:stop])
            chunk_names, chunk_regions = names[start:stop], None if regions is None else regions[start:stop]
            if self.targets_per_input is not None:  # (N, T, ...) -> N * T explanations, image-major
                out, chunk, chunk_names, chunk_regions = self._per_target(out, chunk, chunk_names, chunk_regions)
            overlays = self._overlays(out, chunk, alpha, cmap, source, sign, outlier_perc)
            results.extend(self._explanations(out, chunk_names, overlays, chunk_regions))
        return results

    def _per_target(self, out: GraphOutputs, images: list, names: list[str], regions: np.ndarray | None):
        """A T-target graph's outputs as N * T single-target ones (image-major), the images (not copied), their
        names (``<name>_t<j>`` for column j) and regions repeated to match."""
        t = self.targets_per_input
        flat = GraphOutputs(np.repeat(out.scores, t, 0), out.explained_class.reshape(-1),
                            out.raw.reshape(-1, *out.raw.shape[2:]), out.maps.reshape(-1, *out.maps.shape[2:]),
                            None if out.embedding is None else np.repeat(out.embedding, t, 0))
        return (flat, [rgb for rgb in images for _ in range(t)], [f"{name}_t{j}" for name in names for j in range(t)],
                None if regions is None else np.repeat(regions, t, 0))

    def _explain_detection(self, images: list, names: list[str], boxes: Any, box_classes: Any, *, alpha: float,
                           cmap: str, source: str, sign: str, outlier_perc: float, batch_size: int,
                           ) -> list[DetectionExplanation]:
        """explain() for detection graphs: every box checked first, then the images in batches, each batch's boxes
        padded to its largest count (chunks of :attr:`max_boxes` in :meth:`run`)."""
        from .detection import per_image_boxes

        given = per_image_boxes(boxes, box_classes, len(images), self.class_index,
                                self._box_classes())  # all checked before any run
        h, w = self.input_size
        results: list[DetectionExplanation] = []
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            chunk = [load_image(image) for image in images[start:stop]]
            sizes = [rgb.shape[:2] for rgb in chunk]
            mine = given[start:stop]
            count = max((len(b) for b, _, _ in mine), default=0)
            xyxy = np.zeros((len(chunk), count, 4), np.float32)
            classes = np.full((len(chunk), count), -1, np.int64)
            for j, ((b, k, _), (h0, w0)) in enumerate(zip(mine, sizes)):
                xyxy[j, :len(b)] = b * np.asarray([w / w0, h / h0, w / w0, h / h0], np.float32)
                classes[j, :len(b)] = k
            out = self.run(np.stack([self._preprocess_one(rgb) for rgb in chunk]), boxes=xyxy, box_classes=classes)
            for j, (rgb, (b, k, detector_scores)) in enumerate(zip(chunk, mine)):
                d = len(b)
                overlays, combined = self._box_overlays(out.maps[j, :d], out.raw[j, :d], rgb, b, alpha, cmap, source,
                                                        sign, outlier_perc)
                results.append(DetectionExplanation(
                    name=names[start + j], boxes=b, box_classes=k, class_names=[self.class_name(int(c)) for c in k],
                    scores=out.scores[j, :d], matched=out.matched[j, :d], iou=out.iou[j, :d], raw=out.raw[j, :d],
                    maps=out.maps[j, :d], overlays=overlays, overlay=combined, input_boxes=xyxy[j, :d],
                    detector_scores=detector_scores))
        return results

    def _box_overlays(self, maps: np.ndarray, raw: np.ndarray, rgb: np.ndarray, boxes: np.ndarray, alpha: float,
                      cmap: str, source: str, sign: str, outlier_perc: float) -> tuple[list[np.ndarray], np.ndarray]:
        """One overlay per box (its map over the image, drawn as explain() draws class maps), and the image with
        the per-pixel maximum of the box maps and every box outlined (:func:`pyattr.render.draw_boxes`)."""
        d = len(boxes)
        if d == 0:
            return [], rgb.copy()
        per_box = GraphOutputs(np.zeros((d, 1), np.float32), np.zeros(d, np.int64), raw, maps)
        overlays = self._overlays(per_box, [rgb] * d, alpha, cmap, source, sign, outlier_perc)
        most = GraphOutputs(np.zeros((1, 1), np.float32), np.zeros(1, np.int64), raw.max(0)[None], maps.max(0)[None])
        combined = self._overlays(most, [rgb], alpha, cmap, source, sign, outlier_perc)[0]
        thickness = max(1, round(min(rgb.shape[:2]) / 128))
        return overlays, render.draw_boxes(combined, boxes, thickness=thickness, num_threads=self.num_threads)

    def _explanations(self, out: GraphOutputs, names: list[str], overlays: list, regions: np.ndarray | None,
                      ) -> list[Explanation]:
        kind = self.target_kind
        probabilities = self.probabilities(out.scores) if kind == "class" else None
        results = []
        for j, name in enumerate(names):
            k = int(out.explained_class[j])
            given = regions is not None and bool((regions[j] >= 0).any())
            similarity = float(out.scores[j, 0]) if kind == "similarity" else None
            results.append(Explanation(
                name=name, explained_class=k,
                class_name="similarity" if kind == "similarity" else self.class_name(k),
                score=float(out.scores[j, k]),
                probability=None if probabilities is None else float(probabilities[j, k]),
                predicted_class=int(out.scores[j].argmax()),
                scores=out.scores[j], raw=out.raw[j], map=out.maps[j], overlay=overlays[j],
                target_kind=kind, region=regions[j] if given else None, similarity=similarity,
                embedding=None if out.embedding is None else out.embedding[j],
                metrics=None if out.metrics is None else {name: v[j] for name, v in out.metrics.items()},
            ))
        return results

    def _explain_regions(self, region: Any, n: int) -> np.ndarray:
        """explain()'s ``region`` as (n, H, W) float32 (-1 for the predicted region)."""
        size = self.region_size or self.input_size
        if self.target_kind != "segmentation":
            self._target_inputs(region, None, n)  # raises: the graph takes no region
        if isinstance(region, (str, os.PathLike)) or _is_pil(region):
            return np.broadcast_to(load_mask(region, size), (n, *size))
        if isinstance(region, (list, tuple)):
            if len(region) != n:
                raise InputError(f"give one region per image: {len(region)} regions for {n} images")
            return np.stack([np.full(size, -1.0, np.float32) if r is None
                             else load_mask(r, size) if isinstance(r, (str, os.PathLike)) or _is_pil(r)
                             else self._region(r, 1)[0] for r in region]) if n else np.zeros((0, *size), np.float32)
        return self._region(region, n)

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
                f"{f', layer={layer!r}' if layer else ''}, input_size={self.input_size}, backend={self.backend!r}, "
                f"providers={self.providers})")


# --- helpers ------------------------------------------------------------------------------------


def _metadata_of(graph: GraphSession, path: Path) -> dict[str, Any]:
    text = graph.metadata_props.get(METADATA_KEY)
    if text is None and DETECTOR_METADATA_KEY in graph.metadata_props:
        raise InputError(f"{path.name} is a detector graph (it finds boxes; it explains nothing): give it with "
                         "--detector (Detector(path) in Python) beside the detection explanation graph")
    if text is None:
        raise InputError(f"{path.name} holds no pyattr metadata (was it written by pyattr.export?)")
    return parse_metadata(text, path.name)


def _preprocessing(metadata: dict[str, Any], graph: GraphSession) -> dict[str, Any]:
    """The metadata's preprocessing with defaults filled in and checked."""
    import warnings

    given = dict(metadata.get("preprocessing") or {})
    shape = graph.inputs[0].shape  # ('batch', C, H, W)
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
    pil_filter(p["resize"])
    return p


def _interface(metadata: dict[str, Any], name: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The target kind and the graph's input and output names, from the metadata. Graphs exported before
    targets existed have no ``target``: a class target with inputs ``images, target``. Method-with-metrics graphs
    (metadata ``metrics``) return their metric outputs (``metrics.outputs``) after the method's."""
    from .metadata import TARGET_INPUTS

    target = metadata.get("target")
    kind = target.get("kind", "class") if isinstance(target, dict) else "class"
    metrics = metadata.get("metrics")
    if metrics is not None:  # a method-with-metrics graph: its metric outputs follow the method's
        validate_metadata(metadata)  # names checked before they are used
        if kind != "class":
            raise InputError(f"{name}: a method-with-metrics graph scores class targets; this one says {kind!r}")
        return kind, (IMAGE_INPUT, TARGET_INPUT), (*OUTPUTS, *metrics["outputs"])
    if kind == "detection":  # no target input: every box is explained
        return kind, (IMAGE_INPUT, BOXES_INPUT, BOX_CLASSES_INPUT), (*OUTPUTS, *TARGET_OUTPUTS[kind])
    extra = TARGET_INPUTS.get(kind)
    if extra is None:
        # a user's own kind: runs here when it takes no run-time input and returns the usual outputs
        declared = metadata.get("inputs") or [IMAGE_INPUT, TARGET_INPUT]
        if list(declared) != [IMAGE_INPUT, TARGET_INPUT]:
            raise InputError(f"{name} explains a {kind!r} target with inputs {declared}; the runtime knows the inputs "
                             f"of {', '.join(TARGET_INPUTS)} targets only")
        extra = ()
    return (kind, (IMAGE_INPUT, TARGET_INPUT, *extra), (*OUTPUTS, *TARGET_OUTPUTS.get(kind, ())))


def _detection_boxes(metadata: dict[str, Any], shape: Sequence[Any], name: str) -> int:
    """B, the boxes per run of a detection graph: its ``boxes`` input's fixed dimension, which the metadata's
    ``target.boxes`` (where given) must equal."""
    fixed = _fixed(shape, 1)
    recorded = metadata["target"].get("boxes")
    if len(shape) != 3 or _fixed(shape, 2) not in (None, 4) or (fixed is None and recorded is None):
        raise InputError(f"{name}: its boxes input has shape {list(shape)}; a detection graph takes boxes (N, B, 4) "
                         "with B fixed at export")
    if fixed is not None and recorded is not None and fixed != recorded:
        raise InputError(f"{name}: its boxes input takes {fixed} boxes but its metadata says target.boxes = {recorded}")
    return int(fixed or recorded)


def _fixed(shape: Sequence[Any], i: int) -> int | None:
    """``shape[i]`` when it is a fixed positive int (onnxruntime gives a name for dynamic dimensions)."""
    return shape[i] if len(shape) > i and isinstance(shape[i], int) and shape[i] > 0 else None


def _numbers(value: Any, what: str) -> np.ndarray:
    """``value`` as a finite float32 array; bools become 0/1."""
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"dtype {array.dtype}")
        array = array.astype(np.float32)
    except (TypeError, ValueError) as err:
        raise InputError(f"{what} must be an array of numbers (or bools); got {type(value).__name__} ({err})") from None
    if not np.isfinite(array).all():
        raise InputError(f"{what} holds NaN or infinite values")
    return array


def _is_pil(value: Any) -> bool:
    import sys

    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(value, pil.Image)


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or not 1 <= batch_size <= MAX_BATCH:
        raise InputError(f"batch_size must be an int from 1 to {MAX_BATCH}, got {batch_size!r}")


def _name_of(image: ImageLike, i: int) -> str:
    return Path(image).stem if isinstance(image, (str, os.PathLike)) else f"image_{i}"
