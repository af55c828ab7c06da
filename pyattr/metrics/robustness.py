"""Infidelity and sensitivity-max (Yeh, Hsieh, Suggala, Inouye & Ravikumar, "On the (In)fidelity and
Sensitivity of Explanations", NeurIPS 2019, arXiv:1901.09392), as captum defines them
(``captum.metrics.infidelity``, ``captum.metrics.sensitivity_max``), with seeded perturbations drawn from a
generator of their own (the global random state is not touched).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..methods.base import AttributionMethod, OutputSelector
from ..targets.base import CLASS_TARGET, as_target
from ._common import check_positive_int, chunks, prepare

Perturbation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _check_scale(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def infidelity(model: nn.Module, x: torch.Tensor, explanation: Any, target: Any = None, *, n_perturb: int = 10,
               std: float = 0.003, perturbation: Perturbation | None = None, normalize: bool = False, seed: int = 0,
               score: str = "logit", chunk_size: int = 64, output: OutputSelector = None) -> torch.Tensor:
    """Explanation infidelity (Yeh et al. 2019, arXiv:1901.09392; ``captum.metrics.infidelity``)::

        INFD(phi, f, x) = E_I[ (I . phi(x) - (f(x) - f(x - I)))^2 ]

    estimated with ``n_perturb`` perturbations ``I`` per input: by default Gaussian noise ``N(0, std^2)`` on
    every input value (captum's documented example perturbation, ``std=0.003``), or ``perturbation(x, gen)``
    which returns one (M, C, H, W) ``I`` for a chunk of M repeated inputs. ``f`` is the target's score
    (``score="logit"`` by default, as captum's ``forward_func`` with ``target``). 0 is perfect: for a linear
    model ``f(x) = w . x + b`` the map ``phi = w_target`` has infidelity 0 for every perturbation.

    ``normalize=False`` is captum's default: the raw mean squared error, which depends on the map's scale (the
    methods' ``maps`` are normalized to [0, 1]). ``normalize=True`` first rescales the map by the optimal
    ``beta = E[(I . phi) (f(x) - f(x - I))] / E[(I . phi)^2]`` (captum's ``normalize=True``, the paper's code),
    which makes the value invariant to the map's scale; use it for maps of arbitrary scale.

    Args:
        model, x, explanation, target, chunk_size, output: as :func:`~pyattr.metrics.deletion`; the maps may
            also be (N, C, H, W) (the inputs' shape); (N, H, W) maps count for every channel of a pixel.
        n_perturb: perturbations per input.
        std: standard deviation of the default Gaussian perturbation.
        perturbation: a callable ``(x_rows, generator) -> I`` replacing the Gaussian one.
        normalize: rescale the map by the optimal ``beta`` first (see above).
        seed: seed of the perturbations (row by row, sample-major: the result does not depend on
            ``chunk_size`` with the default perturbation).
        score: ``"logit"`` (default) or ``"softmax"``.

    Returns:
        (N,) infidelity per input (captum returns the same values).

    Example:
        >>> import torch, pyattr
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
        >>> x = torch.rand(2, 3, 8, 8)
        >>> exact = model[1].weight[1].detach().view(3, 8, 8).expand(2, 3, 8, 8)
        >>> bool(pyattr.metrics.infidelity(model, x, exact, 1, std=0.1).abs().max() < 1e-8)
        True
    """
    check_positive_int(n_perturb, "n_perturb", "the infidelity is a mean over perturbations")
    std = _check_scale(std, "std")
    if perturbation is not None and not callable(perturbation):
        raise InputError(f"perturbation must be a callable (x_rows, generator) -> I, got {type(perturbation).__name__}")
    prep = prepare(model, x, explanation, target, score=score, chunk_size=chunk_size, output=output, channels=True)
    x, scorer = prep.x, prep.scorer
    n = x.shape[0]
    maps = prep.maps if prep.maps.dim() == 4 else prep.maps[:, None]
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(n, device=x.device).repeat_interleave(n_perturb)
    dots: list[torch.Tensor] = []

    def build(jobs: torch.Tensor) -> torch.Tensor:
        idx = rows[jobs]
        xs = x[idx]
        if perturbation is None:
            noise = torch.stack([torch.randn(x.shape[1:], generator=generator) for _ in range(idx.numel())])
            noise = (std * noise).to(xs)
        else:
            noise = perturbation(xs, generator)
            if not isinstance(noise, torch.Tensor) or noise.shape != xs.shape:
                raise InputError(f"perturbation must return a tensor of the rows' shape {tuple(xs.shape)}, got "
                                 f"{getattr(noise, 'shape', type(noise).__name__)}")
            noise = noise.to(xs)
        dots.append((maps[idx].to(noise.dtype) * noise).flatten(1).sum(1))
        return xs - noise

    perturbed = scorer.run(rows, build)
    dot = torch.cat(dots).view(n, n_perturb)
    diff = (prep.original[:, None] - perturbed.view(n, n_perturb)).to(dot.dtype)
    if not normalize:
        return (dot - diff).pow(2).sum(1) / n_perturb
    a, b, c = dot.pow(2).sum(1), (dot * diff).sum(1), diff.pow(2).sum(1)
    beta = b / torch.where(a != 0, a, torch.ones_like(a))
    return (beta * beta * a - 2 * beta * b + c) / n_perturb


def sensitivity_max(model: nn.Module, x: torch.Tensor, method: AttributionMethod, target: Any = None, *,
                    radius: float = 0.02, n_perturb: int = 10, seed: int = 0, which: str = "raw",
                    chunk_size: int = 64, output: OutputSelector = None) -> torch.Tensor:
    """Max-sensitivity (Yeh et al. 2019, arXiv:1901.09392; ``captum.metrics.sensitivity_max``)::

        SENS_MAX(phi, x) = max_j || phi(x + d_j) - phi(x) || / || phi(x) ||,   d_j ~ U(-radius, radius)

    over ``n_perturb`` uniform perturbations of every input value (captum's defaults: radius 0.02, 10 draws,
    Frobenius norm of the flattened map; a zero ``||phi(x)||`` counts as 1, as captum). The method explains
    each perturbed copy for the class it explained on ``x`` (resolved once). Lower is better.

    Args:
        model, x, target, chunk_size, output: as :func:`~pyattr.metrics.deletion` (class ids only).
        method: a pyattr method built on ``model`` (maps cannot be re-computed from a tensor).
        radius: half-width of the uniform perturbation.
        n_perturb: perturbations per input.
        seed: seed of the perturbations (row by row, sample-major).
        which: ``"raw"`` (the method's own map, as captum's explanation function returns; default) or
            ``"maps"`` (resized and min-max normalized).

    Returns:
        (N,) max-sensitivity per input.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.metrics.sensitivity_max(model, torch.rand(2, 3, 64, 64), pyattr.Saliency(model), n_perturb=2).shape
        torch.Size([2])
    """
    if not isinstance(method, AttributionMethod):
        raise InputError("sensitivity_max explains perturbed copies of the inputs again, so it needs the method "
                         f"itself (e.g. pyattr.Saliency(model)), not {type(method).__name__}")
    if which not in ("raw", "maps"):
        raise InputError(f"which must be 'raw' or 'maps', got {which!r}")
    check_positive_int(n_perturb, "n_perturb", "sensitivity-max is a max over perturbations")
    radius = _check_scale(radius, "radius")
    if as_target(target)[0] is not CLASS_TARGET:
        raise InputError("sensitivity_max takes class ids as target (a Target's run-time inputs are per sample of "
                         "the batch, not of the perturbed copies)")
    prep = prepare(model, x, method, target, score="logit", chunk_size=chunk_size, output=output, need_maps=False)
    x, ids = prep.x, prep.scorer.target
    n = x.shape[0]
    first = getattr(method(x, ids), which)
    norm = first.flatten(1).double().norm(dim=1)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(n, device=x.device).repeat_interleave(n_perturb)
    out = []
    for jobs in chunks(rows.numel(), chunk_size, x.device):
        idx = rows[jobs]
        noise = torch.stack([torch.empty(x.shape[1:]).uniform_(-radius, radius, generator=generator)
                             for _ in range(idx.numel())]).to(x)
        maps = getattr(method(x[idx] + noise, ids[idx]), which)
        out.append((maps - first[idx]).flatten(1).double().norm(dim=1) / norm[idx])
    return torch.cat(out).view(n, n_perturb).amax(1).to(first.dtype)
