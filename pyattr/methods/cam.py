"""The class activation map family: maps made from a layer's activations, weighted per channel."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._capture import capture_outputs, find_layer
from ..errors import InputError
from .base import AttributionMethod


class GradCAM(AttributionMethod):
    r"""Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391).

    With :math:`A^k` the target layer's activations and :math:`S_t` the target score,

    .. math:: \alpha_k = \frac{1}{hw}\sum_{ij} \frac{\partial S_t}{\partial A^k_{ij}}, \qquad
              L = \mathrm{ReLU}\Big(\sum_k \alpha_k A^k\Big)

    The raw map has the layer's resolution (h, w); ``maps`` are bilinearly resized to the input
    size and min-max normalized. Only the backward pass down to the layer is computed.

    Args:
        model: a module mapping (N, C, H, W) inputs to (N, K) scores.
        layer: the name of the target layer, as in ``model.named_modules()`` (e.g. ``"layer4"``).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> cam = pyattr.GradCAM(model, layer="layer3")
        >>> cam(torch.rand(4, 3, 64, 64), target=2).raw.shape
        torch.Size([4, 8, 8])
    """

    name = "gradcam"

    def __init__(self, model: nn.Module, layer: str):
        super().__init__(model)
        self.layer_name = layer
        self.layer = find_layer(model, layer)

    def layer_activation_and_grad(self, x: torch.Tensor, target: torch.Tensor):
        """Forward pass with the layer's output captured; returns (scores, A, dS/dA, resolved target)."""
        x = x.detach().requires_grad_(True)  # so that A requires grad even for a frozen model
        with capture_outputs([self.layer]) as captured:
            scores = self.model(x)
        act = captured[0]
        if not isinstance(act, torch.Tensor) or act.dim() != 4:
            got = tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__
            raise InputError(
                f"layer {self.layer_name!r} must output a (N, C, h, w) tensor for {type(self).__name__}, "
                f"got {got}; choose a convolutional layer"
            )
        score, resolved = self.select(scores, target)
        (grad,) = torch.autograd.grad(score, act)
        return scores, act, grad, resolved

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        scores, act, grad, resolved = self.layer_activation_and_grad(x, target)
        weights = grad.mean((2, 3), keepdim=True)
        cam = torch.relu((weights * act).sum(1))
        return scores, cam, resolved

    def metadata(self) -> dict[str, Any]:
        return {"method": self.name, "layer": self.layer_name}
