"""Canonizers: bring a model into a form that LRP's rules apply to, for the duration of one call.

- :func:`merge_batch_norm` / :func:`batch_norm_pairs`: a BatchNorm that directly follows a convolution
  or linear layer is merged into it. Nothing is written to the model: the merged weights are computed
  functionally, and the layer's rule is applied at the BatchNorm's output with them.
- :func:`residual_sum` + :func:`canonical_blocks`: the residual blocks of torchvision's ResNets
  (``BasicBlock``, ``Bottleneck``) and of pyattr's ShapesNet get, for the duration of the call, a
  forward whose ``identity + out`` is :func:`residual_sum`, which splits the relevance in
  proportion to its two inputs: ``R_a = a * R / stabilize(a + b)``.
- :func:`out_of_place_activations`: in-place activations (``nn.ReLU(inplace=True)``) run out of
  place, so that their input keeps its own relevance.

The changes (a forward set on a block instance, an ``inplace`` flag) are made only on the modules of
a per-call view (:mod:`pyattr._callview`), never on the user's modules (which other threads may be
running); they are undone when the ``with`` block exits, also when it raises, and the view is dropped
after the call anyway. Modules that are not views (a shared TorchScript module) are left alone.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..._callview import is_view
from .rules import Stabilizer

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named leaf modules in registration order (depth first)."""
    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            yield name, module


def batch_norm_pairs(model: nn.Module) -> dict[str, str]:
    """``{batch_norm_name: linear_name}`` for every BatchNorm registered right after a convolution
    or linear leaf (registration order stands for the order of the forward pass; the call checks
    that the BatchNorm really reads the layer's output)."""
    pairs = {}
    previous: tuple[str, nn.Module] | None = None
    for name, module in leaves(model):
        if (
            previous is not None
            and isinstance(module, BATCH_NORM_TYPES)
            and isinstance(previous[1], LINEAR_TYPES)
        ):
            pairs[name] = previous[0]
        previous = (name, module)
    return pairs


def merge_batch_norm(layer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(layer(x))`` as one layer (eval-mode statistics), computed without
    touching either module: ``w' = w * s``, ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``."""
    weight = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(bn.running_mean)
    scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
    shift = -bn.running_mean.detach() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
        shift = shift * bn.weight.detach()
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    merged_weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
    merged_bias = bias * scale + shift
    return merged_weight, merged_bias


class _ResidualSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, epsilon: float) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.epsilon = epsilon
        return a + b

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):
        a, b = ctx.saved_tensors
        s = relevance / Stabilizer(ctx.epsilon)(a + b)
        return a * s, b * s, None


def residual_sum(a: torch.Tensor, b: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """``a + b`` whose backward splits the relevance in proportion to the two inputs."""
    return _ResidualSum.apply(a, b, epsilon)


def _torchvision_basic_block(self, x: torch.Tensor) -> torch.Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu(residual_sum(identity, out))


def _torchvision_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu(residual_sum(identity, out))


def _shapesnet_basic_block(self, x: torch.Tensor) -> torch.Tensor:
    out = self.relu1(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.blur(self.relu2(residual_sum(out, self.downsample(x))))


def _block_forwards() -> list[tuple[type, object]]:
    table: list[tuple[type, object]] = []
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        table += [(BasicBlock, _torchvision_basic_block), (Bottleneck, _torchvision_bottleneck)]
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    from ...zoo.model import BasicBlock as ShapesBasicBlock

    table.append((ShapesBasicBlock, _shapesnet_basic_block))
    return table


def canonical_forward(module: nn.Module):
    """The canonical forward for a known residual block type (exact type match: a subclass may have
    changed the forward), else ``None``."""
    for block_type, forward in _block_forwards():
        if type(module) is block_type:
            return forward
    return None


def _require_view(model: nn.Module) -> None:
    if not is_view(model):
        raise RuntimeError("LRP canonizers change modules: they act on a per-call view of the model only "
                           "(pyattr._callview.call_view), never on the model itself")


@contextmanager
def canonical_blocks(model: nn.Module) -> Iterator[list[str]]:
    """Known residual blocks of ``model`` (a per-call view) use their canonical forward in the body.
    Yields their names."""
    _require_view(model)
    changed: list[tuple[nn.Module, bool, object]] = []
    names = []
    try:
        for name, module in model.named_modules():
            forward = canonical_forward(module)
            if forward is not None and is_view(module):
                had = "forward" in module.__dict__
                changed.append((module, had, module.__dict__.get("forward")))
                module.forward = types.MethodType(forward, module)
                names.append(name)
        yield names
    finally:
        for module, had, previous in reversed(changed):
            if had:
                module.forward = previous
            else:
                del module.forward


@contextmanager
def out_of_place_activations(model: nn.Module) -> Iterator[None]:
    """Modules of ``model`` (a per-call view) with ``inplace=True`` (activations, dropout) run out of
    place in the body."""
    _require_view(model)
    changed = []
    try:
        for module in model.modules():
            if is_view(module) and getattr(module, "inplace", False) is True:
                changed.append(module)
                module.inplace = False
        yield
    finally:
        for module in changed:
            module.inplace = True
