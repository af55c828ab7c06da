"""``pyattr evaluate``: every method x every metric on one model and one set of images, as a report.

:func:`evaluate` computes each method's maps batch by batch (timed), scores them with the metrics of
:data:`METRICS` and returns an :class:`~pyattr.report.Evaluation`, which :func:`pyattr.report.write_report`
writes as ``results.json``, ``results.md`` and ``report.html``. With no arguments the command evaluates every
registered method on the built-in model and its generated test images (seed 40,000, the README's test set:
never used for training), whose ground-truth object masks the pointing games need.

Example:
    >>> from pyattr.evaluate import evaluate, builtin_images
    >>> images, targets, masks = builtin_images(4)
    >>> ev = evaluate(["gradcam"], ["pointing_game"], images=images, targets=targets, masks=masks)
    >>> ev.table["gradcam"]["pointing_game"] >= 0
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError
from .report import Evaluation, Metric

EVAL_SEED = 40_000
"""Images of the built-in model's test set (the README's pointing game); never used for training."""


@dataclass
class Batch:
    """What a metric sees of one batch: the model and its probabilities, the inputs (as the model takes
    them), the method's maps at input resolution (N, H, W) in [0, 1], the explained classes (N,), the
    ground-truth masks of those classes (N, H, W) bool or None, and the method (for metrics that re-run it)."""

    model: torch.nn.Module
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    maps: torch.Tensor
    target: torch.Tensor
    masks: torch.Tensor | None
    method: object
    options: dict
    memo: dict = field(default_factory=dict)
    """Results that several metrics share within the batch (Average Drop and Increase in Confidence: one pass)."""


@dataclass
class MetricSpec:
    """A metric of ``pyattr evaluate``: its report column, whether it needs ground-truth masks, and
    ``compute(batch) -> (values (N,), curves (N, K + 1) or None)``."""

    column: Metric
    compute: Callable[[Batch], tuple[torch.Tensor, torch.Tensor | None]]
    needs_masks: bool = False
    default: bool = True
    """Whether ``--metrics default`` runs it (those that re-run the method many times do not)."""


def _pointing_game(b: Batch):
    from .metrics import pointing_game

    return pointing_game(b.maps, b.masks).float(), None


def _energy_pointing_game(b: Batch):
    from .metrics import energy_pointing_game

    return energy_pointing_game(b.maps, b.masks).float(), None


def _common(b: Batch) -> dict:
    return {"score": b.options.get("score", "softmax"), "chunk_size": b.options.get("chunk_size", 64)}


def _curve(kind: str):
    def compute(b: Batch):
        from . import metrics

        curve = getattr(metrics, kind)(b.model, b.x, b.maps, b.target, steps=b.options.get("steps", 20), **_common(b))
        return curve.auc, curve.scores

    return compute


def _confidence(b: Batch):
    """The batch's :func:`~pyattr.metrics.confidence_change`, computed once for both metrics that read it."""
    if "confidence" not in b.memo:
        from .metrics import confidence_change

        b.memo["confidence"] = confidence_change(b.model, b.x, b.maps, b.target, **_common(b))
    return b.memo["confidence"]


def _average_drop(b: Batch):
    return _confidence(b).drop, None


def _increase_in_confidence(b: Batch):
    return _confidence(b).increase.float(), None


def _road(order: str):
    def compute(b: Batch):
        from .metrics import road

        return road(b.model, b.x, b.maps, b.target, order=order, seed=b.options.get("seed", 0), **_common(b)
                    ).mean_change, None

    return compute


def _infidelity(b: Batch):
    from .metrics import infidelity

    common = _common(b)
    return infidelity(b.model, b.x, b.maps, b.target, normalize=True, seed=b.options.get("seed", 0),
                      chunk_size=common["chunk_size"]), None


def _sensitivity_max(b: Batch):
    from .metrics import sensitivity_max

    return sensitivity_max(b.model, b.x, b.method, b.target, seed=b.options.get("seed", 0), which="maps",
                           chunk_size=_common(b)["chunk_size"]), None


METRICS: dict[str, MetricSpec] = {
    "deletion": MetricSpec(
        Metric("deletion", "Deletion AUC", False,
               "area under the target's probability as the most relevant pixels are set to 0 first, in 20 steps "
               "(RISE, Petsiuk et al. 2018; torchcam's definition)"), _curve("deletion")),
    "insertion": MetricSpec(
        Metric("insertion", "Insertion AUC", True,
               "area under the target's probability as the most relevant pixels are put back first into a blurred "
               "copy, in 20 steps (RISE; torchcam's definition)"), _curve("insertion")),
    "average_drop": MetricSpec(
        Metric("average_drop", "Average Drop", False,
               "relative drop of the target's probability on the input multiplied by the map, max(0, Y - O) / Y "
               "(Grad-CAM++, Chattopadhyay et al. 2018)"), _average_drop),
    "increase_in_confidence": MetricSpec(
        Metric("increase_in_confidence", "Increase in Confidence", True,
               "share of images whose target probability rises on the input multiplied by the map (Grad-CAM++)"),
        _increase_in_confidence),
    "road_morf": MetricSpec(
        Metric("road_morf", "ROAD MoRF", False,
               "mean change of the target's probability when the most relevant pixels are removed and filled in by "
               "noisy linear imputation (ROAD, Rong et al. 2022; pytorch-grad-cam's definition)"), _road("morf")),
    "road_lerf": MetricSpec(
        Metric("road_lerf", "ROAD LeRF", True,
               "the same with the least relevant pixels removed first: a faithful map keeps the probability"),
        _road("lerf")),
    "infidelity": MetricSpec(
        Metric("infidelity", "Infidelity", False,
               "mean squared error between the map's prediction of a small Gaussian perturbation's effect and the "
               "effect on the target's logit, the map rescaled optimally (Yeh et al. 2019; captum's, normalize=True)"),
        _infidelity),
    "sensitivity_max": MetricSpec(
        Metric("sensitivity_max", "Max-sensitivity", False,
               "largest relative change of the map under 10 uniform input perturbations of radius 0.02 (Yeh et al. "
               "2019; captum's); re-runs the method 10 times"), _sensitivity_max, default=False),
    "pointing_game": MetricSpec(
        Metric("pointing_game", "Pointing game", True,
               "share of images whose map peaks inside the explained object's mask (Zhang et al. 2016)"),
        _pointing_game, needs_masks=True),
    "energy_pointing_game": MetricSpec(
        Metric("energy_pointing_game", "Energy pointing game", True,
               "share of the map's positive energy inside the object's mask (Wang et al. 2020)"),
        _energy_pointing_game, needs_masks=True),
}
"""The metrics ``pyattr evaluate`` knows, by name (the column keys of the report)."""


SLOW_METHODS = ("sscam", "iscam")
"""Left out of ``pyattr evaluate``'s default set: SS-CAM and IS-CAM score every channel of the layer on 35 / 10 noisy
copies (thousands of forward passes per image: about half an hour for 32 images on 2 CPU cores); ``--methods all``
or their names include them."""


def default_methods(slow: bool = False) -> list[str]:
    """The methods ``pyattr evaluate`` runs by default: every registered one, aliases left out (``lrp`` is
    ``lrp_epsilon_plus``), and without :data:`SLOW_METHODS` unless ``slow``."""
    from .methods import METHODS

    return [name for name in METHODS if name != "lrp" and (slow or name not in SLOW_METHODS)]


def builtin_images(n: int, seed: int = EVAL_SEED, size: int = 64):
    """``n`` generated images of the built-in model's world: (N, 3, H, W) float in [0, 1], the explained class of
    each (the present class with the largest object), and that object's mask (N, H, W) bool."""
    from .zoo import generate

    data = generate(n, seed=seed, size=size)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    areas = data.masks.reshape(n, data.masks.shape[1], -1).sum(-1) * data.labels  # (N, K) present objects only
    targets = torch.from_numpy(areas.argmax(1)).long()
    masks = torch.from_numpy(np.stack([data.masks[i, int(k)] for i, k in enumerate(targets)])).bool()
    return images, targets, masks


def _overlay(method, result, j: int, image: np.ndarray) -> np.ndarray:
    from . import render
    from .figures import overlay_image, signed_overlay_image
    from .postprocess import resize_bilinear

    if method.signed:
        unit = torch.from_numpy(render.normalize(result.raw[j:j + 1].detach().cpu().float().numpy(), sign="centered"))
        heat = resize_bilinear(unit, image.shape[:2])[0].clamp(0, 1).numpy()
        return signed_overlay_image(image, heat, alpha=1.0)
    heat = resize_bilinear(result.maps[j:j + 1].detach().cpu().float(), image.shape[:2])[0].clamp(0, 1).numpy()
    return overlay_image(image, heat, alpha=0.5)


def evaluate(methods: Sequence[str], metrics: Sequence[str], *, images: torch.Tensor, targets: torch.Tensor | None = None,
             masks: torch.Tensor | None = None, model: torch.nn.Module | None = None, bundle=None,
             layer: str | None = None, batch_size: int = 16, grid: int = 6, options: dict | None = None,
             method_options: Callable[[str], dict] | None = None, progress: bool = False,
             model_name: str = "builtin", pictures: Sequence[np.ndarray] | None = None) -> Evaluation:
    """Every method of ``methods`` x every metric of ``metrics`` (names of :data:`METRICS`).

    Args:
        images: (N, C, H, W) the model's inputs. ``pictures``: the same images as (H, W, 3) uint8 for the
            grid (default: ``images`` in [0, 1] shown as they are).
        targets: (N,) classes to explain (default: each image's top class).
        masks: (N, H, W) bool ground truth of the explained objects; the mask metrics need them.
        model / bundle: the model (default: the built-in one) or a :class:`pyattr.models.ModelBundle`.
        layer: the CAM methods' layer (default: the bundle's).
        batch_size: images per method call. ``grid``: images shown in the report's grid.
        options: the metrics' settings (e.g. ``steps``). ``method_options(name)``: extra options per method.

    Returns:
        an :class:`~pyattr.report.Evaluation` (per metric the mean over the images; per method the seconds
        its maps took, and per method and metric the seconds the metric took).
    """
    from .methods import METHODS, build_method, needs_layer

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(METHODS)}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(METRICS)}")
    if not methods or not metrics:
        raise InputError("give at least one method and one metric")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise InputError(f"images must be a non-empty (N, C, H, W) tensor, got {getattr(images, 'shape', images)}")
    n = int(images.shape[0])
    if masks is not None and tuple(masks.shape) != (n, *images.shape[-2:]):
        raise InputError(f"masks must be (N, H, W) = {(n, *images.shape[-2:])} like the images, got "
                         f"{tuple(masks.shape)}")
    needing = [m for m in metrics if METRICS[m].needs_masks]
    if needing and masks is None:
        raise InputError(f"{', '.join(needing)} need ground-truth masks of the explained objects; give masks or "
                         "leave these metrics out")
    if bundle is None:
        from .models import load_model

        bundle = load_model("builtin", "cpu", None) if model is None else None
    if bundle is not None:
        model = bundle.model
        layer = layer or bundle.default_layer
        probabilities = bundle.probabilities
    else:
        def probabilities(scores):
            return torch.softmax(scores, 1)
    options = dict(options or {})
    if pictures is None:
        pictures = [(images[i].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy() for i in range(n)]
    shown = list(range(min(grid, n)))
    captions: list[str] = []
    table: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    overlays: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    metric_seconds: dict[str, dict[str, float]] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(methods) * n, unit="image", desc="evaluate", dynamic_ncols=True)
    try:
        for name in methods:
            extra = method_options(name) if method_options else {}
            method = build_method(name, model, layer if needs_layer(name) else None, **extra)
            values: dict[str, list[torch.Tensor]] = {m: [] for m in metrics}
            curve_sums: dict[str, list[torch.Tensor]] = {}
            overlays[name] = []
            spent = 0.0
            metric_seconds[name] = dict.fromkeys(metrics, 0.0)
            for start in range(0, n, batch_size):
                x = images[start:start + batch_size]
                t = None if targets is None else targets[start:start + batch_size]
                if bar is not None:
                    bar.set_postfix_str(name, refresh=False)
                began = time.perf_counter()
                result = method(x, t)
                spent += time.perf_counter() - began
                batch = Batch(model, probabilities, x, result.maps.detach(), result.target,
                              None if masks is None else masks[start:start + batch_size], method, options)
                for metric in metrics:
                    began = time.perf_counter()
                    per_image, curve = METRICS[metric].compute(batch)
                    metric_seconds[name][metric] += time.perf_counter() - began
                    values[metric].append(per_image.detach().float().cpu())
                    if curve is not None:
                        curve_sums.setdefault(metric, []).append(curve.detach().float().cpu())
                for i in range(start, start + x.shape[0]):
                    if i in shown:
                        overlays[name].append(_overlay(method, result, i - start, pictures[i]))
                        if len(captions) <= i:
                            k = int(result.target[i - start])
                            captions.append(bundle.class_name(k) if bundle is not None else f"class {k}")
                if bar is not None:
                    bar.update(int(x.shape[0]))
            seconds[name] = spent
            table[name] = {m: float(torch.cat(v).mean()) for m, v in values.items()}
            for metric, parts in curve_sums.items():
                curves.setdefault(metric, {})[name] = torch.cat(parts).mean(0).tolist()
    finally:
        if bar is not None:
            bar.close()
    return Evaluation(model=model_name, images=[pictures[i] for i in shown], methods=list(methods),
                      metrics=[METRICS[m].column for m in metrics], table=table, curves=curves,
                      overlays=overlays, seconds=seconds, metric_seconds=metric_seconds, n_images=n, captions=captions)


__all__ = ["METRICS", "Batch", "MetricSpec", "builtin_images", "default_methods", "evaluate"]
