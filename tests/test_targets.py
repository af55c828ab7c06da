"""Targets beyond class logits: segmentation and similarity objectives, eager and exported.

Analytic cases (a linear segmenter's and a linear embedder's gradients written out by hand), agreement
with pytorch-grad-cam's ``SemanticSegmentationTarget`` / ``SimilarityToConceptTarget`` and with captum on
a wrapped forward, the export contract (eager == ONNX == TorchScript == .pt2 at batches 1 and 3, mixed
class ids, given and predicted regions, per-sample references) for every method on tiny models, a custom
target kind, and the errors for what makes no sense.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from contract import assert_export_contract
from target_models import D, K, TinySegmenter, tiny_embedder, tiny_segmenter
from torch import nn

import pyattr
from pyattr.errors import InputError
from pyattr.methods import METHODS, build_method, needs_layer
from pyattr.targets import ClassTarget, SegmentationTarget, SimilarityTarget, Target


@pytest.fixture(scope="module")
def segmenter():
    return tiny_segmenter()


@pytest.fixture(scope="module")
def embedder():
    return tiny_embedder()


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def regions(n: int, size: int = 16) -> torch.Tensor:
    """Per-sample regions: a box, the predicted region (all -1), a soft half, repeated."""
    out = torch.zeros(n, size, size)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out[i, 2:9, 3:12] = 1.0
        elif kind == 1:
            out[i] = -1.0
        else:
            out[i, size // 2:] = 0.5
    return out


def layer_for(name: str, model: nn.Module) -> str | None:
    if not needs_layer(name):
        return None
    return "down" if isinstance(model, TinySegmenter) else "features.4"


SMALL = {"lrp_epsilon_gamma_box": {"low": torch.full((3,), -4.0), "high": torch.full((3,), 4.0)},
         "integratedgradients": {"steps": 6, "chunk_size": 6}, "smoothgrad": {"samples": 4, "chunk_size": 4},
         "occlusion": {"patch": 8, "stride": 8, "chunk_size": 2}, "featureablation": {"cell": 8, "chunk_size": 2},
         "rise": {"masks": 4, "chunk_size": 2},
         "sscam": {"samples": 1}, "iscam": {"samples": 1}, "smoothgradcampp": {"samples": 2, "chunk_size": 2},
         "deepliftshap": {"baselines": 2, "chunk_size": 2}, "gradientshap": {"baselines": 2, "samples": 2, "chunk_size": 2}}
"""Options: inputs are standard normal (box bounds -4..4 for LRP); few passes for the multi-pass methods."""


def make(name: str, model: nn.Module) -> pyattr.AttributionMethod:
    """The registered method ``name`` on ``model``, with the :data:`SMALL` options."""
    return build_method(name, model, layer_for(name, model), **SMALL.get(name, {}))


# --------------------------------------------------------------------------------------------------
# Analytic cases
# --------------------------------------------------------------------------------------------------


def test_linear_segmenter_gradient_is_the_class_row_times_the_region():
    """out[k, p] = sum_c W[k, c] x[c, p] + b[k]: d/dx[c, p] of sum_p R_p out[t, p] is W[t, c] R_p."""
    torch.manual_seed(5)
    conv = nn.Conv2d(3, K, 1).eval()
    x = images(3, 8, seed=1)
    region = torch.rand(3, 8, 8)
    target = torch.tensor([0, 3, 2])
    result = pyattr.InputXGradient(conv, reduction="none")(x, SegmentationTarget(target, region))
    expected = conv.weight[target, :, 0, 0].detach()[:, :, None, None] * region[:, None] * x
    torch.testing.assert_close(result.raw, expected, rtol=1e-5, atol=1e-6)
    scores = (conv(x) * region[:, None]).sum((2, 3)).detach()
    torch.testing.assert_close(result.scores, scores, rtol=1e-5, atol=1e-5)


def test_predicted_region_is_the_models_own_argmax():
    torch.manual_seed(6)
    conv = nn.Conv2d(3, K, 1).eval()
    x = images(2, 8, seed=2)
    out = conv(x).detach()
    result = pyattr.Saliency(conv)(x, SegmentationTarget(classes=torch.tensor([1, 2])))
    for n, k in enumerate((1, 2)):
        mask = (out[n].argmax(0) == k).float()
        assert float(result.scores[n, k]) == pytest.approx(float((out[n, k] * mask).sum()), rel=1e-5, abs=1e-5)
        grad = conv.weight[k, :, 0, 0].detach().abs().max() * mask  # Saliency: max over channels of |W[k, c]| R_p
        torch.testing.assert_close(result.raw[n], grad, rtol=1e-5, atol=1e-6)
    # -1 explains the class with the largest summed score over its own predicted pixels
    scores_all = torch.stack([(out * (out.argmax(1, keepdim=True) == k)).sum((2, 3))[:, k] for k in range(K)], 1)
    free = pyattr.Saliency(conv)(x, SegmentationTarget())
    assert free.target.tolist() == scores_all.argmax(1).tolist()


def test_similarity_gradient_matches_the_cosine_formula():
    """e = A vec(x): d cos(e, r)/dx = A^T (r / (|e||r|) - (e.r) e / (|e|^3 |r|))."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, D)).eval()
    x = images(3, 4, seed=3)
    ref = torch.randn(3, D)
    result = pyattr.InputXGradient(model, reduction="none")(x, SimilarityTarget(ref))
    a = model[1].weight.detach()
    e = model(x).detach()
    ne, nr = e.norm(dim=1, keepdim=True), ref.norm(dim=1, keepdim=True)
    g = ref / (ne * nr) - (e * ref).sum(1, keepdim=True) * e / (ne ** 3 * nr)
    expected = (g @ a).view_as(x) * x
    torch.testing.assert_close(result.raw, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.scores[:, 0], F.cosine_similarity(e, ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.outputs["embedding"], e)
    assert result.target.tolist() == [0, 0, 0]
    dot = pyattr.InputXGradient(model, reduction="none")(x, SimilarityTarget(ref[0], measure="dot"))
    torch.testing.assert_close(dot.raw, (ref[0] @ a).view(1, 3, 4, 4).expand_as(x) * x, rtol=1e-5, atol=1e-6)


def test_class_target_object_is_the_plain_call(segmenter, embedder):
    x = images(2, seed=4)
    for method in (pyattr.GradCAM(embedder, "features.4"), pyattr.IntegratedGradients(embedder, steps=4)):
        plain, boxed = method(x, torch.tensor([1, -1])), method(x, ClassTarget(torch.tensor([1, -1])))
        assert torch.equal(plain.maps, boxed.maps) and torch.equal(plain.target, boxed.target)


def test_custom_target_kind():
    """A user's kind: a class's logit minus the mean of the others (no run-time input)."""

    class Contrast(Target):
        kind = "contrast"

        def scores(self, output, inputs):
            k = output.shape[1]
            return output - (output.sum(1, keepdim=True) - output) / (k - 1)

    torch.manual_seed(8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    x = images(2, 2, seed=5)
    result = pyattr.Saliency(model, reduction="none", absolute=False)(x, Contrast(classes=torch.tensor([1, 4])))
    w = model[1].weight.detach()
    for n, k in enumerate((1, 4)):
        row = w[k] - (w.sum(0) - w[k]) / 4
        torch.testing.assert_close(result.raw[n].flatten(), row, rtol=1e-5, atol=1e-6)


def test_every_method_explains_both_targets(segmenter, embedder):
    """Every registered method (CAM excepted: it reads a classifier's head) runs with both targets; maps
    are finite, in [0, 1], and change with the target (another reference), except for the methods that say
    they do not depend on it (``depends_on_target`` False: Eigen-CAM), whose map stays the same."""
    x = images(2, seed=6)
    ref = embedder(images(2, seed=7)).detach()
    for name in METHODS:
        if name == "cam":
            continue
        seg = make(name, segmenter)
        a = seg(x, SegmentationTarget(classes=torch.tensor([1, 2]), region=regions(2)))
        assert a.maps.shape == (2, 16, 16) and bool(torch.isfinite(a.maps).all()), name
        assert a.scores.shape == (2, K) and a.target.tolist() == [1, 2], name
        sim = make(name, embedder)
        b = sim(x, SimilarityTarget(ref))
        assert b.maps.shape == (2, 16, 16) and bool(torch.isfinite(b.maps).all()), name
        assert b.scores.shape == (2, 1) and b.target.tolist() == [0, 0], name
        other = sim(x, SimilarityTarget(-ref.flip(0)))
        if METHODS[name].depends_on_target:
            assert not torch.allclose(other.raw, b.raw), f"{name}: the map ignores the reference"
        else:  # Eigen-CAM: a principal component of the activations, the same for every target
            assert torch.equal(other.raw, b.raw), f"{name}: says it ignores the target, but its map changed"


# --------------------------------------------------------------------------------------------------
# Agreement with the peers
# --------------------------------------------------------------------------------------------------


def pgc_gradcam(model: nn.Module, layer: str, x: torch.Tensor, targets: list) -> torch.Tensor:
    """pytorch-grad-cam's Grad-CAM raw map (before its resize/rescale) for its target objects."""
    from pytorch_grad_cam import GradCAM

    cam = GradCAM(model=model, target_layers=[model.get_submodule(layer)])
    try:
        outputs = cam.activations_and_grads(x)
        sum(t(o) for t, o in zip(targets, outputs)).backward()
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = cam.get_cam_image(x, layer, targets, acts, grads, False)
        return torch.from_numpy(np.maximum(raw, 0))
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)


class OutOnly(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def deeplab():
    import torchvision

    torch.manual_seed(9)
    return torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5, aux_loss=False).eval()


def test_segmentation_gradcam_matches_pytorch_grad_cam(deeplab):
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    x = images(2, 64, seed=10)
    mask = np.zeros((2, 64, 64), dtype=np.float32)
    mask[0, 8:40, 16:48] = 1
    mask[1, 30:, :] = 1
    classes = [3, 1]
    ours = pyattr.GradCAM(OutOnly(deeplab), "model.backbone.16")(
        x, SegmentationTarget(classes=torch.tensor(classes), region=torch.from_numpy(mask)))
    theirs = pgc_gradcam(OutOnly(deeplab), "model.backbone.16", x,
                         [SemanticSegmentationTarget(c, m) for c, m in zip(classes, mask)])
    assert rel_err(ours.raw, theirs) < 1e-5
    # the dict output is read without a wrapper, and gives the same map
    direct = pyattr.GradCAM(deeplab, "backbone.16")(
        x, SegmentationTarget(classes=torch.tensor(classes), region=torch.from_numpy(mask)))
    torch.testing.assert_close(direct.raw, ours.raw)


class SimilarityToConceptTarget:
    """pytorch-grad-cam's target for embeddings, as its tutorial "Pixel Attribution for embeddings"
    (tutorials/Pixel Attribution for embeddings.ipynb) defines it: the package itself does not ship it."""

    def __init__(self, features):
        self.features = features

    def __call__(self, model_output):
        cos = torch.nn.CosineSimilarity(dim=0)
        return cos(model_output, self.features)


def test_similarity_gradcam_matches_pytorch_grad_cam(embedder):
    x = images(3, seed=11)
    concept = embedder(images(1, seed=12))[0].detach()
    ours = pyattr.GradCAM(embedder, "features.4")(x, SimilarityTarget(concept))
    theirs = pgc_gradcam(embedder, "features.4", x, [SimilarityToConceptTarget(concept)] * 3)
    assert rel_err(ours.raw, theirs) < 1e-5


def test_saliency_and_ig_match_captum_on_a_wrapped_forward(deeplab, embedder):
    from captum.attr import IntegratedGradients, Saliency

    x = images(2, 32, seed=13)
    region = torch.zeros(2, 32, 32)
    region[:, 4:20, 8:28] = 1
    classes = torch.tensor([2, 4])

    def seg_objective(inp):
        return (deeplab(inp)["out"] * region[:, None]).sum((2, 3)).gather(1, classes[:, None])[:, 0]

    theirs = Saliency(seg_objective).attribute(x, abs=True).amax(1)
    ours = pyattr.Saliency(deeplab)(x, SegmentationTarget(classes, region))
    assert rel_err(ours.raw, theirs) < 1e-5

    ref = embedder(images(2, seed=14)).detach()

    def sim_objective(inp, reference):  # captum repeats the extra argument along with the steps
        return F.cosine_similarity(embedder(inp), reference, dim=1)

    xs = images(2, seed=15)
    theirs = IntegratedGradients(sim_objective).attribute(xs, baselines=torch.zeros_like(xs), n_steps=16,
                                                          method="gausslegendre",
                                                          additional_forward_args=(ref,)).sum(1)
    ours = pyattr.IntegratedGradients(embedder, steps=16, baseline="zeros", rule="gausslegendre",
                                      reduction="sum")(xs, SimilarityTarget(ref))
    assert rel_err(ours.raw, theirs) < 1e-4
    deeplab.zero_grad(set_to_none=True)
    embedder.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------
# Export: the contract for every method
# --------------------------------------------------------------------------------------------------


def seg_inputs(x: torch.Tensor, t: torch.Tensor):
    region = regions(x.shape[0], x.shape[-1])
    return SegmentationTarget(t, region), (region,)


def sim_inputs_for(embedder):
    def make(x: torch.Tensor, t: torch.Tensor):
        ref = embedder(images(x.shape[0], seed=21)).detach()
        return SimilarityTarget(ref, classes=t.clamp_max(0)), (ref,)
    return make


EXPORTED = [name for name in METHODS if name != "cam"]


@pytest.mark.parametrize("name", EXPORTED)
def test_export_contract_segmentation(segmenter, name, tmp_path):
    method = make(name, segmenter)
    formats = ("onnx", "torchscript", "pt2") if name in FULL_FORMATS else ("onnx",)
    assert_export_contract(method, images(2), tmp_path, num_classes=K, formats=formats, batches=(1, 3),
                           target=SegmentationTarget(), target_inputs=seg_inputs)


SIMILARITY_ATOL = {"occlusion": 1e-3, "featureablation": 1e-3, "reciprocam": 5e-4}
"""Normalized-map tolerances above the contract's 1e-4. Occlusion, Feature Ablation: a score drop of the tiny
embedder's similarity is a difference of two numbers near 0.9996 that differ by ~1e-3, so float32 rounding of the
similarity (~6e-8) is ~1e-4 of the drop and of the map's range, in eager calls as in any runtime (eager float32 vs
float64: 1.9e-4; onnxruntime vs eager: 2.4e-4). Recipro-CAM: one position of the layer moves the cosine similarity
(about 0.98, dominated by the head's bias) by about 1e-3, so min-max normalization multiplies float32 rounding
(1e-7) by about 1e3 (measured: map ranges 1.0e-3 to 1.9e-3 for values 0.97-0.99)."""


@pytest.mark.parametrize("name", EXPORTED)
def test_export_contract_similarity(embedder, name, tmp_path):
    method = make(name, embedder)
    formats = ("onnx", "torchscript", "pt2") if name in FULL_FORMATS else ("onnx",)
    assert_export_contract(method, images(2), tmp_path, num_classes=1, formats=formats, batches=(1, 3),
                           target=SimilarityTarget(), target_inputs=sim_inputs_for(embedder),
                           atol=SIMILARITY_ATOL.get(name, 1e-4))


FULL_FORMATS = ("saliency", "gradcam", "lrp_epsilon_plus")
"""Methods checked in all three formats; the others in ONNX (the strictest runtime) to keep the suite short."""


def test_export_records_the_target(segmenter, embedder, tmp_path):
    seg = pyattr.export(pyattr.GradCAM(segmenter, "down"), images(1), tmp_path / "s.onnx", target=SegmentationTarget())
    meta = pyattr.read_metadata(seg)
    assert meta["inputs"] == ["images", "target", "region"] and meta["target"] == {"kind": "segmentation"}
    assert meta["outputs"] == ["scores", "explained_class", "raw", "maps"]
    sim = pyattr.export(pyattr.Saliency(embedder), images(1), tmp_path / "e.pt2",
                        target=SimilarityTarget(measure="dot"))
    meta = pyattr.read_metadata(sim)
    assert meta["inputs"] == ["images", "target", "reference"]
    assert meta["outputs"][-1] == "embedding" and meta["target"] == {"kind": "similarity", "measure": "dot"}


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_bad_targets_raise_clear_errors(segmenter, embedder, tmp_path):
    x = images(2)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5)).eval()
    cases = [
        (pyattr.Saliency(segmenter), SegmentationTarget(region=torch.ones(2, 8, 8)), "region must be"),
        (pyattr.Saliency(segmenter), SegmentationTarget(region=torch.full((16, 16), float("nan"))), "NaN"),
        (pyattr.Saliency(segmenter), SegmentationTarget(region=torch.randn(2, 16, 16)), "negative"),
        (pyattr.Saliency(segmenter), SegmentationTarget(classes=K), "out of range"),
        (pyattr.Saliency(classifier), SegmentationTarget(classes=1), "classifier"),
        (pyattr.Saliency(embedder), SimilarityTarget(torch.ones(D + 1)), f"has {D}"),
        (pyattr.Saliency(embedder), SimilarityTarget(torch.ones(2, 3, D)), "reference must be"),
        (pyattr.Saliency(embedder), SimilarityTarget(), "needs reference"),
        (pyattr.Saliency(embedder), SimilarityTarget(torch.zeros(D)), "all-zero"),
        (pyattr.Saliency(segmenter), SimilarityTarget(torch.ones(D)), "embedding (N, D)"),
        (pyattr.CAM(embedder, "features.4"), SimilarityTarget(torch.ones(D)), "Grad-CAM"),
        (pyattr.Saliency(embedder), SimilarityTarget, "instance"),
    ]
    for method, target, words in cases:
        with pytest.raises(InputError, match=None) as info:
            method(x, target)
        assert words in str(info.value), f"{target!r}: {info.value}"
    with pytest.raises(InputError, match="classifier"):
        pyattr.export(pyattr.Saliency(classifier), x[:1], tmp_path / "c.onnx", target=SegmentationTarget())
    with pytest.raises(InputError, match="target kind"):
        pyattr.export(pyattr.Saliency(classifier), x[:1], tmp_path / "c.onnx", target=3)
    with pytest.raises(InputError, match="Grad-CAM"):
        pyattr.export(pyattr.CAM(embedder, "features.4"), x[:1], tmp_path / "c.onnx", target=SimilarityTarget())
    with pytest.raises(InputError, match="one score"):
        SimilarityTarget(torch.ones(D), classes=3)
    assert not list(tmp_path.iterdir())


def test_exported_graph_marks_bad_run_time_inputs_invalid(embedder, tmp_path):
    """A NaN reference cannot raise in a graph: that sample gets NaN maps and explained_class -1."""
    import onnxruntime as ort

    path = pyattr.export(pyattr.GradCAM(embedder, "features.4"), images(1), tmp_path / "e.onnx",
                         target=SimilarityTarget())
    x = images(2, seed=30)
    ref = embedder(images(2, seed=31)).detach()
    ref[1, 0] = float("nan")
    out = ort.InferenceSession(str(path)).run(None, {"images": x.numpy(), "target": np.zeros(2, np.int64),
                                                      "reference": ref.numpy()})
    assert out[1].tolist() == [0, -1]
    assert np.isfinite(out[3][0]).all() and np.isnan(out[3][1]).all()


def test_threads_with_different_targets_get_their_own(embedder):
    """The target is the call's: 6 threads on one model with different references get what they get alone."""
    x = images(2, seed=40)
    refs = [embedder(images(2, seed=41 + i)).detach() for i in range(6)]
    method = pyattr.GradCAM(embedder, "features.4")
    alone = [method(x, SimilarityTarget(r)).maps for r in refs]
    got: dict[int, torch.Tensor] = {}

    def work(i):
        for _ in range(3):
            got[i] = method(x, SimilarityTarget(refs[i])).maps

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        assert torch.equal(got[i], alone[i])


def test_builtin_models_match_pytorch_grad_cam():
    """The built-in segmenter (given masks) and embedding (a reference's embedding) against pytorch-grad-cam."""
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    pairs = pyattr.zoo.generate_similarity(3, seed=50)
    x = torch.from_numpy(pairs.queries).permute(0, 3, 1, 2).float() / 255
    seg = pyattr.zoo.load_builtin_segmenter()
    masks = pairs.shared_masks.astype(np.float32)
    classes = [int(k) + 1 for k in pairs.shared_classes]
    ours = pyattr.GradCAM(seg, pyattr.zoo.SHAPESSEG_LAYER)(
        x, SegmentationTarget(classes=torch.tensor(classes), region=torch.from_numpy(masks)))
    theirs = pgc_gradcam(seg, pyattr.zoo.SHAPESSEG_LAYER, x,
                         [SemanticSegmentationTarget(c, m) for c, m in zip(classes, masks)])
    assert rel_err(ours.raw, theirs) < 1e-5
    embed = pyattr.zoo.load_builtin_embedding()
    refs = embed(torch.from_numpy(pairs.references).permute(0, 3, 1, 2).float() / 255).detach()
    ours = pyattr.GradCAM(embed, pyattr.zoo.SHAPESNET_LAYER)(x, SimilarityTarget(refs))
    theirs = pgc_gradcam(embed, pyattr.zoo.SHAPESNET_LAYER, x, [SimilarityToConceptTarget(r) for r in refs])
    assert rel_err(ours.raw, theirs) < 1e-5
