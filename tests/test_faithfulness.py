"""pyattr.metrics' faithfulness metrics: analytic cases (linear models whose true attribution is known), agreement
with the reference implementations on the same maps and inputs (torchcam, pytorch-grad-cam, captum), properties
(chunk size, seeds), and the errors bad inputs get. Tiny models and inputs: the whole file runs in seconds."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

import pyattr
from pyattr.metrics import (
    confidence_change,
    deletion,
    deletion_insertion,
    infidelity,
    insertion,
    linear_imputation,
    model_parameter_randomization,
    noisy_linear_imputation,
    pixel_ranks,
    removal_masks,
    removed_count,
    road,
    road_combined,
    sensitivity_max,
    step_counts,
)
from pyattr.metrics._common import gaussian_blur


def linear_model(c: int = 2, h: int = 4, w: int = 4, k: int = 3, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, k)).to(dtype).eval()
    return model


class TinyNet(nn.Module):
    def __init__(self, seed: int = 0, k: int = 5):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, k)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def tiny():
    return TinyNet().eval()


def images(n: int, size: int = 12, seed: int = 1, c: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_maps(n: int, size: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, size, size, generator=torch.Generator().manual_seed(seed))


def rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# -- analytic cases --------------------------------------------------------------------------------------------


def test_step_counts_and_ranks():
    assert step_counts(16, 4) == [0, 4, 8, 12, 16]
    assert step_counts(10, 4) == [0, 3, 6, 9, 10]
    assert step_counts(5, 20) == [0, 1, 2, 3, 4, 5]
    ranks = pixel_ranks(torch.tensor([[[0.2, 0.9], [0.2, 0.5]]]))
    assert ranks.tolist() == [[2, 0, 3, 1]]  # ties in row-major order


def test_deletion_and_insertion_of_a_linear_model_follow_the_exact_contributions():
    """f(x) = W x + b: deleting pixel p (to 0) removes its contribution c_p = sum_c W[t, c, p] x[c, p], so with
    the map c and one pixel per step the logit curve is f(x) minus the cumulative sum of the sorted c_p."""
    model = linear_model()
    x = images(2, size=4, c=2, dtype=torch.float64)
    target = torch.tensor([0, 2])
    w = model[1].weight.detach().view(3, 2, 16)
    contributions = (w[target] * x.view(2, 2, 16)).sum(1)  # (N, P)
    maps = contributions.view(2, 4, 4)
    logits = model(x).detach()
    f = logits.gather(1, target[:, None])[:, 0]
    curve = deletion(model, x, maps, target, steps=16, score="logit")
    sorted_c = contributions.sort(1, descending=True).values
    expected = torch.cat([f[:, None], f[:, None] - sorted_c.cumsum(1)], 1)
    torch.testing.assert_close(curve.scores, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(curve.fractions, torch.arange(17, dtype=torch.float32) / 16)
    for i in range(2):  # the trapezoid rule by hand
        s = expected[i].tolist()
        auc = sum((s[k] + s[k + 1]) / 2 for k in range(16)) / 16
        assert float(curve.auc[i]) == pytest.approx(auc, abs=1e-6)
    bias = model[1].bias.detach()[target]
    ins = insertion(model, x, maps, target, steps=16, score="logit", baseline=0.0)
    expected_ins = torch.cat([bias[:, None], bias[:, None] + sorted_c.cumsum(1)], 1)
    torch.testing.assert_close(ins.scores, expected_ins, rtol=0, atol=1e-12)
    # the exact map deletes faster than any other order: its AUC is the lowest, the reversed map's the highest
    worst = deletion(model, x, -maps, target, steps=16, score="logit")
    shuffled = deletion(model, x, maps.flatten(1)[:, torch.randperm(16)].view(2, 4, 4), target, steps=16, score="logit")
    assert bool((curve.auc < shuffled.auc).all()) and bool((shuffled.auc < worst.auc).all())


def test_deletion_steps_that_do_not_divide_the_pixels_and_a_constant_baseline():
    model = linear_model()
    x = images(1, size=4, c=2, dtype=torch.float64)
    maps = torch.arange(16.0, dtype=torch.float64).flip(0).view(1, 4, 4)  # row-major order is the ranking
    curve = deletion(model, x, maps, 1, steps=6, baseline=0.5, score="logit")
    assert curve.fractions.tolist() == [k / 16 for k in (0, 3, 6, 9, 12, 15, 16)]
    w, b = model[1].weight.detach()[1].view(2, 16), model[1].bias.detach()[1]
    for j, k in enumerate((0, 3, 6, 9, 12, 15, 16)):
        xs = x.view(2, 16).clone()
        xs[:, :k] = 0.5
        assert float(curve.scores[0, j]) == pytest.approx(float((w * xs).sum() + b), abs=1e-12)


def test_confidence_change_by_hand():
    model = linear_model(dtype=torch.float32)
    x = images(3, size=4, c=2)
    with torch.no_grad():
        y = model(x).softmax(1)[:, 1]
        zero = model(torch.zeros_like(x)).softmax(1)[:, 1]
    ones = confidence_change(model, x, torch.ones(3, 4, 4), 1)
    assert torch.equal(ones.drop, torch.zeros(3)) and not bool(ones.increase.any())
    blank = confidence_change(model, x, torch.zeros(3, 4, 4), 1)
    torch.testing.assert_close(blank.masked, zero)
    torch.testing.assert_close(blank.drop, torch.relu(y - zero) / (y + 1e-7))
    torch.testing.assert_close(blank.absolute_drop, torch.relu(y - zero))
    assert blank.increase.tolist() == (zero > y).tolist()
    assert blank.average_drop == pytest.approx(float(blank.drop.mean()))


def test_infidelity_is_zero_for_the_exact_attribution_of_a_linear_model():
    model = linear_model()
    x = images(3, size=4, c=2, dtype=torch.float64)
    target = torch.tensor([2, 0, 1])
    exact = model[1].weight.detach()[target].view(3, 2, 4, 4)
    assert float(infidelity(model, x, exact, target, std=0.1).max()) < 1e-20
    wrong = model[1].weight.detach()[(target + 1) % 3].view(3, 2, 4, 4)
    assert float(infidelity(model, x, wrong, target, std=0.1).min()) > 1e-4
    # normalize=True: invariant to the map's scale, and 0 for any multiple of the exact map
    assert float(infidelity(model, x, 7.5 * exact, target, std=0.1, normalize=True).abs().max()) < 1e-12
    torch.testing.assert_close(infidelity(model, x, 3 * wrong, target, std=0.1, normalize=True),
                               infidelity(model, x, wrong, target, std=0.1, normalize=True))
    # (N, H, W) maps count for every channel: exact when the weights are the same on each channel
    shared = linear_model(c=1)
    twice = nn.Sequential(nn.Flatten(), nn.Linear(32, 3)).double().eval()
    with torch.no_grad():
        twice[1].weight.copy_(shared[1].weight.repeat(1, 2))
        twice[1].bias.copy_(shared[1].bias)
    per_pixel = shared[1].weight.detach()[target].view(3, 4, 4)
    assert float(infidelity(twice, x, per_pixel, target, std=0.1).max()) < 1e-20


def test_sensitivity_of_saliency_on_a_linear_model_is_zero():
    model = linear_model(dtype=torch.float32)
    x = images(2, size=4, c=2)
    assert float(sensitivity_max(model, x, pyattr.Saliency(model), 1).abs().max()) == 0.0
    ixg = sensitivity_max(model, x, pyattr.InputXGradient(model, reduction="none"), 1, radius=0.05)
    # Input x Gradient is x * w: ||d * w|| / ||x * w|| with |d| <= radius; positive, below radius * max|w| / ...
    assert bool((ixg > 0).all()) and bool((ixg < 1).all())


def test_linear_imputation_reproduces_a_linear_ramp_inside_the_image():
    """Every imputed pixel is the weighted mean of its 8 neighbours; a linear function has that property at
    interior pixels (symmetric weights), so removed interior pixels come back exactly."""
    yy, xx = torch.meshgrid(torch.arange(7.0), torch.arange(9.0), indexing="ij")
    image = torch.stack([2 * yy - xx + 1, 0.5 * xx + 3 * yy])  # (2, 7, 9)
    keep = torch.ones(7, 9, dtype=torch.bool)
    keep[2:5, 3:7] = False
    keep[1, 1] = False
    out = linear_imputation(image, keep)
    torch.testing.assert_close(out, image, rtol=0, atol=1e-5)
    noisy = noisy_linear_imputation(image, keep, 0.25, torch.Generator().manual_seed(4))
    draw = torch.randn(2, int((~keep).sum()), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(noisy[:, ~keep], image[:, ~keep] + 0.25 * draw, rtol=0, atol=1e-5)
    assert torch.equal(noisy[:, keep], image[:, keep])


def test_removal_masks_follow_numpy_percentiles():
    maps = random_maps(3, size=6)
    for fraction in (0.1, 0.35, 0.8):
        morf, lerf = (removal_masks(maps, fraction, order, "threshold") for order in ("morf", "lerf"))
        for i in range(3):
            m = maps[i].numpy()
            assert (morf[i].numpy() == (m < np.percentile(m, 100 * (1 - fraction)))).all()
            assert (lerf[i].numpy() == ((1 - m) < np.percentile(1 - m, 100 * (1 - fraction)))).all()
        # on maps without ties the rank rule removes the same pixels, removed_count of them
        assert torch.equal(removal_masks(maps, fraction, "morf"), morf)
        assert torch.equal(removal_masks(maps, fraction, "lerf"), lerf)
        assert (~morf).flatten(1).sum(1).tolist() == [removed_count(36, fraction)] * 3


def test_road_on_a_map_with_ties_removes_the_share_by_rank(tiny):
    """Grad-CAM-like maps, 80% zeros: the reference's threshold would remove every pixel at 30% (the 70th
    percentile is 0 and every pixel is >= 0); the rank rule removes 43 of 144 pixels, the positive ones first."""
    maps = random_maps(2) * (torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(3)) > 0.8)
    keep = removal_masks(maps, 0.3, "morf")
    assert (~keep).flatten(1).sum(1).tolist() == [43, 43]
    assert bool(((maps > 0) <= ~keep).all())  # every positive pixel (fewer than 43) is among the removed
    with pytest.raises(pyattr.InputError, match="selection='rank'"):
        road(tiny, images(2), maps, fractions=[0.3], selection="threshold")
    result = road(tiny, images(2), maps, fractions=[0.3, 0.9])
    assert bool(torch.isfinite(result.scores).all())


def test_segmentation_target_scores_each_sample_over_its_own_region():
    """A per-pixel linear segmenter (a 1x1 convolution): the segmentation target's score is
    sum_p region[p] (w_k . x[:, p] + b_k); deleting pixels to 0 removes their w_k . x[:, p] inside the region."""
    torch.manual_seed(5)
    seg = nn.Conv2d(2, 3, 1).double().eval()
    x = images(2, size=4, c=2, dtype=torch.float64)
    region = torch.zeros(2, 4, 4, dtype=torch.float64)
    region[0, :2] = 1
    region[1, :, 1:3] = 1
    target = pyattr.SegmentationTarget(classes=torch.tensor([1, 2]), region=region)
    w, b = seg.weight.detach()[:, :, 0, 0], seg.bias.detach()
    per_pixel = torch.einsum("kc,ncp->nkp", w, x.view(2, 2, 16)) + b[None, :, None]  # (N, K, P)
    maps = random_maps(2, size=4).double()
    curve = deletion(seg, x, maps, target, steps=4, score="logit")
    for i, k in enumerate((1, 2)):
        order = maps[i].flatten().argsort(descending=True, stable=True)
        for j, count in enumerate((0, 4, 8, 12, 16)):
            kept = torch.ones(16, dtype=torch.bool)
            kept[order[:count]] = False
            value = (region[i].flatten() * (torch.where(kept, per_pixel[i, k] - b[k], 0) + b[k])).sum()
            assert float(curve.scores[i, j]) == pytest.approx(float(value), abs=1e-10)


def test_model_parameter_randomization_wraps_the_sanity_cascade(tiny):
    x = images(2)
    result = model_parameter_randomization(tiny, x, "saliency", seed=3)
    expected = pyattr.sanity.model_randomization(lambda m: pyattr.Saliency(m), tiny, x, seed=3)
    assert list(zip(result.layers, result.correlations)) == expected
    assert result.layers == ["head", "conv"] and result.per_sample.shape == (2, 2)
    cam = model_parameter_randomization(tiny, x, "gradcam", layer="conv", layers=["head"])
    assert cam.layers == ["head"] and -1 <= cam.correlations[0] <= 1


# -- agreement with the reference implementations --------------------------------------------------------------


class FixedCAM:
    """A torchcam CAM extractor that returns given maps (torchcam's metrics call it with the batch)."""

    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


@pytest.mark.parametrize("blur", [False, True])
def test_deletion_insertion_agree_with_torchcam(tiny, blur):
    from functools import partial

    from torchcam.metrics import DeletionInsertionMetric

    x, maps, target = images(3), random_maps(3), [1, 4, 0]
    baseline = gaussian_blur if blur else 0.0
    dele = deletion(tiny, x, maps, torch.tensor(target), steps=7, baseline=baseline, chunk_size=5)
    ins = insertion(tiny, x, maps, torch.tensor(target), steps=7, baseline=baseline, chunk_size=5)
    for i in range(3):
        ref = DeletionInsertionMetric(FixedCAM(tiny, maps[i:i + 1]), partial(torch.softmax, dim=-1), steps=7,
                                      baseline=gaussian_blur if blur else None)
        ref.update(x[i:i + 1], class_idx=[target[i]])
        got = ref.summary()
        assert rel(dele.auc[i], got["deletion_auc"]) < 1e-4
        assert rel(ins.auc[i], got["insertion_auc"]) < 1e-4
    both = deletion_insertion(tiny, x, maps, torch.tensor(target), steps=7, baseline=baseline, chunk_size=4)
    torch.testing.assert_close(both[0].scores, dele.scores, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(both[1].scores, ins.scores, rtol=1e-5, atol=1e-7)
    assert torch.equal(both[0].scores[:, -1], both[1].scores[:, 0])
    assert dele.scores.shape == (3, 8)  # ceil(144 / 7) = 21 pixels a step: 0, 21, ..., 126, then 144


def test_confidence_change_agrees_with_torchcam_and_pytorch_grad_cam(tiny):
    from functools import partial

    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    from torchcam.metrics import ClassificationMetric

    x = images(4)
    maps = random_maps(4) ** 3
    target = [0, 3, 2, 2]
    ours = confidence_change(tiny, x, maps, torch.tensor(target))
    assert ours.increase.any() and not ours.increase.all()  # both cases occur on these inputs
    for i in range(4):
        ref = ClassificationMetric(FixedCAM(tiny, maps[i:i + 1]), partial(torch.softmax, dim=-1))
        ref.update(x[i:i + 1], class_idx=[target[i]])
        got = ref.summary()
        assert rel(ours.drop[i], got["avg_drop"]) < 1e-4 or abs(float(ours.drop[i]) - got["avg_drop"]) < 1e-7
        assert float(ours.increase[i]) == got["conf_increase"]
    targets = [ClassifierOutputSoftmaxTarget(t) for t in target]
    drop = DropInConfidence()(x, maps.numpy(), targets, tiny)
    increase = IncreaseInConfidence()(x, maps.numpy(), targets, tiny)
    assert np.abs(ours.absolute_drop.numpy() - drop).max() <= 1e-4 * max(np.abs(drop).max(), 1e-6)
    assert (ours.increase.numpy() == increase.astype(bool)).all()


def _grad_cam_road(x, maps, targets, model, order, percentile, noise):
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    remove = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
    return PerturbationConfidenceMetric(remove(percentile, NoisyLinearImputer(noise=noise)))(x, maps, targets, model)


@pytest.mark.parametrize(("order", "selection"), [("morf", "rank"), ("lerf", "rank"), ("morf", "threshold")])
def test_road_agrees_with_pytorch_grad_cam(tiny, order, selection):
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    x, maps, target = images(3), random_maps(3), [2, 0, 4]
    targets = [ClassifierOutputSoftmaxTarget(t) for t in target]
    # without noise: the imputation itself
    ours = road(tiny, x, maps, torch.tensor(target), order=order, fractions=[0.3, 0.7], noise=0.0, chunk_size=4,
                selection=selection)
    for j, fraction in enumerate((0.3, 0.7)):
        ref = _grad_cam_road(x, maps.numpy(), targets, tiny, order, 100 * (1 - fraction), 0.0)
        assert rel(ours.change[:, j], ref) < 1e-4
    # with ROAD's noise, drawn in the reference's order from the same seed
    noisy = road(tiny, x, maps, torch.tensor(target), order=order, fractions=[0.2], seed=11, selection=selection)
    torch.manual_seed(11)
    cls = ROADMostRelevantFirst if order == "morf" else ROADLeastRelevantFirst
    ref = cls(percentile=80)(x, maps.numpy(), targets, tiny)
    assert rel(noisy.change[:, 0], ref) < 1e-4


def test_road_averages_and_combined_agree_with_pytorch_grad_cam(tiny):
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    x, maps = images(2, size=10, seed=3), random_maps(2, size=10, seed=4)
    targets = [ClassifierOutputSoftmaxTarget(t) for t in (1, 3)]
    percentiles = [20, 50, 80]
    fractions = [1 - p / 100 for p in percentiles]  # the reference's order of draws
    torch.manual_seed(5)
    morf_ref = ROADMostRelevantFirstAverage(percentiles)(x, maps.numpy(), targets, tiny)
    torch.manual_seed(5)
    lerf_ref = ROADLeastRelevantFirstAverage(percentiles)(x, maps.numpy(), targets, tiny)
    morf = road(tiny, x, maps, torch.tensor([1, 3]), fractions=fractions, seed=5)
    assert rel(morf.mean_change, morf_ref) < 1e-4
    combined = road_combined(tiny, x, maps, torch.tensor([1, 3]), fractions=fractions, seed=5)
    assert rel(combined, (lerf_ref - morf_ref) / 2) < 1e-4


@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_agrees_with_captum(tiny, normalize):
    from captum.metrics import infidelity as captum_infidelity

    x, target = images(3), torch.tensor([1, 0, 3])
    attributions = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    std = 0.05
    ours = infidelity(tiny, x, attributions, target, n_perturb=6, std=std, normalize=normalize, seed=8, chunk_size=5)

    generator = torch.Generator().manual_seed(8)

    def perturb(inputs):  # the same draws: one per repeated row, sample-major
        noise = std * torch.stack([torch.randn(inputs.shape[1:], generator=generator) for _ in range(len(inputs))])
        return noise, inputs - noise

    ref = captum_infidelity(tiny, perturb, x, attributions, target=target, n_perturb_samples=6, normalize=normalize)
    assert rel(ours, ref) < 1e-4
    # (N, H, W) maps are the same map on every channel
    per_pixel = attributions[:, 0]
    generator = torch.Generator().manual_seed(8)
    ref = captum_infidelity(tiny, perturb, x, per_pixel[:, None].expand(3, 3, 12, 12), target=target,
                            n_perturb_samples=6, normalize=normalize)
    assert rel(infidelity(tiny, x, per_pixel, target, n_perturb=6, std=std, normalize=normalize, seed=8), ref) < 1e-4


def test_sensitivity_max_agrees_with_captum(tiny):
    from captum.metrics import sensitivity_max as captum_sensitivity_max

    x, target = images(3), torch.tensor([2, 2, 1])
    method = pyattr.Saliency(tiny)
    ours = sensitivity_max(tiny, x, method, target, n_perturb=4, radius=0.1, seed=9, chunk_size=5)
    generator = torch.Generator().manual_seed(9)

    def perturb(inputs, radius):
        return inputs + torch.stack([torch.empty(inputs.shape[1:]).uniform_(-radius, radius, generator=generator)
                                     for _ in range(len(inputs))])

    def explain(inputs, target):  # captum passes a tuple for x and expects one back
        if isinstance(inputs, tuple):
            return (method(inputs[0], target).raw,)
        return method(inputs, target).raw

    ref = captum_sensitivity_max(explain, x, perturb, perturb_radius=0.1, n_perturb_samples=4, target=target)
    assert rel(ours, ref) < 1e-4
    assert bool((ours > 0).all())


# -- properties ---------------------------------------------------------------------------------------------------


def test_results_do_not_depend_on_the_chunk_size_and_seeds_reproduce(tiny):
    x, maps = images(3), random_maps(3)
    a = deletion(tiny, x, maps, steps=5, chunk_size=1)
    b = deletion(tiny, x, maps, steps=5, chunk_size=100)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    r1 = road(tiny, x, maps, fractions=[0.4, 0.6], chunk_size=1, seed=2)
    r2 = road(tiny, x, maps, fractions=[0.4, 0.6], chunk_size=64, seed=2)
    torch.testing.assert_close(r1.scores, r2.scores, rtol=1e-5, atol=1e-6)
    r3 = road(tiny, x, maps, fractions=[0.4, 0.6], seed=3)
    assert not torch.equal(r1.scores, r3.scores)
    i1 = infidelity(tiny, x, maps, chunk_size=2, std=0.1)
    i2 = infidelity(tiny, x, maps, chunk_size=64, std=0.1)
    torch.testing.assert_close(i1, i2, rtol=1e-4, atol=1e-7)
    rng = torch.random.get_rng_state()
    infidelity(tiny, x, maps, seed=1)
    sensitivity_max(tiny, x, pyattr.Saliency(tiny), n_perturb=2)
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_a_method_gives_the_same_numbers_as_its_maps(tiny):
    x = images(2)
    method = pyattr.GradCAM(tiny, "conv")
    result = method(x)
    for metric in (deletion, insertion):
        from_method = metric(tiny, x, method, steps=6, chunk_size=1)  # the maps, too, chunk by chunk
        from_maps = metric(tiny, x, result.maps, result.target, steps=6)
        torch.testing.assert_close(from_method.auc, from_maps.auc)
        assert torch.equal(from_method.target, result.target)
    torch.testing.assert_close(confidence_change(tiny, x, method).drop, confidence_change(tiny, x, result.maps).drop)


class WithBatchNorm(TinyNet):
    def __init__(self):
        super().__init__(seed=4)
        self.bn = nn.BatchNorm2d(3)  # its running statistics would move if a metric ran it in training mode

    def forward(self, x):
        return super().forward(self.bn(x))


def test_the_users_model_stays_in_training_mode_and_untouched():
    model = WithBatchNorm().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, maps = images(2), random_maps(2)
    deletion(model, x, maps, steps=3)
    confidence_change(model, x, maps)
    infidelity(model, x, maps, n_perturb=2)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# -- bad input ------------------------------------------------------------------------------------------------------


def test_bad_inputs_get_input_errors_that_name_the_fix(tiny):
    x, maps = images(2), random_maps(2)
    with pytest.raises(pyattr.InputError, match=r"\(2, 12, 12\).*resize"):
        deletion(tiny, x, random_maps(2, size=6))
    with pytest.raises(pyattr.InputError, match="one map per input"):
        insertion(tiny, x, random_maps(3))
    with pytest.raises(pyattr.InputError, match="reduce the channels"):
        deletion(tiny, x, torch.rand(2, 3, 12, 12))
    with pytest.raises(pyattr.InputError, match="steps must be a positive int, got 0"):
        deletion(tiny, x, maps, steps=0)
    with pytest.raises(pyattr.InputError, match="chunk_size"):
        insertion(tiny, x, maps, chunk_size=0)
    bad = maps.clone()
    bad[1, 3, 3] = float("nan")
    with pytest.raises(pyattr.InputError, match="NaN or infinite values \\(samples 1\\)"):
        deletion(tiny, x, bad)
    with pytest.raises(pyattr.InputError, match="NaN"):
        road(tiny, x, bad)
    with pytest.raises(pyattr.InputError, match="another model"):
        deletion(tiny, x, pyattr.GradCAM(TinyNet(seed=9), "conv"))
    linear = linear_model(c=3, h=12, w=12, dtype=torch.float32)
    with pytest.raises(pyattr.InputError, match="convolutional layer"):
        deletion(linear, x, pyattr.GradCAM(linear, "1"))
    with pytest.raises(pyattr.InputError, match="first argument is the model"):
        deletion(pyattr.Saliency(tiny), x, maps)
    with pytest.raises(pyattr.InputError, match="out of range"):
        deletion(tiny, x, maps, 7)
    with pytest.raises(pyattr.InputError, match=r"\(N, T\)"):
        deletion(tiny, x, maps, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(pyattr.InputError, match="score must be"):
        deletion(tiny, x, maps, score="probability")
    with pytest.raises(pyattr.InputError, match="baseline"):
        deletion(tiny, x, maps, baseline=torch.zeros(5, 12, 12))
    with pytest.raises(pyattr.InputError, match=r"\[0, 1\].*normalize"):
        confidence_change(tiny, x, maps * 3)
    with pytest.raises(pyattr.InputError, match="constant map"):
        road(tiny, x, torch.ones(2, 12, 12), selection="threshold")
    with pytest.raises(pyattr.InputError, match="selection must be"):
        road(tiny, x, maps, selection="percentile")
    with pytest.raises(pyattr.InputError, match="fractions"):
        road(tiny, x, maps, fractions=[0.0, 0.5])
    with pytest.raises(pyattr.InputError, match="needs the method"):
        sensitivity_max(tiny, x, maps)
    with pytest.raises(pyattr.InputError, match="n_perturb"):
        infidelity(tiny, x, maps, n_perturb=0)
    with pytest.raises(pyattr.InputError, match="by name"):
        model_parameter_randomization(tiny, x, pyattr.Saliency(tiny))
    with pytest.raises(pyattr.InputError, match="NaN or infinite"):
        deletion(tiny, torch.full((1, 3, 12, 12), float("nan")), maps[:1])


def test_road_without_scipy_says_how_to_install_it(tiny, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy.sparse", None)  # import scipy.sparse now raises ImportError
    with pytest.raises(ImportError, match="pip install scipy"):
        road(tiny, images(1), random_maps(1))
    deletion(tiny, images(1), random_maps(1), steps=2)  # the other metrics do not need it


# -- one exported graph: the method and its metrics ------------------------------------------------------------------


def test_top_pixels_matches_the_stable_ranks():
    from pyattr.metrics.graph import top_pixels

    maps = (random_maps(3, size=6) * 4).round() / 4  # five values: many ties
    counts = step_counts(36, 7)
    top = top_pixels(maps, counts)
    ranks = pixel_ranks(maps)
    for j, c in enumerate(counts):
        assert torch.equal(top[:, j], ranks < c), c


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_method_with_metrics_exports_as_one_graph_equal_to_the_eager_metrics(tiny, tmp_path, fmt):
    """The exported graph (GradCAM + deletion/insertion curves, AUC, Average Drop, Increase in Confidence) run at
    batch 4 with mixed targets equals the eager metric functions on the method's maps (Grad-CAM's zeros: ties)."""
    from contract import FORMATS, run_exported

    from pyattr.metrics.graph import METRIC_OUTPUTS, MethodWithMetrics

    method = pyattr.GradCAM(tiny, "conv")
    scored = MethodWithMetrics(method, steps=6)
    x = images(4, seed=7)
    path = pyattr.export(scored, x[:1], tmp_path / f"scored{FORMATS[fmt]}")
    meta = pyattr.read_metadata(path)
    assert meta["outputs"][4:] == list(METRIC_OUTPUTS) and meta["metrics"]["steps"] == 6
    t = torch.tensor([-1, 3, -1, 0])
    outs = run_exported(fmt, path, x, t)
    result = method(x, t)
    assert bool((result.maps == 0).flatten(1).sum(1).gt(1).any())  # tied zeros to order
    dele, ins = deletion_insertion(tiny, x, result.maps, result.target, steps=6)
    conf = confidence_change(tiny, x, result.maps, result.target)
    expected = [dele.scores, dele.auc, ins.scores, ins.auc, conf.drop, conf.increase.float()]
    assert torch.equal(outs[1].long(), result.target)
    for name, got, want in zip(METRIC_OUTPUTS, outs[4:], expected):
        assert got.shape == want.shape, name
        assert float((got - want).abs().max()) < 1e-5, (name, float((got - want).abs().max()))


def test_method_with_metrics_refuses_what_it_cannot_score(tiny, tmp_path):
    from pyattr.metrics.graph import MethodWithMetrics

    with pytest.raises(pyattr.InputError, match="attribution method"):
        MethodWithMetrics(random_maps(1))
    with pytest.raises(pyattr.InputError, match="steps"):
        MethodWithMetrics(pyattr.Saliency(tiny), steps=0)
    with pytest.raises(pyattr.InputError, match="baseline must be a number"):
        MethodWithMetrics(pyattr.Saliency(tiny), baseline="blur")
    with pytest.raises(pyattr.InputError, match="class targets only"):
        pyattr.export(MethodWithMetrics(pyattr.Saliency(tiny)), images(1), tmp_path / "s.onnx",
                      target=pyattr.SegmentationTarget())


def test_grad_cam_scores_between_random_and_inverted_maps_on_the_builtin_model(builtin_model):
    """On the trained built-in model, Grad-CAM's maps find the evidence first: lower deletion AUC, higher insertion
    AUC than random maps, which beat Grad-CAM inverted (1 - maps: evidence last); removing Grad-CAM's top half
    (ROAD MoRF) costs far more than removing a random or the least relevant half (on these 4 images: deletion
    0.14 < 0.30 < 0.90, insertion 0.87 > 0.24 > 0.14, MoRF -0.88 vs -0.17 / -0.20; benchmarks/results/
    metrics_quality.md for more methods and images)."""
    batch = pyattr.zoo.generate(4, seed=71_000)
    x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255
    result = pyattr.GradCAM(builtin_model, "layer3")(x)
    candidates = {"gradcam": result.maps, "random": random_maps(4, size=64, seed=5), "inverted": 1 - result.maps}
    table = {}
    for name, maps in candidates.items():
        dele, ins = deletion_insertion(builtin_model, x, maps, result.target, steps=8)
        morf = road(builtin_model, x, maps, result.target, fractions=[0.5])
        table[name] = (float(dele.auc.mean()), float(ins.auc.mean()), float(morf.mean_change.mean()))
    g, r, i = table["gradcam"], table["random"], table["inverted"]
    assert g[0] < r[0] < i[0] and g[1] > r[1] > i[1], table
    assert g[2] < min(r[2], i[2]) - 0.3, table  # ROAD MoRF: removing Grad-CAM's top half costs the most


def test_sigmoid_score_is_the_targets_independent_probability():
    """``score="sigmoid"`` (multi-label models): the deletion curve's first point is sigmoid(logit) of the target,
    and Average Drop compares sigmoid probabilities; the graph's score agrees."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.rand(2, 3, 8, 8)
    maps = torch.rand(2, 8, 8)
    target = torch.tensor([0, 2])
    logits = model(x).detach()
    want = logits.sigmoid().gather(1, target[:, None])[:, 0]
    curve = pyattr.metrics.deletion(model, x, maps, target, steps=4, score="sigmoid")
    torch.testing.assert_close(curve.scores[:, 0], want)
    change = pyattr.metrics.confidence_change(model, x, maps, target, score="sigmoid")
    masked = model(maps[:, None] * x).detach().sigmoid().gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(change.drop, (want - masked).clamp_min(0) / (want + 1e-7))
    with pytest.raises(pyattr.InputError, match="score must be one of"):
        pyattr.metrics.deletion(model, x, maps, target, score="probability")
