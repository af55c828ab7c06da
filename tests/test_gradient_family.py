"""Tests for the gradient family: Saliency options, Input x Gradient, SmoothGrad, Integrated Gradients,
Guided Backprop, DeconvNet; non-image inputs, output selectors, several targets per input.

Analytic cases (linear models, a one-hidden-layer ReLU net), agreement with captum on seeded
random-init torchvision models, IG completeness on the built-in model, the export contract,
state hygiene and errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import Deconvolution as CaptumDeconvolution
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from captum.attr import InputXGradient as CaptumInputXGradient
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
from captum.attr import NoiseTunnel as CaptumNoiseTunnel
from captum.attr import Saliency as CaptumSaliency
from conftest import NUM_CLASSES_TORCHVISION, make_images, max_relative_error, seeded
from contract import assert_export_contract
from torch import nn

import pyattr
from pyattr.exporting.trace import backward_ops_left, trace_graph
from pyattr.methods import METHODS, build_method
from pyattr.methods.gradient import (
    DeconvNet,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
    integration_points,
)

REFERENCE_RTOL = 1e-5
GRADIENT_METHODS = ("saliency", "inputxgradient", "smoothgrad", "integratedgradients", "guidedbackprop", "deconvnet")


def assert_maps_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = REFERENCE_RTOL) -> None:
    err = max_relative_error(actual, expected)
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"



@pytest.fixture(scope="session")
def mobilenet_v3_small() -> nn.Module:
    return seeded(2, lambda: torchvision.models.mobilenet_v3_small(num_classes=NUM_CLASSES_TORCHVISION))


@pytest.fixture
def torchvision_model(request):
    def get(name: str) -> nn.Module:
        return request.getfixturevalue(name)

    return get


TORCHVISION = ("resnet18", "vgg11", "mobilenet_v3_small")


# --------------------------------------------------------------------------------------------------
# Analytic cases
# --------------------------------------------------------------------------------------------------


class Linear(nn.Module):
    """S(x) = W x.flatten() + b, for inputs of any shape."""

    def __init__(self, shape: tuple[int, ...], k: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.shape = shape
        numel = int(torch.tensor(shape).prod())
        self.fc = nn.Linear(numel, k)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(k, numel, generator=g))
            self.fc.bias.copy_(torch.randn(k, generator=g))

    def w(self, t: int) -> torch.Tensor:
        return self.fc.weight[t].detach().view(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def linear_image() -> Linear:
    return Linear((3, 64, 64)).eval()


def test_input_x_gradient_of_linear_model_is_x_times_weight(linear_image):
    x, target = make_images(3, seed=1), torch.tensor([3, 0, 2])
    result = InputXGradient(linear_image, reduction="none")(x, target)
    expected = torch.stack([x[i] * linear_image.w(t) for i, t in enumerate(target.tolist())])
    torch.testing.assert_close(result.raw, expected, rtol=1e-6, atol=0)
    summed = InputXGradient(linear_image)(x, target).raw  # default: signed sum over channels
    torch.testing.assert_close(summed, expected.sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                                  "riemann_trapezoid"])
def test_integrated_gradients_of_linear_model_is_x_times_weight(linear_image, rule):
    x, target = make_images(2, seed=2), torch.tensor([1, 3])
    result = IntegratedGradients(linear_image, steps=7, rule=rule, chunk_size=3, reduction="none")(x, target)
    expected = torch.stack([x[i] * linear_image.w(t) for i, t in enumerate(target.tolist())])
    torch.testing.assert_close(result.raw, expected, rtol=1e-5, atol=1e-6)
    # completeness: sum(x * w) = S(x) - S(0) (the bias cancels)
    scale = (linear_image(x) - linear_image(torch.zeros_like(x))).gather(1, target[:, None])[:, 0].abs()
    assert bool((result.completeness_error <= 1e-5 * scale).all()), result.completeness_error


def test_integrated_gradients_with_tensor_baseline(linear_image):
    x, target = make_images(2, seed=3), torch.tensor([0, 2])
    baseline = make_images(1, seed=4)[0]
    result = IntegratedGradients(linear_image, baseline=baseline, steps=4, reduction="none")(x, target)
    expected = torch.stack([(x[i] - baseline) * linear_image.w(t) for i, t in enumerate(target.tolist())])
    torch.testing.assert_close(result.raw, expected, rtol=1e-5, atol=1e-6)


def test_integration_points_are_quadrature_rules():
    for rule in ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"):
        alphas, weights = integration_points(9, rule)
        assert len(alphas) == len(weights) == 9
        assert sum(weights) == pytest.approx(1.0, abs=1e-12)
        # exact for x^2 up to the rule's order; all of them integrate x^2 on [0, 1] within 1e-2
        assert sum(w * a * a for a, w in zip(alphas, weights)) == pytest.approx(1 / 3, abs=6e-2)
    alphas, weights = integration_points(5, "gausslegendre")
    assert sum(w * a**9 for a, w in zip(alphas, weights)) == pytest.approx(0.1, abs=1e-12)  # degree 2n-1 exact
    assert integration_points(4, "riemann_left")[0] == [0.0, 0.25, 0.5, 0.75]
    assert integration_points(3, "riemann_trapezoid") == ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])


class ReluNet(nn.Module):
    """S(x) = V relu(W x); the ReLU is called in the style given by ``style``."""

    def __init__(self, style: str, d: int = 12, h: int = 16, k: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.W = nn.Parameter(torch.randn(h, d, generator=g))
        self.V = nn.Parameter(torch.randn(k, h, generator=g))
        self.style = style
        self.act = nn.ReLU(inplace=style == "module_inplace")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.W.t()
        if self.style.startswith("module"):
            a = self.act(z)
        elif self.style == "functional":
            a = F.relu(z)
        elif self.style == "functional_inplace":
            a = F.relu(z, inplace=True)
        elif self.style == "torch":
            a = torch.relu(z)
        elif self.style == "torch_inplace":
            a = torch.relu_(z)
        elif self.style == "method":
            a = z.relu()
        else:  # "method_inplace": the result is read from the mutated tensor, not the return value
            z.relu_()
            a = z
        return a @ self.V.t()


RELU_STYLES = ("module", "module_inplace", "functional", "functional_inplace", "torch", "torch_inplace", "method",
               "method_inplace")


@pytest.mark.parametrize("style", RELU_STYLES)
def test_modified_relu_rules_on_every_relu_call_style(style):
    model = ReluNet(style).eval()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(10))
    target = torch.tensor([0, 1, 2, 0, 1])
    W, V = model.W.detach(), model.V.detach()
    mask = (x @ W.t() > 0).float()  # (N, h)
    v = V[target]  # (N, h)
    expected = {
        "saliency": (mask * v) @ W,
        "guidedbackprop": (mask * v.clamp_min(0)) @ W,
        "deconvnet": v.clamp_min(0) @ W,
    }
    scores = x @ W.t()
    scores = scores.clamp_min(0) @ V.t()
    for cls in (Saliency, GuidedBackprop, DeconvNet):
        result = cls(model, absolute=False, layout="tabular")(x, target)
        torch.testing.assert_close(result.raw, expected[cls.name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.scores, scores, rtol=1e-5, atol=1e-6)
    assert not torch.equal(expected["guidedbackprop"], expected["saliency"])
    assert not torch.equal(expected["guidedbackprop"], expected["deconvnet"])
    assert torch.overrides._get_current_function_mode_stack() == []


# --------------------------------------------------------------------------------------------------
# Agreement with captum on seeded random-init torchvision models
# --------------------------------------------------------------------------------------------------


CAPTUM_CASES = {
    "saliency_abs": (lambda m: Saliency(m, reduction="none"),
                     lambda m, x, t: CaptumSaliency(m).attribute(x, target=t, abs=True)),
    "saliency_signed": (lambda m: Saliency(m, reduction="none", absolute=False),
                        lambda m, x, t: CaptumSaliency(m).attribute(x, target=t, abs=False)),
    "inputxgradient": (lambda m: InputXGradient(m, reduction="none"),
                       lambda m, x, t: CaptumInputXGradient(m).attribute(x, target=t)),
    "integratedgradients": (lambda m: IntegratedGradients(m, steps=6, chunk_size=4, rule="gausslegendre", reduction="none"),
                            lambda m, x, t: CaptumIntegratedGradients(m).attribute(x, target=t, n_steps=6,
                                                                                     method="gausslegendre")),
    "guidedbackprop": (lambda m: GuidedBackprop(m, reduction="none", absolute=False),
                       lambda m, x, t: CaptumGuidedBackprop(m).attribute(x, target=t)),
    "deconvnet": (lambda m: DeconvNet(m, reduction="none", absolute=False),
                  lambda m, x, t: CaptumDeconvolution(m).attribute(x, target=t)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", CAPTUM_CASES)
@pytest.mark.parametrize("model_name", TORCHVISION)
def test_matches_captum(torchvision_model, model_name, case):
    model = torchvision_model(model_name)
    ours, reference = CAPTUM_CASES[case]
    x = make_images(2, seed=60)
    target = torch.tensor([-1, 7])
    result = ours(model)(x, target)
    assert result.target[1] == 7 and result.target[0] == model(x[:1]).argmax(1)[0]
    expected = reference(model, x.clone(), result.target)
    assert_maps_close(result.raw, expected)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trapezoid_rule_is_captums_rescaled(resnet18):
    """captum's riemann_trapezoid weights are 1/n (ends halved) for points 1/(n-1) apart: they sum to
    (n-1)/n. pyattr uses the trapezoid rule's own weights 1/(n-1): captum's result times n/(n-1)."""
    x, target = make_images(2, seed=61), torch.tensor([3, 5])
    n = 6
    result = IntegratedGradients(resnet18, steps=n, rule="riemann_trapezoid", reduction="none")(x, target)
    expected = CaptumIntegratedGradients(resnet18).attribute(x.clone(), target=target, n_steps=n,
                                                            method="riemann_trapezoid")
    assert_maps_close(result.raw, expected * n / (n - 1))


def captum_noise_tunnel(monkeypatch, method: SmoothGrad, attribution, x, target, **kwargs) -> torch.Tensor:
    """captum's NoiseTunnel fed with pyattr's noise tensors: its single draw (``torch.normal`` over
    N * S samples, sample-major as ``repeat_interleave``) is replaced by ``method.noise(x)``."""
    noise = method.noise(x).flatten(0, 1)  # (N * S, ...)
    calls = []

    def normal(mean, std, *args, **kw):
        calls.append(tuple(std.shape))
        assert tuple(std.shape) == tuple(noise.shape)
        return noise.clone()

    monkeypatch.setattr(torch, "normal", normal)
    try:
        out = CaptumNoiseTunnel(attribution).attribute(x.clone(), nt_type=method.variant, nt_samples=method.samples,
                                                       stdevs=1.0, target=target, **kwargs)
    finally:
        monkeypatch.undo()
    assert len(calls) == 1
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("model_name", TORCHVISION)
def test_smoothgrad_matches_captum_noise_tunnel_with_the_same_noise(torchvision_model, model_name, monkeypatch):
    model = torchvision_model(model_name)
    x, target = make_images(2, seed=62), torch.tensor([2, 9])
    method = SmoothGrad(model, "saliency", samples=5, chunk_size=2, noise_level=0.2, seed=3, reduction="none")
    result = method(x, target)
    expected = captum_noise_tunnel(monkeypatch, method, CaptumSaliency(model), x, target, abs=True)
    assert_maps_close(result.raw, expected)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("variant, inner, captum_inner, kwargs", [
    ("smoothgrad_sq", "saliency", CaptumSaliency, {"abs": False}),
    ("vargrad", "saliency", CaptumSaliency, {"abs": False}),
    ("smoothgrad", "inputxgradient", CaptumInputXGradient, {}),
    ("vargrad", "guidedbackprop", CaptumGuidedBackprop, {}),
])
def test_smoothgrad_variants_match_captum(resnet18, monkeypatch, variant, inner, captum_inner, kwargs):
    x, target = make_images(2, seed=63), torch.tensor([1, 4])
    method = SmoothGrad(resnet18, inner, samples=4, chunk_size=3, variant=variant, seed=5, reduction="none",
                        absolute=False)
    result = method(x, target)
    expected = captum_noise_tunnel(monkeypatch, method, captum_inner(resnet18), x, target, **kwargs)
    assert_maps_close(result.raw, expected)


# --------------------------------------------------------------------------------------------------
# SmoothGrad and Integrated Gradients properties
# --------------------------------------------------------------------------------------------------


def test_smoothgrad_is_reproducible_batch_and_chunk_invariant(fresh_model):
    x, target = make_images(2, seed=70), torch.tensor([0, -1])
    method = SmoothGrad(fresh_model, samples=5, chunk_size=5, seed=11)
    first = method(x, target)
    assert torch.equal(SmoothGrad(fresh_model, samples=5, chunk_size=5, seed=11)(x, target).raw, first.raw)
    assert not torch.allclose(SmoothGrad(fresh_model, samples=5, seed=12)(x, target).raw, first.raw)
    chunked = SmoothGrad(fresh_model, samples=5, chunk_size=2, seed=11)(x, target)
    assert_maps_close(chunked.raw, first.raw, rtol=1e-6)
    alone = method(x[1:2], target[1:2])
    assert_maps_close(alone.raw, first.raw[1:2], rtol=1e-5)
    # the noise scales with each input's range
    noise = method.noise(x * torch.tensor([1.0, 0.5]).view(2, 1, 1, 1))
    assert noise.shape == (2, 5, 3, 64, 64)
    ranges = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    std = noise.flatten(1).std(1)
    torch.testing.assert_close(std, 0.15 * ranges * torch.tensor([1.0, 0.5]), rtol=0.02, atol=0)


def test_smoothgrad_without_noise_is_the_inner_method(fresh_model):
    x, target = make_images(2, seed=71), torch.tensor([1, 2])
    for inner in ("saliency", "inputxgradient", "guidedbackprop"):
        smooth = SmoothGrad(fresh_model, inner, noise_level=0.0, samples=3)(x, target)
        plain = build_method(inner, fresh_model)(x, target)
        assert_maps_close(smooth.raw, plain.raw, rtol=1e-5)
    squared = SmoothGrad(fresh_model, noise_level=0.0, samples=3, variant="vargrad")(x, target)
    assert float(squared.raw.abs().max()) <= 1e-6 * float(plain.raw.abs().max()) + 1e-12


def test_vargrad_is_mean_square_minus_square_mean(fresh_model):
    x, target = make_images(2, seed=72), torch.tensor([3, 0])
    options = {"samples": 5, "seed": 2, "reduction": "none", "absolute": False}
    mean = SmoothGrad(fresh_model, variant="smoothgrad", **options)(x, target).raw
    square = SmoothGrad(fresh_model, variant="smoothgrad_sq", **options)(x, target).raw
    var = SmoothGrad(fresh_model, variant="vargrad", **options)(x, target).raw
    assert_maps_close(var, square - mean * mean, rtol=1e-4)
    assert float(var.min()) >= -1e-6 * float(var.abs().max())


def test_smoothgrad_over_integrated_gradients(fresh_model):
    x, target = make_images(2, seed=73), torch.tensor([5, 1])
    inner = IntegratedGradients(fresh_model, steps=4)
    smooth = SmoothGrad(fresh_model, inner, noise_level=0.0, samples=2)(x, target)
    assert_maps_close(smooth.raw, inner(x, target).raw, rtol=1e-5)


class _FoldsClean:
    """Runs the clean input as one more row of the first batched pass in eager calls too (as traced graphs do)."""

    def folds_clean(self) -> bool:
        return True


class FoldedIG(_FoldsClean, IntegratedGradients):
    pass


class FoldedSmoothGrad(_FoldsClean, SmoothGrad):
    pass


def test_clean_input_in_the_first_pass_gives_the_same_results():
    """An exported IG / SmoothGrad graph takes the clean input's scores and arg-max targets from one more row of
    its batched pass (the model is traced once); eager calls from a no-grad forward: the same scores, targets and
    maps, with chunked passes, several targets, the inner methods that take the row and one that does not (IG),
    and a target with a run-time input (the reference) and an extra output (the embedding, from the clean row)."""
    from target_models import tiny_embedder

    from pyattr.targets import SimilarityTarget

    model = tiny_embedder()  # (N, 3, 16, 16) -> (N, 6): scores of 6 "classes" too
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    pairs = [(FoldedIG(model, steps=6, chunk_size=4), IntegratedGradients(model, steps=6, chunk_size=4)),
             (FoldedSmoothGrad(model, "inputxgradient", samples=5, chunk_size=2),
              SmoothGrad(model, "inputxgradient", samples=5, chunk_size=2)),
             (FoldedSmoothGrad(model, "guidedbackprop", samples=3), SmoothGrad(model, "guidedbackprop", samples=3)),
             (FoldedSmoothGrad(model, IntegratedGradients(model, steps=3), samples=2),
              SmoothGrad(model, IntegratedGradients(model, steps=3), samples=2))]
    for folded, plain in pairs:
        for target in (torch.tensor([-1, 2, -1]), torch.tensor([[-1, 2], [0, 1], [3, -1]])):
            a, b = folded(x, target), plain(x, target)
            assert torch.equal(a.target, b.target)
            torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
            assert_maps_close(a.raw, b.raw, rtol=1e-5)
    ref = torch.randn(3, 6, generator=torch.Generator().manual_seed(4))
    for folded, plain in pairs[:2]:
        a, b = folded(x, SimilarityTarget(ref)), plain(x, SimilarityTarget(ref))
        torch.testing.assert_close(a.outputs["embedding"], model(x).detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
        assert_maps_close(a.raw, b.raw, rtol=1e-5)


def test_multi_pass_graphs_trace_the_model_once():
    """IG's and SmoothGrad's traced graphs hold as many convolutions as Saliency's (one forward and its backward):
    the clean input runs in the batched pass, not in a second traced forward (one model's export time more)."""
    from target_models import tiny_embedder

    model = tiny_embedder()

    def convolutions(method) -> int:
        graph = trace_graph(method, torch.rand(1, 3, 16, 16)).graph
        return sum(n.target is torch.ops.aten.convolution.default for n in graph.nodes)

    once = convolutions(Saliency(model))
    assert once > 0
    for method in (IntegratedGradients(model, steps=3), SmoothGrad(model, samples=2),
                   SmoothGrad(model, "inputxgradient", samples=2)):
        assert convolutions(method) == once, type(method).__name__


def test_integrated_gradients_chunking_and_baselines(fresh_model):
    x, target = make_images(2, seed=74), torch.tensor([2, -1])
    whole = IntegratedGradients(fresh_model, steps=7, chunk_size=7)(x, target)
    chunked = IntegratedGradients(fresh_model, steps=7, chunk_size=3)(x, target)
    assert_maps_close(chunked.raw, whole.raw, rtol=1e-5)
    for baseline in ("blur", "uniform", torch.full((3, 64, 64), 0.5)):
        method = IntegratedGradients(fresh_model, baseline=baseline, steps=8)
        result = method(x, target)
        b = method.baseline_of(x)
        assert b.shape == x.shape
        with torch.no_grad():
            gap = (fresh_model(x) - fresh_model(b)).gather(1, result.target[:, None])[:, 0]
        # reported error = |sum of the attributions - score gap| (the default map is the signed channel sum)
        torch.testing.assert_close(result.completeness_error, (result.raw.flatten(1).sum(1) - gap).abs(),
                                   rtol=0, atol=1e-5 * float(gap.abs().max()) + 1e-7)
    blurred = IntegratedGradients(fresh_model, baseline="blur", blur_sigma=3.0).baseline_of(x)
    assert float((blurred - x).abs().mean()) > 0.05  # blurred, not the input
    torch.testing.assert_close(blurred.mean((2, 3)), x.mean((2, 3)), rtol=0, atol=2e-2)  # the blur keeps the mean
    uniform = IntegratedGradients(fresh_model, baseline="uniform", seed=4).baseline_of(x)
    unit = [(uniform[i] - x[i].min()) / (x[i].max() - x[i].min()) for i in range(2)]  # the same U[0, 1) draw
    torch.testing.assert_close(unit[0], unit[1], rtol=0, atol=1e-6)
    assert 0 <= float(unit[0].min()) and float(unit[0].max()) < 1 and float(unit[0].std()) > 0.25


@pytest.mark.parametrize("rule", ["riemann_trapezoid", "riemann_middle"])
def test_integrated_gradients_completeness_on_the_builtin_model(builtin_model, rule):
    """64 steps from the zero baseline: |sum(A) - (S(x) - S(0))| / |S(x) - S(0)| is 5.5e-3 on average
    (trapezoid, 24 images, docs/gradient_methods.md); a path that crosses many ReLU kinks reaches 1e-2 to 1.8e-2."""
    batch = pyattr.zoo.generate(8, seed=50_000)
    x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255
    result = IntegratedGradients(builtin_model, steps=64, rule=rule, chunk_size=32)(x)
    with torch.no_grad():
        gap = (builtin_model(x) - builtin_model(torch.zeros_like(x))).gather(1, result.target[:, None])[:, 0]
    assert float(gap.abs().min()) > 1.0  # a real score difference to complete
    relative = result.completeness_error / gap.abs()
    assert float(relative.mean()) < 1e-2, relative
    assert float(relative.max()) < 2e-2, relative


# --------------------------------------------------------------------------------------------------
# Several targets, output selectors, non-image inputs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_model() -> nn.Module:
    """A random-init ShapesNet with non-trivial BN statistics (independent of the trained weights)."""
    torch.manual_seed(6)
    model = pyattr.zoo.ShapesNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


SMALL = {
    "saliency": lambda m, **kw: Saliency(m, **kw),
    "inputxgradient": lambda m, **kw: InputXGradient(m, **kw),
    "smoothgrad": lambda m, **kw: SmoothGrad(m, "guidedbackprop", samples=3, chunk_size=2, **kw),
    "integratedgradients": lambda m, **kw: IntegratedGradients(m, steps=3, chunk_size=2, **kw),
    "guidedbackprop": lambda m, **kw: GuidedBackprop(m, **kw),
    "deconvnet": lambda m, **kw: DeconvNet(m, **kw),
}


@pytest.mark.parametrize("name", SMALL)
def test_several_targets_per_input_equal_separate_calls(fresh_model, name):
    method = SMALL[name](fresh_model)
    x = make_images(2, seed=80)
    targets = torch.tensor([[0, 3, -1], [5, 5, 1]])
    result = method(x, targets)
    assert result.raw.shape == (2, 3, 64, 64) and result.maps.shape == (2, 3, 64, 64)
    assert result.target.shape == (2, 3) and result.scores.shape == (2, 6)
    for j in range(3):
        alone = method(x, targets[:, j])
        assert torch.equal(alone.target, result.target[:, j])
        assert_maps_close(result.raw[:, j], alone.raw, rtol=1e-5)
        torch.testing.assert_close(result.maps[:, j], alone.maps, rtol=0, atol=1e-5)
    if name == "integratedgradients":
        assert result.completeness_error.shape == (2, 3)


@pytest.mark.parametrize("name", ["GradCAM", "GuidedGradCAM"])
def test_several_targets_for_cam_methods(fresh_model, name):
    """Grad-CAM takes one forward pass and one backward pass per target (``multi_target``); the base class
    repeats the batch for methods that take one target per input (Guided Grad-CAM): both equal separate calls."""
    method = getattr(pyattr, name)(fresh_model, "layer3")
    assert method.multi_target == (name == "GradCAM")
    # Not class 1: its Grad-CAM is zero everywhere on this random net (negative evidence only).
    x, targets = make_images(2, seed=81), torch.tensor([[3, 2], [0, -1]])
    result = method(x, targets)
    raw_size = 16 if name == "GradCAM" else 64
    assert result.raw.shape == (2, 2, raw_size, raw_size) and result.maps.shape == (2, 2, 64, 64)
    for j in range(2):
        alone = method(x, targets[:, j])
        assert torch.equal(alone.target, result.target[:, j])
        assert_maps_close(result.raw[:, j], alone.raw, rtol=1e-5)


class TupleOutput(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        logits = self.body(x)
        return logits, logits.sigmoid(), None


class DictOutput(TupleOutput):
    def forward(self, x):
        logits = self.body(x)
        return {"aux": logits.sum(1), "logits": logits}


@pytest.mark.parametrize("name", SMALL)
def test_output_selector(fresh_model, name):
    x, target = make_images(2, seed=82), torch.tensor([1, -1])
    reference = SMALL[name](fresh_model)(x, target)
    for model, output in ((TupleOutput(fresh_model), 0), (DictOutput(fresh_model), "logits"),
                          (DictOutput(fresh_model), lambda out: out["logits"])):
        result = SMALL[name](model.eval(), output=output)(x, target)
        assert torch.equal(result.raw, reference.raw) and torch.equal(result.target, reference.target)
    with pytest.raises(pyattr.InputError, match=r"returned a tuple.*output=0"):
        SMALL[name](TupleOutput(fresh_model))(x, target)
    with pytest.raises(pyattr.InputError, match=r"returned a dict.*output='aux'"):
        SMALL[name](DictOutput(fresh_model))(x, target)
    with pytest.raises(pyattr.InputError, match=r"scores must have shape \(N, K\).*got \(2,\) \(after output='aux'\)"):
        SMALL[name](DictOutput(fresh_model), output="aux")(x, target)


class SignalNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(13)
        self.conv = nn.Conv1d(2, 8, 5, padding=2)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool1d(4)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        h = self.act(self.conv(x))
        return self.fc(self.pool(h).flatten(1)), h


class TableNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(14)
        self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return {"logits": self.net(x)}


@pytest.mark.parametrize("name", SMALL)
def test_signals_and_tables(name):
    signal, table = SignalNet().eval(), TableNet().eval()
    xs = torch.randn(4, 2, 30, generator=torch.Generator().manual_seed(15))
    xt = torch.randn(4, 10, generator=torch.Generator().manual_seed(16))
    r = SMALL[name](signal, output=0, layout="signal")(xs, 2)
    assert r.raw.shape == r.maps.shape == (4, 30)
    assert float(r.maps.amax()) == pytest.approx(1.0) and float(r.maps.amin()) == 0.0
    r = SMALL[name](signal, output=0, layout="signal", reduction="none")(xs, torch.tensor([[0, 1]] * 4))
    assert r.raw.shape == r.maps.shape == (4, 2, 2, 30)
    r = SMALL[name](table, output="logits", layout="tabular")(xt)
    assert r.raw.shape == r.maps.shape == (4, 10) and r.target.shape == (4,)
    torch.testing.assert_close(r.maps, (r.raw - r.raw.amin(1, keepdim=True))
                               / (r.raw.amax(1, keepdim=True) - r.raw.amin(1, keepdim=True)))


def test_tabular_linear_model_is_exact():
    model = Linear((10,), k=3, seed=5).eval()
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(17))
    target = torch.tensor([0, 1, 2, 1])
    w = model.fc.weight.detach()[target]
    torch.testing.assert_close(Saliency(model, layout="tabular", absolute=False)(x, target).raw, w)
    torch.testing.assert_close(InputXGradient(model, layout="tabular")(x, target).raw, x * w)
    torch.testing.assert_close(IntegratedGradients(model, layout="tabular", steps=5)(x, target).raw, x * w,
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Export: one graph per method, no backward op, no hook
# --------------------------------------------------------------------------------------------------


# One exported graph per registered method (small sample / step counts keep the graphs small: every
# chunk is one more copy of the model's forward and backward). The SmoothGrad case also covers the
# Guided Backprop rule under noise and maps that keep the channels; Integrated Gradients covers
# chunked steps (2 + 1) and a baked (seeded) baseline. The blurred baseline is exported on signals
# below. (Seen once on images: a blurred-path point sat on a max-pool / ReLU tie, where eager float32
# itself moved by 6e-3 relative under 1e-7 input noise and onnxruntime agreed with float64 instead.)
EXPORT_CASES = {
    "inputxgradient": lambda m: build_method("inputxgradient", m),
    "guidedbackprop": lambda m: build_method("guidedbackprop", m),
    "deconvnet": lambda m: build_method("deconvnet", m),
    "smoothgrad": lambda m: SmoothGrad(m, "guidedbackprop", samples=3, variant="vargrad", reduction="none"),
    "integratedgradients": lambda m: IntegratedGradients(m, baseline="uniform", steps=3, chunk_size=2),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_contract_on_the_builtin_model(builtin_model, case, tmp_path):
    method = EXPORT_CASES[case](builtin_model)
    assert_export_contract(method, make_images(5, seed=90), tmp_path, num_classes=6)


@pytest.mark.filterwarnings("ignore")
def test_default_smoothgrad_exports_up_to_relu_ties(builtin_model, tmp_path):
    """The default SmoothGrad (16 noisy samples) evaluates 16 points per image, so it meets points within
    ~1e-7 of a ReLU kink 16 times as often as Saliency; any two conv kernels (torch's, onnxruntime's, with
    or without its graph optimizations) may route the gradient differently there. Measured on 80 images:
    the median image agrees to ~2e-7, ~10% of images differ by up to 9e-3 on a few pixels (0.05-0.15% of
    all pixels), with and without onnxruntime's optimizations. TorchScript runs torch's kernels: exact."""
    import numpy as np
    import onnxruntime as ort
    from conftest import make_shapes
    from contract import run_exported

    method = SmoothGrad(builtin_model)
    x = torch.cat([make_shapes(8, seed=7), make_images(8, seed=5)])
    t = torch.full((16,), -1)
    ref = method(x, t)
    onnx_path, ts_path = tmp_path / "sg.onnx", tmp_path / "sg.pt"
    pyattr.export(method, x[:1], onnx_path)
    pyattr.export(method, x[:1], ts_path)
    _, explained, _, maps = run_exported("torchscript", ts_path, x, t)
    assert torch.equal(explained.long(), ref.target)
    assert float((maps - ref.maps).abs().max()) < 1e-5
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scores, explained, _, maps = sess.run(None, {"images": x.numpy(), "target": t.numpy()})
    assert np.array_equal(explained, ref.target.numpy())
    assert float(np.abs(scores - ref.scores.numpy()).max()) < 1e-4
    err = np.abs(maps - ref.maps.numpy()).reshape(16, -1)
    assert float(np.median(err.max(axis=1))) < 1e-6  # most images: exact to float rounding
    assert float((err > 1e-4).mean()) < 5e-3  # tie pixels are rare ...
    assert float(err.max()) < 3e-2  # ... and bounded by one sample's share of the map


@pytest.mark.filterwarnings("ignore")
def test_export_contract_signals_and_tables(tmp_path):
    signal, table = SignalNet().eval(), TableNet().eval()
    xs = torch.randn(5, 2, 30, generator=torch.Generator().manual_seed(18))
    xt = torch.randn(5, 10, generator=torch.Generator().manual_seed(19))
    for name in ("signal", "table"):
        (tmp_path / name).mkdir()
    assert_export_contract(IntegratedGradients(signal, output=0, layout="signal", baseline="blur", steps=4),
                           xs, tmp_path / "signal", num_classes=4)
    assert_export_contract(SmoothGrad(table, "deconvnet", output="logits", layout="tabular", samples=3),
                           xt, tmp_path / "table", num_classes=3)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ["guidedbackprop", "deconvnet"])
def test_modified_relu_graph_of_resnet18_holds_forward_ops_only(resnet18, name):
    """resnet18 uses nn.ReLU(inplace=True): the traced graph holds the rule as forward ops, and it
    computes the same maps as the eager call (which agrees with captum, above)."""
    method = build_method(name, resnet18)
    x = make_images(2, seed=91)
    gm = trace_graph(method, x[:1])
    assert backward_ops_left(gm) == []
    target = torch.tensor([4, -1])
    _, explained, raw, _ = gm(x, target)
    ref = method(x, target)
    assert torch.equal(explained, ref.target)
    assert_maps_close(raw, ref.raw, rtol=1e-5)
    plain = Saliency(resnet18)(x, ref.target)
    assert max_relative_error(ref.raw, plain.raw) > 0.1  # the rule changed the map


def test_every_gradient_method_is_registered_and_buildable_with_defaults(fresh_model):
    for name in GRADIENT_METHODS:
        method = build_method(name, fresh_model, "layer3")
        assert type(method) is METHODS[name] and method.name == name


# --------------------------------------------------------------------------------------------------
# State hygiene and errors
# --------------------------------------------------------------------------------------------------


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def snapshot(model: nn.Module) -> dict:
    return {
        "hooks": {(n, a): list(getattr(m, a).keys()) for n, m in model.named_modules() for a in HOOK_DICTS},
        "training": {n: m.training for n, m in model.named_modules()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": {n: type(m) for n, m in model.named_modules()},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("hooks", "training", "modules"):
        assert after[key] == before[key], key
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    assert all(p.grad is None for p in model.parameters())
    assert torch.overrides._get_current_function_mode_stack() == []


class Explodes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        self.act(self.conv(x))
        raise RuntimeError("boom inside the forward")


@pytest.mark.parametrize("name", SMALL)
def test_no_state_left_behind(fresh_model, name):
    model = copy.deepcopy(fresh_model).train()
    before = snapshot(model)
    x = make_images(2, seed=92).requires_grad_(True)
    with torch.no_grad():
        result = SMALL[name](model)(x, torch.tensor([[1, 2], [0, -1]]))
        assert not torch.is_grad_enabled()
    assert_untouched(model, before)
    assert x.grad is None and not result.raw.requires_grad and not result.maps.requires_grad
    exploding = Explodes().train()
    before = snapshot(exploding)
    with pytest.raises(RuntimeError, match="boom inside the forward"):
        SMALL[name](exploding)(make_images(1, seed=93))
    assert_untouched(exploding, before)


def test_errors(fresh_model):
    with pytest.raises(ValueError, match="unknown reduction 'median'; use one of max, sum, l2, mean, none"):
        Saliency(fresh_model, reduction="median")
    with pytest.raises(ValueError, match="unknown SmoothGrad variant 'sq'"):
        SmoothGrad(fresh_model, variant="sq")
    with pytest.raises(ValueError, match="unknown inner method 'gradcam'"):
        SmoothGrad(fresh_model, "gradcam")
    with pytest.raises(pyattr.InputError, match="same model"):
        SmoothGrad(fresh_model, Saliency(copy.deepcopy(fresh_model)))
    with pytest.raises(ValueError, match="unknown integration rule 'simpson'"):
        IntegratedGradients(fresh_model, rule="simpson")
    with pytest.raises(ValueError, match="unknown baseline 'ones'"):
        IntegratedGradients(fresh_model, baseline="ones")
    with pytest.raises(pyattr.InputError, match="blurred baseline needs images or signals"):
        IntegratedGradients(fresh_model, baseline="blur", layout="tabular")
    with pytest.raises(pyattr.InputError, match=r"baseline's shape \(2, 64, 64\) does not broadcast"):
        IntegratedGradients(fresh_model, baseline=torch.zeros(2, 64, 64))(make_images(1))
    with pytest.raises(pyattr.InputError, match=r"baseline's shape \(3, 3, 64, 64\) does not broadcast.*\(N, \.\.\.\)"):
        IntegratedGradients(fresh_model, baseline=torch.zeros(3, 3, 64, 64))(make_images(2))  # more rows than inputs
    with pytest.raises(pyattr.InputError, match="layout image, signal, tabular; got layout='video'"):
        Saliency(fresh_model, layout="video")
    with pytest.raises(pyattr.InputError, match=r"\(N, C, H, W\), got \(3, 64, 64\).*layout='signal'"):
        Saliency(fresh_model)(torch.rand(3, 64, 64))
    with pytest.raises(pyattr.InputError, match=r"shape \(N, C, L\), got \(2, 3, 8, 8\)"):
        Saliency(fresh_model, layout="signal")(torch.rand(2, 3, 8, 8))
    with pytest.raises(pyattr.InputError, match=r"target class 6 is out of range"):
        IntegratedGradients(fresh_model, steps=2)(make_images(2), torch.tensor([[0, 6], [1, 2]]))
    with pytest.raises(pyattr.InputError, match=r"target class 7 is out of range"):
        SmoothGrad(fresh_model, samples=2)(make_images(2), 7)
