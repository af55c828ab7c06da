"""Semantic segmentation: explain why a region's pixels are given a class."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .._callview import is_tracing
from ..errors import InputError
from .base import Target, per_sample


def segmentation_logits(output: Any) -> Any:
    """The per-pixel scores of a segmenter's output: torchvision's segmentation models return a dict whose
    ``"out"`` entry holds them; any other output is taken as it is (pick it with ``output=`` otherwise)."""
    if isinstance(output, dict) and "out" in output:
        return output["out"]
    return output


class SegmentationTarget(Target):
    """A class's per-pixel scores summed over a region: ``sum_p region[n, p] * out[n, k, p]``.

    The model outputs per-pixel class scores (N, K, h, w) (torchvision's segmenters: the dict's ``"out"``,
    taken automatically). The region is a mask (N, H, W) (or one (H, W) mask for every sample) at the
    input's resolution, 0/1 or non-negative weights, resized bilinearly to (h, w) when the output is
    coarser. Without a region, a class's region is where the model itself predicts that class (the
    per-pixel arg-max, computed in the graph), so ``scores[n, k]`` is class k's score summed over the
    pixels predicted as k. ``classes`` -1 (or None) explains the class with the largest summed score.

    The target's scores are (N, K), one per class, and ``explained_class`` is the class explained (as
    for a classifier). pytorch-grad-cam's ``SemanticSegmentationTarget(category, mask)`` is the
    same objective for a given mask.

    Exported graphs take ``region`` (N, H, W) float32 after ``target``: a sample whose region has no
    value >= 0 (e.g. all -1) uses the predicted region. (They compute both sums and pick one per sample;
    eager calls skip the sum that no sample of the batch uses, with the same results.)

    Args:
        classes: class ids to explain (None: the arg-max of the summed scores).
        region: the mask, (N, H, W) or (H, W), bool or float >= 0; None: the predicted region (so does a
            sample whose mask is all negative, as in exported graphs).

    Example:
        >>> model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None).eval()
        >>> cam = pyattr.GradCAM(model, "backbone.layer4")
        >>> result = cam(x, pyattr.targets.SegmentationTarget(classes=15, region=person_mask))  # doctest: +SKIP
    """

    kind = "segmentation"
    inputs = ("region",)
    convention = ("target is an int64 (N,) tensor of class ids (-1: the class with the largest summed score); "
                  "region is a float32 (N, H, W) mask at the input's size, a sample with no value >= 0 uses "
                  "the pixels the model predicts as the class")

    def __init__(self, classes: Any = None, region: Any = None):
        super().__init__(classes)
        self.region = region

    def scores(self, output: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = segmentation_logits(output)
        region = inputs["region"]
        h, w = int(out.shape[2]), int(out.shape[3])
        if tuple(region.shape[-2:]) != (h, w):
            region = F.interpolate(region[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        given = (region.flatten(1).amax(1) >= 0)[:, None]
        if not is_tracing() and bool(given.all()):  # eager, every region given: the same numbers, one product
            return (out * region[:, None]).sum((2, 3))
        detached = out.detach()
        # the pixels where class k scores highest (a pixel whose best classes tie exactly counts for each of
        # them): a comparison with the per-pixel maximum, ~10x cheaper than argmax + one-hot on a 21-class map
        predicted = (detached == detached.amax(1, keepdim=True)).to(out.dtype)
        over_predicted = (out * predicted).sum((2, 3))
        if not is_tracing() and not bool(given.any()):  # eager, no region given
            return over_predicted
        over_region = (out * region[:, None]).sum((2, 3))
        return torch.where(given, over_region, over_predicted)

    def check_output(self, output: Any, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
        out = segmentation_logits(output)
        if isinstance(out, (dict, tuple, list)):
            raise InputError(f"a segmentation target needs the model's per-pixel class scores (N, K, h, w); the "
                             f"model returned a {type(out).__name__}: pick them with output=...")
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            hint = (" (an (N, K) classifier output: explain a class with target=int or ClassTarget)"
                    if isinstance(out, torch.Tensor) and out.dim() == 2 else "")
            raise InputError(f"a segmentation target needs per-pixel class scores (N, K, h, w) with N = "
                             f"{x.shape[0]}; the model returned {shape}{hint}")

    def run_time_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = tuple(int(s) for s in x.shape[-2:])
        if self.region is None:
            return {"region": torch.full((x.shape[0], *size), -1.0, dtype=x.dtype, device=x.device)}
        region = per_sample(self.region, "region", x, size, f"a mask at the input's size {size[0]}x{size[1]}")
        negative = (region < 0).flatten(1)
        if bool((negative.any(1) & ~negative.all(1)).any()):
            raise InputError("region holds negative values: give a 0/1 mask or non-negative weights (a sample whose "
                             "region is all negative, e.g. -1, and region=None use the pixels the model predicts "
                             "as the class)")
        return {"region": region}

    def example_inputs(self, x: torch.Tensor, output: Any) -> dict[str, torch.Tensor]:
        return {"region": torch.full((x.shape[0], *x.shape[-2:]), -1.0, dtype=x.dtype, device=x.device)}

    def __repr__(self) -> str:
        region = None if self.region is None else tuple(torch.as_tensor(self.region).shape)
        return f"SegmentationTarget(classes={self.classes!r}, region={region})"
