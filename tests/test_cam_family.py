"""Tests for the CAM family and FullGrad (CAM, Grad-CAM++, XGrad-CAM, Layer-CAM, HiResCAM, Score-CAM, FullGrad).

Analytic cases on a conv -> GAP -> linear model; agreement with pytorch-grad-cam and torchcam on
seeded random-init torchvision models (raw maps at the layer's resolution, 1e-5 relative to each
map's max); FullGrad's completeness; fusion, automatic layer, ViT tokens; state hygiene; errors; and
the export contract (ONNX in onnxruntime, TorchScript, .pt2 vs eager, batch 1 and 5) for every method.
"""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import pytest
import test_methods
import torch
import torch.nn.functional as F
import torchvision
from conftest import NUM_CLASSES_TORCHVISION, make_images, seeded
from contract import assert_export_contract
from test_methods import ConvGapLinear, assert_maps_close, assert_untouched, snapshot
from torch import nn

import pyattr
from pyattr.methods import (
    CAM,
    METHODS,
    FullGrad,
    GradCAM,
    GradCAMPlusPlus,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    TokensToGrid,
    XGradCAM,
    build_method,
)
from pyattr.methods.cam import fuse_maps
from pyattr.methods.fullgrad import bias_layers

pgc = pytest.importorskip("pytorch_grad_cam")
tcm = pytest.importorskip("torchcam.methods")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

logging.getLogger("torchcam").setLevel(logging.ERROR)
CAM_NAMES = ("cam", "gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "scorecam", "fullgrad", "guidedgradcam")


fresh_shapesnet = test_methods.fresh_shapesnet  # fixture: a random-init ShapesNet with non-trivial BatchNorms


@pytest.fixture(scope="session")
def densenet121() -> nn.Module:
    return seeded(2, lambda: torchvision.models.densenet121(num_classes=NUM_CLASSES_TORCHVISION))


@pytest.fixture(scope="session")
def mobilenet_v3_small() -> nn.Module:
    return seeded(3, lambda: torchvision.models.mobilenet_v3_small(num_classes=NUM_CLASSES_TORCHVISION))


@pytest.fixture(scope="session")
def vgg11_bn() -> nn.Module:
    return seeded(4, lambda: torchvision.models.vgg11_bn(num_classes=NUM_CLASSES_TORCHVISION))


def _vit(**kwargs) -> nn.Module:
    model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_classes=NUM_CLASSES_TORCHVISION,
                                                 **kwargs)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits the head: all maps would be 0
    return model


@pytest.fixture(scope="session")
def vit_b_16() -> nn.Module:
    """torchvision's vit_b_16 (12 layers, 768 wide) at 64x64: a 4x4 grid of patches + the class token."""
    return seeded(5, lambda: _vit(num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072))


@pytest.fixture(scope="session")
def vit_tiny() -> nn.Module:
    """The same VisionTransformer class, 2 layers 64 wide: for the export and Score-CAM checks."""
    return seeded(6, lambda: _vit(num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128))


@pytest.fixture(scope="session")
def models(request):
    def get(name: str) -> nn.Module:
        return request.getfixturevalue(name)
    return get


VIT_LAYER = "encoder.layers.encoder_layer_11.ln_1"  # the last block's first norm: its patch tokens reach the score
VIT_TINY_LAYER = "encoder.layers.encoder_layer_1.ln_1"

# Layers at 4x4 (64x64 input). DenseNet's denseblock3 is a concatenation; "features" of DenseNet is
# followed by an in-place ReLU in its forward (tested separately).
LAYERS = {"resnet18": "layer3", "vgg11": "features.19", "densenet121": "features.denseblock3",
          "mobilenet_v3_small": "features.8"}
REFERENCE_MODELS = tuple(LAYERS)


# --------------------------------------------------------------------------------------------------
# The references, at the layer's resolution
# --------------------------------------------------------------------------------------------------


def pgc_raw(cls, model: nn.Module, layer: str, x: torch.Tensor, target: torch.Tensor, reshape_transform=None,
            **attributes) -> torch.Tensor:
    """pytorch-grad-cam's raw map: its activation/gradient capture, ``get_cam_image`` and the ReLU of
    ``compute_cam_per_layer``, without its resize and rescale."""
    cam = cls(model=model, target_layers=[model.get_submodule(layer)], reshape_transform=reshape_transform)
    for key, value in attributes.items():
        setattr(cam, key, value)
    try:
        targets = [ClassifierOutputTarget(int(t)) for t in target]
        outputs = cam.activations_and_grads(x)
        if cam.uses_gradients:
            sum(t(o) for t, o in zip(targets, outputs)).backward(retain_graph=True)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy() if cam.uses_gradients else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = cam.get_cam_image(x, layer, targets, acts, grads, False)
        return torch.from_numpy(np.maximum(raw, 0))
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)  # the shared model must not keep .grad


def torchcam_raw(cls, model: nn.Module, layer: str, x: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    """torchcam's un-normalized map (``normalized=False``)."""
    with cls(model, layer, input_shape=tuple(x.shape[1:]), **kwargs) as extractor:
        scores = model(x)
        cams = extractor(class_idx=[int(t) for t in target], scores=scores, normalized=False)
    model.zero_grad(set_to_none=True)
    return cams[0].detach()


PGC = {"gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "layercam": "LayerCAM",
       "hirescam": "HiResCAM"}
TORCHCAM = {"gradcam": "GradCAM", "xgradcam": "XGradCAM", "layercam": "LayerCAM"}
OURS = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM,
        "hirescam": HiResCAM}


def reference_layer(method: str, model_name: str) -> str:
    # XGrad-CAM divides by each channel's activation sum: on a signed (pre-ReLU) layer such as DenseNet's
    # concatenation that sum nears 0 and float32 summation order alone moves the map by ~1e-5; compare it
    # on the post-ReLU features instead.
    if method == "xgradcam" and model_name == "densenet121":
        return "features"
    return LAYERS[model_name]


def inputs(n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return make_images(n, seed=seed), torch.tensor([3, 7, 0, 9, 5][:n])


@pytest.mark.parametrize("model_name", REFERENCE_MODELS)
@pytest.mark.parametrize("method", tuple(PGC))
def test_matches_pytorch_grad_cam(models, method, model_name):
    model = models(model_name)
    layer = reference_layer(method, model_name)
    x, target = inputs()
    result = OURS[method](model, layer)(x, target)
    assert torch.equal(result.target, target)
    reference = pgc_raw(getattr(pgc, PGC[method]), model, layer, x.clone(), target)
    assert_maps_close(result.raw, reference)


@pytest.mark.parametrize("model_name", REFERENCE_MODELS)
@pytest.mark.parametrize("method", tuple(TORCHCAM))
def test_matches_torchcam(models, method, model_name):
    model = models(model_name)
    layer = reference_layer(method, model_name)
    x, target = inputs()
    options = {"eps": 1e-8} if method == "xgradcam" else {}  # torchcam's epsilon
    result = OURS[method](model, layer, **options)(x, target)
    assert_maps_close(result.raw, torchcam_raw(getattr(tcm, TORCHCAM[method]), model, layer, x.clone(), target))


@pytest.mark.parametrize("model_name", REFERENCE_MODELS)
def test_torchcam_gradcampp_differs_as_documented(models, model_name):
    """torchcam 0.5's GradCAMpp divides ``alpha[mask]`` in place, which acts on a copy: its weights are
    sum(g^2 * relu(g)) (and its intended denominator sums g^3 * A over space, unlike the paper's eq. 19).
    We reproduce that from our own activations and gradients, and check our map is not it."""
    model = models(model_name)
    layer = LAYERS[model_name]
    x, target = inputs()
    method = GradCAMPlusPlus(model, layer)
    _, act, grad, _ = method.layer_activation_and_grad(x, target)
    as_torchcam = torch.relu(((grad.pow(2) * torch.relu(grad)).sum((2, 3))[:, :, None, None] * act).sum(1))
    reference = torchcam_raw(tcm.GradCAMpp, model, layer, x.clone(), target)
    assert_maps_close(as_torchcam, reference)
    ours = method(x, target).raw
    assert float((ours - reference).abs().max()) > 0.1 * float(reference.abs().max())


def test_layer_overwritten_in_place(densenet121):
    """DenseNet's ``features`` output is overwritten by ``F.relu(..., inplace=True)``. pyattr (as torchcam)
    pairs the tensor as the model leaves it (post-ReLU) with the gradient with respect to that same tensor;
    pytorch-grad-cam pairs the post-ReLU activations with the pre-ReLU gradient (its tensor hook was
    registered before the in-place op): the same for Layer-CAM / HiResCAM / XGrad-CAM (they multiply by A),
    different for Grad-CAM and Grad-CAM++."""
    model, layer = densenet121, "features"
    x, target = inputs()
    for method in ("gradcam", "layercam"):
        ours = OURS[method](model, layer)(x, target).raw
        assert_maps_close(ours, torchcam_raw(getattr(tcm, TORCHCAM[method]), model, layer, x.clone(), target))
    for method in ("layercam", "hirescam", "xgradcam"):
        ours = OURS[method](model, layer)(x, target).raw
        assert_maps_close(ours, pgc_raw(getattr(pgc, PGC[method]), model, layer, x.clone(), target))
    _, act, grad, _ = GradCAM(model, layer).layer_activation_and_grad(x, target)
    assert bool((act >= 0).all()), "the captured activations are post-ReLU"
    grad_before_relu = grad * (act > 0)
    as_pgc = torch.relu((grad_before_relu.mean((2, 3))[:, :, None, None] * act).sum(1))
    assert_maps_close(as_pgc, pgc_raw(pgc.GradCAM, model, layer, x.clone(), target))


@pytest.mark.parametrize("model_name, layer", [("resnet18", "layer4"), ("densenet121", "features")])
def test_cam_matches_torchcam(models, model_name, layer):
    model = models(model_name)
    x, target = inputs()
    result = CAM(model, layer)(x, target)  # head found automatically: the last nn.Linear
    assert_maps_close(result.raw, torchcam_raw(tcm.CAM, model, layer, x.clone(), target))


def test_cam_matches_torchcam_on_the_builtin_model(builtin_model):
    x, target = make_images(3, seed=2), torch.tensor([0, 5, 2])
    result = CAM(builtin_model, "layer3", fc="fc")(x, target)
    assert_maps_close(result.raw, torchcam_raw(tcm.CAM, builtin_model, "layer3", x.clone(), target, fc_layer="fc"))


# Score-CAM runs C masked forward passes per image: layers with few channels, and one image for the
# two heavier models.
SCORECAM_CASES = {"resnet18": ("layer2", 1), "vgg11": ("features.2", 1), "densenet121": ("features.pool0", 1),
                  "mobilenet_v3_small": ("features.8", 2)}


@pytest.mark.parametrize("model_name", tuple(SCORECAM_CASES))
def test_scorecam_matches_references(models, model_name):
    model = models(model_name)
    layer, n = SCORECAM_CASES[model_name]
    x, target = inputs(n)
    # pytorch-grad-cam upsamples with align_corners=True, then normalizes each mask
    ours = ScoreCAM(model, layer, chunk_size=128, align_corners=True)(x, target).raw
    reference = pgc_raw(pgc.ScoreCAM, model, layer, x.clone(), target, batch_size=128)
    assert_maps_close(ours, reference)
    # torchcam normalizes at the layer's resolution, then upsamples (align_corners=False)
    ours = ScoreCAM(model, layer, chunk_size=128, normalize_first=True)(x, target).raw
    assert_maps_close(ours, torchcam_raw(tcm.ScoreCAM, model, layer, x.clone(), target, batch_size=128))


def pgc_fullgrad(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    cam = pgc.FullGrad(model=model, target_layers=[])
    try:
        return torch.from_numpy(cam(x, [ClassifierOutputTarget(int(t)) for t in target]))
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("model_name", REFERENCE_MODELS)
def test_fullgrad_matches_pytorch_grad_cam_variant(models, model_name):
    model = models(model_name)
    x, target = inputs(1 if model_name == "densenet121" else 2)  # densenet121: 120 BatchNorms, slow in the reference
    raw = FullGrad(model, variant="pytorch-grad-cam")(x, target).raw
    flat = raw.flatten(1) - raw.flatten(1).amin(1, keepdim=True)  # its final scale_cam_image
    ours = (flat / (flat.amax(1, keepdim=True) + 1e-7)).view_as(raw)
    assert_maps_close(ours, pgc_fullgrad(model, x.clone(), target))


def fullgrad_paper_reference(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A transcription of fullgrad-saliency's ``FullGrad.saliency`` (idiap/fullgrad-saliency): biases of
    Conv2d / Linear / BatchNorm2d, output gradients from tensor hooks (they see the gradient of the layer's
    own output even when an in-place ReLU follows), ``_postProcess`` and bilinear align_corners=True."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))
              and (isinstance(m, nn.BatchNorm2d) or m.bias is not None)]
    grads: dict[nn.Module, torch.Tensor] = {}

    def hook(module, _inputs, output):
        output.register_hook(lambda g: grads.__setitem__(module, g))

    def post(t, eps=1e-6):
        t = t.abs()
        t = t - t.flatten(1).amin(1)[:, None, None, None]
        return t / (t.flatten(1).amax(1)[:, None, None, None] + eps)

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        image = x.clone().requires_grad_(True)
        out = model(image)
        score = -F.nll_loss(out, target, reduction="sum")
        (input_grad,) = torch.autograd.grad(score, image)
    finally:
        for h in handles:
            h.remove()
    cam = post(input_grad * image.detach()).sum(1, keepdim=True)
    for m in layers:
        if isinstance(m, nn.BatchNorm2d):
            bias = -(m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps)) + m.bias
        else:
            bias = m.bias
        g = grads[m]
        if g.dim() == 4:
            term = post(g * bias.detach().view(1, -1, 1, 1))
            cam = cam + F.interpolate(term, size=x.shape[-2:], mode="bilinear", align_corners=True).sum(1, keepdim=True)
    return cam[:, 0].detach()


@pytest.mark.parametrize("model_name", ["resnet18", "vgg11_bn"])
def test_fullgrad_matches_the_papers_reference_implementation(models, model_name):
    model = models(model_name)
    x, target = inputs()
    assert_maps_close(FullGrad(model)(x, target).raw, fullgrad_paper_reference(model, x, target))


@pytest.mark.parametrize("model_name", ["resnet18", "vgg11"])
def test_guided_gradcam_matches_pytorch_grad_cam(models, model_name):
    """pytorch-grad-cam's recipe: its GuidedBackpropReLUModel (which swaps the ReLU modules, hence a copy
    of the model) times its Grad-CAM map upsampled to the input; then the max of |.| over channels."""
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel

    model = models(model_name)
    layer = LAYERS[model_name]
    x, target = inputs(3)
    ours = GuidedGradCAM(model, layer)(x, target).raw
    cam = pgc_raw(pgc.GradCAM, model, layer, x.clone(), target)
    expected = []
    for i in range(3):
        guided = GuidedBackpropReLUModel(copy.deepcopy(model), "cpu")(x[i:i + 1].clone(), int(target[i]))
        up = F.interpolate(cam[i:i + 1, None], size=(64, 64), mode="bilinear", align_corners=False)[0]
        expected.append((torch.from_numpy(guided).permute(2, 0, 1) * up).abs().amax(0))
    assert_maps_close(ours, torch.stack(expected))


# --------------------------------------------------------------------------------------------------
# FullGrad completeness
# --------------------------------------------------------------------------------------------------


def completeness_error(method: FullGrad, x: torch.Tensor, target=None) -> float:
    score, total = method.completeness(x, target)
    return float(((score - total).abs() / score.abs()).max())


@pytest.mark.parametrize("model_name", ["resnet18", "vgg11", "vgg11_bn", "densenet121"])
def test_fullgrad_completeness(models, model_name):
    model = models(model_name)
    x = make_images(3, seed=4)
    assert completeness_error(FullGrad(model), x, torch.tensor([1, -1, 8])) < 1e-4


def test_fullgrad_completeness_on_the_builtin_model(builtin_model):
    """ShapesNet normalizes its input inside ((x - mean) / std): that shift is a bias no layer holds, so the
    input-gradient term is taken relative to the mean (``input_offset``)."""
    x = make_images(4, seed=5)
    assert completeness_error(FullGrad(builtin_model, input_offset=builtin_model.mean), x) < 1e-4
    score, total = FullGrad(builtin_model).completeness(x)
    assert float((score - total).abs().min()) > 1e-3  # without the offset, the normalization's share is missing


class PatchMLP(nn.Module):
    """Patches -> tokens (N, 16, 8) -> Linear + ReLU on the features (last dim) -> token mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 16, stride=16)
        self.mlp = nn.Sequential(nn.Linear(8, 12), nn.ReLU(inplace=True), nn.Linear(12, 8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.mlp(tokens).mean(1))


def test_fullgrad_completeness_with_linear_layers_on_tokens():
    """Linear biases apply along the last dim (features), conv biases along dim 1 (channels)."""
    model = seeded(8, PatchMLP)
    x = make_images(3, seed=9)
    method = FullGrad(model)
    assert completeness_error(method, x) < 1e-4
    assert method(x).raw.shape == (3, 64, 64)  # the map: the input term and the patch conv's bias term


def test_fullgrad_collects_every_bias(resnet18, vgg11):
    assert len(bias_layers(resnet18)) == 20 + 1  # 20 BatchNorm2d (incl. downsample) + fc
    assert len(bias_layers(vgg11)) == 8 + 3  # 8 conv + 3 linear, each with a bias
    assert len(bias_layers(vgg11, "pytorch-grad-cam")) == 8  # Conv2d / BatchNorm2d only


# --------------------------------------------------------------------------------------------------
# Analytic cases
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gap_model() -> nn.Module:
    return seeded(7, ConvGapLinear)


def test_cam_on_gap_linear_head(gap_model):
    x, target = make_images(4, seed=6), torch.tensor([3, 0, 1, 2])
    result = CAM(gap_model, "act")(x, target)
    act = torch.relu(gap_model.conv(x)).detach()
    weight = gap_model.fc.weight.detach()
    cam = torch.einsum("nk,nkhw->nhw", weight[target], act)
    torch.testing.assert_close(result.raw, cam, rtol=1e-6, atol=1e-6)
    # the map's mean plus the class bias is the score
    torch.testing.assert_close(cam.mean((1, 2)) + gap_model.fc.bias.detach()[target],
                               result.scores.gather(1, target[:, None])[:, 0], rtol=1e-5, atol=1e-6)


def test_gradient_cams_on_gap_linear_head(gap_model):
    """dS_t/dA_k = W[t, k] / (hw) at every position: Grad-CAM, XGrad-CAM and HiResCAM all equal
    ReLU(CAM) / (hw), Layer-CAM is ReLU(sum_k ReLU(W[t, k]) A_k) / (hw)."""
    x, target = make_images(3, seed=7), torch.tensor([1, 2, 3])
    act = torch.relu(gap_model.conv(x)).detach()
    hw = act.shape[-1] * act.shape[-2]
    weight = gap_model.fc.weight.detach()[target]
    cam = torch.einsum("nk,nkhw->nhw", weight, act)
    for cls in (GradCAM, XGradCAM, HiResCAM):
        assert_maps_close(cls(gap_model, "act")(x, target).raw, torch.relu(cam) / hw)
    layercam = torch.relu(torch.einsum("nk,nkhw->nhw", torch.relu(weight), act)) / hw
    assert_maps_close(LayerCAM(gap_model, "act")(x, target).raw, layercam)
    # Grad-CAM++ with a constant gradient c_k: a = c^2 / (2 c^2 + sum(A) c^3), w_k = hw * a * relu(c_k)
    c = (weight / hw)[:, :, None, None]
    alpha = c**2 / (2 * c**2 + act.sum((2, 3), keepdim=True) * c**3 + 1e-6)
    w = (hw * alpha * torch.relu(c))[:, :, 0, 0]
    assert_maps_close(GradCAMPlusPlus(gap_model, "act")(x, target).raw, torch.relu(torch.einsum("nk,nkhw->nhw", w, act)))


def scorecam_one_channel_at_a_time(model, layer, x, target):
    """Score-CAM written plainly: one masked forward pass per channel and image."""
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    with torch.no_grad():
        model(x)
        handle.remove()
        act = captured[0]
        weights = torch.zeros(act.shape[:2])
        for n in range(x.shape[0]):
            for k in range(act.shape[1]):
                up = F.interpolate(act[n:n + 1, k:k + 1], size=x.shape[-2:], mode="bilinear", align_corners=False)
                mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
                weights[n, k] = model(x[n:n + 1] * mask)[0, target[n]]
        return torch.relu((torch.softmax(weights, 1)[:, :, None, None] * act).sum(1))


def test_scorecam_chunks_equal_one_pass_per_channel(gap_model):
    x, target = make_images(3, seed=8), torch.tensor([0, 3, 1])
    expected = scorecam_one_channel_at_a_time(gap_model, "act", x, target)
    for chunk in (1, 3, 8, 100):
        assert_maps_close(ScoreCAM(gap_model, "act", chunk_size=chunk)(x, target).raw, expected)


# --------------------------------------------------------------------------------------------------
# Several layers, the automatic layer, transformers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fuse", ["mean", "max"])
def test_layers_fused(resnet18, fuse):
    x, target = inputs(3)
    fused = LayerCAM(resnet18, ["layer2", "layer3"], fuse=fuse)(x, target)
    single = [LayerCAM(resnet18, name)(x, target).raw for name in ("layer2", "layer3")]
    assert fused.raw.shape == (3, 8, 8)  # layer2's resolution, the larger one
    resized = torch.stack([F.interpolate(((m - m.amin((1, 2), keepdim=True))
                                          / (m.amax((1, 2), keepdim=True) - m.amin((1, 2), keepdim=True)))[:, None],
                                         size=(8, 8), mode="bilinear", align_corners=False)[:, 0] for m in single])
    expected = resized.mean(0) if fuse == "mean" else resized.amax(0)
    torch.testing.assert_close(fused.raw, expected, rtol=1e-5, atol=1e-6)
    assert fuse_maps([single[1]], fuse) is single[1]


@pytest.mark.parametrize("model_name, expected", [("resnet18", "layer4"), ("vgg11", "features"),
                                                  ("densenet121", "features"), ("mobilenet_v3_small", "features")])
def test_automatic_layer(models, model_name, expected):
    model = models(model_name)
    method = build_method("gradcam", model, None)
    assert method.layer_name is None
    x, target = inputs()
    result = method(x, target)
    assert method.layer_name == expected and method.metadata()["layer"] == expected
    torch.testing.assert_close(result.raw, GradCAM(model, expected)(x, target).raw, rtol=0, atol=0)


def test_automatic_layer_of_the_builtin_model(builtin_model):
    assert GradCAM(builtin_model).resolve_layer(make_images(1)) == pyattr.zoo.SHAPESNET_LAYER


def pgc_vit_reshape(tokens: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ViT recipe (its tutorial's reshape_transform) for a 4x4 patch grid."""
    return tokens[:, 1:, :].reshape(tokens.size(0), 4, 4, tokens.size(2)).transpose(2, 3).transpose(1, 2)


@pytest.mark.parametrize("method", tuple(PGC))
def test_vit_b_16_matches_pytorch_grad_cam(vit_b_16, method):
    """Grad-CAM-style methods on the class-token model: the last block's ``ln_1`` tokens laid out on the
    4x4 patch grid (pytorch-grad-cam's own ``reshape_transform`` recipe)."""
    x, target = inputs()
    result = OURS[method](vit_b_16, VIT_LAYER, reshape_transform=TokensToGrid(prefix_tokens=1))(x, target)
    assert result.raw.shape == (2, 4, 4)
    assert_maps_close(result.raw, pgc_raw(getattr(pgc, PGC[method]), vit_b_16, VIT_LAYER, x.clone(), target,
                                          reshape_transform=pgc_vit_reshape))


def test_vit_scorecam_matches_pytorch_grad_cam(vit_tiny):
    """ln_1's activations are signed and cancel in sum_k w_k A_k: the terms' absolute sum is ~500x the map's
    max, so float32 summation order alone (numpy's vs torch's; float64 sits between them) moves the map by
    ~3e-5 of its max. Hence 1e-4 here."""
    x, target = inputs(1)
    ours = ScoreCAM(vit_tiny, VIT_TINY_LAYER, reshape_transform=TokensToGrid(), align_corners=True)(x, target).raw
    assert_maps_close(ours, pgc_raw(pgc.ScoreCAM, vit_tiny, VIT_TINY_LAYER, x.clone(), target, reshape_transform=pgc_vit_reshape,
                                    batch_size=64), rtol=1e-4)


def test_tokens_to_grid():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)
    grid = TokensToGrid()(tokens)
    assert grid.shape == (2, 3, 4, 4)
    assert torch.equal(grid[1, 2, 0, 1], tokens[1, 1 + 1, 2])
    assert TokensToGrid(prefix_tokens=2, grid=(3, 5))(torch.zeros(1, 17, 4)).shape == (1, 4, 3, 5)
    with pytest.raises(pyattr.InputError, match="square grid"):
        TokensToGrid()(torch.zeros(1, 16, 4))
    with pytest.raises(pyattr.InputError, match="holds 12 patches"):
        TokensToGrid(grid=(3, 4))(torch.zeros(1, 17, 4))


# --------------------------------------------------------------------------------------------------
# Batch consistency, state hygiene, errors
# --------------------------------------------------------------------------------------------------


def make(name: str, model: nn.Module, layer: str = "layer3", **options) -> pyattr.AttributionMethod:
    if name == "scorecam":
        options.setdefault("chunk_size", 64)
    return build_method(name, model, layer, **options)


@pytest.mark.parametrize("name", CAM_NAMES)
def test_batch_equals_samples_alone(fresh_shapesnet, name):
    method = make(name, fresh_shapesnet)
    # Class 1's Grad-CAM is zero everywhere on this random net (negative evidence only), so not target 1.
    x, target = make_images(3, seed=20), torch.tensor([-1, 3, 5])
    batch = method(x, target)
    assert batch.maps.shape == (3, 64, 64)
    assert float(batch.raw.abs().amax()) > 0
    for i in range(3):
        alone = method(x[i:i + 1], target[i:i + 1])
        assert torch.equal(alone.target, batch.target[i:i + 1])
        assert_maps_close(alone.raw, batch.raw[i:i + 1], rtol=1e-4)  # batched convolutions round differently


@pytest.mark.parametrize("name", CAM_NAMES)
def test_call_leaves_model_untouched(fresh_shapesnet, name):
    model = fresh_shapesnet
    model.layer3.register_forward_hook(lambda *_: None)  # the user's own hook stays
    model.train()
    before = snapshot(model)
    x, target = make_images(2, seed=40), torch.tensor([1, -1])
    train_result = make(name, model)(x, target)
    assert_untouched(model, before)
    with torch.no_grad():
        eval_result = make(name, model.eval())(x, target)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(train_result.raw, eval_result.raw, rtol=0, atol=0)


def test_frozen_model_and_errors(fresh_shapesnet, vgg11, mobilenet_v3_small):
    frozen = fresh_shapesnet.requires_grad_(False)
    x = make_images(2, seed=41)
    for name in CAM_NAMES:
        assert float(make(name, frozen)(x).raw.abs().amax()) > 0, name
    with pytest.raises(pyattr.InputError, match="global average pooling"):
        CAM(vgg11, "features")(x)
    with pytest.raises(pyattr.InputError, match="global average pooling"):
        CAM(mobilenet_v3_small)(x)
    with pytest.raises(pyattr.InputError, match="one layer"):
        CAM(frozen, ["layer2", "layer3"])
    with pytest.raises(pyattr.InputError, match="unknown fuse 'sum'"):
        GradCAM(frozen, ["layer2", "layer3"], fuse="sum")
    with pytest.raises(pyattr.InputError, match="name the layer"):
        GradCAM(frozen, reshape_transform=TokensToGrid())
    with pytest.raises(pyattr.InputError, match="chunk_size"):
        ScoreCAM(frozen, "layer3", chunk_size=0)
    with pytest.raises(pyattr.InputError, match="unknown FullGrad variant"):
        FullGrad(frozen, variant="captum")
    with pytest.raises(pyattr.InputError, match=r"reshape_transform=TokensToGrid"):
        GradCAM(torchvision.models.VisionTransformer(64, 16, 1, 2, 32, 64), "encoder.layers.encoder_layer_0")(x)
    with pytest.raises(pyattr.LayerNotFoundError):
        LayerCAM(frozen, ["layer2", "layer9"])


# --------------------------------------------------------------------------------------------------
# The export contract: one graph per method, eager == TorchScript == .pt2 == onnxruntime
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAM_NAMES)
def test_export_contract(builtin_model, name, tmp_path):
    assert name in METHODS
    options = {"chunk_size": 64} if name == "scorecam" else {}  # 2 masked passes, one loop in the graph
    method = build_method(name, builtin_model, pyattr.zoo.SHAPESNET_LAYER, **options)
    # FullGrad on image 2 of seed 50 sits on a ReLU tie of the current weights: eager's own map moves by
    # 3.7e-3 under a 1e-7 input perturbation (onnxruntime lands on the other side); seed 56 has no tie.
    seed = 56 if name == "fullgrad" else 50
    assert_export_contract(method, make_images(5, seed=seed), tmp_path, num_classes=6)


def test_export_contract_several_layers_and_automatic_layer(builtin_model, tmp_path):
    method = LayerCAM(builtin_model, ["layer2", "layer3"], fuse="max")
    assert_export_contract(method, make_images(5, seed=51), tmp_path, num_classes=6, formats=("onnx",))
    method = GradCAMPlusPlus(builtin_model)  # layer chosen at export
    assert_export_contract(method, make_images(5, seed=52), tmp_path, num_classes=6, formats=("onnx",))
    assert pyattr.read_metadata(tmp_path / "gradcampp.onnx")["layer"] == "layer3"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "scorecam",
                                  "guidedgradcam", "fullgrad"])
def test_export_contract_vit_every_method(vit_tiny, name, tmp_path):
    options = {} if name == "fullgrad" else {"reshape_transform": TokensToGrid()}
    method = build_method(name, vit_tiny, VIT_TINY_LAYER, **options)
    assert_export_contract(method, make_images(5, seed=54), tmp_path, num_classes=NUM_CLASSES_TORCHVISION)


def test_export_contract_vit(vit_tiny, tmp_path):
    """A ViT exports once attention is traced in its math form (done while tracing): the graph holds
    MatMul / Softmax for the attention and its backward."""
    method = GradCAM(vit_tiny, VIT_TINY_LAYER, reshape_transform=TokensToGrid())
    assert_export_contract(method, make_images(5, seed=53), tmp_path, num_classes=NUM_CLASSES_TORCHVISION,
                           formats=("onnx",))  # every format and method: test_export_contract_vit_every_method
