"""Backward ops written as forward ops, so that a traced attribution graph exports anywhere.

``torch._decomp`` already decomposes most ``*_backward`` ops (ReLU's threshold_backward, batch
norm, max-pool with indices, softmax, GELU/SiLU/...). What it leaves alone is written here:

- ``convolution_backward``: the input gradient of a convolution is a transposed convolution with
  the same stride/padding/dilation/groups and ``output_padding = in - ((out-1)*s - 2p + d(k-1) + 1)``;
  the bias gradient is a sum. (Weight gradients are never needed by an attribution method.)
  At stride 1 it is written as a plain convolution with the weights flipped in space and their
  in/out channels swapped (per group), padding ``d(k-1) - p``: the same numbers, but runtimes run
  a convolution faster than a transposed one (onnxruntime's CPU ``ConvTranspose`` has no NCHWc
  kernel). The weight transform is folded into a constant after tracing
  (:func:`pyattr.exporting.trace.fold_constants`), so no backend pays for it per call.
- ``threshold_backward`` (ReLU): ``grad * (out > 0)`` as a multiplication by a float mask rather
  than torch's ``where(out <= 0, 0, grad)``; onnxruntime's CPU ``Where`` is several times slower
  than ``Mul``. (It differs only at NaN activations and where an infinite or NaN gradient
  reaches a dead unit.)
- average pooling (``avg_pool2d``, ``_adaptive_avg_pool2d``) and bilinear / nearest upsampling:
  all are separable linear maps, so their backward is ``P_h^T @ g @ P_w`` with constant matrices
  built in Python from the op's own index formulas (the spatial sizes are static in the graph).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch._decomp import decomposition_table as _torch_table

from ..errors import ExportError

aten = torch.ops.aten


def _conv_input_grad_output_padding(inp, grad_out, weight, stride, padding, dilation) -> list[int]:
    pads = []
    for d in range(weight.dim() - 2):
        k = int(weight.shape[2 + d])
        size_in, size_out = int(inp.shape[2 + d]), int(grad_out.shape[2 + d])
        pads.append(size_in - ((size_out - 1) * stride[d] - 2 * padding[d] + dilation[d] * (k - 1) + 1))
    return pads


def _flipped_transposed_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C_in/g, *k) -> (C_in, C_out/g, *k) flipped in space: the weight of the convolution that
    computes a stride-1 convolution's input gradient."""
    k = list(weight.shape[2:])
    c_out, c_in_g = int(weight.shape[0]), int(weight.shape[1])
    w = weight.reshape(groups, c_out // groups, c_in_g, *k).transpose(1, 2).reshape(groups * c_in_g, c_out // groups, *k)
    return w.flip(list(range(2, 2 + len(k))))


def convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask):
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        kernel = [int(s) for s in weight.shape[2:]]
        pads = [dilation[d] * (kernel[d] - 1) - padding[d] for d in range(len(kernel))]
        if not transposed and all(s == 1 for s in stride) and all(p >= 0 for p in pads):
            grad_input = aten.convolution(grad_output, _flipped_transposed_weight(weight, groups), None,
                                          [1] * len(kernel), pads, dilation, False, [0] * len(kernel), groups)
        elif not transposed:
            op = _conv_input_grad_output_padding(input, grad_output, weight, stride, padding, dilation)
            grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, op, groups)
        elif groups == 1:
            grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, False,
                                          [0] * len(stride), 1)
        else:
            err = ExportError("the input gradient of a grouped transposed convolution has no export rule yet")
            err.op = "aten.convolution_backward (grouped transposed convolution)"
            err.layer_filter = lambda m: isinstance(m, torch.nn.modules.conv._ConvTransposeNd) and m.groups > 1
            raise err
    if output_mask[1]:
        raise ExportError("weight gradients of convolutions are not exported (no attribution method needs them)")
    if output_mask[2]:
        grad_bias = grad_output.sum([0] + list(range(2, grad_output.dim())))
    return grad_input, grad_weight, grad_bias


def _matrix(rows: Sequence[Sequence[tuple[int, float]]], n_in: int, like: torch.Tensor) -> torch.Tensor:
    """A dense (len(rows), n_in) matrix from sparse rows [(column, value), ...]."""
    dense = [[0.0] * n_in for _ in rows]
    for r, row in enumerate(rows):
        for c, v in row:
            dense[r][c] += v
    return torch.tensor(dense, dtype=like.dtype, device=like.device)


def _separable_backward(grad_output: torch.Tensor, rows_h, rows_w, in_h: int, in_w: int) -> torch.Tensor:
    p_h = _matrix(rows_h, in_h, grad_output)  # (out_h, in_h)
    p_w = _matrix(rows_w, in_w, grad_output)  # (out_w, in_w)
    return torch.matmul(torch.matmul(p_h.t(), grad_output), p_w)


def _adaptive_rows(n_in: int, n_out: int):
    rows = []
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        rows.append([(j, 1.0 / (end - start)) for j in range(start, end)])
    return rows


def adaptive_avg_pool2d_backward(grad_output, self):
    in_h, in_w = int(self.shape[-2]), int(self.shape[-1])
    out_h, out_w = int(grad_output.shape[-2]), int(grad_output.shape[-1])
    return _separable_backward(grad_output, _adaptive_rows(in_h, out_h), _adaptive_rows(in_w, out_w), in_h, in_w)


def _avg_rows(n_in, n_out, k, s, p, count_include_pad, use_override):
    rows = []
    for i in range(n_out):
        start = i * s - p
        end = min(start + k, n_in + p)
        padded_len = end - start
        lo, hi = max(start, 0), min(end, n_in)
        length = 1.0 if use_override else float(padded_len if count_include_pad else hi - lo)
        rows.append([(j, 1.0 / length) for j in range(lo, hi)])
    return rows


def avg_pool2d_backward(grad_output, self, kernel_size, stride, padding, ceil_mode, count_include_pad,
                        divisor_override):
    kh, kw = kernel_size if len(kernel_size) == 2 else (kernel_size[0],) * 2
    stride = stride or kernel_size
    sh, sw = stride if len(stride) == 2 else (stride[0],) * 2
    ph, pw = padding if len(padding) == 2 else (padding[0],) * 2
    in_h, in_w = int(self.shape[-2]), int(self.shape[-1])
    out_h, out_w = int(grad_output.shape[-2]), int(grad_output.shape[-1])
    override = divisor_override is not None
    g = _separable_backward(
        grad_output,
        _avg_rows(in_h, out_h, kh, sh, ph, count_include_pad, override),
        _avg_rows(in_w, out_w, kw, sw, pw, count_include_pad, override),
        in_h, in_w,
    )
    return g / divisor_override if override else g


def _source_index(i: int, n_in: int, n_out: int, align_corners: bool, scale: float | None) -> float:
    if align_corners:
        return i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    ratio = 1.0 / scale if scale else n_in / n_out
    return max((i + 0.5) * ratio - 0.5, 0.0)


def _bilinear_rows(n_in, n_out, align_corners, scale):
    if n_in == n_out:  # torch's kernels copy when the size is unchanged, whatever the scale says
        return [[(i, 1.0)] for i in range(n_out)]
    rows = []
    for i in range(n_out):
        src = _source_index(i, n_in, n_out, align_corners, scale)
        lo = min(math.floor(src), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        lam = src - lo
        rows.append([(lo, 1.0 - lam), (hi, lam)])
    return rows


def upsample_bilinear2d_backward(grad_output, output_size, input_size, align_corners, scales_h=None,
                                 scales_w=None):
    in_h, in_w = int(input_size[-2]), int(input_size[-1])
    out_h, out_w = int(output_size[0]), int(output_size[1])
    return _separable_backward(grad_output, _bilinear_rows(in_h, out_h, align_corners, scales_h),
                               _bilinear_rows(in_w, out_w, align_corners, scales_w), in_h, in_w)


def _nearest_rows(n_in, n_out, scale):
    # As torch's nearest_idx: a copy at equal sizes, i >> 1 at twice the size, otherwise
    # floorf(i * scale) with the scale rounded to float32 and the product taken in float32.
    if n_out == n_in:
        return [[(i, 1.0)] for i in range(n_out)]
    if n_out == 2 * n_in:
        return [[(i >> 1, 1.0)] for i in range(n_out)]
    ratio = np.float32(1.0 / scale) if scale else np.float32(n_in) / np.float32(n_out)
    return [[(min(math.floor(np.float32(i) * ratio), n_in - 1), 1.0)] for i in range(n_out)]


def upsample_nearest2d_backward(grad_output, output_size, input_size, scales_h=None, scales_w=None):
    in_h, in_w = int(input_size[-2]), int(input_size[-1])
    out_h, out_w = int(output_size[0]), int(output_size[1])
    return _separable_backward(grad_output, _nearest_rows(in_h, out_h, scales_h),
                               _nearest_rows(in_w, out_w, scales_w), in_h, in_w)


def threshold_backward(grad_output, self, threshold):
    """ReLU's backward (``self`` is the ReLU's output or input): the gradient times the float mask
    ``self > threshold``."""
    return grad_output * (self > threshold).to(grad_output.dtype)


def decomposition_table() -> dict[torch._ops.OpOverload, Callable]:
    """torch's decompositions of backward ops, plus pyattr's own for the ops torch leaves alone."""
    table = {op: fn for op, fn in _torch_table.items() if "backward" in op.name()}
    table[aten.threshold_backward.default] = threshold_backward
    table[aten.convolution_backward.default] = convolution_backward
    table[aten._adaptive_avg_pool2d_backward.default] = adaptive_avg_pool2d_backward
    table[aten.avg_pool2d_backward.default] = avg_pool2d_backward
    table[aten.upsample_bilinear2d_backward.default] = upsample_bilinear2d_backward
    table[aten.upsample_nearest2d_backward.default] = upsample_nearest2d_backward
    return table
