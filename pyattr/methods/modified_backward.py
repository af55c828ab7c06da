"""Modified ReLU backward rules (Guided Backpropagation, DeconvNet), scoped to one forward pass.

A ReLU's true backward passes ``g * [x > 0]``. The two rules replace it with

- ``"guided"`` (Springenberg et al. 2015, arXiv:1412.6806): ``max(g, 0) * [x > 0]``;
- ``"deconv"`` (Zeiler & Fergus 2014, arXiv:1311.2901): ``max(g, 0)`` (the forward mask is ignored).

The rule is a ``torch.autograd.Function`` whose backward is written with forward ops (clamp, where),
so a traced attribution graph holds no backward op and no hook. :func:`modified_relu` is a
``TorchFunctionMode`` active only for the body of its ``with`` block: it reroutes every ReLU call
made in Python — ``nn.ReLU`` (in place or not), ``F.relu``, ``F.relu_``, ``torch.relu``,
``torch.relu_``, ``Tensor.relu``, ``Tensor.relu_`` — to that Function. Nothing is attached to the
model; ReLUs inside TorchScript-compiled submodules are not seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

RULES = ("guided", "deconv")

_RELU = frozenset({F.relu, torch.relu, torch.Tensor.relu})
_RELU_INPLACE = frozenset({torch.relu_, torch.Tensor.relu_})


class _ModifiedReLU(torch.autograd.Function):
    """ReLU forward; backward by ``rule``. In place (``mark_dirty``) when ``inplace``. Written with
    ``setup_context`` so that ``torch.func`` transforms (``vjp`` in a loop body: :mod:`pyattr._loop`) accept it."""

    @staticmethod
    def forward(x: torch.Tensor, rule: str, inplace: bool) -> torch.Tensor:
        if inplace:
            return x.clamp_min_(0)
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, rule, inplace = inputs
        ctx.rule = rule
        if rule == "guided":
            ctx.save_for_backward(output > 0)  # output > 0 exactly where x > 0, also after an in-place update
        if inplace:
            ctx.mark_dirty(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        positive = grad.clamp_min(0)
        if ctx.rule == "guided":
            (mask,) = ctx.saved_tensors
            positive = torch.where(mask, positive, 0.0)
        return positive, None, None


class _ReLURule(TorchFunctionMode):
    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU or func in _RELU_INPLACE:
            x = args[0] if args else kwargs["input"]
            inplace = func in _RELU_INPLACE
            if func is F.relu:
                inplace = bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
            return _ModifiedReLU.apply(x, self.rule, inplace)
        return func(*args, **kwargs)


@contextmanager
def modified_relu(rule: str | None) -> Iterator[None]:
    """Within the block, every ReLU call uses the backward ``rule`` (``"guided"``, ``"deconv"``;
    ``None``: unchanged). The forward values are those of ReLU.

    Example:
        >>> x = torch.tensor([-1.0, 2.0], requires_grad=True)
        >>> with modified_relu("guided"):
        ...     y = torch.relu(x)
        >>> torch.autograd.grad((y * torch.tensor([3.0, -4.0])).sum(), x)[0]
        tensor([0., 0.])
    """
    if rule is None:
        yield
        return
    if rule not in RULES:
        raise ValueError(f"unknown ReLU rule {rule!r}; use one of {', '.join(RULES)}")
    with _ReLURule(rule):
        yield
