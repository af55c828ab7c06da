"""torchvision's detectors as models a :class:`~pyattr.targets.DetectionTarget` explains.

- :class:`DenseCandidates` wraps a one-stage dense detector (``RetinaNet``, ``FCOS``, ``SSD``/SSDlite): its own
  normalization, backbone, head and anchor/box decoding, *without* the transform's resize and without
  score thresholding, top-k or NMS. It returns every candidate: ``(boxes (N, M, 4), scores (N, M, K))`` in the
  input's pixels, the default decoder's format. Traceable, so it exports as one graph. The wrapper holds the
  model's own submodules by reference (no copy of a weight, nothing of the model is changed): layer names
  are the model's (``"backbone.fpn.layer_blocks.0"``, ``"backbone.body.layer4"``, ``"head..."``).
- :class:`DetectionsDecoder` decodes a torchvision detector's eval output (a list of dicts, after NMS), e.g.
  Faster R-CNN's, to the detections' boxes and one-hot scores: eager calls only (the list's lengths depend
  on the data; such a model cannot be exported).

Which layer for the CAM family: an FPN's levels are separate outputs of one module (a dict), so name the
modules that output each level's tensor: ``"backbone.fpn.layer_blocks.0"`` is the finest level (stride 8 on
RetinaNet/FCOS), ``.1``, ``.2`` the coarser ones. A candidate's score depends only on the level its anchor
is on (and on the levels it is computed from): a box found on P5 has a zero gradient at P3's block, so
one level's Grad-CAM is zero for the boxes of the other levels. ``layer=feature_levels(model)`` (every
level) fuses one map per level (each normalized, resized to the finest, then averaged:
:func:`pyattr.methods.cam.fuse_maps`) and explains every box; a single level is cheaper when the boxes'
scale is known. SSDlite's levels are ``"backbone.features.0"``, ``"backbone.features.1"`` and
``"backbone.extra.0"`` ... ``"backbone.extra.3"``.

Example:
    >>> import torch, torchvision, pyattr
    >>> det = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
    >>> boxes, scores = pyattr.detection.DenseCandidates(det)(torch.rand(1, 3, 128, 128))
    >>> boxes.shape, scores.shape
    (torch.Size([1, 3069, 4]), torch.Size([1, 3069, 91]))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

FAMILIES = ("retinanet", "fcos", "ssd")


def detector_family(model: nn.Module) -> str:
    """``"retinanet"``, ``"fcos"``, ``"ssd"`` or ``"rcnn"`` for a torchvision detector; InputError otherwise."""
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, FCOS):
        return "fcos"
    if isinstance(model, SSD):
        return "ssd"
    if isinstance(model, GeneralizedRCNN):
        return "rcnn"
    raise InputError(f"{type(model).__name__} is not a torchvision detector pyattr knows (RetinaNet, FCOS, SSD, "
                     "Faster/Mask R-CNN); write a decode= callable output -> (boxes, scores) for your own")


def feature_levels(model: nn.Module) -> list[str]:
    """The names of the modules whose outputs are a torchvision detector's feature levels, finest first, for the
    CAM family (``layer=feature_levels(model)`` fuses one map per level): an FPN's ``backbone.fpn.layer_blocks.i``
    (the extra P6/P7 levels of RetinaNet/FCOS are computed from P5, so P5's block explains their candidates
    too), SSD's ``backbone.features.i`` and ``backbone.extra.i``. The names hold for the model and for its
    :class:`DenseCandidates` alike. InputError for a model without such levels.

    Example:
        >>> pyattr.detection.feature_levels(det)                      # doctest: +SKIP
        ['backbone.fpn.layer_blocks.0', 'backbone.fpn.layer_blocks.1', 'backbone.fpn.layer_blocks.2']
    """
    backbone = getattr(model, "backbone", None)
    fpn = getattr(backbone, "fpn", None)
    if fpn is not None and hasattr(fpn, "layer_blocks"):
        return [f"backbone.fpn.layer_blocks.{i}" for i in range(len(fpn.layer_blocks))]
    if backbone is not None and hasattr(backbone, "features") and hasattr(backbone, "extra"):
        return ([f"backbone.features.{i}" for i in range(len(backbone.features))]
                + [f"backbone.extra.{i}" for i in range(len(backbone.extra))])
    raise InputError(f"{type(model).__name__} has no FPN (backbone.fpn) or SSD feature extractor (backbone.features/"
                     "extra): name its feature layers yourself")


class DenseCandidates(nn.Module):
    """A one-stage torchvision detector's candidates before NMS: ``images -> (boxes (N, M, 4), scores (N, M, K))``.

    Runs the model's normalization (``transform.image_mean/std``), pads to the transform's
    ``size_divisible`` as the model does (bottom/right, after normalization), then the backbone, the head,
    the anchors and the box coder; boxes are clipped to the input image as the model's postprocessing does.
    Scores per family, as the model's ``postprocess_detections``: RetinaNet ``sigmoid(logits)``, FCOS
    ``sqrt(sigmoid(logits) * sigmoid(centerness))``, SSD ``softmax(logits)`` (class 0 is the background).
    M: every anchor (RetinaNet: 9 per location; SSD: its default boxes) of every level, in the head's order.

    No resize: the explained image is the input as given (its size is the wrapper's, any multiple the
    backbone accepts). The model's own eval output on an input that its transform does not resize (e.g.
    ``min_size = max_size =`` the input size; SSD: ``fixed_size``) is a subset of these candidates with the
    same scores (see tests/test_targets_detection.py).

    Args:
        model: a torchvision ``RetinaNet``, ``FCOS`` or ``SSD`` (incl. SSDlite). Two-stage detectors
            (Faster R-CNN) are refused: their candidates come from data-dependent proposals; explain their
            eval output with :class:`DetectionsDecoder` instead (eager only).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        family = detector_family(model)
        if family == "rcnn":
            raise InputError(f"{type(model).__name__} is a two-stage detector: its candidates come from region "
                             "proposals chosen by score, NMS and RoI pooling (data-dependent), so there is no dense "
                             "candidate set to wrap; explain its detections eagerly with "
                             "DetectionTarget(decode=pyattr.detection.DetectionsDecoder.of(model))")
        self.family = family
        self.backbone = model.backbone  # by reference: the model's own modules and weights
        self.head = model.head
        # not modules of the wrapper's tree (no weights): plain references
        self.__dict__["anchor_generator"] = model.anchor_generator
        self.__dict__["box_coder"] = model.box_coder
        transform = model.transform
        self.register_buffer("mean", torch.as_tensor(transform.image_mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.as_tensor(transform.image_std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.size_divisible = int(getattr(transform, "size_divisible", 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.models.detection.image_list import ImageList

        h, w = int(images.shape[-2]), int(images.shape[-1])
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        d = self.size_divisible
        ph, pw = -(-h // d) * d, -(-w // d) * d
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h))
        features = self.backbone(x)
        if isinstance(features, torch.Tensor):
            features = {"0": features}
        features = list(features.values())
        head = self.head(features)
        # anchors depend on the sizes only: one image's, shared by the batch
        anchors = self.anchor_generator(ImageList(x[:1], [(h, w)]), features)[0]
        n, m = x.shape[0], anchors.shape[0]
        regression = head["bbox_regression"]
        if self.family == "fcos":
            boxes = self.box_coder.decode(regression, anchors[None].expand(n, m, 4))
        else:
            flat = self.box_coder.decode_single(regression.reshape(-1, 4), anchors[None].expand(n, m, 4).reshape(-1, 4))
            boxes = flat.reshape(n, m, 4)
        boxes = torch.stack((boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                             boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)), -1)
        logits = head["cls_logits"]
        if self.family == "retinanet":
            scores = torch.sigmoid(logits)
        elif self.family == "fcos":
            scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(head["bbox_ctrness"]))
        else:
            scores = torch.softmax(logits, dim=-1)
        return boxes, scores

    def extra_repr(self) -> str:
        return f"family={self.family!r}, size_divisible={self.size_divisible}"


class DetectionsDecoder:
    """Decode a torchvision detector's eval output (a list of N dicts with ``boxes`` (D_n, 4), ``labels``,
    ``scores``), after NMS, to ``(boxes (N, D, 4), scores (N, D, K))``: each detection's score one-hot at its
    label (so a :class:`~pyattr.targets.DetectionTarget` with the default ``match="iou"`` is pytorch-grad-cam's
    ``FasterRCNNBoxScoreTarget`` per box). Images with fewer detections are padded with zero boxes and zero
    scores (D >= 1: an image without detection has one empty candidate, so its boxes find no match). Eager
    only (the number of detections depends on the data).

    Args:
        num_classes: K, the detector's number of classes (with the background); :meth:`of` reads it from a model.

    Example:
        >>> rcnn = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None,
        ...                                                                      weights_backbone=None).eval()
        >>> target = pyattr.targets.DetectionTarget(boxes, labels, decode=pyattr.detection.DetectionsDecoder.of(rcnn))
        >>> pyattr.GradCAM(rcnn, "backbone.fpn.layer_blocks.0")(images, target)   # doctest: +SKIP
    """

    exportable = False
    """Post-NMS detections have a data-dependent count: an exported graph cannot hold them."""

    def __init__(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise InputError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes

    @classmethod
    def of(cls, model: nn.Module) -> DetectionsDecoder:
        """The decoder for a torchvision R-CNN (its box predictor's classes), RetinaNet/FCOS (head classes) or SSD."""
        family = detector_family(model)
        if family == "rcnn":
            return cls(int(model.roi_heads.box_predictor.cls_score.out_features))
        if family in ("retinanet", "fcos"):
            return cls(int(model.head.classification_head.num_classes))
        return cls(int(model.head.classification_head.num_columns))

    def __call__(self, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(output, (list, tuple)) and output and all(
                isinstance(d, dict) and {"boxes", "labels", "scores"} <= set(d) for d in output)):
            raise InputError("DetectionsDecoder decodes a torchvision detector's eval output: a list of dicts with "
                             f"boxes, labels and scores; got {type(output).__name__}")
        d = max(1, max(int(o["boxes"].shape[0]) for o in output))
        k = self.num_classes
        boxes, scores = [], []
        for o in output:
            b, s, lab = o["boxes"], o["scores"], o["labels"]
            if bool((lab >= k).any()):
                raise InputError(f"a detection has label {int(lab.max())} >= num_classes {k}")
            pad = d - b.shape[0]
            one_hot = F.one_hot(lab.long(), k).to(s.dtype) * s[:, None]
            boxes.append(torch.cat([b, b.new_zeros(pad, 4)]))
            scores.append(torch.cat([one_hot, s.new_zeros(pad, k)]))
        return torch.stack(boxes), torch.stack(scores)

    def __repr__(self) -> str:
        return f"DetectionsDecoder(num_classes={self.num_classes})"


__all__ = ["FAMILIES", "DenseCandidates", "DetectionsDecoder", "detector_family", "feature_levels"]
