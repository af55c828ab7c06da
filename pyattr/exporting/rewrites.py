"""Forward-pass rewrites applied while an attribution method is traced for export.

Some composite torch functions pick their implementation from the input's memory layout, and the
layout-specific path leaves ops in the traced backward that no exporter takes. A tensor computed in
NHWC and permuted back to NCHW (ConvNeXt's LayerNorm2d and blocks, timm's ``permute`` layers) keeps
channels-last strides; ``adaptive_avg_pool2d`` to 1x1 then restrides its result with ``as_strided_``,
whose backward is an ``as_strided_scatter`` with ``sym_max`` storage arithmetic (no ONNX function,
no TorchScript builtin). Pooling a contiguous copy gives the same numbers through plain ops.

The rewrites change only how the traced graph computes, never what: each one is exact (up to the
order of floating point sums), and the user's modules are not touched.

The mode also marks the backward pass: before ``torch.autograd.grad`` runs, each node of the call's
own autograd graph (created by this trace, freed with it) gets a pre-hook that records its sequence
number, so every traced backward op carries the ``seq_nr`` of the forward op it differentiates (as in
torch's AOTAutograd), and an export failure in a backward op can name the model layer it came from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_CONTIGUOUS_INPUT = frozenset({F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d,
                               F.adaptive_avg_pool1d, torch.adaptive_avg_pool1d})


class ExportRewrites(TorchFunctionMode):
    """A torch function mode, entered inside the traced function, that applies the rewrites above."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONTIGUOUS_INPUT and args and isinstance(args[0], torch.Tensor):
            args = (args[0].contiguous(), *args[1:])
        elif func is torch.autograd.grad:
            from torch._functorch._aot_autograd.logging_utils import (
                setup_stacktrace_preservation_hooks_from_tensors,
            )

            outputs = kwargs.get("outputs", args[0] if args else None)
            setup_stacktrace_preservation_hooks_from_tensors(outputs)
        return func(*args, **kwargs)
