r"""The DeepLIFT family: DeepLIFT (Rescale rule), DeepLIFT-SHAP and GradientSHAP.

DeepLIFT (Shrikumar, Greenside & Kundaje 2017, arXiv:1704.02685) explains the difference
``F(x) - F(x_ref)`` between an input and a reference (baseline). It back-propagates *multipliers*
instead of gradients: every non-linearity ``y = f(u)`` passes back

.. math:: g_u = g_y \cdot \frac{f(u) - f(u_{ref})}{u - u_{ref}}

(the plain derivative where :math:`|u - u_{ref}| <` ``eps``), linear layers (convolutions, linear
layers, batch norm in eval mode, average pooling, sums) keep their gradient. The attribution is
:math:`(x - x_{ref}) \odot m` and adds up to the score difference (summation-to-delta), exactly
for networks whose non-linearities all follow the rule.

How it runs here (captum's ``DeepLift`` semantics, ``multiply_by_inputs=True``): the input and its
reference go through the model in ONE forward pass, paired sample-major in the batch (rows
``2n`` and ``2n + 1``), and :func:`deeplift_rules` — a ``TorchFunctionMode`` active for that
forward pass only — reroutes every non-linearity it knows to a ``torch.autograd.Function`` whose
backward is the rule written with forward ops (so an exported graph holds no backward op and no
hook). Nothing is attached to the model. Rules:

- Rescale for ReLU (``nn.ReLU`` in place or not, ``F.relu``, ``F.relu_``, ``torch.relu``,
  ``torch.relu_``, ``Tensor.relu``, ``Tensor.relu_``), LeakyReLU, ELU, Sigmoid, Tanh, Softplus
  (captum's non-linear list) and GELU, SiLU (beyond captum's list);
- captum's max-pool rule for ``max_pool1d/2d/3d`` (``nn.MaxPool*``, ``F.max_pool*``): the score
  difference of a window ``max(y, y_ref) - y_ref`` goes to the arg-max of the input's window and
  ``y - max(y, y_ref)`` to the arg-max of the reference's window, then is divided by
  ``u - u_ref``. Where windows overlap (resnet's 3x3 / stride 2 pool) an input position that is the
  arg-max of several windows receives the sum of their shares (the max-pool backward's scatter-add);
  captum's ``max_unpool`` keeps one of them, which breaks summation-to-delta (see docs/deeplift.md).

Differences from captum, by design: captum changes only *modules* of the listed types, each used
once; here every call of the function is changed, whether it comes from a module (reused or not)
or from ``F.relu`` in a ``forward``. Not covered (plain gradient, as in captum): ``hardtanh``/ReLU6,
hardswish, mish, softmax, adaptive max pooling, and non-linearities applied to tensors whose first
dim is not the paired batch (e.g. to parameters, or to activations reshaped to (N*L, D)).

DeepLIFT-SHAP (Lundberg & Lee 2017, arXiv:1705.07874) averages DeepLIFT over B baselines;
GradientSHAP (same paper; captum's ``GradientShap``) averages ``(x + noise - b) * grad F`` at random
points ``b + alpha (x + noise - b)`` over random baselines ``b``, alphas and noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
from torch.nn.modules.utils import _ntuple
from torch.overrides import TorchFunctionMode

from ..errors import InputError
from ..targets.base import CLASS_TARGET, current_target
from .base import OutputSelector, check_scores, select_output
from .gradient import GradientMethod, _sample_range, seeded_tensor

EPS = 1e-10
"""captum's threshold: where ``|u - u_ref| < eps`` a non-linearity passes back its plain derivative."""

MAXPOOL_RULES = ("deeplift", "gradient")

_SQRT_2_OVER_PI = 0.7978845608028654
_INV_SQRT_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


# -- the element-wise non-linearities: forward and plain derivative (forward ops) -------------------------
def _forward(kind: str, x: torch.Tensor, p: tuple) -> torch.Tensor:
    if kind == "relu":
        return x.clamp_min(0)
    if kind == "leaky_relu":
        return F.leaky_relu(x, p[0])
    if kind == "elu":
        return F.elu(x, p[0])
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "tanh":
        return torch.tanh(x)
    if kind == "softplus":
        return F.softplus(x, p[0], p[1])
    if kind == "gelu":
        return F.gelu(x, approximate=p[0])
    if kind == "silu":
        return F.silu(x)
    raise AssertionError(kind)


def _derivative(kind: str, x: torch.Tensor, y: torch.Tensor, p: tuple) -> torch.Tensor:
    """f'(x) of the non-linearity ``kind`` (``y = f(x)``), written with forward ops."""
    one = torch.ones_like(x)
    if kind == "relu":
        return (x > 0).to(x.dtype)
    if kind == "leaky_relu":
        return torch.where(x > 0, one, one * p[0])
    if kind == "elu":
        return torch.where(x > 0, one, y + p[0])
    if kind == "sigmoid":
        return y * (1 - y)
    if kind == "tanh":
        return 1 - y * y
    if kind == "softplus":
        bx = x * p[0]
        return torch.where(bx > p[1], one, torch.sigmoid(bx))
    if kind == "gelu":
        if p[0] == "tanh":
            t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
        return 0.5 * (1 + torch.erf(x * _INV_SQRT_2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    if kind == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    raise AssertionError(kind)


def _pairs(t: torch.Tensor) -> torch.Tensor:
    """(2P, ...) rows (input, reference, input, reference, ...) -> (P, 2, ...)."""
    return t.unflatten(0, (-1, 2))


class _Rescale(torch.autograd.Function):
    """``f`` forward on the paired batch; backward: the Rescale multiplier, shared by both rows of a pair."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kind: str, params: tuple, inplace: bool, eps: float) -> torch.Tensor:
        ctx.kind, ctx.params, ctx.eps = kind, params, eps
        if inplace:
            before = x.clone()
            y = _forward(kind, before, params)
            ctx.mark_dirty(x)
            ctx.save_for_backward(before, y)
            return x.copy_(y)
        y = _forward(kind, x, params)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # ReLU / LeakyReLU: the ratio from u alone (exactly 1 or the slope when both sides agree); the smooth
        # functions: from the forward pass's values (captum's), whose last bits the ratio amplifies where u ~ u_ref
        x, y = (_pairs(t) for t in ctx.saved_tensors)
        kind, p = ctx.kind, ctx.params
        dx = x[:, 0] - x[:, 1]
        small = (dx.abs() < ctx.eps)[:, None]
        if kind in ("relu", "leaky_relu"):  # piecewise linear: 1 / slope exactly on one side, the ratio across 0
            slope = 0.0 if kind == "relu" else p[0]
            pos = x > 0
            across = (torch.where(pos, x, x * slope).diff(dim=1)[:, 0] / -dx)[:, None]
            same = torch.where(pos[:, :1], torch.ones_like(across), torch.full_like(across, slope))
            ratio = torch.where(pos[:, :1] == pos[:, 1:], same, across)
            one = torch.ones_like(x)
            plain = torch.where(pos, one, one * slope)
            multiplier = torch.where(small, plain, ratio)
        else:
            ratio = ((y[:, 0] - y[:, 1]) / dx)[:, None]
            multiplier = torch.where(small, _derivative(kind, x, y, p), ratio)
        return (_pairs(grad) * multiplier).flatten(0, 1), None, None, None, None


TIE_RTOL = 1e-5
"""Max-pool ties: the values of a window within ``TIE_RTOL * max |u|`` (the largest magnitude of that row's pool
input) of the window's maximum share its multiplier equally (see :class:`_MaxPoolRule`)."""


def _tie_scatter(values: list[torch.Tensor], x: torch.Tensor, out: torch.Tensor, kernel, stride, padding,
                 dilation, tol: torch.Tensor) -> list[torch.Tensor]:
    """Each of ``values`` (R, C, *O), one number per max-pool window, sent back to the window's maximal inputs:
    the positions of ``x`` (R, C, *S) whose value is within ``tol`` (R, 1, ...) of the window's maximum ``out``
    share it equally; a position in several windows receives the sum (the max-pool backward's scatter-add).

    Forward ops only: the k window offsets are strided slices of ``x`` padded with -inf; the scatter-add is one
    transposed convolution with one-hot kernels (offset j's values go to offset j of each window)."""
    d = x.dim() - 2
    spatial, outs = x.shape[2:], out.shape[2:]
    need = [(o - 1) * s + dl * (k - 1) + 1 for o, s, dl, k in zip(outs, stride, dilation, kernel)]
    pads: list[int] = []
    for i in reversed(range(d)):  # F.pad's order: last dim first; enough on the right for every window
        pads += [padding[i], max(0, need[i] - spatial[i] - padding[i])]
    padded = F.pad(x, pads, value=float("-inf"))
    floor = out - tol
    masks = []
    for offset in _offsets(kernel):
        index = tuple(slice(a * dl, a * dl + (o - 1) * s + 1, s) for a, dl, o, s in zip(offset, dilation, outs, stride))
        masks.append(padded[(..., *index)] >= floor)
    mask = torch.stack(masks, 2).to(x.dtype)  # (R, C, k, *O)
    share = mask / mask.sum(2, keepdim=True)
    count = len(masks)
    with unset_fake_temporarily(), disable_proxy_modes_tracing():  # a constant of the graph, not ops
        eye = torch.eye(count, dtype=x.dtype, device=x.device).view(count, 1, *kernel)
    natural = [(o - 1) * s - 2 * p + dl * (k - 1) + 1 for o, s, p, dl, k in zip(outs, stride, padding, dilation, kernel)]
    extra = [max(0, n - sz) for n, sz in zip(natural, spatial)]  # ceil mode: windows past the end (cropped)
    out_pad = [sz + e - n for sz, e, n in zip(spatial, extra, natural)]
    transposed = F.conv_transpose3d if d == 3 else F.conv_transpose2d
    rows, channels = x.shape[0], x.shape[1]
    stacked = torch.cat([(v[:, :, None] * share) for v in values], 0).flatten(0, 1)  # (len * R * C, k, *O)
    placed = transposed(stacked, eye, stride=tuple(stride), padding=tuple(padding), output_padding=tuple(out_pad),
                        dilation=tuple(dilation))
    if any(extra):
        placed = placed[(..., *(slice(0, sz) for sz in spatial))]
    return list(placed.view(len(values), rows, channels, *spatial).unbind(0))


def _offsets(kernel) -> list[tuple[int, ...]]:
    grid = [()]
    for k in kernel:
        grid = [(*g, a) for g in grid for a in range(k)]
    return grid


class _MaxPoolRule(torch.autograd.Function):
    """Max pooling forward on the paired batch; backward: captum's DeepLIFT max-pool rule, ties shared.

    A window's share of the score difference goes to its arg-max; where several inputs of a window are equal up
    to ``TIE_RTOL`` times the row's largest ``|u|`` (flat image regions make exact ties, which backends that
    round differently would break either way) they share it equally, so that eager and exported graphs agree
    (torch and captum send it to the first one)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, d: int, kernel, stride, padding, dilation, ceil_mode: bool, eps: float):
        pool = F.max_pool3d if d == 3 else F.max_pool2d
        out = pool(x, kernel, stride, padding, dilation, ceil_mode)
        ctx.args = (kernel, stride, padding, dilation)
        ctx.eps = eps
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, out = ctx.saved_tensors
        xp, yp = _pairs(x), _pairs(out)
        dx = xp[:, 0] - xp[:, 1]
        cross = torch.maximum(yp[:, 0], yp[:, 1])
        dy = torch.stack([cross - yp[:, 1], yp[:, 0] - cross], 1).flatten(0, 1)
        tol = TIE_RTOL * x.detach().abs().flatten(1).amax(1).view(-1, *[1] * (x.dim() - 1))
        shares, plain = _tie_scatter([grad * dy, grad], x, out, *ctx.args, tol)
        shares = _pairs(shares)
        ratio = ((shares[:, 0] + shares[:, 1]) / dx)[:, None]
        small = (dx.abs() < ctx.eps)[:, None]
        new = torch.where(small, _pairs(plain), ratio)
        return new.flatten(0, 1), None, None, None, None, None, None, None


_RELU = frozenset({F.relu, torch.relu, torch.Tensor.relu})
_RELU_INPLACE = frozenset({torch.relu_, torch.Tensor.relu_})
_SIMPLE = {torch.sigmoid: ("sigmoid", False), torch.Tensor.sigmoid: ("sigmoid", False),
           torch.sigmoid_: ("sigmoid", True), torch.Tensor.sigmoid_: ("sigmoid", True),
           torch.tanh: ("tanh", False), torch.Tensor.tanh: ("tanh", False),
           torch.tanh_: ("tanh", True), torch.Tensor.tanh_: ("tanh", True)}
_POOLS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
          torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3}


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


class _DeepLiftMode(TorchFunctionMode):
    def __init__(self, rows: Any, eps: float, maxpool: str):
        super().__init__()
        self.rows = rows
        self.eps = eps
        self.maxpool = maxpool

    def paired(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == self.rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = self.rule(func, args, kwargs)
        if rule is None:
            return func(*args, **kwargs)
        return rule()

    def rule(self, func, args: tuple, kwargs: dict):
        x = args[0] if args else kwargs.get("input")
        if not self.paired(x):
            return None
        eps = self.eps
        if func in _RELU or func in _RELU_INPLACE:
            inplace = func in _RELU_INPLACE or (func is F.relu and bool(_arg(args, kwargs, 1, "inplace", False)))
            return lambda: _Rescale.apply(x, "relu", (), inplace, eps)
        if func in _SIMPLE:
            kind, inplace = _SIMPLE[func]
            return lambda: _Rescale.apply(x, kind, (), inplace, eps)
        if func is F.leaky_relu:
            p = (float(_arg(args, kwargs, 1, "negative_slope", 0.01)),)
            return lambda: _Rescale.apply(x, "leaky_relu", p, bool(_arg(args, kwargs, 2, "inplace", False)), eps)
        if func is F.elu:
            p = (float(_arg(args, kwargs, 1, "alpha", 1.0)),)
            return lambda: _Rescale.apply(x, "elu", p, bool(_arg(args, kwargs, 2, "inplace", False)), eps)
        if func is F.softplus:
            p = (float(_arg(args, kwargs, 1, "beta", 1.0)), float(_arg(args, kwargs, 2, "threshold", 20.0)))
            return lambda: _Rescale.apply(x, "softplus", p, False, eps)
        if func is F.gelu:
            p = (str(_arg(args, kwargs, 1, "approximate", "none")),)
            return lambda: _Rescale.apply(x, "gelu", p, False, eps)
        if func is F.silu:
            return lambda: _Rescale.apply(x, "silu", (), bool(_arg(args, kwargs, 1, "inplace", False)), eps)
        d = _POOLS.get(func)
        if d is not None and self.maxpool == "deeplift":
            return self.pool_rule(func, d, x, args, kwargs)
        return None

    def pool_rule(self, func, d: int, x: torch.Tensor, args: tuple, kwargs: dict):
        if func in (F.max_pool1d, F.max_pool2d, F.max_pool3d) and bool(_arg(args, kwargs, 6, "return_indices", False)):
            return None  # the caller wants the indices: left as it is (plain gradient)
        tup = _ntuple(d)
        kernel = tup(_arg(args, kwargs, 1, "kernel_size", None))
        stride = _arg(args, kwargs, 2, "stride", None)
        stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else tup(stride)
        padding = tup(_arg(args, kwargs, 3, "padding", 0))
        dilation = tup(_arg(args, kwargs, 4, "dilation", 1))
        ceil_mode = bool(_arg(args, kwargs, 5, "ceil_mode", False))
        eps = self.eps
        if d == 1:  # as a 2-D pool over a height of 1
            def run():
                out = _MaxPoolRule.apply(x.unsqueeze(-2), 2, (1, *kernel), (1, *stride), (0, *padding),
                                         (1, *dilation), ceil_mode, eps)
                return out.squeeze(-2)
            return run
        return lambda: _MaxPoolRule.apply(x, d, kernel, stride, padding, dilation, ceil_mode, eps)


@contextmanager
def deeplift_rules(rows: Any, eps: float = EPS, maxpool: str = "deeplift") -> Iterator[None]:
    """Within the block, every non-linearity applied to a tensor of ``rows`` rows (pairs of an input and its
    reference, sample-major: rows 2p and 2p + 1) passes back DeepLIFT's multipliers instead of its gradient
    (Rescale rule; captum's max-pool rule, or the plain max-pool gradient with ``maxpool="gradient"``).
    Forward values are unchanged.

    Example:
        >>> u = torch.tensor([[2.0], [-1.0]], requires_grad=True)   # an input 2, its reference -1
        >>> with deeplift_rules(rows=2):
        ...     y = torch.relu(u)
        >>> torch.autograd.grad(y.sum(), u)[0]                      # (relu(2) - relu(-1)) / (2 - (-1))
        tensor([[0.6667],
                [0.6667]])
    """
    if maxpool not in MAXPOOL_RULES:
        raise InputError(f"unknown max-pool rule {maxpool!r}; use one of {', '.join(MAXPOOL_RULES)}")
    with _DeepLiftMode(rows, float(eps), maxpool):
        yield


# -- the methods ---------------------------------------------------------------------------------------------
class _PairedMethod(GradientMethod):
    """DeepLIFT's paired pass, shared by :class:`DeepLift` and :class:`DeepLiftShap`."""

    signed_evidence = True
    default_reduction = "sum"

    def __init__(self, model: nn.Module, reduction: str, absolute: bool | None, eps: float, maxpool: str, *,
                 output: OutputSelector, layout: str):
        super().__init__(model, reduction, absolute, output=output, layout=layout)
        if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps >= 0):
            raise InputError(f"eps must be a number >= 0, got {eps!r}")
        if maxpool not in MAXPOOL_RULES:
            raise InputError(f"unknown max-pool rule {maxpool!r}; use one of {', '.join(MAXPOOL_RULES)}")
        self.eps = float(eps)
        self.maxpool = maxpool

    def paired_pass(self, x: torch.Tensor, refs: torch.Tensor, target: torch.Tensor, resolved: torch.Tensor | None):
        """DeepLIFT of inputs ``x`` (N, ...) against ``c`` references each, ``refs`` (N, c, ...), in one forward
        pass of 2 N c rows and one backward pass per target column.

        Returns: scores of ``x`` (N, K), the attributions summed over the c references (N, T, ...), the resolved
        targets (N, T) (``resolved`` when given, else ``target`` resolved on the scores of ``x``) and the score
        differences F(x) - F(ref) summed over the references (N, T)."""
        n, c = refs.shape[0], refs.shape[1]
        pairs = torch.stack([x[:, None].expand_as(refs), refs], 2).flatten(0, 2).detach().requires_grad_(True)
        bound = current_target()
        old = None if bound is None else bound.repeats
        if bound is not None:  # the first row of each sample is the input: the target's outputs are read there
            bound.repeats = old * 2 * c
        try:
            with deeplift_rules(pairs.shape[0], self.eps, self.maxpool):
                out = self._paired_scores(pairs, x, bound)
        finally:
            if bound is not None:
                bound.repeats = old
        grouped = out.view(n, c, 2, out.shape[1])
        scores = grouped[:, 0, 0]
        if resolved is None:
            resolved = self.resolve(scores.detach(), target)
        columns = resolved.shape[1]
        selected = out.gather(1, resolved.repeat_interleave(2 * c, 0))  # (2Nc, T): input and reference rows
        grads = [torch.autograd.grad(selected[:, j].sum(), pairs, retain_graph=j + 1 < columns)[0]
                 for j in range(columns)]
        g = torch.stack(grads, 1).view(n, c, 2, columns, *x.shape[1:])[:, :, 0]  # (N, c, T, ...)
        attr = ((x[:, None] - refs)[:, :, None] * g).sum(1)
        sel = selected.detach().view(n, c, 2, columns)
        gap = (sel[:, :, 0] - sel[:, :, 1]).sum(1)
        return scores.detach(), attr, resolved, gap

    def _paired_scores(self, pairs: torch.Tensor, x: torch.Tensor, bound) -> torch.Tensor:
        """:meth:`scores_of` on the paired batch; eager calls check the inputs' rows first, so that a message
        about non-finite scores counts the caller's inputs, then the references' rows."""
        if bound is not None and bound.target is not CLASS_TARGET:
            return self.scores_of(pairs)
        out = select_output(self.model(pairs), self.output)
        if not self._tracing:
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == pairs.shape[0]:
                check_scores(out.unflatten(0, (x.shape[0], -1))[:, 0], x, self.output)
            check_scores(out, pairs, self.output)
        return out

    def elementwise(self, x, target):
        scores, attr, resolved, _ = self._run(x, target)
        return scores, self._abs(attr), resolved

    def elementwise_with_diagnostics(self, x, target):
        scores, attr, resolved, error = self._run(x, target)
        return scores, self._abs(attr), resolved, {"completeness_error": error}

    def _run(self, x: torch.Tensor, target: torch.Tensor):
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "eps": self.eps, "maxpool": self.maxpool}


def _check_baselines(b: torch.Tensor, what: str) -> torch.Tensor:
    if not b.is_floating_point():
        raise InputError(f"{what} must be floating point, got {b.dtype}")
    if not bool(torch.isfinite(b).all()):
        raise InputError(f"{what} hold NaN or infinite values; give finite reference inputs")
    return b.detach()


class DeepLift(_PairedMethod):
    r"""DeepLIFT with the Rescale rule (Shrikumar, Greenside & Kundaje 2017, arXiv:1704.02685).

    .. math:: A = (x - x_{ref}) \odot m, \qquad \sum A = S_t(x) - S_t(x_{ref})

    where :math:`m` is the gradient of the target score with every non-linearity's derivative replaced by
    :math:`(f(u) - f(u_{ref})) / (u - u_{ref})` (see :mod:`pyattr.methods.deeplift`; captum's ``DeepLift``
    with ``multiply_by_inputs=True``). The input and the baseline go through the model in one forward pass
    (a batch of 2N) and one backward pass per target. Summation-to-delta holds exactly (up to rounding)
    for networks whose non-linearities all follow a rule (ReLU, max pooling, ...) and whose other layers
    are linear; eager calls report ``|sum A - (S_t(x) - S_t(x_ref))|`` per sample as
    ``result.completeness_error`` (no extra pass: both scores come from the paired pass).

    Args:
        model: a module mapping inputs to (N, K) scores.
        baseline: the reference input: ``"zeros"`` (default), a number (a constant input), or a tensor that
            broadcasts to the inputs (one input's shape, (1, ...), or (N, ...) for eager calls).
        reduction, absolute: the channel reduction (default the signed ``"sum"``, so that the map adds up to
            the score difference) and whether ``|A|`` is taken first (default no).
        eps: where ``|u - u_ref| < eps`` a non-linearity passes back its plain derivative (captum's 1e-10).
        maxpool: ``"deeplift"`` (default: captum's max-pool rule, summation-to-delta holds) or ``"gradient"`` (the
            plain max-pool gradient: what captum 0.9 computes in effect when a hooked ReLU feeds the pool, as in
            VGG and ResNet stems; its sums then miss the score difference, see docs/deeplift.md).
        output, layout: as :class:`~pyattr.Saliency`.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> result = pyattr.DeepLift(model)(torch.rand(2, 3, 64, 64), target=1)
        >>> result.raw.shape, bool(result.completeness_error.max() < 1e-3)
        (torch.Size([2, 64, 64]), True)
    """

    name = "deeplift"

    def __init__(self, model: nn.Module, baseline: str | float | torch.Tensor = "zeros", reduction: str = "sum",
                 absolute: bool | None = None, *, eps: float = EPS, maxpool: str = "deeplift",
                 output: OutputSelector = None, layout: str = "image"):
        super().__init__(model, reduction, absolute, eps, maxpool, output=output, layout=layout)
        if isinstance(baseline, torch.Tensor):
            baseline = _check_baselines(baseline, "the baseline")
        elif isinstance(baseline, bool) or not (baseline == "zeros" or isinstance(baseline, (int, float))):
            raise InputError(f"unknown baseline {baseline!r}; use 'zeros', a number or a tensor shaped like the inputs")
        self.baseline = baseline

    def baseline_of(self, x: torch.Tensor) -> torch.Tensor:
        """The reference for inputs ``x``, shaped like ``x``."""
        if isinstance(self.baseline, torch.Tensor):
            b = self.baseline.to(device=x.device, dtype=x.dtype)
            if not self._tracing:
                try:
                    if torch.broadcast_shapes(b.shape, x.shape) != x.shape:
                        raise RuntimeError
                except RuntimeError:
                    raise InputError(f"the baseline's shape {tuple(b.shape)} does not broadcast to the inputs' "
                                     f"{tuple(x.shape)}; give one input's shape, (1, ...) or (N, ...)") from None
            return b.expand_as(x)
        if self.baseline == "zeros":
            return torch.zeros_like(x)
        return torch.full_like(x, float(self.baseline))

    def _run(self, x, target):
        refs = self.baseline_of(x).detach()[:, None]
        scores, attr, resolved, gap = self.paired_pass(x, refs, target, None)
        return scores, attr, resolved, (attr.detach().flatten(2).sum(2) - gap).abs()

    def metadata(self) -> dict[str, Any]:
        baseline = "tensor" if isinstance(self.baseline, torch.Tensor) else self.baseline
        return {**super().metadata(), "baseline": baseline}


def _baseline_distribution(baselines: Any, what: str) -> int | torch.Tensor:
    if isinstance(baselines, torch.Tensor):
        b = _check_baselines(baselines, what)
        if b.dim() < 2:
            raise InputError(f"{what} must be a (B, ...) tensor of B reference inputs, got shape {tuple(b.shape)}")
        if b.shape[0] == 0:
            raise InputError(f"{what} hold no reference input (shape {tuple(b.shape)}); give B >= 1 baselines, "
                             "(B, C, H, W) for images, or an int B for B seeded random baselines")
        return b
    if isinstance(baselines, bool) or not isinstance(baselines, int) or baselines < 1:
        raise InputError(f"{what} must be a (B, ...) tensor or an int B >= 1 (B seeded random baselines), "
                         f"got {baselines!r}")
    return baselines


class _Distribution:
    """A baseline distribution: a (B, ...) tensor, or B baselines of uniform noise over each input's
    [min, max] drawn from ``seed`` (the same noise for every input, as Integrated Gradients' "uniform")."""

    def __init__(self, baselines: int | torch.Tensor, seed: int):
        self.baselines = baselines
        self.seed = seed
        self.count = baselines if isinstance(baselines, int) else int(baselines.shape[0])

    def of(self, method: GradientMethod, x: torch.Tensor) -> torch.Tensor:
        """The baselines for inputs ``x`` (N, ...): (1, B, ...) when the same for every input, else (N, B, ...)."""
        if isinstance(self.baselines, torch.Tensor):
            b = self.baselines.to(device=x.device, dtype=x.dtype)
            if not method._tracing:
                try:
                    ok = b.dim() == x.dim() and torch.broadcast_shapes(b.shape[1:], x.shape[1:]) == x.shape[1:]
                except RuntimeError:
                    ok = False
                if not ok:
                    raise InputError(f"the baselines' shape {tuple(b.shape)} does not fit the inputs' "
                                     f"{tuple(x.shape)}: give (B, {', '.join(str(s) for s in x.shape[1:])})")
            return b.expand(-1, *x.shape[1:])[None]
        noise = method.constant("uniform", (self.count, *x.shape[1:]), self.seed, x)
        low = x.flatten(1).amin(1).view(-1, 1, *[1] * (x.dim() - 1))
        return low + _sample_range(x)[:, None] * noise[None]

    def meta(self) -> Any:
        return "tensor" if isinstance(self.baselines, torch.Tensor) else self.baselines


class DeepLiftShap(_PairedMethod):
    r"""DeepLIFT-SHAP (Lundberg & Lee 2017, arXiv:1705.07874; captum's ``DeepLiftShap``): DeepLIFT averaged over
    a distribution of B baselines :math:`b_k`.

    .. math:: A = \frac1B \sum_k (x - b_k) \odot m(x, b_k), \qquad
              \sum A = S_t(x) - \frac1B \sum_k S_t(b_k)

    (exact for networks whose non-linearities all follow a rule; eager calls report the error per sample as
    ``result.completeness_error``). ``chunk_size`` baselines per input go through the model in one paired pass
    of 2 N chunk_size rows; ``ceil(B / chunk_size)`` passes in all. Unlike captum, a single baseline is allowed
    (it is :class:`DeepLift`).

    Args:
        model: a module mapping inputs to (N, K) scores.
        baselines: a (B, ...) tensor of reference inputs (B >= 1, each the shape of one input, or broadcasting
            to it), or an int B (default 16): B baselines of uniform noise over each input's [min, max], drawn
            once from ``seed`` (CPU generator) and the same for every input, held by an exported graph as a
            constant.
        chunk_size: baselines per input in one pass.
        reduction, absolute, eps, maxpool, output, layout: as :class:`DeepLift`.
        seed: seed of the random baselines (an int ``baselines``).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> background = torch.rand(8, 3, 64, 64)
        >>> result = pyattr.DeepLiftShap(model, background)(torch.rand(2, 3, 64, 64), target=0)
        >>> result.maps.shape
        torch.Size([2, 64, 64])
    """

    name = "deepliftshap"

    def __init__(self, model: nn.Module, baselines: int | torch.Tensor = 16, chunk_size: int = 8,
                 reduction: str = "sum", absolute: bool | None = None, *, eps: float = EPS, maxpool: str = "deeplift",
                 seed: int = 0, output: OutputSelector = None, layout: str = "image"):
        super().__init__(model, reduction, absolute, eps, maxpool, output=output, layout=layout)
        if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1):
            raise InputError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.distribution = _Distribution(_baseline_distribution(baselines, "baselines"), int(seed))
        self.chunk_size = chunk_size
        self.seed = int(seed)

    def _run(self, x, target):
        refs = self.distribution.of(self, x).detach()
        count = self.distribution.count
        total = gap = resolved = scores = None
        for start in range(0, count, self.chunk_size):
            part = refs[:, start:start + self.chunk_size]
            part = part.expand(x.shape[0], *part.shape[1:])
            s, attr, resolved, g = self.paired_pass(x, part, target, resolved)
            scores = s if scores is None else scores
            total = attr if total is None else total + attr
            gap = g if gap is None else gap + g
        attr = total / count
        return scores, attr, resolved, (attr.detach().flatten(2).sum(2) - gap / count).abs()

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "baselines": self.distribution.meta(), "chunk_size": self.chunk_size,
                "seed": self.seed}


class GradientShap(GradientMethod):
    r"""GradientSHAP (Lundberg & Lee 2017, arXiv:1705.07874; captum's ``GradientShap``): expected gradients
    times (input - baseline), with noise on the input.

    For S samples :math:`s`: a baseline :math:`b_s` drawn from the distribution, :math:`\alpha_s \sim U(0, 1)`,
    noise :math:`\epsilon_s \sim N(0, \text{stdevs}^2)`; with :math:`\tilde x_s = x + \epsilon_s`,

    .. math:: A = \frac1S \sum_s (\tilde x_s - b_s) \odot
              \nabla S_t\big(\alpha_s \tilde x_s + (1 - \alpha_s) b_s\big)

    which is captum's ``GradientShap`` (a ``NoiseTunnel`` over ``InputBaselineXGradient``) with these draws. Its
    expectation satisfies :math:`E[\sum A] \approx S_t(x) - E_b[S_t(b)]` (for ``stdevs = 0``), only on average.

    Draws: the S baseline indices, alphas and noise tensors (one input's shape) come from one CPU
    ``torch.Generator`` seeded with ``seed``, once, and are the same for every input of a batch (captum draws
    per row from NumPy's global generator); an exported graph holds them as constants, so eager and exported
    results agree and an input's map does not depend on the rest of its batch. The target is resolved on the
    clean input and ``scores`` are its (one extra forward pass). ``chunk_size`` samples per input are batched
    in one forward + backward pass; ``ceil(S / chunk_size)`` passes in all.

    Args:
        model: a module mapping inputs to (N, K) scores.
        baselines: a (B, ...) tensor of reference inputs, or an int B (default 16) of seeded uniform-noise
            baselines over each input's [min, max] (as :class:`DeepLiftShap`).
        samples: S, the number of random points per input (captum's ``n_samples``).
        stdevs: the standard deviation of the noise added to the input (absolute, captum's ``stdevs``; default 0).
        chunk_size: samples per input in one pass.
        reduction, absolute: as :class:`DeepLift`.
        seed: seed of every draw.
        output, layout: as :class:`~pyattr.Saliency`.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> gs = pyattr.GradientShap(model, torch.rand(8, 3, 64, 64), samples=16, stdevs=0.05)
        >>> gs(torch.rand(2, 3, 64, 64), target=0).maps.shape
        torch.Size([2, 64, 64])
    """

    name = "gradientshap"
    signed_evidence = True
    default_reduction = "sum"

    def __init__(self, model: nn.Module, baselines: int | torch.Tensor = 16, samples: int = 16,
                 stdevs: float = 0.0, chunk_size: int = 16, reduction: str = "sum", absolute: bool | None = None, *,
                 seed: int = 0, output: OutputSelector = None, layout: str = "image"):
        super().__init__(model, reduction, absolute, output=output, layout=layout)
        if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1):
            raise InputError(f"samples must be an int >= 1, got {samples!r}")
        if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1):
            raise InputError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if isinstance(stdevs, bool) or not isinstance(stdevs, (int, float)) or not stdevs >= 0:
            raise InputError(f"stdevs must be a number >= 0, got {stdevs!r}")
        self.distribution = _Distribution(_baseline_distribution(baselines, "baselines"), int(seed))
        self.samples = samples
        self.stdevs = float(stdevs)
        self.chunk_size = chunk_size
        self.seed = int(seed)
        self._draw_cache: dict[tuple, tuple[list[int], list[float], torch.Tensor]] = {}

    def draws(self, x: torch.Tensor) -> tuple[list[int], list[float], torch.Tensor]:
        """The S baseline indices, alphas and standard normal noise tensors (S, ...) for inputs like ``x``: the
        indices (``randint``) then the alphas (``rand``, float64) from ``torch.Generator().manual_seed(seed)``, the
        noise from :func:`~pyattr.methods.gradient.seeded_tensor` with ``seed + 1``."""
        key = (tuple(int(s) for s in x.shape[1:]), x.device, x.dtype)
        cached = self._draw_cache.get(key)
        if cached is None:
            with unset_fake_temporarily(), disable_proxy_modes_tracing():  # constants, not graph ops
                generator = torch.Generator().manual_seed(self.seed)
                index = torch.randint(self.distribution.count, (self.samples,), generator=generator).tolist()
                alpha = torch.rand(self.samples, generator=generator, dtype=torch.float64).tolist()
            noise = seeded_tensor("normal", (self.samples, *key[0]), self.seed + 1, x)
            cached = (index, alpha, noise)
            self._draw_cache = {key: cached}  # replaced whole (threads)
        return cached

    def elementwise(self, x, target):
        with torch.no_grad():
            scores = self.scores_of(x)
        resolved = self.resolve(scores, target)
        index, alpha, noise = self.draws(x)
        refs = self.distribution.of(self, x).detach()
        n = x.shape[0]
        view = (1, -1) + (1,) * (x.dim() - 1)
        total = None
        for start in range(0, self.samples, self.chunk_size):
            stop = min(start + self.chunk_size, self.samples)
            c = stop - start
            base = refs[:, index[start:stop]]  # (1 or N, c, ...)
            noisy = x[:, None] + self.stdevs * noise[None, start:stop] if self.stdevs else x[:, None]
            a = torch.tensor(alpha[start:stop], dtype=x.dtype, device=x.device).view(view)
            points = (a * noisy + (1 - a) * base).expand(n, c, *x.shape[1:]).flatten(0, 1)
            _, grads, _ = self.input_gradients(points, resolved.repeat_interleave(c, 0))
            part = ((noisy - base)[:, :, None] * grads.view(n, c, *grads.shape[1:])).sum(1)
            total = part if total is None else total + part
        return scores, self._abs(total / self.samples), resolved

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "baselines": self.distribution.meta(), "samples": self.samples,
                "stdevs": self.stdevs, "chunk_size": self.chunk_size, "seed": self.seed}
