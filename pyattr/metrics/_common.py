"""What the faithfulness metrics share: checking the inputs, computing or checking the maps, and scoring
(perturbed copies of) the inputs in chunks of bounded size.

A metric is called as ``metric(model, x, explanation, target)``:

- ``model``: the classifier (an ``nn.Module``); it runs on a per-call eval-mode view
  (:func:`pyattr._callview.call_view`), so a model in training mode is neither switched nor updated;
- ``x``: (N, C, H, W) float inputs;
- ``explanation``: (N, H, W) precomputed maps at the inputs' resolution, or a pyattr
  :class:`~pyattr.methods.base.AttributionMethod` built on ``model`` (its ``maps`` are used);
- ``target``: class ids (None / -1: the model's arg-max class on ``x``, an int, an (N,) tensor) or a
  :class:`~pyattr.targets.Target` (segmentation, similarity, your own kind): its scores replace the logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._callview import call_view
from ..errors import InputError
from ..methods.base import AttributionMethod, OutputSelector, check_scores, select_output
from ..targets.base import CLASS_TARGET, Target, as_target

SCORES = ("softmax", "sigmoid", "logit")
"""How a metric turns the target's scores (N, K) into one number per sample: ``"softmax"``, the target
class's softmax probability (torchcam's and pytorch-grad-cam's examples, RISE); ``"sigmoid"``, its sigmoid
probability (multi-label models, such as the built-in one, whose classes are independent); ``"logit"``, the raw
score."""

Explanation = "torch.Tensor | AttributionMethod"


@dataclass
class Scorer:
    """Scores inputs for one batch: ``scorer(xs, rows)`` runs the model on ``xs`` (M, C, H, W), copies of the
    samples ``rows`` (M,) of the batch, and returns (M,) scores of each row's sample's target.

    Attributes:
        model: the classifier; run on a per-call eval-mode view under ``torch.no_grad()``.
        output: which part of the model's output holds the scores (as a method's ``output=``).
        kind: the target (:class:`~pyattr.targets.ClassTarget` for plain class ids).
        inputs: the target's run-time inputs for the batch, each (N, ...).
        target: (N,) long, the resolved class ids.
        score: ``"softmax"``, ``"sigmoid"`` or ``"logit"`` (:data:`SCORES`).
        chunk_size: at most this many inputs go through the model at once.
    """

    model: nn.Module
    output: OutputSelector
    kind: Target
    inputs: dict[str, torch.Tensor]
    target: torch.Tensor
    score: str
    chunk_size: int

    def all_scores(self, xs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(M, K) scores of the target kind for ``xs`` (one forward pass; no chunking, no transform)."""
        with torch.no_grad(), call_view(self.model) as view:
            out = select_output(view.root(xs), self.output)
        if self.kind is CLASS_TARGET:
            check_scores(out, xs, self.output)
            return out
        inputs = {k: v[rows] for k, v in self.inputs.items()}
        self.kind.check_output(out, xs, inputs)
        with torch.no_grad():
            scores = self.kind.scores(out, inputs)
        check_scores(scores, xs, None)
        return scores

    def transform(self, scores: torch.Tensor) -> torch.Tensor:
        if self.score == "softmax":
            return scores.softmax(1)
        return scores.sigmoid() if self.score == "sigmoid" else scores

    def __call__(self, xs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        scores = self.transform(wide(self.all_scores(xs, rows)))
        return scores.gather(1, self.target[rows][:, None])[:, 0]

    def run(self, rows: torch.Tensor, build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Scores of J jobs: job j is a copy of sample ``rows[j]``; ``build(jobs)`` makes the (M, C, H, W)
        inputs of the job ids ``jobs`` (M,). Runs ``chunk_size`` jobs at a time, so memory stays bounded."""
        out = []
        for jobs in chunks(rows.numel(), self.chunk_size, rows.device):
            out.append(self(build(jobs), rows[jobs]))
        return torch.cat(out) if out else torch.zeros(0)


def wide(values: torch.Tensor) -> torch.Tensor:
    """``values`` in float64 if they are, else float32 (scores of half-precision models)."""
    return values if values.dtype == torch.float64 else values.float()


def chunks(total: int, size: int, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Consecutive (M,) long index ranges of at most ``size`` covering ``range(total)``."""
    for start in range(0, total, size):
        yield torch.arange(start, min(start + size, total), device=device)


def check_positive_int(value: Any, name: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be a positive int, got {value!r}; {fix}")
    if value <= 0:
        raise InputError(f"{name} must be a positive int, got {value}; {fix}")
    return value


def check_inputs(x: Any) -> torch.Tensor:
    """``x`` as a detached (N, C, H, W) float tensor, or InputError naming what is wrong and the fix."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"inputs must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        hint = " (add a batch dimension with x[None])" if x.dim() == 3 else ""
        raise InputError(f"inputs must have shape (N, C, H, W), got {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise InputError(f"inputs must be floating point, got {x.dtype}; convert uint8 images with x.float() / 255")
    if x.shape[0] == 0:
        raise InputError("inputs hold no sample (batch size 0)")
    bad = bad_samples(x)
    if bad:
        raise InputError(f"inputs hold NaN or infinite values (samples {_show(bad)}); fix or drop those inputs")
    return x.detach()


def bad_samples(values: torch.Tensor) -> list[int]:
    """Indices of the samples (first dimension) that hold a NaN or an infinity."""
    finite = torch.isfinite(values.detach().flatten(1)).all(1)
    return torch.nonzero(~finite).flatten().tolist()


def _show(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices[:8]) + (", ..." if len(indices) > 8 else "")


def check_maps(maps: Any, x: torch.Tensor, *, channels: bool = False, name: str = "maps") -> torch.Tensor:
    """``maps`` checked against the inputs ``x``: (N, H, W) at the inputs' resolution (or (N, C, H, W), the
    inputs' shape, with ``channels``), floating point, finite. Returns them detached, in float32 or wider."""
    if not isinstance(maps, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape (N, H, W) or an attribution method, got "
                         f"{type(maps).__name__}")
    n, c, h, w = x.shape
    shapes = [(n, h, w)] + ([(n, c, h, w)] if channels else [])
    if tuple(maps.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        hint = ""
        if maps.dim() == 3 and maps.shape[0] == n:
            hint = ("; resize them to the inputs' size first, e.g. pyattr.postprocess.resize_bilinear(maps, "
                    f"({h}, {w}))")
        elif maps.dim() == 2 and (maps.shape[0], maps.shape[1]) == (h, w):
            hint = "; add a batch dimension with maps[None]"
        elif maps.dim() == 4 and maps.shape[0] == n and not channels:
            hint = "; reduce the channels first (e.g. maps.abs().amax(1), as Saliency's default)"
        elif maps.dim() >= 1 and maps.shape[0] != n:
            hint = f"; one map per input: {n} inputs, {maps.shape[0]} maps"
        raise InputError(f"{name} must have shape {want} for inputs of shape {tuple(x.shape)}, got "
                         f"{tuple(maps.shape)}{hint}")
    if not maps.is_floating_point():
        maps = maps.float()
    bad = bad_samples(maps)
    if bad:
        raise InputError(f"{name} hold NaN or infinite values (samples {_show(bad)}): such a map orders no pixel; "
                         "compute them again (an exported graph marks the samples it cannot explain with NaN maps: "
                         "drop those samples)")
    maps = maps.detach().to(x.device)
    return maps if maps.dtype in (torch.float32, torch.float64) else maps.float()


def check_score(score: Any) -> str:
    if score not in SCORES:
        raise InputError(f"score must be one of {', '.join(map(repr, SCORES))}, got {score!r}")
    return score


def class_ids(target: Any, n: int, device: torch.device) -> torch.Tensor:
    """Class ids as an (N,) long tensor, -1 for the arg-max; InputError for anything else (the methods' own target
    check, :meth:`AttributionMethod._check_target`, with one target per input and -1 allowed as an int too)."""
    if isinstance(target, int) and not isinstance(target, bool) and target == -1:
        return torch.full((n,), -1, dtype=torch.long, device=device)
    t = AttributionMethod._check_target(None, target, n, device)
    if t.dim() == 2:
        raise InputError(f"target must be None, an int or an ({n},) tensor of class ids, got shape {tuple(t.shape)}; "
                         "the metrics score one target per input: evaluate each column of an (N, T) target separately")
    return t


@dataclass
class Prepared:
    """A metric call's checked inputs: the inputs, the maps, the scorer, and the scores of the inputs."""

    x: torch.Tensor
    maps: torch.Tensor | None
    scorer: Scorer
    original: torch.Tensor
    """(N,) the scores (after ``score``'s transform) of the unperturbed inputs."""
    method: AttributionMethod | None


def prepare(model: Any, x: Any, explanation: Any, target: Any, *, score: str, chunk_size: int,
            output: OutputSelector = None, channels: bool = False, need_maps: bool = True) -> Prepared:
    """Check a metric call's arguments and score the unperturbed inputs (see the module's docstring).

    The class ids are resolved once on ``x`` (-1 and None: the arg-max of the target's scores) and kept for
    every perturbed copy."""
    method = explanation if isinstance(explanation, AttributionMethod) else None
    if isinstance(model, AttributionMethod):
        raise InputError("the first argument is the model; give the method as the explanation: "
                         "metric(model, x, method, target)")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method is not None:
        if method._model is not model:
            raise InputError(f"the method {type(method).__name__} explains another model than the one given; "
                             "build it on this model (e.g. pyattr.GradCAM(model, 'layer4'))")
        if output is None:
            output = method.output
        if method.layout != "image":
            raise InputError(f"the metrics score images; the method explains layout {method.layout!r}")
    elif explanation is None and need_maps:
        raise InputError("give the maps to score ((N, H, W) tensor) or an attribution method that makes them")
    x = check_inputs(x)
    check_score(score)
    check_positive_int(chunk_size, "chunk_size", "it bounds how many inputs go through the model at once")
    kind, classes = as_target(target)
    if not kind.target_input:
        raise InputError(f"the {kind.kind} target derives its ids from its own inputs; the metrics score one "
                         "class id per input: use a class, segmentation or similarity target")
    inputs = kind.prepare_inputs(x, kind.run_time_inputs(x)) if kind is not CLASS_TARGET else {}
    if classes is None:
        classes = kind.default_classes(x)
    ids = class_ids(classes, x.shape[0], x.device)
    scorer = Scorer(model, output, kind, inputs, ids, score, chunk_size)
    rows = torch.arange(x.shape[0], device=x.device)
    raw = torch.cat([wide(scorer.all_scores(x[j], rows[j])) for j in chunks(x.shape[0], chunk_size, x.device)])
    k = raw.shape[1]
    if bool((ids >= k).any()):
        raise InputError(f"target class {int(ids.max())} is out of range: the target's scores have {k} classes "
                         f"(0..{k - 1})")
    scorer.target = torch.where(ids >= 0, ids, raw.argmax(1))
    maps = None
    if method is not None and need_maps:
        if isinstance(target, Target):  # its run-time inputs belong to the whole batch
            found = method(x, target).maps
        else:  # chunk by chunk, as the perturbed copies
            found = torch.cat([method(x[j], scorer.target[j]).maps for j in chunks(x.shape[0], chunk_size, x.device)])
        if found.dim() != 3:
            raise InputError(f"the method's maps have shape {tuple(found.shape)}; the metrics need one "
                             "(H, W) map per input: use a channel reduction (e.g. reduction='max') and one target "
                             "per input")
        maps = check_maps(found, x, name="the method's maps")
    elif explanation is not None and method is None:
        maps = check_maps(explanation, x, channels=channels)
    original = scorer.transform(raw).gather(1, scorer.target[:, None])[:, 0]
    return Prepared(x, maps, scorer, original, method)


def broadcast_baseline(baseline: Any, x: torch.Tensor, name: str = "baseline") -> torch.Tensor:
    """A baseline image per input: a number (a constant image), ``"blur"`` (:func:`gaussian_blur` of the
    input, RISE's insertion baseline), a tensor broadcastable to (N, C, H, W), or a callable ``f(x)`` that
    returns one."""
    if isinstance(baseline, str):
        if baseline == "blur":
            return gaussian_blur(x)
        raise InputError(f"{name} must be a number, 'blur', a tensor or a callable, got {baseline!r}")
    if callable(baseline):
        baseline = baseline(x)
    if isinstance(baseline, bool):
        raise InputError(f"{name} must be a number, 'blur', a tensor or a callable, not a bool")
    if isinstance(baseline, (int, float)):
        return torch.full_like(x, float(baseline))
    if not isinstance(baseline, torch.Tensor):
        raise InputError(f"{name} must be a number, 'blur', a tensor or a callable, got {type(baseline).__name__}")
    try:
        out = torch.broadcast_to(baseline.to(x), x.shape)
    except RuntimeError:
        raise InputError(f"{name} of shape {tuple(baseline.shape)} does not broadcast to the inputs' shape "
                         f"{tuple(x.shape)}") from None
    if bad_samples(out.reshape(x.shape[0], -1)):
        raise InputError(f"{name} holds NaN or infinite values")
    return out


def gaussian_blur(x: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """A Gaussian blur of (N, C, H, W) images, per channel: an ``size`` x ``size`` kernel of standard deviation
    ``sigma`` (RISE's insertion baseline, Petsiuk et al. 2018: 11 x 11, sigma 5), borders replicated.

    Example:
        >>> gaussian_blur(torch.ones(1, 3, 8, 8)).allclose(torch.ones(1, 3, 8, 8))
        True
    """
    half = size // 2
    t = torch.arange(size, dtype=torch.float64) - half
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    y = torch.nn.functional.pad(x, (half, half, half, half), mode="replicate")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    return torch.nn.functional.conv2d(y, k.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)
