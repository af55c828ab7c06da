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

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple
from torch.overrides import TorchFunctionMode

from .._callview import outside_trace, this_thread_traces
from .._loop import batched_loop, vjp_columns
from ..errors import InputError
from ..targets.base import CLASS_TARGET, current_target
from .base import (
    PER_POINT_BYTES,
    OutputSelector,
    check_pass,
    check_scores,
    check_upfront,
    input_draw_bytes,
    select_output,
)
from .gradient import (
    GradientMethod,
    _sample_range,
    constant_tensor,
    padded_passes,
    seeded_tensor,
    tensor_baseline,
)

try:
    from .. import _C as _core  # the compiled core: eager DeepLIFT's ReLU and max-pool rules
except ImportError:  # pragma: no cover - the torch formula is used instead (same values)
    _core = None

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


def _multiplier(kind: str, u: torch.Tensor, ur: torch.Tensor, y: torch.Tensor, yr: torch.Tensor, p: tuple,
                eps: float) -> torch.Tensor:
    """The Rescale multiplier of the non-linearity ``kind`` at ``u`` against its reference ``ur`` (``y``, ``yr``:
    their outputs): ``(y - yr) / (u - ur)``, the plain derivative ``f'(u)`` where ``|u - ur| < eps``.

    ReLU's ratio is exactly 1 (0) where both sides are positive (not): ``y - yr`` is then ``u - ur`` (0) to the
    bit. LeakyReLU passes back its slope itself where both sides agree (``(s u - s ur) / (u - ur)`` would carry
    rounding noise). The smooth functions use the forward values (captum's), whose last bits the ratio amplifies
    where ``u ~ ur``."""
    dx = u - ur
    ratio = (y - yr).div_(dx)
    if kind == "relu":
        plain = (u > 0).to(u.dtype)
    elif kind == "leaky_relu":
        pos = u > 0
        one = torch.ones_like(u)
        plain = torch.where(pos, one, one * p[0])
        ratio = torch.where(pos == (ur > 0), plain, ratio)
    else:
        plain = _derivative(kind, u, y, p)
    return torch.where(dx.abs_() < eps, plain, ratio)


def _core_threads() -> int:
    """Threads for the compiled rules: torch's intra-op setting, at most the machine's cores (the core starts its
    threads per call)."""
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _dense_flat(t: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of ``t``'s elements in memory order (contiguous or channels-last), else None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)  # a view: the permuted tensor is contiguous
    return None


def _compiled_ok(*tensors: torch.Tensor) -> bool:
    """Whether an eager call may hand these tensors to the compiled core: plain CPU float32 tensors, not traced, not
    functorch-wrapped."""
    if _core is None or this_thread_traces():
        return False
    for t in tensors:
        if (type(t) is not torch.Tensor or t.dtype != torch.float32 or t.device.type != "cpu"
                or torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return False
    return True


def _relu_multiplier_compiled(u: torch.Tensor, ur: torch.Tensor, eps: float) -> torch.Tensor | None:
    """ReLU's multiplier (:func:`_multiplier` ``"relu"``, with ``y``/``yr`` the ReLU of ``u``/``ur``) from the compiled
    core in one pass over memory (:func:`pyattr._C.relu_rescale`: the same float operations in the same order, so
    the same values; the torch formula is seven kernels, two of them slow selects): for eager calls on plain CPU
    float32 tensors of one dense layout. None otherwise (traced graphs, other devices or dtypes, functorch-wrapped
    tensors): the caller uses the torch formula."""
    if u.shape != ur.shape or u.stride() != ur.stride() or not _compiled_ok(u, ur):
        return None
    fu, fr = _dense_flat(u.detach()), _dense_flat(ur.detach())
    if fu is None or fr is None:
        return None
    out = torch.empty_like(u)  # the same dense layout
    fo = _dense_flat(out)
    if fo is None:
        return None
    _core.relu_rescale(fu.numpy(), fr.numpy(), fo.numpy(), eps, _core_threads())
    return out


class _Rescale(torch.autograd.Function):
    """``f`` forward on the paired batch; backward: each row's multiplier against the other row of its pair
    (the same ratio for both, each row's own derivative where they are equal)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kind: str, params: tuple, inplace: bool, eps: float) -> torch.Tensor:
        y = _forward(kind, x, params)
        (u, ur), (v, vr) = _pairs(x).unbind(1), _pairs(y).unbind(1)
        m = torch.stack([_multiplier(kind, u, ur, v, vr, params, eps),
                         _multiplier(kind, ur, u, vr, v, params, eps)], 1).flatten(0, 1)
        ctx.save_for_backward(m)
        if inplace:
            ctx.mark_dirty(x)
            return x.copy_(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.saved_tensors[0], None, None, None, None


class _RescaleAgainst(torch.autograd.Function):
    """``f`` forward on the inputs' rows; backward: the multiplier against the references ``ur`` (the same
    non-linearity's input in the references' pass, row for row; ``yr`` its output there, or None: recomputed),
    computed in the forward pass. ``apply`` returns (output, multiplier); written with ``setup_context`` (the
    multiplier an output of its own, not differentiable) so that ``torch.func.vjp`` accepts it (DeepLIFT-SHAP's
    loop body)."""

    @staticmethod
    def forward(x: torch.Tensor, ur: torch.Tensor, yr: torch.Tensor | None, kind: str, params: tuple,
                inplace: bool, eps: float):
        m = _relu_multiplier_compiled(x, ur, eps) if kind == "relu" else None
        if m is not None:  # computed from x before an in-place ReLU overwrites it
            return (x.clamp_min_(0) if inplace else x.clamp_min(0)), m
        y = _forward(kind, x, params)
        yr = _forward(kind, ur, params) if yr is None else yr
        m = _multiplier(kind, x, ur, y, yr, params, eps)
        if inplace:
            return x.copy_(y), m
        return y, m

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero gradient of the multiplier made for backward (never read)
        ctx.save_for_backward(output[1])
        if inputs[5]:
            ctx.mark_dirty(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, _grad_m: torch.Tensor | None):
        return None if grad is None else grad * ctx.saved_tensors[0], None, None, None, None, None, None


TIE_RTOL = 1e-5
"""Max-pool ties, the default ``tie_rtol``: the values of a window within ``tie_rtol * max |u|`` (the largest magnitude
of that row's pool input) of the window's maximum share its multiplier equally (see :class:`_MaxPoolRule`); with
``tie_rtol=0`` only exactly equal values do (shap's and captum's convention is the first arg-max)."""


def _offsets(kernel) -> list[tuple[int, ...]]:
    grid: list[tuple[int, ...]] = [()]
    for k in kernel:
        grid = [(*g, a) for g in grid for a in range(k)]
    return grid


def _tie_shares(x: torch.Tensor, out: torch.Tensor, kernel, stride, padding, dilation,
                rtol: float = TIE_RTOL) -> torch.Tensor:
    """(R, C, k, *O): for each max-pool window (``out`` (R, C, *O) its maxima over ``x`` (R, C, *S)) and each of
    its k offsets, 1 / t where the input there is one of the t within ``rtol * max |x|`` (per row) of the
    window's maximum (``rtol=0``: equal to it), else 0. Forward ops only: the k offsets are strided slices of ``x``
    padded with -inf."""
    d = x.dim() - 2
    spatial, outs = x.shape[2:], out.shape[2:]
    need = [(o - 1) * s + dl * (k - 1) + 1 for o, s, dl, k in zip(outs, stride, dilation, kernel)]
    pads: list[int] = []
    for i in reversed(range(d)):  # F.pad's order: last dim first; enough on the right for every window
        pads += [padding[i], max(0, need[i] - spatial[i] - padding[i])]
    padded = F.pad(x, pads, value=float("-inf"))
    floor = out if rtol == 0 else out - rtol * x.abs().flatten(1).amax(1).view(-1, *[1] * (x.dim() - 1))
    masks = []
    for offset in _offsets(kernel):
        index = tuple(slice(a * dl, a * dl + (o - 1) * s + 1, s) for a, dl, o, s in zip(offset, dilation, outs, stride))
        masks.append(padded[(..., *index)] >= floor)
    mask = torch.stack(masks, 2).to(x.dtype)
    return mask / mask.sum(2, keepdim=True)


def _place(values: torch.Tensor, spatial, kernel, stride, padding, dilation) -> torch.Tensor:
    """(R, C, k, *O) -> (R, C, *S): the value of each window's offset j added at the input position it reads
    (the max-pool backward's scatter-add), as one transposed convolution with one-hot kernels."""
    count = values.shape[2]
    with outside_trace():  # a constant of the graph, not ops
        eye = torch.eye(count, dtype=values.dtype, device=values.device).view(count, 1, *kernel)
    outs = values.shape[3:]
    natural = [(o - 1) * s - 2 * p + dl * (k - 1) + 1 for o, s, p, dl, k in zip(outs, stride, padding, dilation, kernel)]
    extra = [max(0, n - sz) for n, sz in zip(natural, spatial)]  # ceil mode: windows past the end (cropped)
    out_pad = [sz + e - n for sz, e, n in zip(spatial, extra, natural)]
    transposed = F.conv_transpose3d if len(spatial) == 3 else F.conv_transpose2d
    placed = transposed(values.flatten(0, 1), eye, stride=tuple(stride), padding=tuple(padding),
                        output_padding=tuple(out_pad), dilation=tuple(dilation))
    if any(extra):
        placed = placed[(..., *(slice(0, sz) for sz in spatial))]
    return placed.view(*values.shape[:2], *spatial)


def _max_pool(x: torch.Tensor, geometry: tuple, ceil_mode: bool) -> torch.Tensor:
    return (F.max_pool3d if x.dim() == 5 else F.max_pool2d)(x, *geometry, ceil_mode=ceil_mode)


class _MaxPoolRule(torch.autograd.Function):
    """Max pooling forward on the paired batch; backward: captum's DeepLIFT max-pool rule, ties shared.

    A window's share of the score difference goes to its arg-max; where several inputs of a window are equal up
    to ``rtol`` (:data:`TIE_RTOL` by default) times the row's largest ``|u|`` (flat image regions make exact ties,
    which backends that round differently would break either way) they share it equally, so that eager and exported
    graphs agree (torch and captum send it to the first one)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, geometry: tuple, ceil_mode: bool, eps: float, rtol: float = TIE_RTOL):
        out = _max_pool(x, geometry, ceil_mode)
        share = _tie_shares(x, out, *geometry, rtol)
        xp, yp = _pairs(x), _pairs(out)
        cross = torch.maximum(yp[:, 0], yp[:, 1])
        dy = torch.stack([cross - yp[:, 1], yp[:, 0] - cross], 1).flatten(0, 1)  # each row's share of the gap
        ctx.geometry, ctx.eps = geometry, eps
        ctx.save_for_backward(share, dy, xp[:, 0] - xp[:, 1])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        share, dy, dx = ctx.saved_tensors
        values = torch.cat([(grad * dy)[:, :, None] * share, grad[:, :, None] * share])
        shares, plain = _place(values, dx.shape[2:], *ctx.geometry).unflatten(0, (2, -1)).unbind(0)
        shares = _pairs(shares)
        ratio = ((shares[:, 0] + shares[:, 1]) / dx)[:, None]
        new = torch.where((dx.abs() < ctx.eps)[:, None], _pairs(plain), ratio)
        return new.flatten(0, 1), None, None, None, None


class _MaxPoolAgainst(torch.autograd.Function):
    """Max pooling forward on the inputs' rows; backward: the max-pool rule against the references ``xr`` (the
    same pool's input in the references' pass; ``yr`` its output there, or None: recomputed), ties shared (as
    :class:`_MaxPoolRule`). ``apply`` returns (output, weights, share); ``setup_context`` form (as
    :class:`_RescaleAgainst`)."""

    @staticmethod
    def forward(x: torch.Tensor, xr: torch.Tensor, yr: torch.Tensor | None, geometry: tuple, ceil_mode: bool,
                eps: float, rtol: float = TIE_RTOL):
        out = _max_pool(x, geometry, ceil_mode)
        yr = _max_pool(xr, geometry, ceil_mode) if yr is None else yr
        cross = torch.maximum(out, yr)
        share = _tie_shares(x, out, *geometry, rtol)
        weights = ((cross - yr)[:, :, None] * share  # the input's share of the difference, to its arg-max
                   + (out - cross)[:, :, None] * _tie_shares(xr, yr, *geometry, rtol))  # the reference's
        return out, weights, share

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, xr, _, geometry, _, eps = inputs[:6]
        ctx.geometry, ctx.eps = geometry, eps
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)  # no zero gradients of the weights and shares made for backward
        ctx.save_for_backward(output[1], output[2], x - xr)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_weights, _grad_share):
        weights, share, dx = ctx.saved_tensors
        g = grad[:, :, None]
        placed = _place(torch.cat([g * weights, g * share]), dx.shape[2:], *ctx.geometry)
        ratio, plain = placed.unflatten(0, (2, -1)).unbind(0)  # (not chunk: a guard on a symbolic batch)
        return torch.where(dx.abs() < ctx.eps, plain, ratio / dx), None, None, None, None, None, None


class _MaxPoolCompiled(torch.autograd.Function):
    """:class:`_MaxPoolAgainst` for eager calls on CPU float32 2-D pools: the forward pass pools (and keeps what the
    rule needs), the backward pass is the compiled core's :func:`pyattr._C.maxpool_rescale_backward`, one pass per
    plane where the torch formula makes (R, C, k, *O) shares and places them with a transposed convolution (the same
    float operations; the sums in col2im's order, so equal to the formula where torch's transposed convolution sums
    that way and within float32 rounding where its own kernel does not: 7e-7 of the largest multiplier on resnet50's
    pool; fwd + bwd ~3x faster there)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, xr: torch.Tensor, yr: torch.Tensor | None, geometry: tuple, ceil_mode: bool,
                eps: float, rtol: float):
        out = _max_pool(x, geometry, ceil_mode)
        yr = _max_pool(xr, geometry, ceil_mode) if yr is None else yr

        def tolerance(v: torch.Tensor) -> torch.Tensor:  # as _tie_shares' floor: out - rtol * max |v| of the row
            if rtol == 0:
                return torch.zeros(v.shape[0], dtype=v.dtype)
            return (rtol * v.abs().flatten(1).amax(1)).contiguous()

        # the output is copied: the model may change it in place later (the input, as plain max-pool autograd, not)
        ctx.save_for_backward(x, xr.contiguous(), out.contiguous().clone(), yr.contiguous(), tolerance(x),
                              tolerance(xr))
        ctx.geometry, ctx.eps = geometry, eps
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is None:
            return None, None, None, None, None, None, None
        x, xr, out, yr, tol_x, tol_r = ctx.saved_tensors
        x = x.contiguous()
        result = torch.empty_like(x)
        kernel, stride, padding, dilation = ctx.geometry
        _core.maxpool_rescale_backward(x.numpy(), xr.numpy(), out.numpy(), yr.numpy(), grad.contiguous().numpy(),
                                       tol_x.numpy(), tol_r.numpy(), kernel, stride, padding, dilation, ctx.eps,
                                       result.numpy(), _core_threads())
        return result, None, None, None, None, None, None


def _max_pool_against(x: torch.Tensor, xr: torch.Tensor, yr: torch.Tensor | None, geometry: tuple, ceil_mode: bool,
                      eps: float, rtol: float) -> torch.Tensor:
    """The max-pool rule's output (:class:`_MaxPoolAgainst`): the compiled backward for eager 2-D CPU float32 pools."""
    if x.dim() == 4 and len(geometry[0]) == 2 and _compiled_ok(x, xr, *([] if yr is None else [yr])):
        return _MaxPoolCompiled.apply(x, xr, yr, geometry, ceil_mode, eps, rtol)
    return _MaxPoolAgainst.apply(x, xr, yr, geometry, ceil_mode, eps, rtol)[0]


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


def _rule_of(func, args: tuple, kwargs: dict, maxpool: str) -> tuple | None:
    """The rule a call follows: ``("elementwise", kind, params, inplace)``, ``("pool", d, geometry, ceil_mode)``
    (geometry: kernel, stride, padding, dilation; a 1-D pool as a 2-D one over a height of 1), or None."""
    if func in _RELU or func in _RELU_INPLACE:
        inplace = func in _RELU_INPLACE or (func is F.relu and bool(_arg(args, kwargs, 1, "inplace", False)))
        return "elementwise", "relu", (), inplace
    if func in _SIMPLE:
        kind, inplace = _SIMPLE[func]
        return "elementwise", kind, (), inplace
    if func is F.leaky_relu:
        p = (float(_arg(args, kwargs, 1, "negative_slope", 0.01)),)
        return "elementwise", "leaky_relu", p, bool(_arg(args, kwargs, 2, "inplace", False))
    if func is F.elu:
        p = (float(_arg(args, kwargs, 1, "alpha", 1.0)),)
        return "elementwise", "elu", p, bool(_arg(args, kwargs, 2, "inplace", False))
    if func is F.softplus:
        p = (float(_arg(args, kwargs, 1, "beta", 1.0)), float(_arg(args, kwargs, 2, "threshold", 20.0)))
        return "elementwise", "softplus", p, False
    if func is F.gelu:
        return "elementwise", "gelu", (str(_arg(args, kwargs, 1, "approximate", "none")),), False
    if func is F.silu:
        return "elementwise", "silu", (), bool(_arg(args, kwargs, 1, "inplace", False))
    d = _POOLS.get(func)
    if d is None or maxpool != "deeplift":
        return None
    if func in (F.max_pool1d, F.max_pool2d, F.max_pool3d) and bool(_arg(args, kwargs, 6, "return_indices", False)):
        return None  # the caller wants the indices: left as it is (plain gradient)
    tup = _ntuple(d)
    kernel = tup(_arg(args, kwargs, 1, "kernel_size", None))
    stride = _arg(args, kwargs, 2, "stride", None)
    stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else tup(stride)
    padding = tup(_arg(args, kwargs, 3, "padding", 0))
    dilation = tup(_arg(args, kwargs, 4, "dilation", 1))
    ceil_mode = bool(_arg(args, kwargs, 5, "ceil_mode", False))
    if d == 1:
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    return "pool", d, (tuple(kernel), tuple(stride), tuple(padding), tuple(dilation)), ceil_mode


def _pooled(d: int, x: torch.Tensor, apply) -> torch.Tensor:
    """``apply`` on ``x`` as a 2-D pool input (a 1-D pool's over a height of 1)."""
    return apply(x.unsqueeze(-2)).squeeze(-2) if d == 1 else apply(x)


class _RuleMode(TorchFunctionMode):
    """A mode that hands every call with a DeepLIFT rule (:func:`_rule_of`) on a tensor of ``rows`` rows to
    :meth:`apply_rule`; every other call runs as it is."""

    def __init__(self, rows: Any, eps: float, maxpool: str, tie_rtol: float = TIE_RTOL):
        super().__init__()
        self.rows, self.eps, self.maxpool, self.tie_rtol = rows, eps, maxpool, tie_rtol

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _rule_of(func, args, kwargs, self.maxpool)
        x = args[0] if args else kwargs.get("input")
        if rule is None or not (isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == self.rows):
            return func(*args, **kwargs)
        return self.apply_rule(func, args, kwargs, rule, x)

    def apply_rule(self, func, args: tuple, kwargs: dict, rule: tuple, x: torch.Tensor) -> Any:
        raise NotImplementedError


class _DeepLiftMode(_RuleMode):
    """The rules on a paired batch (:func:`deeplift_rules`)."""

    def apply_rule(self, func, args, kwargs, rule, x):
        if rule[0] == "elementwise":
            return _Rescale.apply(x, *rule[1:], self.eps)
        _, d, geometry, ceil_mode = rule
        return _pooled(d, x, lambda u: _MaxPoolRule.apply(u, geometry, ceil_mode, self.eps, self.tie_rtol))


class _TwoPassRules(_RuleMode):
    """The rules in two passes of ``rows`` rows each: entered with ``reference=True`` around the references'
    forward pass (no autograd), it records the input of every non-linearity and max pool in call order; entered
    again around the inputs' forward pass, each such call takes the record of the same call and passes back the
    multipliers against it. The inputs' pass alone is differentiated: its backward pass has half the rows of a
    paired batch's. Eager calls check that the two passes make the same calls (a model whose forward pass
    branches on its values may not)."""

    def __init__(self, rows: Any, eps: float, maxpool: str, check: bool, tie_rtol: float = TIE_RTOL):
        super().__init__(rows, eps, maxpool, tie_rtol)
        self.check = check
        self.records: list[Any] = []
        self.taken = 0
        self.reference = True

    def apply_rule(self, func, args, kwargs, rule, x):
        if self.reference:
            kept = x.clone() if rule[0] == "elementwise" and rule[3] else x  # an in-place call overwrites it
            y = func(*args, **kwargs)
            self.records.append((rule, kept, kept._version, y, y._version))
            return y
        ref, out = self.take(func, rule, x)
        if rule[0] == "elementwise":
            return _RescaleAgainst.apply(x, ref, out, *rule[1:], self.eps)[0]
        _, d, geometry, ceil_mode = rule
        if d == 1:
            ref, out = ref.unsqueeze(-2), None if out is None else out.unsqueeze(-2)
        return _pooled(d, x, lambda u: _max_pool_against(u, ref, out, geometry, ceil_mode, self.eps, self.tie_rtol))

    def take(self, func, rule: tuple, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The recorded reference input of this call, and its output (None where the model has changed it in
        place since: it is recomputed)."""
        index = self.taken
        self.taken += 1
        if index >= len(self.records):
            raise InputError(f"DeepLIFT: the model called {getattr(func, '__name__', func)} more often for the inputs "
                             "than for the references; a forward pass that branches on its inputs' values cannot "
                             "be explained with references (use maxpool='gradient' or another method)")
        recorded, ref, version, out, out_version = self.records[index]
        self.records[index] = None  # freed as the inputs' pass goes
        if self.check:
            if recorded != rule or ref.shape != x.shape:
                raise InputError(f"DeepLIFT: call {index} of a non-linearity differs between the references' and "
                                 f"the inputs' forward pass ({recorded[:2]} on {tuple(ref.shape)} vs {rule[:2]} on "
                                 f"{tuple(x.shape)}); a forward pass that branches on its inputs' values cannot be "
                                 "explained with references")
            if ref._version != version:
                raise InputError(f"DeepLIFT: the model changed the input of {getattr(func, '__name__', func)} in "
                                 "place after the call; DeepLIFT needs it (make that later operation out of place)")
        return ref, (out if out._version == out_version else None)

    def finish(self) -> None:
        if self.check and self.taken != len(self.records):
            raise InputError(f"DeepLIFT: the model made {len(self.records)} calls of non-linearities for the "
                             f"references and {self.taken} for the inputs; a forward pass that branches on its "
                             "inputs' values cannot be explained with references")


@contextmanager
def deeplift_rules(rows: Any, eps: float = EPS, maxpool: str = "deeplift", tie_rtol: float = TIE_RTOL
                   ) -> Iterator[None]:
    """Within the block, every non-linearity applied to a tensor of ``rows`` rows (pairs of an input and its
    reference, sample-major: rows 2p and 2p + 1) passes back DeepLIFT's multipliers instead of its gradient
    (Rescale rule; captum's max-pool rule with ties within ``tie_rtol`` sharing, or the plain max-pool gradient
    with ``maxpool="gradient"``).
    Forward values are unchanged. (The methods run the same rules in two passes, references then inputs, and
    differentiate the inputs' pass only; see :class:`DeepLift`.)

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
    with _DeepLiftMode(rows, check_eps(eps), maxpool, check_tie_rtol(tie_rtol)):
        yield


def check_eps(value: Any) -> float:
    """``eps`` checked to be a number > 0 (raises InputError)."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
        raise InputError(f"eps must be a number > 0 (where |u - u_ref| < eps a non-linearity passes back its plain "
                         f"derivative; with 0, a unit whose input equals its reference's would divide 0 by 0 and make "
                         f"the map NaN), got {value!r}; the default is {EPS}")
    return float(value)


def check_tie_rtol(value: Any) -> float:
    """``tie_rtol`` checked to be a finite number >= 0 (raises InputError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InputError(f"tie_rtol must be a finite number >= 0 (0: only exactly equal values of a max-pool window "
                         f"share its multiplier; default {TIE_RTOL}), got {value!r}")
    return float(value)


# -- the methods ---------------------------------------------------------------------------------------------
class _PairedMethod(GradientMethod):
    """DeepLIFT's paired pass, shared by :class:`DeepLift` and :class:`DeepLiftShap`."""

    signed_evidence = True
    default_reduction = "sum"

    def __init__(self, model: nn.Module, reduction: str, absolute: bool | None, eps: float, maxpool: str, *,
                 tie_rtol: float, output: OutputSelector, layout: str):
        super().__init__(model, reduction, absolute, output=output, layout=layout)
        self.eps = check_eps(eps)
        if maxpool not in MAXPOOL_RULES:
            raise InputError(f"unknown max-pool rule {maxpool!r}; use one of {', '.join(MAXPOOL_RULES)}")
        self.maxpool = maxpool
        self.tie_rtol = check_tie_rtol(tie_rtol)

    def paired_pass(self, x: torch.Tensor, refs: torch.Tensor, target: torch.Tensor, resolved: torch.Tensor | None,
                    weights: torch.Tensor | None = None):
        """DeepLIFT of inputs ``x`` (N, ...) against ``c`` references each, ``refs`` (N, c, ...): a forward pass of
        the N c references without autograd, which records the input of every non-linearity, then a forward pass
        of the inputs (each repeated c times) whose non-linearities pass back their multipliers against those
        records (:class:`_TwoPassRules`), and one backward pass of the N c input rows per target column (autograd;
        ``torch.func.vjp`` in a loop's body: :func:`pyattr._loop.vjp_columns`).

        Returns: scores of ``x`` (N, K), the attributions summed over the c references (N, T, ...), the resolved
        targets (N, T) (``resolved`` when given, else ``target`` resolved on the scores of ``x``) and the score
        differences F(x) - F(ref) summed over the references (N, T). ``weights`` (c,): the references' weights in
        those sums (a loop's padded pass; None: 1 each)."""
        n, c = refs.shape[0], refs.shape[1]
        rows = x[:, None].expand_as(refs).flatten(0, 1).detach()
        ref_rows = refs.flatten(0, 1).detach()
        checks = not self._tracing
        rules = _TwoPassRules(rows.shape[0], self.eps, self.maxpool, check=checks, tie_rtol=self.tie_rtol)
        bound = current_target()
        old = None if bound is None else bound.repeats

        def selected_of(rows: torch.Tensor):
            with rules:
                out = self._rows_scores(rows, x, bound, checks=checks)
            rules.finish()
            scores = out.view(n, c, out.shape[1])[:, 0]
            res = self.resolve(scores.detach(), target) if resolved is None else resolved
            selected = out.gather(1, res.repeat_interleave(c, 0))  # (Nc, T)
            return selected, (scores.detach(), res, selected.detach())

        if bound is not None:  # c copies of each input: the target's outputs are read from the first
            bound.repeats = old * c
        try:
            with torch.no_grad(), rules:
                kept = None if bound is None else bound.outputs
                out_ref = self._rows_scores(ref_rows, x, bound, checks=False)
                if bound is not None:  # the target's outputs are the inputs'
                    bound.outputs = kept
            rules.reference = False
            grads, (scores, resolved, selected) = vjp_columns(selected_of, rows)
        finally:
            if bound is not None:
                bound.repeats = old
        if checks:
            check_scores(out_ref, ref_rows, self.output if bound is None or bound.target is CLASS_TARGET else None)
        columns = resolved.shape[1]
        g = grads.view(n, c, columns, *x.shape[1:])
        contributions = (x[:, None] - refs)[:, :, None] * g
        gaps = (selected - out_ref.gather(1, resolved.repeat_interleave(c, 0))).view(n, c, columns)
        if weights is not None:
            contributions = contributions * weights.view(1, c, *[1] * (contributions.dim() - 2))
            gaps = gaps * weights.view(1, c, 1)
        return scores, contributions.sum(1), resolved, gaps.sum(1)

    def _rows_scores(self, rows: torch.Tensor, x: torch.Tensor, bound, checks: bool) -> torch.Tensor:
        """The target's scores of ``rows`` (the call's inputs or references, each repeated); with ``checks``, the
        first copy of each input is checked first, so that a message about non-finite scores counts the caller's
        inputs."""
        out = select_output(self.model(rows), self.output)
        if bound is not None and bound.target is not CLASS_TARGET:
            return bound.scores(out, rows, checks=checks)
        if checks:
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == rows.shape[0]:
                check_scores(out.unflatten(0, (x.shape[0], -1))[:, 0], x, self.output)
            check_scores(out, rows, self.output)
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
        return {**super().metadata(), "eps": self.eps, "maxpool": self.maxpool, "tie_rtol": self.tie_rtol}


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
        tie_rtol: the max-pool rule's ties: the inputs of a window within ``tie_rtol`` times the row's largest
            ``|u|`` of its maximum share the window's multiplier equally (default :data:`TIE_RTOL`, 1e-5: eager
            and exported graphs then agree where backends round equal values apart by an ulp). ``0``: exactly
            equal values only, as shap's ``DeepExplainer`` and captum otherwise do (they send a window's share to
            its first arg-max); maps move by 1-5% between the two on random images (docs/deeplift.md).
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
                 tie_rtol: float = TIE_RTOL, output: OutputSelector = None, layout: str = "image"):
        super().__init__(model, reduction, absolute, eps, maxpool, tie_rtol=tie_rtol, output=output, layout=layout)
        if isinstance(baseline, torch.Tensor):
            baseline = _check_baselines(baseline, "the baseline")
        elif isinstance(baseline, bool) or not (baseline == "zeros" or isinstance(baseline, (int, float))):
            raise InputError(f"unknown baseline {baseline!r}; use 'zeros', a number or a tensor shaped like the inputs")
        self.baseline = baseline

    def baseline_of(self, x: torch.Tensor) -> torch.Tensor:
        """The reference for inputs ``x``, shaped like ``x``."""
        if isinstance(self.baseline, torch.Tensor):
            return tensor_baseline(self.baseline, x, check=not self._tracing)
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
        check_upfront(type(method).__name__, "baselines", self.count, input_draw_bytes(x), "random baselines")
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
        reduction, absolute, eps, maxpool, tie_rtol, output, layout: as :class:`DeepLift`.
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
                 tie_rtol: float = TIE_RTOL, seed: int = 0, output: OutputSelector = None, layout: str = "image"):
        super().__init__(model, reduction, absolute, eps, maxpool, tie_rtol=tie_rtol, output=output, layout=layout)
        if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1):
            raise InputError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.distribution = _Distribution(_baseline_distribution(baselines, "baselines"), int(seed))
        self.chunk_size = chunk_size
        self.seed = int(seed)

    def _run(self, x, target):
        if not self._tracing:
            check_pass("DeepLiftShap", x, min(self.chunk_size, self.distribution.count))
        refs = self.distribution.of(self, x).detach()
        count = self.distribution.count
        total = gap = resolved = scores = None
        if self.looped(math.ceil(count / self.chunk_size)):
            with torch.no_grad():  # the targets, resolved before the loop (every pass explains the same ones)
                scores = self.scores_of(x)
            resolved = self.resolve(scores, target)
            ids, keep = padded_passes(list(range(count)), [1.0] * count, self.chunk_size, x)

            def one_pass(i: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                part = refs[:, i.long()]
                part = part.expand(x.shape[0], *part.shape[1:])
                _, attr, _, g = self.paired_pass(x, part, target, resolved, weights=w)
                return attr, g

            total, gap = (v.sum(0) for v in batched_loop(one_pass, ids, keep))  # one loop in a traced graph
        for start in range(0, 0 if total is not None else count, self.chunk_size):
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
        check_upfront("GradientShap", "samples", samples, PER_POINT_BYTES, "draws' bookkeeping")
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
            check_upfront("GradientShap", "samples", self.samples, input_draw_bytes(x), "noise")
            with outside_trace():  # constants, not graph ops
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
        if not self._tracing:
            check_pass("GradientShap", x, min(self.chunk_size, self.samples))
        index, alpha, noise = self.draws(x)
        refs = self.distribution.of(self, x).detach()
        n = x.shape[0]
        view = (1, -1) + (1,) * (x.dim() - 1)
        total = None
        if self.looped(math.ceil(self.samples / self.chunk_size)):
            ids, keep = padded_passes(list(range(self.samples)), [1.0] * self.samples, self.chunk_size, x)
            c = ids.shape[1]
            bases = constant_tensor(index, x).long()
            alphas = constant_tensor(alpha, x)

            def one_pass(i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                i = i.long()
                base = refs[:, bases[i]]  # (1 or N, c, ...)
                noisy = x[:, None] + self.stdevs * noise[i][None] if self.stdevs else x[:, None]
                a = alphas[i].view(view)
                points = (a * noisy + (1 - a) * base).expand(n, c, *x.shape[1:]).flatten(0, 1)
                _, grads, _ = self.input_gradients(points, resolved.repeat_interleave(c, 0))
                w = w.view(1, c, 1, *[1] * (x.dim() - 1))
                return ((noisy - base)[:, :, None] * grads.view(n, c, *grads.shape[1:]) * w).sum(1)

            total = batched_loop(one_pass, ids, keep).sum(0)  # one loop in a traced graph
        for start in range(0, 0 if total is not None else self.samples, self.chunk_size):
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
