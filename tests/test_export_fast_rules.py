"""The backward rules written for speed: stride-1 convolution input gradients as plain convolutions
with folded (flipped, channel-swapped) weights, and ReLU's backward as a multiplication by a float
mask. Each against torch's autograd, and in traced graphs: no ``flip``, ``convolution`` in transposed
mode or ``where`` left for them, no unused constant, the same numbers as eager.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import pyattr
from pyattr.exporting import decompositions
from pyattr.exporting.trace import fold_constants, trace_graph

aten = torch.ops.aten

STRIDE1_CASES = {
    # cin, cout, kernel, padding, dilation, groups, spatial size
    "3x3": (3, 4, 3, 1, 1, 1, (7, 9)),
    "1x1": (5, 3, 1, 0, 1, 1, (6, 5)),
    "7x7-pad3": (3, 4, 7, 3, 1, 1, (11, 10)),
    "no-padding": (2, 3, 3, 0, 1, 1, (8, 8)),
    "grouped": (4, 6, 3, 1, 1, 2, (7, 6)),
    "depthwise": (6, 6, 5, 2, 1, 6, (9, 8)),
    "depthwise-multiplier": (3, 6, 3, 1, 1, 3, (6, 7)),
    "dilated": (4, 6, 3, 2, 2, 1, (9, 8)),
    "asymmetric": (3, 5, (3, 1), (1, 0), 1, 1, (8, 9)),
    "padding-wider-than-kernel": (3, 4, 3, 3, 1, 1, (6, 6)),  # d*(k-1) - p < 0: transposed convolution
    "conv1d": (3, 4, 5, 2, 1, 1, (13,)),
}


def _grad(module: nn.Module, x: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (dx,) = torch.autograd.grad(y, x, g)
    return g, dx


@pytest.mark.parametrize("name", STRIDE1_CASES)
def test_stride1_convolution_input_gradient(name):
    cin, cout, k, p, d, groups, size = STRIDE1_CASES[name]
    n = len(size)
    torch.manual_seed(2)
    conv = (nn.Conv1d if n == 1 else nn.Conv2d)(cin, cout, k, padding=p, dilation=d, groups=groups)
    x = torch.randn(2, cin, *size)
    g, dx = _grad(conv, x)
    pad = list(p) if isinstance(p, tuple) else [p] * n
    grad_input, grad_weight, grad_bias = decompositions.convolution_backward(
        g, x, conv.weight.detach(), [cout], [1] * n, pad, [d] * n, False, [0] * n, groups, [True, False, True])
    assert grad_weight is None
    torch.testing.assert_close(grad_input, dx, rtol=1e-5, atol=1e-5 * float(dx.abs().max()))
    torch.testing.assert_close(grad_bias, g.sum([0, *range(2, g.dim())]), rtol=1e-5, atol=1e-5)


def test_flipped_transposed_weight_is_the_transposed_convolution():
    torch.manual_seed(3)
    w = torch.randn(6, 2, 3, 3)  # 6 outputs, 3 groups of 2 inputs
    g = torch.randn(1, 6, 5, 5)
    expected = torch.nn.functional.conv_transpose2d(g, w, padding=1, groups=3)
    flipped = decompositions._flipped_transposed_weight(w, 3)
    assert flipped.shape == (6, 2, 3, 3)
    torch.testing.assert_close(torch.nn.functional.conv2d(g, flipped, padding=1, groups=3), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_threshold_backward_as_a_mask(threshold):
    x = torch.tensor([-1.0, 0.0, 0.25, 0.5, 2.0, -0.0])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    expected = aten.threshold_backward(g, x, threshold)
    assert torch.equal(decompositions.threshold_backward(g, x, threshold), expected)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                      nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 16, 1))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _ops(gm) -> collections.Counter:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("kind", ["saliency", "gradcam"])
def test_traced_graph_uses_the_fast_rules_and_matches_eager(kind):
    torch.manual_seed(4)
    model = _Block().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    method = pyattr.Saliency(model) if kind == "saliency" else pyattr.GradCAM(model, "features.5")
    gm = trace_graph(method, torch.randn(1, 3, 12, 12))
    ops = _ops(gm)
    assert ops[aten.flip.default] == 0  # folded into constants
    transposed = [n for n in gm.graph.nodes if n.target == aten.convolution.default and n.args[6]]
    if kind == "saliency":  # one stride-2 convolution: its input gradient stays a transposed convolution
        assert len(transposed) == 1
        assert ops[aten.convolution.default] == 4 + 4  # forward + input gradients
    # no ReLU backward as torch's where(out <= 0, 0, grad): the ReLU masks are multiplications. The wheres left
    # are the arg-max target and the per-sample validity masks (NaN maps for bad samples or targets, see
    # AttributionMethod), none of them conditioned on an activation being <= 0
    wheres = [n for n in gm.graph.nodes if n.target == aten.where.self]
    relu_masks = [n for n in wheres if isinstance(n.args[0], torch.fx.Node)
                  and n.args[0].target in (aten.le.Scalar, aten.le.Tensor)]
    assert relu_masks == [] and len(wheres) <= 5
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {name for name, _ in gm.named_buffers(recurse=False)} <= used
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([1, -1, 4])
    _, explained, raw, maps = gm(x, target)
    ref = method(x, target)
    assert torch.equal(explained, ref.target)
    torch.testing.assert_close(raw, ref.raw, rtol=1e-5, atol=1e-6 * float(ref.raw.abs().max()))
    torch.testing.assert_close(maps, ref.maps, rtol=0, atol=1e-5)


def test_fold_constants_leaves_inputs_alone_and_counts():
    class Flip(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.arange(6.0).view(2, 3))

        def forward(self, x):
            return x.flip(1) + self.w.t().flip(0).t()

    gm = torch.fx.experimental.proxy_tensor.make_fx(Flip())(torch.randn(2, 3))
    x = torch.randn(2, 3)
    expected = gm(x)
    assert fold_constants(gm) == 1  # the flip of the input is not a constant
    gm.recompile()
    assert _ops(gm)[aten.flip.default] == 1
    torch.testing.assert_close(gm(x), expected)


class _Attention(nn.Module):
    """Patch embedding + one self-attention layer (scaled_dot_product_attention) + a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        out, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(out.mean(1))


def test_attention_is_traced_in_math_form_for_every_method():
    torch.manual_seed(6)
    model = _Attention().eval()
    method = pyattr.Saliency(model)  # a method that does not ask for the math form itself
    gm = trace_graph(method, torch.randn(1, 3, 16, 16))
    assert not [n for n in gm.graph.nodes if "backward" in str(n.target)]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    target = torch.tensor([0, -1, 3])
    _, explained, raw, _ = gm(x, target)
    ref = method(x, target)
    assert torch.equal(explained, ref.target)
    torch.testing.assert_close(raw, ref.raw, rtol=1e-4, atol=1e-5 * float(ref.raw.abs().max()))
