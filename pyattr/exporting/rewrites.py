"""Forward-pass rewrites applied while an attribution method is traced for export.

Some composite torch functions pick their implementation from the input's memory layout, and the
layout-specific path leaves ops in the traced backward that no exporter takes. A tensor computed in
NHWC and permuted back to NCHW (ConvNeXt's LayerNorm2d and blocks, timm's ``permute`` layers) keeps
channels-last strides; ``adaptive_avg_pool2d`` to 1x1 then restrides its result with ``as_strided_``,
whose backward is an ``as_strided_scatter`` with ``sym_max`` storage arithmetic (no ONNX function,
no TorchScript builtin). Pooling a contiguous copy gives the same numbers through plain ops.

Bilinear resizing (``F.interpolate(..., mode="bilinear")``, the CAMs' upsampling, segmenters' heads)
is traced by torch as gathers (``_unsafe_index``) whose backward is an accumulating scatter
(``_unsafe_index_put``): slow in TorchScript and ``.pt2`` (42 ms of scatter and 31 ms of gather in one
Grad-CAM call on deeplabv3_mobilenet_v3_large at 256x256, where eager's upsample takes 13 ms forward and
backward). It is written instead as the separable product ``A_h @ x @ A_w^T`` with the constant
interpolation matrices of :mod:`pyattr.exporting.decompositions` (torch's source-index rule, scales and
``align_corners`` included), whose backward is two more matrix products.

The rewrites change only how the traced graph computes, never what: each one is exact (up to the
order of floating point sums), and the user's modules are not touched.

The mode also marks the backward pass: before ``torch.autograd.grad`` runs, each node of the call's
own autograd graph (created by this trace, freed with it) gets a pre-hook that records its sequence
number, so every traced backward op carries the ``seq_nr`` of the forward op it differentiates (as in
torch's AOTAutograd), and an export failure in a backward op can name the model layer it came from.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .decompositions import _bilinear_rows, _matrix

_INTERPOLATE = inspect.signature(F.interpolate)

_CONTIGUOUS_INPUT = frozenset({F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d,
                               F.adaptive_avg_pool1d, torch.adaptive_avg_pool1d})


class ExportRewrites(TorchFunctionMode):
    """A torch function mode, entered inside the traced function, that applies the rewrites above."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONTIGUOUS_INPUT and args and isinstance(args[0], torch.Tensor):
            args = (args[0].contiguous(), *args[1:])
        elif func is F.interpolate:
            resized = separable_bilinear(args, kwargs)
            if resized is not None:
                return resized
        elif func is torch.autograd.grad:
            from torch._functorch._aot_autograd.logging_utils import (
                setup_stacktrace_preservation_hooks_from_tensors,
            )

            outputs = kwargs.get("outputs", args[0] if args else None)
            setup_stacktrace_preservation_hooks_from_tensors(outputs)
        return func(*args, **kwargs)


def separable_bilinear(args, kwargs) -> torch.Tensor | None:
    """``F.interpolate(*args, **kwargs)`` as ``A_h @ x @ A_w^T`` for a 4-d bilinear resize without
    anti-aliasing, with the output size and scales F.interpolate would use; None for any other call."""
    try:
        bound = _INTERPOLATE.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    p = bound.arguments
    x = p["input"]
    if p["mode"] != "bilinear" or p["antialias"] or not isinstance(x, torch.Tensor) or x.dim() != 4 \
            or not x.is_floating_point():
        return None
    in_h, in_w = int(x.shape[-2]), int(x.shape[-1])
    scales: tuple = (None, None)
    if p["size"] is not None:
        size = p["size"]
        if p["scale_factor"] is not None:
            return None
        out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    elif p["scale_factor"] is not None:
        factor = p["scale_factor"]
        sh, sw = (factor, factor) if isinstance(factor, (int, float)) else (float(factor[0]), float(factor[1]))
        out_h, out_w = math.floor(in_h * sh), math.floor(in_w * sw)
        if not p["recompute_scale_factor"]:
            scales = (sh, sw)
    else:
        return None
    align = bool(p["align_corners"])
    a_h = _matrix(_bilinear_rows(in_h, out_h, align, scales[0]), in_h, x)  # (out_h, in_h)
    a_w = _matrix(_bilinear_rows(in_w, out_w, align, scales[1]), in_w, x)  # (out_w, in_w)
    return torch.matmul(torch.matmul(a_h, x), a_w.t())
