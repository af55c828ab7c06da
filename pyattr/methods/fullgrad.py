"""FullGrad: the input-gradient and the bias-gradients of every layer, aggregated into one map."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._callview import call_view, is_view
from ..errors import InputError
from .base import AttributionMethod
from .cam import model_scores

VARIANTS = ("paper", "pytorch-grad-cam")


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a layer adds to its output, per output channel (None: the layer adds none).

    Conv / Linear: ``bias``. BatchNorm in eval mode: ``y = x * w / s + (b - mean * w / s)`` with
    ``s = sqrt(running_var + eps)``, so its bias is ``b - running_mean * w / s`` (w = 1, b = 0 when
    not affine). Computed from the module's current tensors (detached), as traceable ops.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None or module.running_var is None:
            raise InputError("FullGrad needs BatchNorm layers with running statistics (track_running_stats=True)")
        scale = torch.rsqrt(module.running_var.detach() + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.detach()
        bias = -module.running_mean.detach() * scale
        if module.bias is not None:
            bias = bias + module.bias.detach()
        return bias
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, torch.Tensor) else None


def bias_layers(model: nn.Module, variant: str = "paper") -> list[tuple[str, nn.Module]]:
    """The layers whose bias-gradients FullGrad collects, in ``named_modules`` order.

    ``paper``: every convolution and linear layer with a bias and every BatchNorm (as the reference
    implementation, fullgrad-saliency, which takes Conv2d / Linear / BatchNorm2d; subclasses and
    1-d/3-d variants included here). ``pytorch-grad-cam``: ``Conv2d`` and ``BatchNorm2d`` with a bias,
    matched by exact type, as pytorch-grad-cam's FullGrad.
    """
    layers = []
    for name, m in model.named_modules():
        if variant == "pytorch-grad-cam":
            keep = type(m) in (nn.Conv2d, nn.BatchNorm2d) and getattr(m, "bias", None) is not None
        else:
            keep = isinstance(m, nn.modules.batchnorm._BatchNorm) or (
                isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m.bias is not None)
        if keep:
            layers.append((name, m))
    return layers


@contextmanager
def capture_fresh_outputs(layers: list[nn.Module]) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Record (layer index, output) for every call of each layer during the body. The model goes on
    with a copy of each output, so that an in-place op after the layer (``ReLU(inplace=True)``) does
    not overwrite the recorded tensor: gradients taken with respect to it are those of the layer's
    own output. ``layers``: modules of a per-call view. Hooks live only inside the ``with`` block."""
    captured: list[tuple[int, torch.Tensor]] = []
    handles = []

    def make_hook(i: int):
        def hook(_module, _inputs, output):
            captured.append((i, output))
            return output.clone()
        return hook

    try:
        for i, layer in enumerate(layers):
            if not is_view(layer):
                raise InputError(f"cannot capture the output of a {type(layer).__name__} outside a per-call view")
            handles.append(layer.register_forward_hook(make_hook(i)))
        yield captured
    finally:
        for h in handles:
            h.remove()


class FullGrad(AttributionMethod):
    r"""FullGrad (Srinivas & Fleuret 2019, arXiv:1905.00780).

    For a network made of piecewise-linear parts, the target score decomposes exactly (completeness)
    into the input-gradient term and one bias-gradient term per layer with a bias :math:`b_l`:

    .. math:: S_t(x) = \sum \nabla_x S_t \odot x + \sum_l \sum \nabla_{z_l} S_t \odot b_l

    with :math:`z_l` the layer's output (BatchNorm counts with its effective bias
    :math:`b - \mu w / \sqrt{\sigma^2 + \epsilon}`, see :func:`effective_bias`). The map is, as in the
    paper's reference implementation (``variant="paper"``),

    .. math:: M = \sum_c \psi(\nabla_x S_t \odot x)_c + \sum_{l\ \mathrm{conv}} \sum_c
              \mathrm{up}\big(\psi(\nabla_{z_l} S_t \odot b_l)\big)_c

    where :math:`\psi` is the absolute value followed by a min-max rescaling per sample over
    (C, h, w) (``(m - min) / (max - min + 1e-6)``) and up is bilinear upsampling to the input's size
    with ``align_corners=True``; only the (N, C, h, w) bias-gradients of convolutions and BatchNorms
    enter the map (linear layers count for completeness only). ``variant="pytorch-grad-cam"`` reproduces pytorch-grad-cam's FullGrad:
    :math:`\psi` rescales each channel separately (``1e-7``), upsampling with ``align_corners=False``
    (its ``cv2.resize``), and only ``Conv2d``/``BatchNorm2d`` layers. Raw map: (N, H, W).

    Gradients are taken with ``torch.autograd.grad`` with respect to the input and the layers'
    outputs (captured for the call; parameters get no ``.grad``).

    Args:
        model: the classifier.
        variant: ``"paper"`` (default) or ``"pytorch-grad-cam"``.
        input_offset: subtracted from the input in the input-gradient term, ``\nabla_x S \odot (x - o)``.
            When the model normalizes its input itself (``(x - mean) / std``, as the built-in ShapesNet),
            pass that mean: the normalization's shift is a bias that no layer holds, and completeness
            holds with ``o = mean``. Default 0 (the paper's).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> fg = pyattr.methods.FullGrad(model, input_offset=model.mean)
        >>> score, total = fg.completeness(torch.rand(2, 3, 64, 64))
        >>> bool(torch.allclose(score, total, rtol=1e-4))
        True
    """

    name = "fullgrad"

    def __init__(self, model: nn.Module, *, variant: str = "paper",
                 input_offset: float | torch.Tensor | None = None, **options):
        super().__init__(model, **options)
        if variant not in VARIANTS:
            raise InputError(f"unknown FullGrad variant {variant!r}; use one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.input_offset = input_offset
        self.bias_layer_names = [n for n, _ in bias_layers(model, variant)]
        self._bias_modules = [m for _, m in bias_layers(model, variant)]

    # -- the decomposition ------------------------------------------------------------------------
    def decompose(self, x: torch.Tensor, target: torch.Tensor):
        """(scores, resolved target, input term ``grad_x * (x - offset)`` (N, C, H, W), bias terms
        ``[(layer index, grad_z * b)]``, one per layer call, each (N, C_l, ...))."""
        x = x.detach().requires_grad_(True)
        with call_view(self._model), capture_fresh_outputs([self.in_call(m) for m in self._bias_modules]) as captured:
            scores = model_scores(self, x)
        score, resolved = self.select(scores, target)
        grads = torch.autograd.grad(score, [x] + [out for _, out in captured], allow_unused=True)
        offset = self.input_offset
        if offset is None:
            shifted = x.detach()
        else:
            shifted = x.detach() - torch.as_tensor(offset, dtype=x.dtype, device=x.device)
        input_term = grads[0] * shifted
        bias_terms = []
        for (i, out), grad in zip(captured, grads[1:]):
            if grad is None:  # the layer's output does not reach the score
                continue
            module = self._bias_modules[i]
            bias = effective_bias(module).to(grad.dtype)
            if isinstance(module, nn.Linear):  # features last: (N, ..., F)
                shape = [1] * (grad.dim() - 1) + [-1]
            else:  # channels at dim 1: (N, C, ...)
                shape = [1, -1] + [1] * (grad.dim() - 2)
            bias_terms.append((i, grad * bias.view(shape)))
        return scores, resolved, input_term, bias_terms

    def completeness(self, x: torch.Tensor, target=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the target score (N,), the sum of the input-gradient term and of every bias-gradient term
        (N,)): equal for piecewise-linear networks whose every bias is held by a Conv/Linear/BatchNorm
        (relative 1e-4 in float32). The model runs in eval mode for the check."""
        with call_view(self._model), torch.enable_grad():
            x = self._check_input(x)
            t = self._check_target(target, x.shape[0], x.device)
            scores, resolved, input_term, bias_terms = self.decompose(x, t)
            total = input_term.flatten(1).sum(1)
            for _, term in bias_terms:
                total = total + term.flatten(1).sum(1)
        score = scores.gather(1, resolved[:, None])[:, 0]
        return score.detach(), total.detach()

    # -- the map -----------------------------------------------------------------------------------
    def _rescale(self, t: torch.Tensor) -> torch.Tensor:
        """|t| min-max rescaled: per sample over (C, h, w) (paper) or per sample and channel."""
        t = t.abs()
        if self.variant == "paper":
            flat = t.flatten(1)
            flat = flat - flat.amin(1, keepdim=True)
            return (flat / (flat.amax(1, keepdim=True) + 1e-6)).view_as(t)
        flat = t.flatten(2)
        flat = flat - flat.amin(2, keepdim=True)
        return (flat / (flat.amax(2, keepdim=True) + 1e-7)).view_as(t)

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        scores, resolved, input_term, bias_terms = self.decompose(x, target)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        align = self.variant == "paper"
        cam = self._rescale(input_term).sum(1)
        # Bilinear resizing is linear, with the same weights for every channel and every map of one size, so
        # the rescaled terms are summed over channels and over the layers of equal size first, then resized
        # once per size: the same map as resizing each channel of each layer and summing, for a fraction of
        # the work (vgg16, 224x224: the exported graph had spent 6x eager's time gathering every channel's
        # pixels; mobilenet_v3_large has 62 bias maps in 5 sizes).
        by_size: dict[tuple[int, int], torch.Tensor] = {}
        for i, term in bias_terms:
            if term.dim() != 4 or isinstance(self._bias_modules[i], nn.Linear):  # (N, C, h, w) maps only
                continue
            summed = self._rescale(term).sum(1, keepdim=True)
            key = (int(summed.shape[-2]), int(summed.shape[-1]))
            by_size[key] = summed if key not in by_size else by_size[key] + summed
        for key, summed in by_size.items():
            if key != size:
                summed = F.interpolate(summed, size=size, mode="bilinear", align_corners=align)
            cam = cam + summed[:, 0]
        return scores, cam, resolved

    def metadata(self) -> dict[str, Any]:
        meta = {**super().metadata(), "variant": self.variant, "bias_layers": len(self.bias_layer_names)}
        if self.input_offset is not None:
            meta["input_offset"] = torch.as_tensor(self.input_offset).flatten().tolist()
        return meta


__all__ = ["FullGrad", "bias_layers", "effective_bias"]
