"""The gradient family: maps made from the gradient of the target score with respect to the input."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..postprocess import reduce_channels
from .base import AttributionMethod

_REDUCTIONS = ("max", "sum", "l2", "mean")


class Saliency(AttributionMethod):
    r"""Vanilla gradient saliency (Simonyan, Vedaldi & Zisserman 2014, arXiv:1312.6034).

    .. math:: M_{ij} = \max_c \left| \frac{\partial S_t(x)}{\partial x_{cij}} \right|

    Args:
        model: a module mapping (N, C, H, W) inputs to (N, K) scores.
        reduction: how channels are reduced: ``"max"`` of absolute values (the paper's, default),
            ``"sum"`` of absolute values, ``"l2"`` norm, or ``"mean"`` (signed).

    Shapes: inputs (N, C, H, W) -> maps and raw (N, H, W).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> x = torch.rand(2, 3, 64, 64)
        >>> result = pyattr.Saliency(model)(x)          # explains the arg-max class
        >>> result.maps.shape
        torch.Size([2, 64, 64])
    """

    name = "saliency"

    def __init__(self, model: nn.Module, reduction: str = "max"):
        super().__init__(model)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; use one of {', '.join(_REDUCTIONS)}")
        self.reduction = reduction

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        x = x.detach().requires_grad_(True)
        scores = self.model(x)
        score, resolved = self.select(scores, target)
        (grad,) = torch.autograd.grad(score, x)
        return scores, reduce_channels(grad, self.reduction), resolved

    def metadata(self) -> dict[str, Any]:
        return {"method": self.name, "reduction": self.reduction}
