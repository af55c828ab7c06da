"""Tests for pyattr's eager attribution methods (Saliency, Grad-CAM).

Analytic cases, agreement with captum and pytorch-grad-cam, batch consistency, normalization,
state hygiene (no grad, hook, mode or weight change survives a call, even a failing one) and errors.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from captum.attr import Saliency as CaptumSaliency
from conftest import MODEL_NAMES, inputs_for, make_images
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

import pyattr
from pyattr.zoo import ShapesNet

REFERENCE_RTOL = 1e-5


def assert_maps_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = REFERENCE_RTOL) -> None:
    """Per sample, max |actual - expected| <= rtol * max |expected| (for an all-zero expected map, rtol
    times the largest map of the batch). At least one expected map must be non-zero (otherwise the
    comparison proves nothing)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape
    scale = expected.flatten(1).abs().amax(1)
    error = (actual - expected).flatten(1).abs().amax(1)
    assert bool((scale > 0).any()), "every reference map is zero: the comparison is vacuous"
    for i in range(len(scale)):
        bound = rtol * float(scale[i] if scale[i] > 0 else scale.max())
        assert float(error[i]) <= bound, f"sample {i}: error {float(error[i]):.3g} > {bound:.3g}"


def mixed_targets(n: int, num_classes: int) -> torch.Tensor:
    """Explicit, distinct-ish per-sample class ids covering both ends of the range."""
    return torch.tensor([(0, num_classes - 1, 2, 1, 3)[i % 5] % num_classes for i in range(n)])


def make_method(kind: str, model: nn.Module, layer: str) -> pyattr.AttributionMethod:
    return pyattr.Saliency(model) if kind == "saliency" else pyattr.GradCAM(model, layer=layer)


# --------------------------------------------------------------------------------------------------
# Analytic cases
# --------------------------------------------------------------------------------------------------


class LinearModel(nn.Module):
    """f(x) = W flatten(x) + b."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def linear_case():
    c, h, w, k = 3, 64, 64, 5
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(k, c * h * w, generator=generator)
    bias = torch.randn(k, generator=generator)
    return LinearModel(weight, bias).eval(), weight.view(k, c, h, w)


@pytest.mark.parametrize(
    "reduction, expected",
    [
        ("max", lambda w: w.abs().amax(0)),
        ("sum", lambda w: w.abs().sum(0)),
        ("l2", lambda w: w.pow(2).sum(0).sqrt()),
        ("mean", lambda w: w.mean(0)),
    ],
)
def test_saliency_of_linear_model_is_its_weight_row(linear_case, reduction, expected):
    model, weight = linear_case
    x = make_images(3, seed=1)
    target = torch.tensor([4, 0, 2])
    result = pyattr.Saliency(model, reduction=reduction)(x, target)
    for i, t in enumerate(target.tolist()):
        torch.testing.assert_close(result.raw[i], expected(weight[t]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.scores, model(x), rtol=0, atol=0)
    assert torch.equal(result.target, target)


def test_saliency_of_linear_model_default_target_is_argmax(linear_case):
    model, weight = linear_case
    x = make_images(4, seed=2)
    result = pyattr.Saliency(model)(x)
    argmax = model(x).argmax(1)
    assert torch.equal(result.target, argmax)
    assert len(set(argmax.tolist())) > 1, "pick inputs whose arg-max classes differ"
    for i, t in enumerate(argmax.tolist()):
        torch.testing.assert_close(result.raw[i], weight[t].abs().amax(0), rtol=1e-6, atol=1e-6)


class ConvGapLinear(nn.Module):
    """conv -> ReLU -> global average pool -> linear: the CAM architecture of Zhou et al. 2016."""

    def __init__(self, channels: int = 8, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


@pytest.mark.parametrize("target", [torch.tensor([3, 0, 1, 2]), None])
def test_gradcam_with_gap_linear_head_is_cam(target):
    torch.manual_seed(5)
    model = ConvGapLinear().eval()
    x = make_images(4, seed=4)
    result = pyattr.GradCAM(model, layer="act")(x, target)
    activations = torch.relu(model.conv(x)).detach()  # (N, C, 32, 32)
    h, w = activations.shape[-2:]
    resolved = model(x).argmax(1) if target is None else target
    assert torch.equal(result.target, resolved)
    # dS_t/dA_k = W_fc[t, k] / (hw) everywhere, so Grad-CAM = ReLU(sum_k W_fc[t,k] A_k) / (hw) = CAM / (hw).
    cam = torch.relu(torch.einsum("nk,nkhw->nhw", model.fc.weight[resolved].detach(), activations)) / (h * w)
    assert result.raw.shape == (4, h, w)
    assert_maps_close(result.raw, cam)
    # maps: bilinear (align_corners=False) resize of the raw map to the input size, min-max per sample
    up = F.interpolate(cam[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0].flatten(1)
    lo, hi = up.amin(1, keepdim=True), up.amax(1, keepdim=True)
    torch.testing.assert_close(result.maps, ((up - lo) / (hi - lo)).view(4, 64, 64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_gradcam_raw_map_has_layer_resolution(model_case, model_name):
    case = model_case(model_name)
    x = inputs_for(model_name, 2, seed=5)
    shapes = []
    handle = case.model.get_submodule(case.layer).register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    try:
        with torch.no_grad():
            case.model(x)
    finally:
        handle.remove()
    h, w = shapes[0][-2:]
    assert h * w > 1
    result = pyattr.GradCAM(case.model, layer=case.layer)(x, 1)
    assert result.raw.shape == (2, h, w)
    assert result.maps.shape == (2, 64, 64)
    assert result.scores.shape == (2, case.num_classes)


# --------------------------------------------------------------------------------------------------
# Agreement with reference implementations
# --------------------------------------------------------------------------------------------------


def resolved_targets(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    if target is not None:
        return target
    with torch.no_grad():
        return model(x).argmax(1)


def pytorch_grad_cam_raw(model: nn.Module, layer: nn.Module, x: torch.Tensor,
                         target: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's Grad-CAM at the layer's resolution: its own activation/gradient capture and
    ``get_cam_image``, then the ReLU of ``compute_cam_per_layer``, without its resize and rescale."""
    cam = PgcGradCAM(model=model, target_layers=[layer])
    try:
        targets = [ClassifierOutputTarget(int(t)) for t in target]
        outputs = cam.activations_and_grads(x)
        loss = sum(t(o) for t, o in zip(targets, outputs))
        loss.backward(retain_graph=True)
        activations = cam.activations_and_grads.activations[0].numpy()
        gradients = cam.activations_and_grads.gradients[0].numpy()
        raw = cam.get_cam_image(x, layer, targets, activations, gradients)
        return torch.from_numpy(np.maximum(raw, 0))
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)  # the shared model must not keep .grad


@pytest.fixture(params=["explicit", "argmax"])
def target_kind(request) -> str:
    return request.param


def make_target(kind: str, n: int, num_classes: int) -> torch.Tensor | None:
    return mixed_targets(n, num_classes) if kind == "explicit" else None


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_saliency_matches_captum(model_case, model_name, target_kind):
    case = model_case(model_name)
    x = inputs_for(model_name, 4, seed=10)
    target = make_target(target_kind, 4, case.num_classes)
    result = pyattr.Saliency(case.model)(x, target)
    resolved = resolved_targets(case.model, x, target)
    assert torch.equal(result.target, resolved)
    reference = CaptumSaliency(case.model).attribute(x.clone().requires_grad_(), target=resolved, abs=True)
    reference = reference.amax(1)
    assert_maps_close(result.raw, reference)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_gradcam_matches_captum(model_case, model_name, target_kind):
    case = model_case(model_name)
    x = inputs_for(model_name, 4, seed=11)
    target = make_target(target_kind, 4, case.num_classes)
    result = pyattr.GradCAM(case.model, layer=case.layer)(x, target)
    resolved = resolved_targets(case.model, x, target)
    assert torch.equal(result.target, resolved)
    layer = case.model.get_submodule(case.layer)
    reference = LayerGradCam(case.model, layer).attribute(x.clone(), target=resolved, relu_attributions=True)
    assert reference.shape[1] == 1
    assert_maps_close(result.raw, reference[:, 0])


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_gradcam_matches_pytorch_grad_cam(model_case, model_name, target_kind):
    case = model_case(model_name)
    x = inputs_for(model_name, 4, seed=12)
    target = make_target(target_kind, 4, case.num_classes)
    result = pyattr.GradCAM(case.model, layer=case.layer)(x, target)
    resolved = resolved_targets(case.model, x, target)
    assert torch.equal(result.target, resolved)
    reference = pytorch_grad_cam_raw(case.model, case.model.get_submodule(case.layer), x.clone(), resolved)
    assert_maps_close(result.raw, reference)


# --------------------------------------------------------------------------------------------------
# Batch consistency and normalization
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["saliency", "gradcam"])
@pytest.mark.parametrize("model_name", ["builtin", "resnet18"])
def test_batch_equals_samples_alone(model_case, model_name, kind):
    """Batching does not mix samples. In float64: in float32 the batch and a single sample may run different
    convolution kernels whose rounding switches a ReLU with a pre-activation within rounding of zero (seen:
    resnet18 Saliency, one sample off by 1.1e-4 on an AVX2-only CPU), which is not what this test is about."""
    case = model_case(model_name)
    method = make_method(kind, copy.deepcopy(case.model).double(), case.layer)
    x = inputs_for(model_name, 4, seed=20).double()
    target = torch.tensor([-1, 1, -1, 0])
    batch = method(x, target)
    alone = [method(x[i : i + 1], target[i : i + 1]) for i in range(4)]
    assert torch.equal(torch.cat([a.target for a in alone]), batch.target)
    assert_maps_close(torch.cat([a.raw for a in alone]), batch.raw)
    torch.testing.assert_close(torch.cat([a.scores for a in alone]), batch.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([a.maps for a in alone]), batch.maps, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["saliency", "gradcam"])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_maps_are_minmax_normalized_per_sample(model_case, model_name, kind):
    case = model_case(model_name)
    x = inputs_for(model_name, 3, seed=30)
    result = make_method(kind, case.model, case.layer)(x, None)
    assert result.maps.shape == (3, 64, 64)
    assert result.maps.dtype == torch.float32
    flat = result.maps.flatten(1)
    for i in range(3):
        if float(result.raw[i].amax()) == float(result.raw[i].amin()):
            continue  # constant raw map (checked by its own test below)
        assert float(flat[i].amin()) == 0.0
        assert float(flat[i].amax()) == pytest.approx(1.0, abs=1e-6)
    assert bool(((flat >= 0) & (flat <= 1)).all())
    assert bool(result.raw.flatten(1).amax(1).gt(result.raw.flatten(1).amin(1)).any())


def test_constant_map_normalizes_to_zeros_not_nan(linear_case):
    model, _ = linear_case
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.fc.weight.zero_()
    result = pyattr.Saliency(dead)(make_images(2, seed=31), 1)
    assert torch.equal(result.raw, torch.zeros(2, 64, 64))
    assert torch.equal(result.maps, torch.zeros(2, 64, 64))


# --------------------------------------------------------------------------------------------------
# State hygiene
# --------------------------------------------------------------------------------------------------


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def snapshot(model: nn.Module) -> dict:
    return {
        "hooks": {(name, attr): list(getattr(m, attr).keys())
                  for name, m in model.named_modules() for attr in HOOK_DICTS},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["hooks"] == before["hooks"], "a hook outlived the call"
    assert after["training"] == before["training"], "a module's training flag changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{k} changed"
        assert v.dtype == after["state"][k].dtype
    assert all(p.grad is None for p in model.parameters()), "a parameter received .grad"
    for hooks in (torch.nn.modules.module._global_forward_hooks,
                  torch.nn.modules.module._global_forward_pre_hooks,
                  torch.nn.modules.module._global_backward_hooks):
        assert len(hooks) == 0


@pytest.fixture
def fresh_shapesnet() -> nn.Module:
    torch.manual_seed(6)
    model = ShapesNet()
    for m in model.modules():  # non-trivial BN statistics and residual branches
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["saliency", "gradcam"])
def test_call_leaves_model_untouched(fresh_shapesnet, kind):
    model = fresh_shapesnet
    user_calls = []
    model.layer3.register_forward_hook(lambda *_: user_calls.append(1))  # the user's own hook stays
    before = snapshot(model)
    make_method(kind, model, "layer3")(make_images(2, seed=40), torch.tensor([1, -1]))
    assert_untouched(model, before)
    assert len(user_calls) == 1


@pytest.mark.parametrize("kind", ["saliency", "gradcam"])
def test_train_mode_is_restored_and_maps_equal_eval_mode(fresh_shapesnet, kind):
    model = fresh_shapesnet
    x, target = make_images(3, seed=41), torch.tensor([0, -1, 5])
    eval_result = make_method(kind, model, "layer3")(x, target)
    model.train()
    model.layer1.eval()  # a mixed state must come back exactly as it was
    before = snapshot(model)
    train_result = make_method(kind, model, "layer3")(x, target)
    assert_untouched(model, before)  # includes BN running statistics: no update in the call
    assert model.training and not model.layer1.training and model.layer2.bn1.training
    for name in ("maps", "raw", "scores", "target"):
        assert torch.equal(getattr(train_result, name), getattr(eval_result, name)), name


class ExplodesAfterLayer(nn.Module):
    """A forward that raises after its ``body`` layer has run (hooks are already installed then)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.head(self.body(x).mean((2, 3)))
        raise RuntimeError("boom after the target layer")


@pytest.mark.parametrize("kind", ["saliency", "gradcam"])
def test_state_is_restored_when_the_model_raises(kind):
    model = ExplodesAfterLayer().train()
    before = snapshot(model)
    method = make_method(kind, model, "body")
    with pytest.raises(RuntimeError, match="boom after the target layer"):
        method(make_images(2, seed=42))
    assert_untouched(model, before)
    assert model.training and model.body[1].training


def test_state_is_restored_when_the_target_check_raises(fresh_shapesnet):
    model = fresh_shapesnet.train()
    before = snapshot(model)
    for method in (pyattr.Saliency(model), pyattr.GradCAM(model, "layer3")):
        with pytest.raises(pyattr.InputError, match="out of range"):
            method(make_images(2, seed=43), torch.tensor([0, 6]))
        assert_untouched(model, before)


@pytest.mark.parametrize("kind", ["saliency", "gradcam"])
def test_works_under_no_grad_and_with_frozen_parameters(fresh_shapesnet, kind):
    model = fresh_shapesnet
    x, target = make_images(2, seed=44), torch.tensor([2, -1])
    reference = make_method(kind, model, "layer3")(x, target)
    with torch.no_grad():
        under_no_grad = make_method(kind, model, "layer3")(x, target)
        assert not torch.is_grad_enabled()  # the call does not leak its enable_grad
    frozen = copy.deepcopy(model).requires_grad_(False)
    before = snapshot(frozen)
    with_frozen = make_method(kind, frozen, "layer3")(x, target)
    assert_untouched(frozen, before)
    assert not any(p.requires_grad for p in frozen.parameters())
    for result in (under_no_grad, with_frozen):
        for name in ("maps", "raw", "scores", "target"):
            assert torch.equal(getattr(result, name), getattr(reference, name)), name
    assert float(reference.raw.abs().amax()) > 0


@pytest.mark.parametrize("kind", ["saliency", "gradcam"])
def test_works_under_inference_mode(fresh_shapesnet, kind):
    model = fresh_shapesnet
    x, target = make_images(2, seed=45), torch.tensor([3, -1])
    reference = make_method(kind, model, "layer3")(x, target)
    with torch.inference_mode():
        xi, ti = x.clone(), target.clone()  # inference tensors
        result = make_method(kind, model, "layer3")(xi, ti)
        assert torch.is_inference_mode_enabled()  # the call does not leak its inference_mode(False)
    for name in ("maps", "raw", "scores", "target"):
        assert torch.equal(getattr(result, name), getattr(reference, name)), name
    with torch.inference_mode():
        built_there = copy.deepcopy(model)  # its parameters are inference tensors
    assert all(p.is_inference() for p in built_there.parameters())
    with pytest.raises(pyattr.InputError, match="created under torch.inference_mode"):
        make_method(kind, built_there, "layer3")(x, target)


def test_input_tensor_is_not_modified_nor_given_grad(fresh_shapesnet):
    x = make_images(2, seed=45).requires_grad_(True)
    copy_of_x = x.detach().clone()
    for method in (pyattr.Saliency(fresh_shapesnet), pyattr.GradCAM(fresh_shapesnet, "layer3")):
        result = method(x)
        assert x.grad is None
        assert torch.equal(x.detach(), copy_of_x)
        assert not result.maps.requires_grad and not result.raw.requires_grad
        assert not result.scores.requires_grad


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model() -> nn.Module:
    torch.manual_seed(7)
    return ConvGapLinear(num_classes=6).eval()


@pytest.mark.parametrize("kind", ["saliency", "gradcam"])
def test_input_errors(small_model, kind):
    method = make_method(kind, small_model, "act")
    with pytest.raises(pyattr.InputError, match=r"\(3, 64, 64\).*add a batch dimension"):
        method(torch.rand(3, 64, 64))
    with pytest.raises(pyattr.InputError, match=r"shape \(N, C, H, W\), got \(64, 64\)"):
        method(torch.rand(64, 64))
    with pytest.raises(pyattr.InputError, match="must be floating point, got torch.uint8"):
        method(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(pyattr.InputError, match="floating point, got torch.int64"):
        method(torch.zeros(1, 3, 64, 64, dtype=torch.long))
    with pytest.raises(pyattr.InputError, match="must be a torch.Tensor"):
        method(np.zeros((1, 3, 64, 64), dtype=np.float32))
    with pytest.raises(pyattr.InputError, match="batch size 0"):
        method(torch.rand(0, 3, 64, 64))


@pytest.mark.parametrize("kind", ["saliency", "gradcam"])
def test_target_errors(small_model, kind):
    method = make_method(kind, small_model, "act")
    x = make_images(2, seed=50)
    with pytest.raises(pyattr.InputError, match=r"target class 6 is out of range: the model has 6 outputs"):
        method(x, 6)
    with pytest.raises(pyattr.InputError, match=r"target class 9 .*6 outputs \(0\.\.5\)"):
        method(x, torch.tensor([0, 9]))
    with pytest.raises(pyattr.InputError, match=r"\(2,\) tensor of class ids, got shape \(3,\)"):
        method(x, torch.tensor([0, 1, 2]))
    with pytest.raises(pyattr.InputError, match=r"\(2,\) tensor of class ids, got shape \(2, 1, 1\)"):
        method(x, torch.tensor([[[0]], [[1]]]))
    with pytest.raises(pyattr.InputError, match="class index >= 0, got -2"):
        method(x, -2)
    with pytest.raises(pyattr.InputError, match="negative class ids"):
        method(x, torch.tensor([0, -3]))
    with pytest.raises(pyattr.InputError, match="integer class indices, got dtype torch.float32"):
        method(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(pyattr.InputError, match="not a bool"):
        method(x, True)
    # accepted forms, for contrast
    assert method(x, [1, 2]).target.tolist() == [1, 2]
    assert method(x, torch.tensor(3)).target.tolist() == [3, 3]


def test_unknown_layer_lists_close_names(resnet18):
    close_to_layer4 = r"no layer named 'layer5'\. Close names: (?:[\w.]+, )*layer4[,.]"
    with pytest.raises(pyattr.LayerNotFoundError, match=close_to_layer4):
        pyattr.GradCAM(resnet18, layer="layer5")
    with pytest.raises(pyattr.LayerNotFoundError, match=r"Close names: (?:[\w.]+, )*layer1\.0\.conv1[,.]"):
        pyattr.GradCAM(resnet18, layer="layer1.0.conv")
    with pytest.raises(pyattr.LayerNotFoundError, match="model.named_modules"):
        pyattr.GradCAM(resnet18, layer="")
    with pytest.raises(KeyError):  # LayerNotFoundError is also a KeyError
        pyattr.GradCAM(resnet18, layer="nope")


def test_gradcam_on_a_layer_without_spatial_output_says_so(small_model):
    with pytest.raises(pyattr.InputError, match=r"'fc'.*\(N, C, h, w\).*got \(2, 6\).*convolutional layer"):
        pyattr.GradCAM(small_model, layer="fc")(make_images(2, seed=51))


def test_unknown_reduction(small_model):
    with pytest.raises(ValueError, match=r"unknown reduction 'median'; use one of max, sum, l2, mean"):
        pyattr.Saliency(small_model, reduction="median")


def test_model_must_be_a_module():
    with pytest.raises(pyattr.InputError, match="must be a torch.nn.Module, got function"):
        pyattr.Saliency(lambda x: x)
