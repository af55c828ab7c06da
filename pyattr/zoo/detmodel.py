"""ShapesDetNet: the small one-stage object detector that pyattr ships, trained on :mod:`pyattr.zoo.shapes`.

A CenterNet/FCOS-style dense detector: every cell of a stride-4 feature map (16x16 at 64x64 input) is a
candidate, with a sigmoid score per class of :data:`DET_CLASSES` (= :data:`pyattr.zoo.shapes.SHAPE_CLASSES`,
no background class) and a box given by its distances to the four sides. The forward pass returns
one raw tensor; :func:`decode_detections` turns it into boxes and scores with tensor ops only (it
traces and exports as part of a graph); :func:`detect` adds the eager, data-dependent part (score
threshold, per-class NMS).

Layout (spatial sizes at 64x64; the backbone is :class:`pyattr.zoo.segmodel.ShapesSegNet`'s)::

    normalize (fixed mean/std buffers)                          (N, 3, 64, 64)
    stem:   conv3x3(3->24) + BN + ReLU + max-pool 2x2           (N, 24, 32, 32)
    layer1: BasicBlock(24->32)                                  (N, 32, 32, 32)
    layer2: BasicBlock(32->64, stride 2)                        (N, 64, 16, 16)
    layer3: BasicBlock(64->96, dilation 2)                      (N, 96, 16, 16)
    head:   conv3x3(96->64, dilation 2) + BN + ReLU  <- default CAM layer  (N, 64, 16, 16)
    box:    conv1x1(64->4)  raw distances (left, top, right, bottom)
    cls:    conv1x1(64->6)  class logits
    output: cat([box, cls], 1)                                  (N, 10, 16, 16)

Box convention: ``xyxy`` in input pixels, continuous coordinates in which pixel ``(row, col)`` covers
``[col, col + 1) x [row, row + 1)``; an object's ground-truth box is the tight box of its mask
(:func:`mask_boxes`: ``x0 = first column``, ``x1 = last column + 1``). Candidate ``m = y * w + x``
sits at cell ``(y, x)``, centre ``((x + 0.5) * 4, (y + 0.5) * 4)``; its box is that centre minus/plus
``softplus(raw) * 4`` on each side.

Training targets (:func:`pyattr.zoo.train_det.dense_targets`): each object's score peaks at one cell ON
the object -- the cell fully on it nearest its box centre -- and any cell regresses the object's whole box.
For the solid shapes that is the centre cell, as in CenterNet; a ring's centre is its hole, so its peak
is a cell of its band (a centre peak would put the detector's evidence, and every explanation of the
detection, on background). Grad-CAM at :data:`DETMODEL_LAYER` of each detected box peaks inside the
object's mask for every matched box of ``generate(300, seed=40_000)``, rings included
(``benchmarks/results/detection_pointing_game.md``, ``builtin_detector.md``).

Example:
    >>> import torch
    >>> model = ShapesDetNet().eval()
    >>> boxes, scores = decode_detections(model(torch.rand(2, 3, 64, 64)))
    >>> boxes.shape, scores.shape
    (torch.Size([2, 256, 4]), torch.Size([2, 256, 6]))
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pyattr.errors import InputError
from pyattr.zoo.segmodel import Stride4Backbone
from pyattr.zoo.shapes import SHAPE_CLASSES

DET_CLASSES: tuple[str, ...] = SHAPE_CLASSES
"""Class names of :class:`ShapesDetNet`, in score order (no background class: scores are sigmoids)."""

NUM_DET_CLASSES = len(DET_CLASSES)

DET_STRIDE = 4
"""Input pixels per cell of the output map."""

DETMODEL_LAYER = "head"
"""Name of the default explanation layer: the last feature map before the 1x1 box and class
convolutions, (N, 64, H/4, W/4)."""

DET_WEIGHTS_PATH = Path(__file__).resolve().parent / "shapesdet.pt"
"""Where the shipped weights live (a plain ``state_dict`` written by :mod:`pyattr.zoo.train_det`)."""

_PRIOR_PROBABILITY = 0.01  # initial class probability of every cell (focal-loss prior, Lin et al. 2017)


class ShapesDetNet(Stride4Backbone):
    """One-stage dense detector for the six shape classes.

    Args:
        num_classes: number of classes (6 for :data:`DET_CLASSES`).
        widths: channels of (stem, layer1, layer2, layer3, head).

    Input: float (N, 3, H, W) RGB in [0, 1], H and W divisible by 4 (normalization happens inside).
    Output: one raw tensor (N, 4 + num_classes, H/4, W/4): channels 0-3 the box distances before
    ``softplus`` (left, top, right, bottom, in cells), the rest the class logits. Decode it with
    :func:`decode_detections` (traceable) or run :func:`detect` (eager, with NMS).

    Example:
        >>> import torch
        >>> model = ShapesDetNet().eval()
        >>> model(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 10, 16, 16])
    """

    def __init__(
        self,
        num_classes: int = NUM_DET_CLASSES,
        widths: tuple[int, int, int, int, int] = (24, 32, 64, 96, 64),
    ) -> None:
        super().__init__(widths)
        self.box = nn.Conv2d(widths[-1], 4, 1)
        self.cls = nn.Conv2d(widths[-1], num_classes, 1)
        self.init_backbone()
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.constant_(self.cls.bias, -math.log((1 - _PRIOR_PROBABILITY) / _PRIOR_PROBABILITY))
        nn.init.normal_(self.box.weight, std=0.01)
        nn.init.constant_(self.box.bias, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return torch.cat([self.box(x), self.cls(x)], dim=1)


def decode_detections(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes and class probabilities of every candidate of a raw :class:`ShapesDetNet` output.

    Tensor ops only (no threshold, no NMS, no Python branch on values): it traces and exports.

    Args:
        output: (N, 4 + K, h, w), the model's output (box distances before softplus, then K logits).

    Returns:
        ``(boxes, scores)``: boxes float (N, h * w, 4), ``xyxy`` in input pixels (see the module
        docstring for the convention), one per cell in row-major order (``m = y * w + x``); scores
        (N, h * w, K), the per-class sigmoid probabilities.

    Example:
        >>> raw = torch.zeros(1, 10, 2, 2)
        >>> raw[0, :4, 0, 1] = math.log(math.e - 1)  # softplus = 1 cell = 4 px on each side
        >>> boxes, scores = decode_detections(raw)
        >>> boxes[0, 1].tolist(), scores.shape
        ([2.0, -2.0, 10.0, 6.0], torch.Size([1, 4, 6]))
    """
    height, width = output.shape[-2], output.shape[-1]
    distances = F.softplus(output[:, :4]) * DET_STRIDE  # (N, 4, h, w)
    centre_y = (torch.arange(height, dtype=output.dtype, device=output.device) + 0.5) * DET_STRIDE
    centre_x = (torch.arange(width, dtype=output.dtype, device=output.device) + 0.5) * DET_STRIDE
    centre_x = centre_x.view(1, 1, width).expand(1, height, width)
    centre_y = centre_y.view(1, height, 1).expand(1, height, width)
    boxes = torch.stack(
        [
            centre_x - distances[:, 0],
            centre_y - distances[:, 1],
            centre_x + distances[:, 2],
            centre_y + distances[:, 3],
        ],
        dim=-1,
    )  # (N, h, w, 4)
    scores = torch.sigmoid(output[:, 4:]).permute(0, 2, 3, 1)  # (N, h, w, K)
    return boxes.flatten(1, 2), scores.flatten(1, 2)


@torch.no_grad()
def detect(
    model: nn.Module,
    images: torch.Tensor,
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image: score threshold, per-class NMS, sorted by score (eager; not exported).

    Args:
        model: a :class:`ShapesDetNet` (or any model whose output :func:`decode_detections` reads);
            it is run as it is (call ``.eval()`` first).
        images: float (N, 3, H, W) RGB in [0, 1].
        score_threshold: keep (candidate, class) pairs whose probability exceeds this.
        iou_threshold: NMS overlap above which the lower-scored box of the same class is dropped.
        max_detections: at most this many detections per image (the highest scored).

    Returns:
        One dict per image: ``boxes`` float (D, 4) ``xyxy`` in pixels, clipped to the image;
        ``labels`` int64 (D,) indices into :data:`DET_CLASSES`; ``scores`` float (D,), descending.

    Example:
        >>> model = load_builtin_detector()
        >>> [sorted(d) for d in detect(model, torch.rand(2, 3, 64, 64))]
        [['boxes', 'labels', 'scores'], ['boxes', 'labels', 'scores']]
    """
    from torchvision.ops import batched_nms

    if images.ndim != 4:
        raise InputError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    boxes, scores = decode_detections(model(images))
    height, width = images.shape[-2:]
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    results = []
    for image_boxes, image_scores in zip(boxes, scores):
        candidate, label = torch.nonzero(image_scores > score_threshold, as_tuple=True)
        kept_scores = image_scores[candidate, label]
        kept_boxes = torch.minimum(image_boxes[candidate].clamp(min=0), limits)
        keep = batched_nms(kept_boxes, kept_scores, label, iou_threshold)[:max_detections]  # sorted
        results.append({"boxes": kept_boxes[keep], "labels": label[keep], "scores": kept_scores[keep]})
    return results


def mask_boxes(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth boxes of one image: the tight box of each non-empty per-class mask.

    In :func:`pyattr.zoo.shapes.generate` images every class occurs at most once, so each non-empty
    mask is one object.

    Args:
        masks: bool (K, H, W), e.g. ``generate(n, seed).masks[i]``.

    Returns:
        ``(boxes, labels)``: float32 (D, 4) ``xyxy`` (``x1`` = last column + 1, ``y1`` = last row + 1)
        and int64 (D,), in class order.

    Example:
        >>> masks = np.zeros((6, 8, 8), dtype=bool); masks[2, 1:3, 4:7] = True
        >>> boxes, labels = mask_boxes(masks)
        >>> boxes.tolist(), labels.tolist()
        ([[4.0, 1.0, 7.0, 3.0]], [2])
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W), got shape {masks.shape}")
    boxes, labels = [], []
    for label, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size:
            boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
            labels.append(label)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (A, B) of ``xyxy`` boxes (A, 4) and (B, 4) in continuous coordinates (area = w * h).

    Example:
        >>> box_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 0, 3, 2], [5, 5, 6, 6]])).round(4).tolist()
        [[0.3333, 0.0]]
    """
    boxes_a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    boxes_b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    intersection = np.clip(bottom_right - top_left, 0.0, None).prod(axis=-1)
    area_a = np.clip(boxes_a[:, 2:] - boxes_a[:, :2], 0.0, None).prod(axis=-1)
    area_b = np.clip(boxes_b[:, 2:] - boxes_b[:, :2], 0.0, None).prod(axis=-1)
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def detection_average_precision(
    detections: list[dict],
    ground_truths: list[tuple[np.ndarray, np.ndarray]],
    num_classes: int = NUM_DET_CLASSES,
    iou_threshold: float = 0.5,
) -> tuple[float, np.ndarray]:
    """VOC-style detection mAP: per-class AP at one IoU threshold, all-point interpolation, averaged.

    Per class, the detections of every image are ranked by score (ties keep image order); each one is
    a true positive when its best-overlapping ground-truth box of that class in its image has IoU >=
    ``iou_threshold`` and was not matched by a higher-ranked detection, else a false positive
    (duplicates are false positives). AP is the area under the precision-recall curve after making
    precision monotone (each precision replaced by the maximum at equal or higher recall): PASCAL VOC
    2010+'s "all points" AP. A class with no ground truth has AP ``nan`` and is left out of the mean.

    Args:
        detections: per image, a dict with ``boxes`` (D, 4), ``labels`` (D,), ``scores`` (D,)
            (tensors or arrays; :func:`detect`'s output).
        ground_truths: per image, ``(boxes (G, 4), labels (G,))`` (:func:`mask_boxes`'s output).
        num_classes: number of classes K.
        iou_threshold: the match threshold (0.5 for mAP@0.5).

    Returns:
        ``(mAP, per_class)``, per_class float64 (K,).

    Example:
        >>> truth = [(np.array([[0, 0, 10, 10]]), np.array([0])), (np.array([[0, 0, 10, 10]]), np.array([0]))]
        >>> found = [{"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), "labels": np.array([0, 0]),
        ...           "scores": np.array([0.9, 0.8])},
        ...          {"boxes": np.array([[1, 1, 10, 10]]), "labels": np.array([0]), "scores": np.array([0.7])}]
        >>> round(detection_average_precision(found, truth, num_classes=1)[0], 4)  # 0.5 * 1 + 0.5 * 2/3
        0.8333
    """
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truths)} ground-truth images")

    def array(value) -> np.ndarray:
        return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    per_class = np.full(num_classes, np.nan)
    for class_index in range(num_classes):
        truth_boxes = []
        for boxes, labels in ground_truths:
            labels = array(labels)
            truth_boxes.append(array(boxes).reshape(-1, 4)[labels == class_index])
        num_truths = sum(len(boxes) for boxes in truth_boxes)
        if num_truths == 0:
            continue
        image_ids, scores, boxes = [], [], []
        for image_index, found in enumerate(detections):
            labels = array(found["labels"])
            selected = labels == class_index
            image_ids.append(np.full(int(selected.sum()), image_index))
            scores.append(array(found["scores"]).reshape(-1)[selected])
            boxes.append(array(found["boxes"]).reshape(-1, 4)[selected])
        image_ids_all = np.concatenate(image_ids)
        scores_all = np.concatenate(scores).astype(np.float64)
        boxes_all = np.concatenate(boxes).reshape(-1, 4)
        order = np.argsort(-scores_all, kind="stable")
        matched = [np.zeros(len(b), dtype=bool) for b in truth_boxes]
        true_positive = np.zeros(order.size)
        for rank, detection_index in enumerate(order):
            image_index = image_ids_all[detection_index]
            candidates = truth_boxes[image_index]
            if len(candidates) == 0:
                continue
            overlaps = box_iou(boxes_all[detection_index : detection_index + 1], candidates)[0]
            best = int(np.argmax(overlaps))
            if overlaps[best] >= iou_threshold and not matched[image_index][best]:
                matched[image_index][best] = True
                true_positive[rank] = 1.0
        cumulative_tp = np.cumsum(true_positive)
        recall = cumulative_tp / num_truths
        precision = cumulative_tp / np.arange(1, order.size + 1)
        # All-point interpolation: precision envelope, summed over the recall steps.
        recall = np.concatenate([[0.0], recall, [1.0]])
        precision = np.concatenate([[0.0], precision, [0.0]])
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        steps = np.flatnonzero(recall[1:] != recall[:-1])
        per_class[class_index] = float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))
    valid = ~np.isnan(per_class)
    return (float(per_class[valid].mean()) if valid.any() else float("nan")), per_class


def load_builtin_detector(
    device: str | torch.device = "cpu", weights: str | os.PathLike | None = None
) -> ShapesDetNet:
    """Load the shipped ShapesDetNet weights, in eval mode, on ``device``.

    Args:
        device: where the model goes.
        weights: another ShapesDetNet ``state_dict`` file to load instead (``python -m
            pyattr.zoo.train_det --out FILE`` writes one).

    Raises:
        FileNotFoundError: when ``pyattr/zoo/shapesdet.pt`` (or ``weights``) is missing (train it with
            ``python -m pyattr.zoo.train_det``).
        pyattr.errors.InputError: when the file is not a ShapesDetNet ``state_dict``.

    Example:
        >>> model = load_builtin_detector()
        >>> found = detect(model, torch.rand(1, 3, 64, 64))[0]
        >>> found["boxes"].shape[1], found["labels"].dtype
        (4, torch.int64)
    """
    path = DET_WEIGHTS_PATH if weights is None else Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"ShapesDetNet weights not found at {path}; train them with `python -m pyattr.zoo.train_det`"
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which file and what to do
        raise InputError(
            f"{path} is not a readable ShapesDetNet state_dict (torch.load(weights_only=True) failed: "
            f"{type(error).__name__}); train one with `python -m pyattr.zoo.train_det --out FILE`"
        ) from error
    model = ShapesDetNet()
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise InputError(
            f"{path} does not hold ShapesDetNet weights ({error}); "
            "train them with `python -m pyattr.zoo.train_det --out FILE`"
        ) from error
    return model.to(device).eval()
