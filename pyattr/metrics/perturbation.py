"""Perturbation metrics: deletion and insertion curves (RISE), Average Drop and Increase in Confidence
(Grad-CAM++).

Each takes ``(model, x, explanation, target)`` as described in :mod:`pyattr.metrics`: the model, (N, C, H, W)
inputs, (N, H, W) maps at the inputs' resolution or a pyattr method built on the model, and the class ids
(or a :class:`~pyattr.targets.Target`) to score. Perturbed copies go through the model ``chunk_size`` at a
time, so memory stays bounded whatever the batch and the number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..methods.base import OutputSelector
from ._common import Prepared, broadcast_baseline, check_positive_int, prepare


@dataclass
class Curve:
    """A deletion or insertion curve per sample.

    Attributes:
        fractions: (K + 1,) the share of pixels deleted (inserted) at each point, from 0 to 1.
        scores: (N, K + 1) the target's score (softmax probability by default) at each point. Deletion
            starts at the unperturbed input's score; insertion ends there.
        auc: (N,) the area under each curve, ``torch.trapezoid(scores, fractions)``. Deletion: lower is
            better; insertion: higher is better.
        target: (N,) the class ids scored.
    """

    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor
    target: torch.Tensor


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(N, H*W) rank of each pixel in its map, 0 for the most relevant (highest value); ties keep row-major
    order (a stable descending sort, as torchcam).

    Example:
        >>> pixel_ranks(torch.tensor([[[0.1, 0.9], [0.5, 0.9]]]))
        tensor([[3, 0, 2, 1]])
    """
    flat = maps.flatten(1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def step_counts(pixels: int, steps: int) -> list[int]:
    """How many pixels are perturbed at each point of a curve of ``steps`` intervals over ``pixels`` pixels:
    ``0, s, 2s, ..., pixels`` with ``s = ceil(pixels / steps)`` (torchcam's rule; fewer points when ``steps``
    does not divide the pixels evenly, at most ``steps + 1``).

    Example:
        >>> step_counts(16, 4), step_counts(10, 4)
        ([0, 4, 8, 12, 16], [0, 3, 6, 9, 10])
    """
    size = (pixels + steps - 1) // steps
    return [*range(0, pixels, size), pixels]


def _curves(prep: Prepared, steps: int, baseline: Any, deletion: bool, insertion: bool) -> list[Curve]:
    """The deletion and/or insertion curves of a prepared call, with one baseline: with both, the all-baseline
    image (deletion's last point, insertion's first) goes through the model once, as in torchcam."""
    x, scorer = prep.x, prep.scorer
    n, c, h, w = x.shape
    base = broadcast_baseline(baseline, x)
    ranks = pixel_ranks(prep.maps)
    counts = step_counts(h * w, steps)
    k = len(counts) - 1
    fractions = torch.tensor(counts, dtype=torch.float32, device=x.device) / (h * w)
    # per sample: deletion's points 1..k, then insertion's 1..k-1 (insertion's 0 is deletion's k when both run;
    # the unperturbed point, deletion's 0 and insertion's k, is the input's own score)
    points = (counts[1:] if deletion else []) + (counts[1:-1] if insertion and deletion else
                                                 counts[:-1] if insertion else [])
    inserted = [False] * (k if deletion else 0) + [True] * (len(points) - (k if deletion else 0))
    per = len(points)
    job_counts = torch.tensor(points, device=x.device).repeat(n)
    job_insert = torch.tensor(inserted, device=x.device).repeat(n)
    rows = torch.arange(n, device=x.device).repeat_interleave(per)
    flat_x, flat_base = x.flatten(2), base.flatten(2)

    def build(jobs: torch.Tensor) -> torch.Tensor:
        idx = rows[jobs]
        top = ranks[idx] < job_counts[jobs][:, None]  # (M, H*W): the pixels moved so far
        keep_input = torch.where(job_insert[jobs][:, None], top, ~top)
        return torch.where(keep_input[:, None], flat_x[idx], flat_base[idx]).view(-1, c, h, w)

    moved = scorer.run(rows, build).view(n, per)
    original = prep.original[:, None].to(moved.dtype)
    out = []
    if deletion:
        out.append(torch.cat([original, moved[:, :k]], 1))
    if insertion:
        first = moved[:, k - 1:k] if deletion else moved[:, :1]
        rest = moved[:, k:] if deletion else moved[:, 1:]
        out.append(torch.cat([first, rest, original], 1))
    return [Curve(fractions, curve, torch.trapezoid(curve, fractions.to(curve.dtype), dim=1), scorer.target)
            for curve in out]


def _prepared(model: nn.Module, x: torch.Tensor, explanation: Any, target: Any, steps: int, score: str,
              chunk_size: int, output: OutputSelector) -> Prepared:
    check_positive_int(steps, "steps", "the curve needs at least one step (RISE and torchcam use 20 or more)")
    return prepare(model, x, explanation, target, score=score, chunk_size=chunk_size, output=output)


def deletion(model: nn.Module, x: torch.Tensor, explanation: Any, target: Any = None, *, steps: int = 20,
             baseline: Any = 0.0, score: str = "softmax", chunk_size: int = 64,
             output: OutputSelector = None) -> Curve:
    """Deletion curve and its AUC (Petsiuk, Das & Saenko, "RISE", BMVC 2018, arXiv:1806.07421).

    Pixels are ranked by the map (highest first; ties in row-major order) and replaced by the baseline in
    ``steps`` intervals of ``ceil(H*W / steps)`` pixels, all channels of a pixel at once; the target's score
    is read after each step. The curve starts at the input's score and ends at the all-baseline image's;
    its area (trapezoid rule over the share of pixels deleted) is low for a map that finds the evidence
    first. Same definition as torchcam's ``DeletionInsertionMetric`` (``torchcam.metrics``).

    Args:
        model: the classifier.
        x: (N, C, H, W) inputs.
        explanation: (N, H, W) maps at the inputs' resolution, or a pyattr method built on ``model``.
        target: class ids (None: the arg-max of the model on ``x``; an int; an (N,) tensor) or a
            :class:`~pyattr.targets.Target`.
        steps: number of intervals (at most ``steps + 1`` points).
        baseline: what deleted pixels become: a number (default 0.0, a black image after your normalization),
            ``"blur"`` (a Gaussian blur of the input), a tensor broadcastable to ``x``, or a callable ``f(x)``.
        score: ``"softmax"`` (the target's probability; default), ``"sigmoid"`` (multi-label models) or ``"logit"``.
        chunk_size: at most this many perturbed copies go through the model at once.
        output: which part of the model's output holds the scores (as a method's ``output=``).

    Returns:
        :class:`Curve` with ``fractions`` (K + 1,), ``scores`` (N, K + 1), ``auc`` (N,), ``target`` (N,).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> x = torch.rand(2, 3, 64, 64)
        >>> curve = pyattr.metrics.deletion(model, x, pyattr.GradCAM(model, "layer3"), steps=8)
        >>> curve.scores.shape, curve.auc.shape
        (torch.Size([2, 9]), torch.Size([2]))
    """
    prep = _prepared(model, x, explanation, target, steps, score, chunk_size, output)
    return _curves(prep, steps, baseline, deletion=True, insertion=False)[0]


def insertion(model: nn.Module, x: torch.Tensor, explanation: Any, target: Any = None, *, steps: int = 20,
              baseline: Any = "blur", score: str = "softmax", chunk_size: int = 64,
              output: OutputSelector = None) -> Curve:
    """Insertion curve and its AUC (RISE, arXiv:1806.07421): the mirror of :func:`deletion`.

    Starting from the baseline image (default ``"blur"``: RISE's blurred copy of the input), the pixels are
    put back from the input in the map's order (highest first) in ``steps`` intervals; the curve ends at
    the input's own score. A high area means the map finds the evidence first. Same definition as
    torchcam's ``DeletionInsertionMetric`` (which takes one baseline for both curves, zeros by default).

    Arguments and result as :func:`deletion`.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> x = torch.rand(2, 3, 64, 64)
        >>> maps = pyattr.Saliency(model)(x).maps
        >>> pyattr.metrics.insertion(model, x, maps, steps=4, baseline=0.0).fractions
        tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000])
    """
    prep = _prepared(model, x, explanation, target, steps, score, chunk_size, output)
    return _curves(prep, steps, baseline, deletion=False, insertion=True)[0]


def deletion_insertion(model: nn.Module, x: torch.Tensor, explanation: Any, target: Any = None, *,
                       steps: int = 20, baseline: Any = 0.0, score: str = "softmax", chunk_size: int = 64,
                       output: OutputSelector = None) -> tuple[Curve, Curve]:
    """Both curves of :func:`deletion` and :func:`insertion` with one ``baseline`` (default 0.0), as torchcam's
    ``DeletionInsertionMetric``: the maps (of a method) are computed once and the all-baseline image, deletion's
    last point and insertion's first, goes through the model once (``2 * len(points) - 3`` forward passes per
    input instead of ``2 * len(points) - 2``).

    Returns:
        (deletion :class:`Curve`, insertion :class:`Curve`).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> x = torch.rand(2, 3, 64, 64)
        >>> dele, ins = pyattr.metrics.deletion_insertion(model, x, pyattr.Saliency(model), steps=4)
        >>> torch.equal(dele.scores[:, -1], ins.scores[:, 0])
        True
    """
    prep = _prepared(model, x, explanation, target, steps, score, chunk_size, output)
    dele, ins = _curves(prep, steps, baseline, deletion=True, insertion=True)
    return dele, ins


@dataclass
class ConfidenceChange:
    """The target's score on the input and on the input multiplied by its map (Grad-CAM++'s explanation map
    ``E * x``), per sample.

    Attributes:
        original: (N,) score of the input, ``Y``.
        masked: (N,) score of ``map * x``, ``O``.
        drop: (N,) ``max(0, Y - O) / Y`` (Chattopadhyay et al. 2018, torchcam: relative drop, divided by
            ``Y + 1e-7``). :attr:`average_drop` is its mean (x 100 for the paper's percent).
        absolute_drop: (N,) ``max(0, Y - O)`` (pytorch-grad-cam's ``DropInConfidence``: not divided by ``Y``).
        increase: (N,) bool, ``O > Y`` (both libraries). :attr:`increase_in_confidence` is its mean.
        target: (N,) the class ids scored.
    """

    original: torch.Tensor
    masked: torch.Tensor
    drop: torch.Tensor
    absolute_drop: torch.Tensor
    increase: torch.Tensor
    target: torch.Tensor

    @property
    def average_drop(self) -> float:
        """Mean relative drop over the batch (a fraction; lower is better)."""
        return float(self.drop.mean())

    @property
    def increase_in_confidence(self) -> float:
        """Share of the batch whose score rises on ``map * x`` (higher is better)."""
        return float(self.increase.float().mean())


def confidence_change(model: nn.Module, x: torch.Tensor, explanation: Any, target: Any = None, *,
                      score: str = "softmax", chunk_size: int = 64, output: OutputSelector = None
                      ) -> ConfidenceChange:
    """Average Drop and Increase in Confidence (Chattopadhyay et al., "Grad-CAM++", WACV 2018,
    arXiv:1710.11063, sec. 5.1).

    The input is multiplied by its map (``E * x``, the map broadcast over channels), and the target's
    score ``O`` on it is compared with the score ``Y`` on the input. Average Drop is the mean of
    ``max(0, Y - O) / Y`` (the paper's and torchcam's ``ClassificationMetric``, which adds 1e-7 to ``Y``);
    pytorch-grad-cam's ``DropInConfidence`` returns ``max(0, Y - O)`` without the division, kept here as
    ``absolute_drop``. Increase in Confidence is the share of samples with ``O > Y`` (both libraries).
    The maps must lie in [0, 1] (the methods' ``maps`` do; normalize others with
    :func:`pyattr.postprocess.normalize_minmax`).

    Args:
        model, x, explanation, target, chunk_size, output: as :func:`~pyattr.metrics.deletion`.
        score: ``"softmax"`` (default: the paper's class probability), ``"sigmoid"`` (multi-label models) or ``"logit"``.

    Returns:
        :class:`ConfidenceChange`; ``.average_drop`` and ``.increase_in_confidence`` are the batch means.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> result = pyattr.metrics.confidence_change(model, torch.rand(2, 3, 64, 64), pyattr.GradCAM(model, "layer3"))
        >>> result.drop.shape, 0.0 <= result.average_drop <= 1.0
        (torch.Size([2]), True)
    """
    prep = prepare(model, x, explanation, target, score=score, chunk_size=chunk_size, output=output)
    maps, x = prep.maps, prep.x
    if bool((maps < 0).any()) or bool((maps > 1).any()):
        raise InputError(f"Average Drop multiplies the input by the map, which must lie in [0, 1]; these maps span "
                         f"[{float(maps.min()):.4g}, {float(maps.max()):.4g}]: normalize them first "
                         "(pyattr.postprocess.normalize_minmax) or pass the method's maps")
    rows = torch.arange(x.shape[0], device=x.device)
    masked = prep.scorer.run(rows, lambda jobs: maps[jobs, None].to(x.dtype) * x[jobs])
    original = prep.original.to(masked.dtype)
    diff = torch.relu(original - masked)
    return ConfidenceChange(original, masked, diff / (original + 1e-7), diff, original < masked, prep.scorer.target)


def average_drop(model: nn.Module, x: torch.Tensor, explanation: Any, target: Any = None, **options: Any
                 ) -> torch.Tensor:
    """(N,) relative drop ``max(0, Y - O) / Y`` per sample; its mean is the Average Drop. See
    :func:`confidence_change` (same arguments).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.metrics.average_drop(model, torch.rand(3, 3, 64, 64), torch.ones(3, 64, 64))
        tensor([0., 0., 0.])
    """
    return confidence_change(model, x, explanation, target, **options).drop


def increase_in_confidence(model: nn.Module, x: torch.Tensor, explanation: Any, target: Any = None,
                           **options: Any) -> torch.Tensor:
    """(N,) bool, whether the score rises on ``map * x``; its mean is the Increase in Confidence. See
    :func:`confidence_change` (same arguments)."""
    return confidence_change(model, x, explanation, target, **options).increase
