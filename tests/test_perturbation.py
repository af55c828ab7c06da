"""The perturbation family: Occlusion, Feature Ablation, RISE (issue 16 item 2).

- analytic cases on a model linear in the input (a score drop is the sum of w * x over what was replaced);
- agreement with captum 0.9's ``Occlusion`` and ``FeatureAblation`` (1e-5 relative, every element of the
  (N, C, H, W) attribution) on resnet18 and vgg11 at 32 px and the built-in model at 64 px: windows that hang over
  the border, per-channel windows, grids, per-channel and per-sample segment maps, several targets per input;
- RISE against the paper's procedure written out here (``generate_masks`` of the authors' code: the grid upsampled
  bilinearly to (s + 1) * cell and cropped at the shift, then sum_i S_i M_i / (N p)) on a linear model whose scores
  are computed by hand, the mask statistics (E[M] = p at every pixel) and the expected map of a constant model.
  No installed package implements RISE as the paper does: TorchRay's ``rise`` (PyPI torchray 1.0.0.2, not
  installed; its requirements pull pycocotools and pymongo) takes the sigmoid of the outputs, divides by N rather
  than N p and upsamples with reflection padding, and ``pip install rise`` is a Jupyter slideshow extension;
- chunking, batching and several targets change nothing; bad input gets InputError naming the fix;
- the export contract (eager == onnxruntime == TorchScript == .pt2, batches 1 and 3) on the built-in model and
  resnet18.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_CLASSES_TORCHVISION, make_images, make_shapes, max_relative_error
from contract import assert_export_contract
from torch import nn

import pyattr
from pyattr.methods import METHODS, RISE, FeatureAblation, Occlusion, build_method
from pyattr.methods.perturbation import interpolation_matrix

captum_attr = pytest.importorskip("captum.attr")


class LinearModel(nn.Module):
    """Scores linear in the input: ``s_k(x) = <W_k, x> + b_k``, K = 3."""

    def __init__(self, shape=(3, 12, 10), seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(3, *shape, generator=g))
        self.bias = nn.Parameter(torch.randn(3, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.weight.flatten(1).T + self.bias


def rel(actual, expected) -> float:
    return max_relative_error(actual, expected)


# --------------------------------------------------------------------------------------------------
# Analytic cases
# --------------------------------------------------------------------------------------------------


def test_occlusion_of_a_linear_model_is_the_windowed_contribution():
    model = LinearModel()
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 2])
    contrib = x * model.weight.detach()[t]  # (N, C, H, W): w * x of the explained class
    # 1x1 windows spanning the channels, stride 1: each pixel's drop is its channel sum of w * x
    raw = Occlusion(model, patch=1, stride=1, baseline=0.0, reduction="none")(x, t).raw
    expected = contrib.sum(1, keepdim=True).expand_as(contrib)
    assert rel(raw, expected) < 1e-5
    # 2x2 windows, stride 1: mean over the (up to 4) windows covering a pixel of each window's sum
    raw = Occlusion(model, patch=2, stride=1, reduction="mean")(x, t).raw
    pixel = contrib.sum(1)  # (N, H, W)
    window = F.avg_pool2d(pixel[:, None], 2, stride=1)[:, 0] * 4  # (N, H-1, W-1) window sums
    total = F.conv_transpose2d(window[:, None], torch.ones(1, 1, 2, 2))[:, 0]
    count = F.conv_transpose2d(torch.ones_like(window[:, None]), torch.ones(1, 1, 2, 2))[:, 0]
    assert rel(raw, total / count) < 1e-5
    # a baseline b: the drop is <w, x - b> over the window
    raw = Occlusion(model, patch=1, stride=1, baseline=0.5, reduction="sum")(x, t).raw
    assert rel(raw, 3 * (model.weight.detach()[t] * (x - 0.5)).sum(1)) < 1e-5


def test_feature_ablation_of_a_linear_model_gives_each_cell_its_sum():
    model = LinearModel()
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 1])
    pixel = (x * model.weight.detach()[t]).sum(1)  # (N, H, W)
    raw = FeatureAblation(model, cell=(4, 5))(x, t).raw
    cells = pixel.reshape(2, 3, 4, 2, 5).sum((2, 4))  # (N, 3, 2) cell sums
    expected = cells.repeat_interleave(4, 1).repeat_interleave(5, 2)
    assert rel(raw, expected) < 1e-5
    # cells that do not divide the image: the last row / column of cells is smaller
    raw = FeatureAblation(model, cell=5)(x, t).raw
    ids = (torch.arange(12)[:, None] // 5) * 2 + torch.arange(10)[None] // 5
    sums = torch.zeros(2, 6).index_add_(1, ids.flatten(), pixel.flatten(1))
    assert rel(raw, sums[:, ids]) < 1e-5


# --------------------------------------------------------------------------------------------------
# captum
# --------------------------------------------------------------------------------------------------


PER_PASS = 8
"""Perturbations per pass, the same for pyattr (``chunk_size``) and captum (``perturbations_per_eval``): a different
batching costs both up to 3e-5 relative on vgg11's tiny random-init logits (captum against itself at 4 and 5 per
pass: 2.9e-5), the same batching gives bit-equal maps."""


def captum_occlusion(model, x, t, patch, stride, baseline):
    window = patch if len(patch) == 3 else (x.shape[1], *patch)
    strides = stride if len(stride) == 3 else (1, *stride)
    with torch.no_grad():
        return captum_attr.Occlusion(model).attribute(x, sliding_window_shapes=window, strides=strides,
                                                      baselines=baseline, target=t, perturbations_per_eval=PER_PASS)


def reference_case(request, name):
    """(model, inputs, targets (N,), (N, 2) targets): resnet18 / vgg11 at 32 px, the built-in model at 64 px."""
    if name == "builtin":
        return request.getfixturevalue("builtin_model"), make_shapes(2, seed=3), torch.tensor([1, -1]), 6
    model = request.getfixturevalue(name)
    return model, make_images(2, seed=3, size=32), torch.tensor([4, -1]), NUM_CLASSES_TORCHVISION


@pytest.mark.parametrize("model_name", ["resnet18", "vgg11", "builtin"])
def test_occlusion_matches_captum(request, model_name):
    model, x, t, _ = reference_case(request, model_name)
    s = x.shape[-1]
    # 3 x 3 windows that hang over the border (size - patch not a multiple of the stride) and two targets per input
    # (from the same passes); 2 x 2 x 2 per-channel windows
    patch, stride = (s // 2, 7 * s // 16), (5 * s // 16, 3 * s // 8)
    two = torch.stack([t, (t + 2) % 6], 1)
    result = Occlusion(model, patch, stride, baseline=0.2, reduction="none", chunk_size=PER_PASS)(x, two)
    for j in range(2):
        theirs = captum_occlusion(model, x, result.target[:, j], patch, stride, 0.2)
        assert rel(result.raw[:, j], theirs) < 1e-5, f"{model_name} target column {j}"
    patch, stride = (2, s // 2, s // 2), (1, s // 2, s // 2)
    result = Occlusion(model, patch, stride, baseline=0.2, reduction="none", chunk_size=PER_PASS)(x, t)
    assert rel(result.raw, captum_occlusion(model, x, result.target, patch, stride, 0.2)) < 1e-5


@pytest.mark.parametrize("model_name", ["resnet18", "vgg11", "builtin"])
def test_feature_ablation_matches_captum(request, model_name):
    model, x, t, _ = reference_case(request, model_name)
    n, c, h, w = x.shape
    # the default grid
    result = FeatureAblation(model, cell=(h // 2, w // 3), baseline=0.1, reduction="none", chunk_size=4)(x, t)
    grid = (torch.arange(h)[:, None] // (h // 2)) * math.ceil(w / (w // 3)) + torch.arange(w)[None] // (w // 3)
    with torch.no_grad():
        theirs = captum_attr.FeatureAblation(model).attribute(x, feature_mask=grid[None, None], baselines=0.1,
                                                              target=result.target, perturbations_per_eval=4)
    assert rel(result.raw, theirs) < 1e-5
    # a per-channel segment map at construction (ids not consecutive) and per-sample maps at call time
    g = torch.Generator().manual_seed(5)
    channel_map = torch.randint(0, 6, (c, h // 8, w // 8), generator=g).repeat_interleave(8, 1)
    channel_map = channel_map.repeat_interleave(8, 2) * 7 + 3
    per_sample = torch.randint(0, 9, (n, h // 4, w // 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    for mask, at_call in ((channel_map, False), (per_sample, True)):
        if at_call:
            ours = FeatureAblation(model, reduction="none", chunk_size=PER_PASS)(x, t, feature_mask=mask).raw
            captum_mask = mask[:, None]
        else:
            ours = FeatureAblation(model, feature_mask=mask, reduction="none", chunk_size=PER_PASS)(x, t).raw
            captum_mask = mask[None]
        with torch.no_grad():
            theirs = captum_attr.FeatureAblation(model).attribute(x, feature_mask=captum_mask, baselines=0.0,
                                                                  target=result.target, perturbations_per_eval=PER_PASS)
        assert rel(ours, theirs) < 1e-5, f"{model_name} {'call' if at_call else 'construction'} mask"


# --------------------------------------------------------------------------------------------------
# RISE
# --------------------------------------------------------------------------------------------------


def paper_masks(method: RISE, h: int, w: int) -> torch.Tensor:
    """The paper's ``generate_masks`` (Petsiuk et al., github.com/eclique/RISE) on the method's grids and
    shifts: each grid upsampled bilinearly (half-pixel centres) to (s + 1) * ceil(size / s), then cropped."""
    s = method.cells
    cell = (math.ceil(h / s), math.ceil(w / s))
    up = F.interpolate(method.grids[:, None].double(), size=((s + 1) * cell[0], (s + 1) * cell[1]),
                       mode="bilinear", align_corners=False)[:, 0]
    out = []
    for i in range(method.num_masks):
        dy = int(method.shift_fractions[i, 0] * cell[0])
        dx = int(method.shift_fractions[i, 1] * cell[1])
        assert 0 <= dy < cell[0] and 0 <= dx < cell[1]
        out.append(up[i, dy:dy + h, dx:dx + w])
    return torch.stack(out)


def test_rise_is_the_papers_formula_on_a_linear_model():
    """Scores of a linear model computed by hand from the paper's masks: S = sum_i s_i M_i / (N p)."""
    model = LinearModel(shape=(3, 20, 13))
    x = torch.rand(2, 3, 20, 13, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([2, 0])
    method = RISE(model, masks=70, cells=4, p=0.3, seed=11, chunk_size=16)
    masks = paper_masks(method, 20, 13)  # (N_M, H, W) float64
    weight, bias = model.weight.detach().double()[t], model.bias.detach().double()[t]  # (N, C, H, W), (N,)
    scores = torch.einsum("nchw,mhw->nm", x.double() * weight, masks) + bias[:, None]  # s_i of each sample
    expected = torch.einsum("nm,mhw->nhw", scores, masks) / (70 * 0.3)
    assert rel(method(x, t).raw, expected) < 1e-5
    # the paper's softmax (class probabilities) and a baseline the masked-out part fades to
    method = RISE(model, masks=70, cells=4, p=0.3, seed=11, softmax=True, baseline=0.25)
    w_all, b_all = model.weight.detach().double(), model.bias.detach().double()
    perturbed = x.double()[:, None] * masks[None, :, None] + 0.25 * (1 - masks[None, :, None])
    probs = (torch.einsum("nmchw,kchw->nmk", perturbed, w_all) + b_all).softmax(-1)
    chosen = probs.gather(2, t[:, None, None].expand(-1, 70, 1))[..., 0]
    expected = torch.einsum("nm,mhw->nhw", chosen, masks) / (70 * 0.3)
    assert rel(method(x, t).raw, expected) < 1e-5


def test_rise_masks_statistics_and_a_constant_models_map():
    method = RISE(LinearModel(), masks=4000, cells=7, p=0.5, seed=0)
    masks = paper_masks(method, 30, 30)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1 + 1e-12
    assert abs(float(method.grids.mean()) - 0.5) < 3 * math.sqrt(0.25 / method.grids.numel())
    # a bilinear mask is a convex combination of Bernoulli(p) cells: E[M] = p at every pixel
    per_pixel = masks.mean(0)
    assert abs(float(per_pixel.mean()) - 0.5) < 0.01 and float((per_pixel - 0.5).abs().max()) < 0.05
    # in-graph masks (A_i G_i B_i^T) == the paper's upsample-and-crop
    built = method.mask_maps(torch.arange(4000), 30, 30, torch.zeros((), dtype=torch.float64))
    assert float((built - masks).abs().max()) < 1e-12
    # the interpolation matrix is F.interpolate's
    v = torch.rand(3, 7, dtype=torch.float64)
    torch.testing.assert_close(interpolation_matrix(7, 40) @ v.T,
                               F.interpolate(v[None], size=40, mode="linear", align_corners=False)[0].T)
    # a model with a constant score c: E[S] = c E[M] / p = c at every pixel
    constant = LinearModel(shape=(3, 30, 30))
    with torch.no_grad():
        constant.weight.zero_()
        constant.bias.copy_(torch.tensor([2.0, -1.0, 0.5]))
    small = RISE(constant, masks=4000, chunk_size=4000, seed=0)
    raw = small(torch.rand(1, 3, 30, 30), 0).raw
    assert abs(float(raw.mean()) - 2.0) < 0.02 and float((raw - 2.0).abs().max()) < 0.1


# --------------------------------------------------------------------------------------------------
# Properties, bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["occlusion", "featureablation", "rise"])
def test_chunks_batches_and_targets_change_nothing(builtin_model, name):
    x = make_shapes(2, seed=12)
    options = {"occlusion": {"patch": 32, "stride": 32}, "featureablation": {"cell": 32}, "rise": {"masks": 5}}[name]
    base = build_method(name, builtin_model, chunk_size=3, **options)
    t = torch.tensor([-1, 3])
    ref = base(x, t)
    for chunk in (1, None):
        assert rel(build_method(name, builtin_model, chunk_size=chunk, **options)(x, t).raw, ref.raw) < 1e-5
    assert rel(base(x[1:], t[1:]).raw, ref.raw[1:]) < 1e-5
    several = base(x, torch.tensor([[0, 4], [1, 2]]))
    for j in range(2):
        assert rel(several.raw[:, j], base(x, several.target[:, j]).raw) < 1e-5
    assert torch.equal(ref.target[1:], t[1:]) and int(ref.target[0]) == int(ref.scores[0].argmax())


def test_bad_input_is_named(builtin_model):
    x = make_shapes(2, seed=13)
    with pytest.raises(pyattr.InputError, match="patch .* larger than the input"):
        Occlusion(builtin_model, patch=65)(x)
    with pytest.raises(pyattr.InputError, match="stride .* larger than patch"):
        Occlusion(builtin_model, patch=8, stride=9)(x)
    for bad in (0, -1, (8, 0), 1.5, (1, 2, 3, 4)):
        with pytest.raises(pyattr.InputError, match="stride"):
            Occlusion(builtin_model, patch=8, stride=bad)
    with pytest.raises(pyattr.InputError, match="patch"):
        Occlusion(builtin_model, patch=(0, 4))
    with pytest.raises(pyattr.InputError, match="reduction"):
        Occlusion(builtin_model, reduction="median")
    fa = FeatureAblation(builtin_model)
    for bad in (torch.zeros(2, 3, 32, 32, dtype=torch.long), torch.zeros(5, 64, 64, dtype=torch.long),
                torch.zeros(2, 2, 64, 64, dtype=torch.long), torch.zeros(64, dtype=torch.long)):
        with pytest.raises(pyattr.InputError, match="feature_mask"):
            fa(x, feature_mask=bad)
    with pytest.raises(pyattr.InputError, match="integer segment ids"):
        fa(x, feature_mask=torch.zeros(64, 64))
    with pytest.raises(pyattr.InputError, match="does not fit"):
        FeatureAblation(builtin_model, feature_mask=torch.zeros(32, 32, dtype=torch.long))(x)
    with pytest.raises(pyattr.InputError, match="cell"):
        FeatureAblation(builtin_model, cell=128)(x)
    for kwargs, what in (({"p": 0.0}, "p "), ({"masks": 0}, "masks"), ({"cells": 0}, "cells"), ({"seed": 1.5}, "seed")):
        with pytest.raises(pyattr.InputError, match=what):
            RISE(builtin_model, **kwargs)


def test_memory_budget_names_a_chunk_size_that_then_runs(builtin_model):
    x = make_shapes(2, seed=14)
    per_image = 3 * 64 * 64 * 4
    unchunked = RISE(builtin_model, masks=40, chunk_size=None, max_pass_bytes=20 * 2 * per_image)
    with pytest.raises(pyattr.InputError, match=r"2 x 40 = 80 perturbed images.*chunk_size=20 or less") as err:
        unchunked(x)
    assert "max_pass_bytes" in str(err.value)
    chunked = RISE(builtin_model, masks=40, chunk_size=20, max_pass_bytes=20 * 2 * per_image)
    roomy = RISE(builtin_model, masks=40, chunk_size=None)
    assert rel(chunked(x).raw, roomy(x).raw) < 1e-5
    with pytest.raises(pyattr.InputError, match="chunk_size"):
        Occlusion(builtin_model, chunk_size=0)


def test_registered_signed_and_metadata(builtin_model):
    assert METHODS["occlusion"] is Occlusion and METHODS["featureablation"] is FeatureAblation
    assert METHODS["rise"] is RISE and pyattr.RISE is RISE
    assert Occlusion(builtin_model).signed and not Occlusion(builtin_model, reduction="max").signed
    assert not RISE(builtin_model).signed
    meta = Occlusion(builtin_model, patch=(8, 4), stride=2).metadata()
    assert meta["patch"] == [8, 4] and meta["stride"] == [2, 2] and meta["method"] == "occlusion"


# --------------------------------------------------------------------------------------------------
# The export contract
# --------------------------------------------------------------------------------------------------

CONTRACT_OPTIONS = {"occlusion": {"patch": 32, "stride": 32, "chunk_size": 3},
                    "featureablation": {"cell": 32, "chunk_size": 3}, "rise": {"masks": 6, "chunk_size": 4}}
# CI time (2 loaded cores; 4 / 4 / 6 passes per input, 2 unrolled chunks): the built-in model in every format for
# Occlusion, in ONNX for the others; resnet18 (32 px) in ONNX for RISE; the rest with -m slow.
CONTRACT_CASES = [
    ("builtin", "occlusion", ("onnx", "torchscript", "pt2")),
    ("builtin", "featureablation", ("onnx",)),
    ("builtin", "rise", ("onnx",)),
    ("resnet18", "rise", ("onnx",)),
    pytest.param("resnet18", "occlusion", ("onnx",), marks=pytest.mark.slow),
    pytest.param("resnet18", "featureablation", ("onnx", "torchscript", "pt2"), marks=pytest.mark.slow),
    pytest.param("builtin", "rise", ("torchscript", "pt2"), marks=pytest.mark.slow),
    pytest.param("builtin", "featureablation", ("torchscript", "pt2"), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model_name, name, formats", CONTRACT_CASES)
def test_export_contract(request, model_name, name, formats, tmp_path):
    options = dict(CONTRACT_OPTIONS[name])
    if model_name == "builtin":
        model, x, k = request.getfixturevalue("builtin_model"), make_shapes(3, seed=10), 6
    else:
        model, x, k = request.getfixturevalue("resnet18"), make_images(3, seed=10, size=32), NUM_CLASSES_TORCHVISION
        options.update({"occlusion": {"patch": 16, "stride": 16}, "featureablation": {"cell": 16}}.get(name, {}))
    method = build_method(name, model, **options)
    assert_export_contract(method, x, tmp_path, num_classes=k, formats=formats, batches=(1, 3))
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}[formats[0]]
    meta = pyattr.read_metadata(tmp_path / f"{name}{suffix}")
    assert meta["method"] == name and meta["chunk_size"] == options["chunk_size"]


def test_export_with_a_construction_segment_map(builtin_model, tmp_path):
    """A fixed segment map is a constant of the graph: its number of segments (here 4 ids) is static."""
    ids = torch.tensor([3, 9, 9, 14, 20, 3, 3, 20]).repeat_interleave(8)
    seg = ids[None].expand(64, 64).contiguous()  # vertical bands of 4 distinct ids (3, 9, 14, 20)
    method = FeatureAblation(builtin_model, feature_mask=seg, chunk_size=2)
    assert method.segments == 4
    assert_export_contract(method, make_shapes(3, seed=15), tmp_path, num_classes=6, formats=("onnx",), batches=(2,))


def test_cli_flags_reach_the_methods(tmp_path, capsys):
    """--patch/--stride, --cell and --masks reach the methods (explain and export); other methods refuse them."""
    from pyattr.cli import main

    assert main(["explain", "--method", "occlusion", "--patch", "32", "--stride", "32", "--samples", "1", "--quiet",
                 "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").glob("*occlusion_overlay.png"))) == 1
    assert main(["explain", "--method", "gradcam", "--masks", "8", "--samples", "1", "--out", str(tmp_path / "g")]) == 2
    assert "--masks is an option of rise, not of gradcam" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "r.onnx"), "--method", "rise", "--masks", "3"]) == 0
    meta = pyattr.read_metadata(tmp_path / "r.onnx")
    assert meta["method"] == "rise" and meta["masks"] == 3
