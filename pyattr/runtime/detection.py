"""Detection graphs in the torch-free runtime: boxes in, one map per box out; and detector graphs that find
the boxes first.

An explanation graph exported with :class:`pyattr.targets.DetectionTarget` (``pyattr export det.onnx --task
detection --max-boxes B``) takes ``images`` (N, 3, H, W), ``boxes`` (N, B, 4) xyxy in its input pixels and
``box_classes`` (N, B) int64 (-1 pads), with B fixed at export. :class:`~pyattr.runtime.AttributionRuntime`
runs it for any number of boxes:

* fewer than B boxes: padded with class -1 (a padded box has a zero map and is dropped from the results);
* more than B boxes: the graph runs over chunks of B boxes and the chunks are concatenated (each box's
  map depends on that box only, so the result is the one a graph with more box inputs would give);
* no box: an empty result (``maps`` (0, H, W)) without running the graph.

:class:`Detector` runs a detector ``.onnx`` graph (numpy + onnxruntime) and returns its boxes per image in the
image's pixels, the input of :meth:`AttributionRuntime.explain`. Two output layouts, told by the output names:

* **post-NMS**: ``boxes`` (M, 4) or (N, M, 4) xyxy, ``labels`` (M,) / (N, M) int, ``scores`` (M,) / (N, M)
  (a torchvision detector exported with its postprocessing; a graph without batch dimension is run one
  image at a time); the runtime keeps the boxes scored above the threshold, best first;
* **dense**: ``boxes`` (N, M, 4) xyxy and ``scores`` (N, M, K) per class (every candidate, before NMS: what
  ``pyattr export --task detection --detector-out detector.onnx`` writes for the built-in detector); the
  runtime keeps the (candidate, class) pairs scored above the threshold, clips the boxes to the image and
  applies per-class non-maximum suppression, as :func:`pyattr.zoo.detect` does.

Box coordinates: the detector's boxes are in its input pixels and are scaled to each image's own pixels; the
boxes given to :meth:`AttributionRuntime.explain` are in the image's pixels and are scaled to the explanation
graph's input pixels (both are the identity for images at the graphs' size).

Example:
    >>> from pyattr.runtime import AttributionRuntime, Detector
    >>> runtime = AttributionRuntime("det.onnx")                                  # doctest: +SKIP
    >>> found = Detector("detector.onnx").detect(["a.png"], score_threshold=0.3)  # doctest: +SKIP
    >>> e = runtime.explain(["a.png"], boxes=found)[0]                            # doctest: +SKIP
    >>> e.maps.shape, e.class_names, e.matched                                    # doctest: +SKIP
    ((2, 64, 64), ['circle', 'star'], array([ True,  True]))
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pyattr.errors import InputError

from .images import ImageLike, load_image, preprocess_rgb

__all__ = ["DETECTOR_METADATA_KEY", "DetectionExplanation", "DetectionOutputs", "Detector", "box_iou", "nms"]

DETECTION_INPUTS = ("images", "boxes", "box_classes")
DETECTION_OUTPUTS = ("scores", "explained_class", "raw", "maps", "matched", "iou")
DETECTOR_METADATA_KEY = "pyattr_detector"
"""The ONNX metadata entry of a detector graph written by pyattr (preprocessing, class names, layout)."""

MAX_BOXES_PER_IMAGE = 10_000  # boxes explained per image (each one is a map of H x W floats)
MAX_CANDIDATES = 10_000  # (candidate, class) pairs above the threshold kept for NMS, per image (the best)


class DetectionOutputs(NamedTuple):
    """A detection graph's outputs for N images and C boxes each (any C: chunks of the graph's B)."""

    scores: np.ndarray  # (N, C) float32: each box's objective (its matched candidate's class score; 0 unmatched)
    explained_class: np.ndarray  # (N, C) int64: the box indices 0..C-1
    raw: np.ndarray  # (N, C, ...) the method's raw maps
    maps: np.ndarray  # (N, C, H, W) float32 in [0, 1]
    matched: np.ndarray  # (N, C) bool: the box found a candidate (IoU above the threshold, score > 0)
    iou: np.ndarray  # (N, C) float32: the matched candidate's IoU (0 unmatched)


@dataclass
class DetectionExplanation:
    """The explanation of the boxes of one image (B boxes, B >= 0).

    Attributes:
        name: the image's name.
        boxes: (B, 4) float32 xyxy in the image's own pixels.
        box_classes: (B,) int64 class ids.
        class_names: B names (``"class <k>"`` without names in the metadata).
        scores: (B,) float32: each box's objective, the score its matched candidate gives its class (0 when
            unmatched).
        matched: (B,) bool: the box matched a candidate of the detector (IoU above the graph's threshold).
        iou: (B,) float32: the IoU of the match (0 when unmatched).
        raw: (B, ...) the method's raw maps.
        maps: (B, H, W) float32 in [0, 1] at the graph's input size.
        overlays: B (H0, W0, 3) uint8 pictures: each box's map over the image.
        overlay: (H0, W0, 3) uint8: the per-pixel maximum of the box maps over the image, every box drawn.
        input_boxes: (B, 4) float32: the boxes in the graph's input pixels (what the graph was given).
        detector_scores: (B,) the detector's scores of the boxes (None for boxes given without scores).
    """

    name: str
    boxes: np.ndarray
    box_classes: np.ndarray
    class_names: list[str]
    scores: np.ndarray
    matched: np.ndarray
    iou: np.ndarray
    raw: np.ndarray
    maps: np.ndarray
    overlays: list[np.ndarray]
    overlay: np.ndarray
    input_boxes: np.ndarray
    detector_scores: np.ndarray | None = None
    target_kind: str = "detection"

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict: image, target_kind and one entry per box (``box`` in the image's pixels,
        ``class`` (the name, as a ``--boxes`` file takes it), ``class_id``, ``score``, ``matched``, ``iou``
        and the detector's ``detector_score`` when known)."""
        boxes = []
        for b in range(len(self.boxes)):
            k, name = int(self.box_classes[b]), self.class_names[b]
            entry = {"box": [round(float(v), 3) for v in self.boxes[b]], "class": k if name == f"class {k}" else name,
                     "class_id": int(self.box_classes[b]), "score": float(self.scores[b]),
                     "matched": bool(self.matched[b]), "iou": float(self.iou[b])}
            if self.detector_scores is not None:
                entry["detector_score"] = float(self.detector_scores[b])
            boxes.append(entry)
        return {"image": self.name, "target_kind": self.target_kind, "boxes": boxes}


# --- boxes given by the caller ----------------------------------------------------------------------


def box_array(value: Any, what: str) -> np.ndarray:
    """``value`` as (B, 4) float32 xyxy boxes (one box (4,) is (1, 4); nothing is (0, 4)); an
    :class:`InputError` for anything else: not numbers, not 4 per box, NaN / inf, x1 < x0 or y1 < y0."""
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "iuf" and array.size:
            raise TypeError(f"dtype {array.dtype}")
        array = array.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{what} must be xyxy boxes: 4 numbers each [x0, y0, x1, y1]; got {_shown(value)} "
                         f"({err})") from None
    if array.size == 0:
        return np.zeros((0, 4), np.float32)
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4:
        raise InputError(f"{what} must be boxes of 4 numbers each [x0, y0, x1, y1] (an array (B, 4)); got shape "
                         f"{array.shape}")
    if len(array) > MAX_BOXES_PER_IMAGE:
        raise InputError(f"{what}: {len(array)} boxes for one image, over the limit of {MAX_BOXES_PER_IMAGE}")
    if not np.isfinite(array).all():
        raise InputError(f"{what} holds NaN or infinite coordinates: give finite pixel coordinates")
    bad = (array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1])
    if bad.any():
        b = int(np.argmax(bad))
        raise InputError(f"{what}: box {b} {array[b].tolist()} has x1 < x0 or y1 < y0; boxes are [x0, y0, x1, y1] "
                         "(corners, not x, y, width, height)")
    return array.astype(np.float32)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def class_ids(value: Any, count: int, what: str, class_index, num_classes: int | None = None) -> np.ndarray:
    """(count,) int64 class ids from one id or name for every box, or one per box; ids must be in
    0..num_classes-1 (>= 0 when the number of classes is unknown); ``class_index`` resolves names."""
    if isinstance(value, (int, str, np.integer, np.str_)) and not isinstance(value, (bool, np.bool_)):
        values = [value] * count
    elif value is None:
        raise InputError(f"{what}: give the boxes' classes (box_classes=..., ids or class names)")
    else:
        values = np.asarray(value, dtype=object).ravel().tolist() if not isinstance(value, (list, tuple)) \
            else list(value)
        if len(values) != count:
            raise InputError(f"{what}: {len(values)} classes for {count} boxes; give one class per box")
    ids = []
    for v in values:
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            raise InputError(f"{what}: class {v!r} is a float; give an int class id or a class name")
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and int(v) < 0:
            raise InputError(f"{what}: class {int(v)}: give a class id >= 0 or a class name (-1 marks padding, added "
                             "by the runtime itself)")
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and num_classes is not None \
                and not 0 <= int(v) < num_classes:
            raise InputError(f"{what}: class {int(v)} is out of range: the graph's metadata names {num_classes} classes "
                             f"(ids 0..{num_classes - 1})")
        try:
            k = class_index(v)
        except InputError as err:
            raise InputError(f"{what}: {err}") from None
        if k < 0:
            raise InputError(f"{what}: class {v!r}: give a class id >= 0 or a class name (-1 marks padding, added "
                             "by the runtime itself)")
        ids.append(k)
    return np.asarray(ids, np.int64).reshape(count)


def per_image_boxes(boxes: Any, box_classes: Any, n: int, class_index, num_classes: int | None = None,
                    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """``explain()``'s boxes as one (boxes (B_i, 4), classes (B_i,), scores (B_i,) or None) per image.

    ``boxes``: (B, 4) (the same boxes for every image), (N, B, 4), a list of N per-image (B_i, 4), or a list
    of N per-image dicts with ``boxes`` and ``labels`` (and ``scores``), as :meth:`Detector.detect` and
    torchvision's detectors return them (then ``box_classes`` is None)."""
    if boxes is None:
        raise InputError("a detection graph explains boxes: give boxes=... ((B, 4) xyxy in the image's pixels, "
                         "or one (B_i, 4) per image) and box_classes=..., or boxes=Detector(...).detect(images)")
    if isinstance(boxes, (list, tuple)) and boxes and all(isinstance(d, dict) for d in boxes):
        if box_classes is not None:
            raise InputError("boxes given as per-image dicts carry their classes ('labels'); leave box_classes None")
        if len(boxes) != n:
            raise InputError(f"give one dict of boxes per image: {len(boxes)} for {n} images")
        out = []
        for i, d in enumerate(boxes):
            if "boxes" not in d or "labels" not in d:
                raise InputError(f"boxes[{i}] must be a dict with 'boxes' (B, 4) and 'labels' (B,); got keys "
                                 f"{sorted(map(str, d))}")
            b = box_array(d["boxes"], f"image {i}'s boxes")
            scores = d.get("scores")
            scores = None if scores is None else np.asarray(scores, np.float32).reshape(-1)
            if scores is not None and len(scores) != len(b):
                raise InputError(f"image {i}: {len(scores)} scores for {len(b)} boxes")
            out.append((b, class_ids(np.asarray(d["labels"]).reshape(-1).tolist(), len(b), f"image {i}'s labels",
                                     class_index, num_classes), scores))
        return out
    per_image = isinstance(boxes, np.ndarray) and boxes.ndim == 3
    if isinstance(boxes, (list, tuple)):
        try:
            shaped = np.asarray(boxes, dtype=np.float64)
            per_image = shaped.ndim == 3
        except (TypeError, ValueError):  # ragged: one list per image
            per_image = True
    if not per_image:
        b = box_array(boxes, "boxes")
        k = class_ids(box_classes, len(b), "box_classes", class_index, num_classes)
        return [(b, k, None)] * n
    if len(boxes) != n:
        raise InputError(f"give one list of boxes per image: {len(boxes)} lists for {n} images (a 2-D (B, 4) array "
                         "gives the same boxes to every image)")
    if isinstance(box_classes, (int, str, np.integer)) and not isinstance(box_classes, bool):
        box_classes = [box_classes] * n
    if box_classes is None or len(box_classes) != n:
        raise InputError(f"give one list of classes per image (box_classes), like the boxes: {n} images")
    out = []
    for i in range(n):
        b = box_array(boxes[i], f"image {i}'s boxes")
        out.append((b, class_ids(box_classes[i], len(b), f"image {i}'s box_classes", class_index, num_classes),
                    None))
    return out


# --- NMS (numpy), as torchvision's ------------------------------------------------------------------


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box (4,) with (M, 4) boxes, torchvision's formula (area = w * h; 0 for an empty union)."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[:, 0] * wh[:, 1]
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Per-class greedy non-maximum suppression (torchvision's ``batched_nms``): the indices kept, by
    decreasing score; within a class a box is dropped when its IoU with a kept, higher-scored box is above
    ``iou_threshold``.

    Example:
        >>> b = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10]], np.float32)
        >>> nms(b, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 1]), 0.5).tolist()
        [0, 2]
    """
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(order), bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        same = labels == labels[i]
        suppressed |= same & (box_iou(boxes[i], boxes) > iou_threshold)
    return np.asarray(keep, np.int64)


# --- detector graphs ----------------------------------------------------------------------------------


class Detector:
    """A detector ``.onnx`` graph in onnxruntime: images -> boxes, labels and scores per image, torch-free.

    Args:
        path: the detector graph: one image input (N, 3, H, W) float and outputs named ``boxes``, ``scores``
            and (post-NMS layout) ``labels`` (see the module docstring for the two layouts).
        preprocessing: how images become its input (the runtime's filled-in dict: ``scale``, ``mean``,
            ``std``, ``size`` ...), used when the graph carries no pyattr detector metadata of its own; a
            graph written by ``pyattr export --detector-out`` carries it.
        class_names: names of its classes (default: from its metadata).
        providers, num_threads, backend: as :class:`~pyattr.runtime.AttributionRuntime`'s.

    Example:
        >>> det = Detector("detector.onnx")                                       # doctest: +SKIP
        >>> det.layout, det.input_size                                            # doctest: +SKIP
        ('dense', (64, 64))
        >>> det.detect(["a.png"], score_threshold=0.3, max_boxes=5)[0]["labels"]  # doctest: +SKIP
        array([3, 0])
    """

    def __init__(self, path: str | os.PathLike, preprocessing: dict[str, Any] | None = None,
                 class_names: Sequence[str] | None = None, providers: Sequence[str] | None = None,
                 num_threads: int = 0, backend: str = "onnxruntime"):
        from . import check_num_threads
        from .backends import check_backend, open_graph

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"no such detector file: {path}")
        if self.path.suffix.lower() != ".onnx":
            raise InputError(f"{self.path.name}: a detector must be an ONNX graph (.onnx)")
        self.num_threads = check_num_threads(num_threads)
        self.backend = check_backend(backend)
        self.graph = open_graph(self.path, self.backend, providers, self.num_threads)
        self.session = self.graph.native
        if "pyattr" in self.graph.metadata_props:
            raise InputError(f"{self.path.name} is an explanation graph (pyattr export), not a detector: give the "
                             "detector graph, e.g. the one `pyattr export --task detection --detector-out "
                             "DETECTOR.onnx` writes")
        meta = self._metadata()
        inputs, outputs = self.graph.inputs, {o.name: o for o in self.graph.outputs}
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise InputError(f"{self.path.name} is not a detector graph the runtime runs: it needs one image input "
                             f"(N, 3, H, W), got inputs {[(i.name, i.shape) for i in inputs]}")
        if not {"boxes", "scores"} <= set(outputs):
            raise InputError(f"{self.path.name}: a detector graph needs outputs named 'boxes' and 'scores' (and "
                             f"'labels' after NMS); it has {sorted(outputs)}")
        self.input_name = inputs[0].name
        self.layout = "post-nms" if "labels" in outputs else "dense"
        self.batched = self.layout == "dense" or len(outputs["boxes"].shape) == 3
        given = meta.get("preprocessing") or preprocessing
        if given is None:
            raise InputError(f"{self.path.name} holds no preprocessing: give preprocessing=... (the explanation "
                             "graph's, runtime.preprocessing)")
        self.preprocessing = _filled(given)
        shape = inputs[0].shape
        fixed = [s if isinstance(s, int) and s > 0 else None for s in shape[2:]]
        size = tuple(self.preprocessing["size"])
        self.input_size: tuple[int, int] = (fixed[0] or size[0], fixed[1] or size[1])
        if min(self.input_size) < 1:
            raise InputError(f"{self.path.name}: its input {shape} has no fixed (H, W) and no preprocessing size")
        names = meta.get("class_names") if class_names is None else class_names
        self.class_names = list(names) if names is not None else None
        self.iou_threshold = float(meta.get("nms_iou_threshold", 0.5))

    def _metadata(self) -> dict[str, Any]:
        text = self.graph.metadata_props.get(DETECTOR_METADATA_KEY)
        if text is None:
            return {}
        from .metadata import _validate_preprocessing, parse_metadata

        meta = parse_metadata(text, self.path.name)
        if meta.get("preprocessing") is not None:
            _validate_preprocessing(meta["preprocessing"], None, None)
        names = meta.get("class_names")
        if names is not None and not (isinstance(names, list) and all(isinstance(v, str) for v in names)):
            raise InputError(f"{self.path.name}: its detector metadata's class_names must be a list of strings")
        return meta

    def detect(self, images: Sequence[ImageLike], score_threshold: float = 0.3, max_boxes: int | None = 100,
               batch_size: int = 16) -> list[dict[str, np.ndarray]]:
        """Boxes per image, in the image's own pixels, best first.

        Args:
            images: paths, PIL images or uint8 arrays, any size (resized to the detector's input size).
            score_threshold: keep detections scored above this.
            max_boxes: at most this many per image (the best); None: all.
            batch_size: images per detector run (dense and batched post-NMS graphs).

        Returns:
            One dict per image: ``boxes`` (D, 4) float32 xyxy, ``labels`` (D,) int64, ``scores`` (D,) float32.
        """
        if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)) \
                or not 0 <= score_threshold <= 1:
            raise InputError(f"score_threshold must be a number in [0, 1], got {score_threshold!r}")
        if max_boxes is not None and (isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or max_boxes < 1):
            raise InputError(f"max_boxes must be a positive int or None, got {max_boxes!r}")
        step = batch_size if self.batched else 1
        results = []
        images = list(images)
        for start in range(0, len(images), step):
            rgbs = [load_image(im) for im in images[start:start + step]]
            x = np.stack([preprocess_rgb(rgb, self.preprocessing, self.input_size) for rgb in rgbs])
            outputs = self._run(x)
            for j, rgb in enumerate(rgbs):
                found = self._decode(outputs, j, len(rgbs), float(score_threshold), max_boxes)
                h0, w0 = rgb.shape[:2]
                h, w = self.input_size
                found["boxes"] = (found["boxes"] * np.asarray([w0 / w, h0 / h, w0 / w, h0 / h], np.float32)
                                  ).astype(np.float32)
                results.append(found)
        return results

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        names = ["boxes", "scores"] + (["labels"] if self.layout == "post-nms" else [])
        return dict(zip(names, self.graph.run(names, {self.input_name: x}, f"the detector {self.path.name}")))

    def _decode(self, out: dict[str, np.ndarray], j: int, n: int, threshold: float, max_boxes: int | None,
                ) -> dict[str, np.ndarray]:
        boxes, scores = out["boxes"], out["scores"]
        if self.batched:
            boxes, scores = boxes[j], scores[j]
        labels = None
        if self.layout == "post-nms":
            labels = out["labels"][j] if self.batched else out["labels"]
            ok = (boxes.ndim == 2 and boxes.shape[-1] == 4 and scores.shape == boxes.shape[:1]
                  and labels.shape == boxes.shape[:1] and labels.dtype.kind in "iu")
        else:
            ok = boxes.ndim == 2 and boxes.shape[-1] == 4 and scores.ndim == 2 and scores.shape[0] == boxes.shape[0]
        if not ok or scores.dtype.kind != "f" or boxes.dtype.kind != "f":
            raise InputError(f"{self.path.name} returned boxes {boxes.dtype} {boxes.shape}, scores {scores.dtype} "
                             f"{scores.shape}{'' if labels is None else f', labels {labels.dtype} {labels.shape}'}: "
                             "expected post-NMS boxes (M, 4), labels (M,) int, scores (M,) (or with a batch "
                             "dimension), or dense boxes (N, M, 4) and scores (N, M, K)")
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise InputError(f"{self.path.name} returned NaN or infinite boxes or scores")
        if self.layout == "post-nms":
            keep = np.flatnonzero(scores > threshold)
            keep = keep[np.argsort(-scores[keep].astype(np.float64), kind="stable")]
            found_boxes, found_labels, found_scores = boxes[keep], labels[keep].astype(np.int64), scores[keep]
        else:
            candidate, label = np.nonzero(scores > threshold)
            found_scores = scores[candidate, label]
            if len(found_scores) > MAX_CANDIDATES:
                best = np.argsort(-found_scores.astype(np.float64), kind="stable")[:MAX_CANDIDATES]
                candidate, label, found_scores = candidate[best], label[best], found_scores[best]
            h, w = self.input_size
            found_boxes = np.minimum(np.clip(boxes[candidate], 0, None),
                                     np.asarray([w, h, w, h], boxes.dtype))
            keep = nms(found_boxes, found_scores, label, self.iou_threshold)
            found_boxes, found_labels, found_scores = found_boxes[keep], label[keep].astype(np.int64), found_scores[keep]
        if max_boxes is not None:
            found_boxes, found_labels, found_scores = found_boxes[:max_boxes], found_labels[:max_boxes], \
                found_scores[:max_boxes]
        if len(found_labels) and (found_labels.min() < 0 or (
                self.class_names is not None and found_labels.max() >= len(self.class_names))):
            raise InputError(f"{self.path.name} returned label {int(found_labels.max())} (or a negative one): outside "
                             f"its {len(self.class_names or [])} classes")
        return {"boxes": found_boxes.astype(np.float32).reshape(-1, 4), "labels": found_labels,
                "scores": found_scores.astype(np.float32)}

    def __repr__(self) -> str:
        return (f"Detector({str(self.path)!r}, layout={self.layout!r}, input_size={self.input_size}, "
                f"backend={self.backend!r})")


def _filled(p: dict[str, Any]) -> dict[str, Any]:
    """A preprocessing dict with the runtime's defaults filled in."""
    return {"color": p.get("color", "RGB"), "scale": float(p.get("scale", 1 / 255)),
            "mean": [float(v) for v in p.get("mean", [0.0] * 3)], "std": [float(v) for v in p.get("std", [1.0] * 3)],
            "size": [int(s) for s in p.get("size", [0, 0])], "resize": p.get("resize", "bilinear"),
            "layout": p.get("layout", "NCHW")}


def detector_metadata(preprocessing: dict[str, Any], class_names: Sequence[str] | None, **extra: Any) -> str:
    """The JSON text of a detector graph's ``pyattr_detector`` metadata entry."""
    return json.dumps({"layout": "dense", "preprocessing": preprocessing,
                       "class_names": None if class_names is None else list(class_names), **extra})
