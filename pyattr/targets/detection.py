"""Object detection: explain why a detector finds a given box (one map per box).

A *detection decoder* turns the model's raw output into candidate boxes and their per-class scores:
``decode(output) -> (boxes, scores)``, ``boxes`` (N, M, 4) float, xyxy in input pixels, for M candidates
(before non-maximum suppression), and ``scores`` (N, M, K), each candidate's score for each class
(probabilities for sigmoid/softmax detectors). Decoders are traceable (tensor ops only) when the graph is
to be exported. :mod:`pyattr.detection` has the wrappers and decoders for torchvision's detectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import InputError
from .base import Target, per_sample

OBJECTIVES = ("score", "score+iou")
MATCHES = ("iou", "class")


def candidates_output(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The default decoder: the model's output already is ``(boxes (N, M, 4), scores (N, M, K))``, as the
    wrappers of :mod:`pyattr.detection` return."""
    if isinstance(output, (tuple, list)) and len(output) == 2:
        return output[0], output[1]
    raise InputError(f"a detection target needs (boxes (N, M, 4), scores (N, M, K)) candidates; the model returned a "
                     f"{type(output).__name__}: give decode=... (a callable output -> (boxes, scores)), or wrap a "
                     "torchvision detector with pyattr.detection.DenseCandidates(model)")


def pairwise_iou(boxes: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """IoU of every given box with every candidate: (N, B, 4) and (N, M, 4) xyxy -> (N, B, M).

    torchvision's ``box_iou`` formula per sample (differentiable in the candidates); a pair whose union is
    empty (two zero-area boxes) has IoU 0. Traceable."""
    area_b = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    area_c = (candidates[..., 2] - candidates[..., 0]) * (candidates[..., 3] - candidates[..., 1])
    lt = torch.max(boxes[:, :, None, :2], candidates[:, None, :, :2])
    rb = torch.min(boxes[:, :, None, 2:], candidates[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_b[:, :, None] + area_c[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


class DetectionTarget(Target):
    """The score a detector gives a box: for each given box b of class c, the candidate that matches it
    best and that candidate's class-c score. One map per box.

    The model's output (after the method's ``output=``) goes through ``decode`` to candidates: ``boxes``
    (N, M, 4) xyxy in input pixels and per-class ``scores`` (N, M, K), before NMS (a dense detector's anchors,
    see :class:`pyattr.detection.DenseCandidates`) or after it (Faster R-CNN's detections, see
    :class:`pyattr.detection.DetectionsDecoder`). For box b of class c:

    - ``iou[b, m]``: the IoU of box b with candidate m (torchvision's ``box_iou``);
    - the match: the candidate with the highest IoU (``match="iou"``, the default: pytorch-grad-cam's
      ``FasterRCNNBoxScoreTarget`` ranking, among all candidates) or with the highest IoU among the
      candidates whose top-scoring class is c (``match="class"``); it matches when its IoU is > ``iou_threshold``
      (strictly, as pytorch-grad-cam) and its class-c score is > 0 (for one-hot post-NMS scores: its label is c);
    - the objective: the match's class-c score (``objective="score"``, the default: the evidence for the
      class at that box), or that score plus the IoU (``"score+iou"``: pytorch-grad-cam's objective, which also
      explains the box's regression: the IoU is differentiated through the candidate's coordinates).

    The ranking is by IoU only (the IoUs are compared without gradient; a masked max, no Python branch), so a
    box that is one of the model's own detections matches the candidate that produced it (IoU 1).
    A box with no match, a padded box (class -1) and a box of zero area get the score 0 and so a zero map
    (min-max normalization of a constant map gives zeros) and ``matched`` False: never an error.

    Boxes: (N, B, 4) or (B, 4) (the same boxes for every image) xyxy in input pixels; parts outside the image
    are clipped to it (a box entirely outside has zero area and no match). ``box_classes``: (N, B) or (B,)
    int64 class ids, -1 for padding. The target's scores are (N, B): ``scores[n, b]`` is box b's objective;
    the class ids of a call are box indices, and by default every box is explained (``classes=None``: the
    ids 0..B-1, so the maps are (N, B, H, W)); give ``classes=`` (an int or (N,)/(N, T) box indices) for
    some boxes only. Extra outputs: ``matched`` (N, B) bool and ``iou`` (N, B) (the match's IoU; 0 when
    unmatched). Eager calls reject class ids >= K or < -1, non-finite boxes, wrong shapes and B = 0
    (:class:`InputError`).

    Exported graphs take ``images, boxes, box_classes`` (no ``target``: every box is explained) with B fixed
    at export (from the boxes given to the target, or ``max_boxes``; recorded as ``boxes`` in the metadata's
    ``target``): pad with class -1 for fewer boxes; more boxes are a shape error of onnxruntime
    (:class:`pyattr.runtime.AttributionRuntime` pads, and runs more boxes over chunks of B).
    They return ``scores`` (N, B), ``explained_class`` (N, B) (the box indices; -1 for an invalid sample),
    ``raw``, ``maps`` (N, B, H, W), ``matched`` (N, B) bool and ``iou`` (N, B).

    Args:
        boxes: the boxes to explain, (N, B, 4) or (B, 4), xyxy in input pixels; required for eager calls,
            an example (its B) for export.
        box_classes: their class ids, (N, B) or (B,) int, -1 for padding.
        decode: ``output -> (boxes (N, M, 4), scores (N, M, K))``; default: the output already is that pair.
        iou_threshold: a match needs an IoU > this (default 0.5).
        objective: ``"score"`` (default) or ``"score+iou"``.
        match: ``"iou"`` (default) or ``"class"`` (see above).
        classes: which boxes to explain (box indices); None: all.
        max_boxes: B of an exported graph when no boxes are given.

    Example:
        >>> import torchvision, pyattr
        >>> det = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None).eval()
        >>> wrapped = pyattr.detection.DenseCandidates(det)            # candidates before NMS, no resize
        >>> cam = pyattr.GradCAM(wrapped, "backbone.fpn.layer_blocks.0")
        >>> target = pyattr.targets.DetectionTarget(boxes=[[10., 20., 60., 90.]], box_classes=[3])
        >>> result = cam(images, target)                               # doctest: +SKIP
        >>> result.maps.shape, result.outputs["matched"]               # doctest: +SKIP
        (torch.Size([1, 1, 128, 128]), tensor([[True]]))
    """

    kind = "detection"
    inputs = ("boxes", "box_classes")
    outputs = ("matched", "iou")
    target_input = False
    convention = ("no target input: every box is explained (explained_class = box index 0..B-1); boxes is a "
                  "float32 (N, B, 4) xyxy in input pixels, box_classes an int64 (N, B) of class ids, -1 for "
                  "padding; matched (N, B) says which boxes found a candidate")

    def __init__(self, boxes: Any = None, box_classes: Any = None, decode: Callable[[Any], Any] | None = None,
                 iou_threshold: float = 0.5, objective: str = "score", match: str = "iou", classes: Any = None,
                 max_boxes: int | None = None):
        if objective not in OBJECTIVES:
            raise InputError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if match not in MATCHES:
            raise InputError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
        if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)) \
                or not 0 <= iou_threshold < 1:
            raise InputError(f"iou_threshold must be a number in [0, 1), got {iou_threshold!r}")
        if decode is not None and not callable(decode):
            raise InputError(f"decode must be a callable output -> (boxes, scores), got {type(decode).__name__}")
        if max_boxes is not None and (isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or max_boxes < 1):
            raise InputError(f"max_boxes must be a positive int, got {max_boxes!r}")
        super().__init__(classes)
        self.boxes = boxes
        self.box_classes = box_classes
        self.decode = candidates_output if decode is None else decode
        self.iou_threshold = float(iou_threshold)
        self.objective = objective
        self.match = match
        self.max_boxes = max_boxes

    @classmethod
    def from_detections(cls, detections: list[dict[str, Any]], **options: Any) -> DetectionTarget:
        """A target for per-image detections in torchvision's format (one dict per image with ``boxes`` (D, 4)
        and ``labels`` (D,), e.g. :func:`pyattr.zoo.detect`'s or a torchvision detector's output): boxes padded
        with class -1 to the largest count (at least one box, so an image without detections gets a zero map).
        ``options``: the other arguments of :class:`DetectionTarget` (``decode``, ``iou_threshold``, ...).

        Example:
            >>> t = DetectionTarget.from_detections([{"boxes": torch.ones(2, 4), "labels": torch.tensor([0, 3])},
            ...                                      {"boxes": torch.ones(0, 4), "labels": torch.zeros(0)}])
            >>> t.boxes.shape, t.box_classes.tolist()
            (torch.Size([2, 2, 4]), [[0, 3], [-1, -1]])
        """
        b = max(1, max((len(d["labels"]) for d in detections), default=0))
        boxes = torch.zeros(len(detections), b, 4)
        labels = torch.full((len(detections), b), -1, dtype=torch.long)
        for j, det in enumerate(detections):
            d = len(det["labels"])
            boxes[j, :d] = torch.as_tensor(det["boxes"], dtype=torch.float32).detach().cpu()
            labels[j, :d] = torch.as_tensor(det["labels"]).long().cpu()
        return cls(boxes=boxes, box_classes=labels, **options)

    # -- the computation ------------------------------------------------------------------------
    def candidates(self, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded ``(boxes (N, M, 4), scores (N, M, K))``."""
        return self.decode(output)

    def matching(self, output: Any, inputs: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(objective (N, B), matched (N, B) bool, the match's IoU (N, B), its candidate index (N, B)).
        Traceable: masked maxima and gathers."""
        cand_boxes, cand_scores = self.candidates(output)
        boxes, labels = inputs["boxes"], inputs["box_classes"]
        n, _, k = cand_scores.shape
        b = boxes.shape[1]
        cls = labels.clamp(0, k - 1)
        iou = pairwise_iou(boxes.to(cand_boxes.dtype), cand_boxes)  # (N, B, M)
        key = iou.detach()
        if self.match == "class":
            top = cand_scores.detach().argmax(2)  # (N, M)
            key = torch.where(top[:, None, :] == cls[:, :, None], key, torch.full_like(key, -1.0))
        best = key.argmax(2)  # (N, B)
        best_key = key.gather(2, best[..., None])[..., 0]
        best_iou = iou.gather(2, best[..., None])[..., 0]
        best_scores = cand_scores.gather(1, best[..., None].expand(n, b, k))  # (N, B, K)
        score = best_scores.gather(2, cls[..., None])[..., 0]
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        matched = (best_key > self.iou_threshold) & (score.detach() > 0) & (labels >= 0) & (area > 0)
        objective = score + best_iou if self.objective == "score+iou" else score
        objective = torch.where(matched, objective, torch.zeros_like(objective))
        return objective, matched, torch.where(matched, best_iou.detach(), torch.zeros_like(best_iou)).detach(), best

    def scores(self, output: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.matching(output, inputs)[0]

    def extra_outputs(self, output: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        _, matched, iou, _ = self.matching(output, inputs)
        return {"matched": matched, "iou": iou}

    def evaluate(self, output: Any, inputs: dict[str, torch.Tensor], outputs: bool):
        objective, matched, iou, _ = self.matching(output, inputs)
        return objective, ({"matched": matched, "iou": iou} if outputs else {})

    def check_export(self, method: Any) -> None:
        """Two-stage detectors (torchvision's Faster/Mask R-CNN) and decoders of post-NMS detections
        (``exportable = False``) cannot be one graph: refused with the reason."""
        from ..errors import ExportError

        model = getattr(method, "_model", None)
        two_stage = isinstance(model, torch.nn.Module) and any(
            type(m).__name__ in ("GeneralizedRCNN", "FasterRCNN", "MaskRCNN", "KeypointRCNN") for m in model.modules())
        if two_stage or getattr(self.decode, "exportable", True) is False:
            raise ExportError(
                "cannot export a detection target on post-NMS detections (a two-stage detector such as Faster "
                "R-CNN, or a decoder of the model's detections list): the number of detections depends on the data "
                "(score thresholds, non-maximum suppression, region proposals and RoI pooling), so there is no "
                "fixed graph to write. Explain it eagerly, or export a one-stage detector's candidates before NMS "
                "(pyattr.detection.DenseCandidates: RetinaNet, FCOS, SSD)")

    # -- inputs -----------------------------------------------------------------------------------
    def check_output(self, output: Any, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
        cand = self.candidates(output)
        if not (isinstance(cand, (tuple, list)) and len(cand) == 2 and all(isinstance(c, torch.Tensor) for c in cand)):
            raise InputError(f"the detection decoder must return (boxes (N, M, 4), scores (N, M, K)); it returned a "
                             f"{type(cand).__name__}")
        boxes, scores = cand
        n = x.shape[0]
        if boxes.dim() != 3 or boxes.shape[0] != n or boxes.shape[2] != 4:
            raise InputError(f"the decoder's boxes must be (N, M, 4) with N = {n}, got {tuple(boxes.shape)}")
        if scores.dim() != 3 or tuple(scores.shape[:2]) != tuple(boxes.shape[:2]):
            raise InputError(f"the decoder's scores must be (N, M, K) with (N, M) = {tuple(boxes.shape[:2])} as its "
                             f"boxes, got {tuple(scores.shape)}")
        if boxes.shape[1] == 0:
            raise InputError("the decoder returned no candidate (M = 0): pad to at least one candidate (a zero box "
                             "with zero scores; pyattr.detection.DetectionsDecoder does)")
        k = scores.shape[2]
        top = int(inputs["box_classes"].max())
        if top >= k:
            raise InputError(f"box_classes holds class {top}, but the detector scores {k} classes (0..{k - 1})")

    def run_time_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.boxes is None or self.box_classes is None:
            raise InputError("a detection target needs boxes=... (N, B, 4) or (B, 4) xyxy in input pixels and "
                             "box_classes=... (N, B) or (B,) class ids (-1: padding)")
        boxes = torch.as_tensor(self.boxes, device=x.device)
        if boxes.dim() not in (2, 3) or boxes.shape[-1] != 4:
            raise InputError(f"boxes must be (N, B, 4) or (B, 4) xyxy in input pixels, got shape {tuple(boxes.shape)}")
        b = int(boxes.shape[-2])
        if b == 0:
            raise InputError("boxes holds no box (B = 0): give at least one box (pad with box_classes -1)")
        boxes = per_sample(boxes, "boxes", x, (b, 4), "xyxy boxes in input pixels")
        labels = torch.as_tensor(self.box_classes, device=x.device)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise InputError(f"box_classes must hold integer class ids, got dtype {labels.dtype}")
        if labels.dim() == 1 and labels.shape[0] == b:
            labels = labels[None].expand(x.shape[0], b)
        elif labels.dim() == 2 and labels.shape[0] == 1 and labels.shape[1] == b:
            labels = labels.expand(x.shape[0], b)
        if tuple(labels.shape) != (x.shape[0], b):
            raise InputError(f"box_classes must be ({x.shape[0]}, {b}) or ({b},): one class id per box, got shape "
                             f"{tuple(labels.shape)}")
        if bool((labels < -1).any()):
            raise InputError("box_classes holds ids < -1 (-1 alone marks a padded box)")
        return {"boxes": boxes, "box_classes": labels.long().contiguous()}

    def prepare_inputs(self, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The boxes clipped to the image (eager calls and exported graphs alike)."""
        boxes = inputs["boxes"]
        h, w = x.shape[-2], x.shape[-1]
        clipped = torch.stack((boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                               boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)), -1)
        return {**inputs, "boxes": clipped}

    def default_classes(self, x: torch.Tensor) -> Any:
        boxes = torch.as_tensor(self.boxes) if self.boxes is not None else None
        if boxes is None or boxes.dim() not in (2, 3) or boxes.shape[-2] == 0:
            return None  # run_time_inputs says what is wrong
        b = int(boxes.shape[-2])
        return torch.arange(b, device=x.device)[None].expand(x.shape[0], b)

    def graph_target(self, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        boxes = inputs["boxes"]
        return torch.arange(boxes.shape[1], device=boxes.device)[None].expand(boxes.shape[0], boxes.shape[1])

    def example_inputs(self, x: torch.Tensor, output: Any) -> dict[str, torch.Tensor]:
        if self.boxes is not None and self.box_classes is not None:  # the first image's boxes, for every image
            boxes, labels = torch.as_tensor(self.boxes), torch.as_tensor(self.box_classes)
            example = DetectionTarget(boxes[0] if boxes.dim() == 3 else boxes,
                                      labels[0] if labels.dim() == 2 else labels)
            return example.run_time_inputs(x)
        b = self.export_boxes()
        h, w = int(x.shape[-2]), int(x.shape[-1])
        box = torch.tensor([0.0, 0.0, w / 2, h / 2], dtype=x.dtype, device=x.device)
        return {"boxes": box.expand(x.shape[0], b, 4).contiguous(),
                "box_classes": torch.zeros(x.shape[0], b, dtype=torch.long, device=x.device)}

    def export_boxes(self) -> int:
        """B of an exported graph: the number of boxes given to the target, else ``max_boxes`` (default 1)."""
        if self.boxes is not None:
            return int(torch.as_tensor(self.boxes).shape[-2])
        return self.max_boxes or 1

    def output_metadata(self, output: Any) -> dict[str, Any]:
        """``num_classes``: K of the decoder's scores, so that a runtime rejects class ids the graph would clamp."""
        return {"num_classes": int(self.candidates(output)[1].shape[-1])}

    def metadata(self) -> dict[str, Any]:
        return {"kind": self.kind, "iou_threshold": self.iou_threshold, "objective": self.objective,
                "match": self.match, "boxes": self.export_boxes()}

    def __repr__(self) -> str:
        boxes = None if self.boxes is None else tuple(torch.as_tensor(self.boxes).shape)
        return (f"DetectionTarget(boxes={boxes}, iou_threshold={self.iou_threshold}, objective={self.objective!r}, "
                f"match={self.match!r})")


__all__ = ["DetectionTarget", "candidates_output", "pairwise_iou"]
