"""ROAD: RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient Evaluation
Strategy for Attribution Methods", ICML 2022, arXiv:2202.00449), with noisy linear imputation.

The removed pixels are not set to a constant (which leaks the mask's shape to the model) but filled in
from their neighbours: each removed pixel is the weighted mean of its 8 neighbours (weight 1/6 for the
4 direct ones, 1/12 for the diagonals; neighbours outside the image do not count), a sparse linear system
over all removed pixels at once, solved per image and channel with ``scipy.sparse.linalg.spsolve`` (as
pytorch-grad-cam's ``pytorch_grad_cam/metrics/road.py``, taken from the authors' code), plus Gaussian noise
of standard deviation ``noise`` (0.01).

scipy is needed for this module only: ``pip install scipy`` (or ``pip install pyattr[metrics]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..methods.base import OutputSelector
from ._common import check_positive_int, prepare

NEIGHBOURS: tuple[tuple[tuple[int, int], float], ...] = (
    ((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
    ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
)
"""(row offset, column offset), weight: the neighbours of the linear imputation (ROAD's)."""

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ORDERS = ("morf", "lerf")


def _scipy_sparse():
    try:
        from scipy.sparse import csc_matrix
        from scipy.sparse.linalg import spsolve
    except ImportError:
        raise ImportError("ROAD's noisy linear imputation solves a sparse linear system with scipy, which is not "
                          "installed: pip install scipy (or pip install pyattr[metrics])") from None
    return csc_matrix, spsolve


def linear_imputation(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Fill the pixels of ``image`` (C, H, W) where ``keep`` (H, W, bool) is False with the solution of ROAD's
    linear system: every filled pixel equals the weighted mean (:data:`NEIGHBOURS`) of its neighbours inside
    the image, filled or kept. No noise (see :func:`noisy_linear_imputation`). Needs at least one kept pixel.

    Example:
        >>> image = torch.arange(9.0).view(1, 3, 3)  # a linear ramp is its own imputation
        >>> keep = torch.ones(3, 3, dtype=torch.bool); keep[1, 1] = False
        >>> linear_imputation(image, keep)[0, 1, 1]
        tensor(4.)
    """
    csc_matrix, spsolve = _scipy_sparse()
    c, h, w = image.shape
    known = keep.detach().cpu().numpy().reshape(-1).astype(bool)
    if known.all():
        return image.clone()
    if not known.any():
        raise InputError("the linear imputation needs at least one kept pixel: every pixel was to be removed")
    values = image.detach().cpu().double().numpy().reshape(c, -1)
    unknown = np.flatnonzero(~known)
    m = unknown.size
    var = np.full(h * w, -1, dtype=np.int64)
    var[unknown] = np.arange(m)
    r, col = np.divmod(unknown, w)
    diag = np.zeros(m)
    rhs = np.zeros((m, c))
    rows, cols, data = [], [], []
    for (dr, dc), weight in NEIGHBOURS:
        rr, cc = r + dr, col + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        ids = np.flatnonzero(inside)
        nb = rr[inside] * w + cc[inside]
        diag[ids] += weight
        has = known[nb]
        rhs[ids[has]] += weight * values[:, nb[has]].T
        rows.append(ids[~has])
        cols.append(var[nb[~has]])
        data.append(np.full(int((~has).sum()), -weight))
    rows.append(np.arange(m))
    cols.append(np.arange(m))
    data.append(diag)
    a = csc_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=(m, m))
    solution = np.asarray(spsolve(a, rhs)).reshape(m, c)
    out = image.detach().clone().reshape(c, -1)
    out[:, torch.from_numpy(unknown).to(out.device)] = torch.from_numpy(solution.T).to(out)
    return out.view(c, h, w)


def noisy_linear_imputation(image: torch.Tensor, keep: torch.Tensor, noise: float = 0.01,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`linear_imputation` plus ``noise * N(0, 1)`` on the filled pixels (drawn as one (C, M) tensor for
    the M filled pixels, in row-major order, from ``generator`` on the CPU: pytorch-grad-cam's draw)."""
    out = linear_imputation(image, keep)
    if noise == 0:
        return out
    missing = ~keep.detach().cpu().reshape(-1)
    c = image.shape[0]
    draw = torch.randn(c, int(missing.sum()), generator=generator, dtype=torch.float32)
    flat = out.reshape(c, -1)
    idx = torch.nonzero(missing).flatten().to(flat.device)
    flat[:, idx] = flat[:, idx] + noise * draw.to(flat)
    return flat.view_as(out)


SELECTIONS = ("rank", "threshold")


def removed_count(pixels: int, fraction: float) -> int:
    """How many of ``pixels`` pixels pytorch-grad-cam's percentile rule removes for ``fraction`` on a map without
    ties: those at or above the ``100 * (1 - fraction)``-th percentile (``np.percentile``, linear interpolation),
    i.e. ``pixels - ceil(t)`` with ``t`` that percentile of ``0, 1, ..., pixels - 1``. Always leaves one pixel.

    Example:
        >>> removed_count(144, 0.3), removed_count(10, 0.5), removed_count(10, 0.01)
        (43, 5, 1)
    """
    t = float(np.percentile(np.arange(pixels, dtype=np.float64), 100 * (1 - fraction)))
    return pixels - int(np.ceil(t))


def removal_masks(maps: torch.Tensor, fraction: float, order: str, selection: str = "rank") -> torch.Tensor:
    """(N, H, W) bool, True where a pixel is kept when removing ``fraction`` of the pixels in ``order``.

    ``selection="threshold"`` is pytorch-grad-cam's rule: with ``q = 100 * (1 - fraction)``, most-relevant-first
    keeps the pixels below the map's q-th percentile (``np.percentile``'s linear interpolation), least-relevant-
    first those where ``1 - map`` is below the q-th percentile of ``1 - map``; every pixel tied at the threshold
    goes, so a map that is mostly one value (Grad-CAM's zeros after its ReLU) can lose all its pixels.
    ``selection="rank"`` (default) removes exactly :func:`removed_count` pixels, the number the threshold rule
    removes on a map without ties, in the map's order (ties in row-major order, as :func:`pixel_ranks`): the
    same masks on maps without ties, and a defined result on maps with them.

    Example:
        >>> maps = torch.arange(10.0).view(1, 2, 5)
        >>> removal_masks(maps, 0.3, "morf").flatten().tolist()[-4:]
        [True, False, False, False]
        >>> removal_masks(torch.zeros(1, 2, 5), 0.3, "morf").flatten().tolist()
        [False, False, False, True, True, True, True, True, True, True]
    """
    from .perturbation import pixel_ranks

    if selection == "rank":
        ranks = pixel_ranks(maps if order == "morf" else -maps)
        return (ranks >= removed_count(ranks.shape[1], fraction)).view_as(maps)
    flat = maps.flatten(1).double()
    if order == "lerf":
        flat = 1 - flat
    threshold = torch.quantile(flat, 1 - fraction, dim=1, keepdim=True)
    return (flat < threshold).view_as(maps)


@dataclass
class RoadResult:
    """ROAD scores of one removal order.

    Attributes:
        order: ``"morf"`` (most relevant first) or ``"lerf"`` (least relevant first).
        fractions: (F,) the shares of pixels removed.
        scores: (N, F) the target's score on each imputed image.
        original: (N,) the score on the input.
        target: (N,) the class ids scored.
    """

    order: str
    fractions: torch.Tensor
    scores: torch.Tensor
    original: torch.Tensor
    target: torch.Tensor

    @property
    def change(self) -> torch.Tensor:
        """(N, F) score after imputation minus before (pytorch-grad-cam's ``ROADMostRelevantFirst`` value)."""
        return self.scores - self.original[:, None]

    @property
    def mean_change(self) -> torch.Tensor:
        """(N,) the change averaged over the fractions (``ROADMostRelevantFirstAverage``'s and
        ``ROADLeastRelevantFirstAverage``'s value). MoRF: lower is better; LeRF: higher is better."""
        return self.change.mean(1)


def road(model: nn.Module, x: torch.Tensor, explanation: Any, target: Any = None, *, order: str = "morf",
         fractions: Sequence[float] = FRACTIONS, noise: float = 0.01, seed: int = 0, selection: str = "rank",
         score: str = "softmax", chunk_size: int = 64, output: OutputSelector = None) -> RoadResult:
    """ROAD (arXiv:2202.00449): remove a share of the pixels in the map's order, fill them in with noisy linear
    imputation (module docstring), and read the target's score; pytorch-grad-cam's
    ``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst`` and their ``...Average`` over several shares.

    Args:
        model, x, explanation, target, chunk_size, output: as :func:`~pyattr.metrics.deletion`.
        order: ``"morf"`` (remove the most relevant pixels first: a good map makes the score fall) or
            ``"lerf"`` (least relevant first: a good map keeps it).
        fractions: the shares of pixels removed, each in (0, 1). pytorch-grad-cam names them by percentile:
            its ``ROADMostRelevantFirst(percentile=p)`` and ``ROADLeastRelevantFirst(percentile=p)`` remove
            ``1 - p / 100`` of the pixels.
        noise: standard deviation of the Gaussian noise added to the imputed pixels (ROAD's 0.01; 0: none).
        seed: seed of the noise (a generator of its own; the global random state is not touched). The
            draws go fraction by fraction, sample by sample, one (C, M) tensor per image.
        selection: which pixels a fraction removes (:func:`removal_masks`): ``"rank"`` (default), exactly the
            number pytorch-grad-cam's percentile threshold removes on a map without ties, in the map's order
            (ties in row-major order); ``"threshold"``, the reference's rule itself, which removes every pixel
            tied at the threshold and fails on maps that are mostly one value.
        score: ``"softmax"`` (default; pytorch-grad-cam's ``ClassifierOutputSoftmaxTarget``), ``"sigmoid"`` or ``"logit"``
            (its ``ClassifierOutputTarget``).

    Returns:
        :class:`RoadResult`: ``scores`` (N, F), ``original`` (N,), ``change`` and ``mean_change``.

    Raises:
        InputError: with ``selection="threshold"``, a map that leaves no pixel to impute from at some fraction
            (a constant map, or one whose threshold value is shared by every pixel it does not exceed).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> x = torch.rand(2, 3, 64, 64)
        >>> result = pyattr.metrics.road(model, x, pyattr.Saliency(model), fractions=[0.2, 0.5])
        >>> result.scores.shape, result.mean_change.shape
        (torch.Size([2, 2]), torch.Size([2]))
    """
    if order not in ORDERS:
        raise InputError(f"order must be 'morf' (most relevant first) or 'lerf' (least relevant first), got {order!r}")
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise InputError(f"fractions must be shares of pixels removed, each strictly between 0 and 1, got {fractions}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise InputError(f"noise must be a standard deviation >= 0, got {noise!r}")
    check_positive_int(chunk_size, "chunk_size", "it bounds how many imputed images go through the model at once")
    if selection not in SELECTIONS:
        raise InputError(f"selection must be 'rank' or 'threshold', got {selection!r}")
    _scipy_sparse()
    prep = prepare(model, x, explanation, target, score=score, chunk_size=chunk_size, output=output)
    x, maps, scorer = prep.x, prep.maps, prep.scorer
    n = x.shape[0]
    keeps = torch.stack([removal_masks(maps, f, order, selection) for f in fractions], 0)  # (F, N, H, W)
    empty = torch.nonzero(~keeps.flatten(2).any(2))
    if empty.numel():
        f, i = (int(v) for v in empty[0])
        raise InputError(f"ROAD cannot remove {fractions[f]:.0%} of the pixels of sample {i}'s map in order {order!r}: "
                         "its values tie at the threshold, so every pixel would go and none is left to impute from "
                         "(a constant map, or one that is mostly a single value); use selection='rank' (ties broken in "
                         "row-major order) or smaller fractions")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(n, device=x.device).repeat(len(fractions))  # fraction-major: job j = (j // n, j % n)

    def build(jobs: torch.Tensor) -> torch.Tensor:
        return torch.stack([noisy_linear_imputation(x[int(j) % n], keeps[int(j) // n, int(j) % n], noise, generator)
                            for j in jobs])

    scores = scorer.run(rows, build).view(len(fractions), n).t()
    return RoadResult(order, torch.tensor(fractions), scores, prep.original.to(scores.dtype), scorer.target)


def road_combined(model: nn.Module, x: torch.Tensor, explanation: Any, target: Any = None, **options: Any
                  ) -> torch.Tensor:
    """(N,) ``(LeRF mean change - MoRF mean change) / 2`` (pytorch-grad-cam's ``ROADCombined``): higher is better.
    Options as :func:`road` (``order`` excepted); the two orders use the same ``seed``.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.metrics.road_combined(model, torch.rand(1, 3, 64, 64), pyattr.Saliency(model),
        ...                              fractions=[0.5]).shape
        torch.Size([1])
    """
    if "order" in options:
        raise InputError("road_combined runs both orders; drop order=")
    if not isinstance(explanation, torch.Tensor) and explanation is not None:  # a method: its maps, once
        explanation = prepare(model, x, explanation, target, score=options.get("score", "softmax"),
                              chunk_size=options.get("chunk_size", 64), output=options.get("output")).maps
    lerf = road(model, x, explanation, target, order="lerf", **options)
    morf = road(model, x, explanation, target, order="morf", **options)
    return (lerf.mean_change - morf.mean_change) / 2
