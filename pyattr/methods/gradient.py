"""The gradient family: maps made from the gradient of the target score with respect to the input.

Every method here computes an *element-wise attribution* ``A`` with the input's shape (the
gradient, ``x * gradient``, an averaged gradient...) and then reduces it over channels. They
share:

- inputs of any layout: images (N, C, H, W), 1-D signals (N, C, L), tables (N, F)
  (``layout="signal"`` / ``"tabular"``); the channel dim is dim 1 (tables have none, their maps
  are (N, F)); only images are resized, every map is min-max normalized per sample;
- ``reduction`` over channels: ``"max"``, ``"sum"``, ``"l2"`` (norm), ``"mean"`` or ``"none"``
  (keep the channels: maps have the input's shape);
- ``absolute``: take ``|A|`` before the reduction (and before SmoothGrad's averaging);
- several targets per input: an (N, T) target runs one forward pass and T backward passes and
  returns (N, T, ...) maps;
- ``output``: picks the scores out of a model that returns a tuple / dict.

Exported graphs hold the random tensors (SmoothGrad's noise, a uniform-noise baseline) as
constants drawn from ``seed`` with a CPU ``torch.Generator``: eager calls use the very same
tensors, so eager and exported maps agree exactly, and an input's map does not depend on the
other inputs of its batch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._callview import outside_trace
from .._loop import batched_loop, in_loop_body, loop_passes, vjp_columns
from ..errors import InputError
from ..targets.base import current_target
from .base import (
    PER_POINT_BYTES,
    AttributionMethod,
    OutputSelector,
    check_pass,
    check_upfront,
    input_draw_bytes,
)
from .modified_backward import modified_relu

_REDUCTIONS = ("max", "sum", "l2", "mean", "none")
NOISE_VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")
IG_RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")
IG_BASELINES = ("zeros", "blur", "uniform")
EAGER_CHUNK = 16
"""Points / samples per input in one pass of an eager call when ``chunk_size`` is left at None."""


def check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is not None and not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
                                       and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    return chunk_size


def points_per_pass(chunk_size: int | None, total: int, tracing: bool) -> int:
    """How many of ``total`` points (IG's steps, SmoothGrad's samples) of an input go through the model in one
    pass: ``chunk_size`` when given; else :data:`EAGER_CHUNK` in an eager call (bounded memory) and all of them
    in a traced graph (one batched pass: unrolled passes multiply the graph, its export time and file size). The
    one pass's peak memory in onnxruntime, IG's 32 steps at batch 1 and 224 px: resnet50 2.4 GB as with two
    passes of 16, vit_b_16 5.3 GB against 4.0 GB (``benchmarks/results/ig_pass_memory.md``); an int
    ``chunk_size`` bounds it. The chunking does not change the values."""
    if chunk_size is not None:
        return chunk_size
    return total if tracing else EAGER_CHUNK


@contextmanager
def _repeated_rows(r: int) -> Iterator[None]:
    """Within the block the model runs on the call's rows repeated ``r`` times more (sample-major, the clean
    input first in each group): the call's target expands its run-time inputs to match and reads its extra
    outputs from the first row of each sample."""
    bound = current_target()
    if bound is None:
        yield
        return
    old = bound.repeats
    bound.repeats = old * r
    try:
        yield
    finally:
        bound.repeats = old


def reduce_channel_dim(attr: torch.Tensor, reduction: str, dim: int) -> torch.Tensor:
    """Reduce ``attr`` over ``dim``: 'max', 'sum', 'l2' norm, 'mean', or 'none' (unchanged)."""
    if reduction == "none":
        return attr
    if reduction == "max":
        return attr.amax(dim)
    if reduction == "sum":
        return attr.sum(dim)
    if reduction == "l2":
        return attr.pow(2).sum(dim).sqrt()
    if reduction == "mean":
        return attr.mean(dim)
    raise ValueError(f"unknown reduction {reduction!r}; use one of {', '.join(_REDUCTIONS)}")


def seeded_tensor(kind: str, shape: tuple[int, ...], seed: int, like: torch.Tensor) -> torch.Tensor:
    """A standard normal (``kind="normal"``) or U[0, 1) (``"uniform"``) tensor drawn on the CPU from
    ``torch.Generator().manual_seed(seed)``, then moved to ``like``'s device and dtype.

    Made outside any tracing in progress, so that a traced graph holds it as a constant."""
    shape = tuple(int(s) for s in shape)
    with outside_trace():
        generator = torch.Generator().manual_seed(int(seed))
        draw = torch.randn if kind == "normal" else torch.rand
        return draw(shape, generator=generator, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


def constant_tensor(values, like: torch.Tensor) -> torch.Tensor:
    """``torch.tensor(values)`` on ``like``'s device and dtype, made outside any tracing in progress (a traced
    graph holds it as a constant)."""
    with outside_trace():
        return torch.tensor(values, dtype=like.dtype, device=like.device)


def tensor_baseline(baseline: torch.Tensor, x: torch.Tensor, check: bool = True) -> torch.Tensor:
    """A user's baseline / reference tensor on ``x``'s device and dtype, expanded to ``x``'s shape; ``check``: a
    shape that does not broadcast to ``x``'s is an :class:`InputError` (Integrated Gradients, DeepLIFT)."""
    b = baseline.to(device=x.device, dtype=x.dtype)
    if check:
        try:
            if torch.broadcast_shapes(b.shape, x.shape) != x.shape:
                raise RuntimeError
        except RuntimeError:
            raise InputError(f"the baseline's shape {tuple(b.shape)} does not broadcast to the inputs' "
                             f"{tuple(x.shape)}; give one input's shape, (1, ...) or (N, ...)") from None
    return b.expand_as(x)


def _sample_range(x: torch.Tensor) -> torch.Tensor:
    """Per-sample (max - min) of ``x``, shaped (N, 1, ..., 1) to broadcast against ``x``."""
    flat = x.flatten(1)
    return (flat.amax(1) - flat.amin(1)).view(-1, *[1] * (x.dim() - 1))


class GradientMethod(AttributionMethod):
    """Base of the gradient family: an element-wise attribution, then a channel reduction.

    Subclasses implement :meth:`elementwise`. :meth:`input_gradients` is the one place where a
    gradient is taken (one forward pass, one backward pass per target column, under the method's
    ReLU rule when it has one).
    """

    layouts: ClassVar[tuple[str, ...]] = ("image", "signal", "tabular")
    multi_target: ClassVar[bool] = True
    relu_rule: ClassVar[str | None] = None
    default_reduction: ClassVar[str] = "max"

    def __init__(self, model: nn.Module, reduction: str | None = None, absolute: bool | None = None, *,
                 output: OutputSelector = None, layout: str = "image"):
        super().__init__(model, output=output, layout=layout)
        reduction = self.default_reduction if reduction is None else reduction
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; use one of {', '.join(_REDUCTIONS)}")
        self.reduction = reduction
        self.absolute = self.default_absolute(reduction) if absolute is None else bool(absolute)
        self._constants: dict[tuple, torch.Tensor] = {}

    signed_evidence: ClassVar[bool] = False
    """Whether the element-wise attribution is signed evidence (Input x Gradient, Integrated Gradients)."""

    @property
    def signed(self) -> bool:  # type: ignore[override]
        """Signed map, drawn centred on a diverging colormap (see ``AttributionMethod.signed``): for methods
        with signed evidence, unless ``|A|`` is taken or the channel reduction drops the sign."""
        return self.signed_evidence and not self.absolute and self.reduction in ("sum", "mean", "none")

    def default_absolute(self, reduction: str) -> bool:
        """Whether ``|A|`` is taken when ``absolute`` is not given."""
        return False

    # -- the core ------------------------------------------------------------------------------
    def input_gradients(self, x: torch.Tensor, target: torch.Tensor, clean: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of the target scores with respect to the input.

        Args:
            x: (M, ...) inputs.
            target: (M, T) class ids, -1 = the arg-max class; with ``clean``: (N, T), resolved on the clean
                inputs' scores, and every point gets its clean input's targets.
            clean: None, or (N, ...) inputs of which ``x`` holds M = N * r points (r per input, sample-major:
                Integrated Gradients' path, SmoothGrad's noisy copies). They run in the same pass as the
                points, one more row in each input's group, so that an exported graph traces the model once
                (a separate no-grad forward for the scores and the arg-max targets is a second trace: one
                more model's worth of export time). Eager calls keep that no-grad forward (:meth:`folds_clean`):
                there folding saves nothing (IG and SmoothGrad on resnet18, 112 px, batch 1: CPU time
                0.997-1.039x and 1.002-1.004x in two runs, ``benchmarks/fold_clean_eager.py``) and eager results
                stay bit-identical to before. The values agree to fp32 rounding.

        Returns:
            scores (M, K), gradients (M, T, ...), resolved targets (M, T); with ``clean``: the clean inputs'
            scores (N, K, no graph) and resolved targets (N, T).
        """
        if clean is None:
            def selected_of(x):
                with modified_relu(self.relu_rule):
                    scores = self.scores_of(x)
                resolved = self.resolve(scores, target)
                return scores.gather(1, resolved), (scores, resolved)  # (M, T)
        else:
            n = clean.shape[0]
            r = x.shape[0] // n

            def selected_of(x):
                rows = torch.cat([clean.detach()[:, None], x.view(n, r, *x.shape[1:])], 1).flatten(0, 1)
                with modified_relu(self.relu_rule), _repeated_rows(r + 1):
                    out = self.scores_of(rows)
                out = out.view(n, r + 1, *out.shape[1:])
                scores = out[:, 0].detach()
                resolved = self.resolve(scores, target)
                return out[:, 1:].flatten(0, 1).gather(1, resolved.repeat_interleave(r, 0)), (scores, resolved)
        grads, (scores, resolved) = vjp_columns(selected_of, x)
        return scores, grads, resolved

    def folds_clean(self) -> bool:
        """Whether a multi-pass method (Integrated Gradients, SmoothGrad) runs the clean input in its first pass
        (``input_gradients(points, target, clean=x)``) rather than in a no-grad forward of its own: in traced
        graphs (one trace of the model), not in eager calls (no faster there, see :meth:`input_gradients`), nor in
        the body of a loop (:func:`~pyattr._loop.batched_loop`, where the targets come resolved)."""
        return self._tracing and not in_loop_body()

    def looped(self, passes: int) -> bool:
        """Whether ``passes`` passes of a multi-pass method (Integrated Gradients and SmoothGrad with a
        ``chunk_size``) are one loop (:func:`~pyattr._loop.batched_loop`): in a traced graph, when there are several
        and this is not already a loop's body. Eager calls keep their Python loop (unchanged results)."""
        return loop_passes(passes)

    def elementwise(self, x: torch.Tensor, target: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores (M, K), element-wise attribution (M, T, ...) with ``|.|`` applied if ``absolute``,
        resolved target (M, T)) for inputs ``x`` (M, ...) and targets (M, T)."""
        raise NotImplementedError

    def reduce(self, attr: torch.Tensor) -> torch.Tensor:
        """Channel reduction of (M, T, ...) attributions (tables have no channel dim)."""
        if self.layout == "tabular":
            return attr
        return reduce_channel_dim(attr, self.reduction, 2)

    def _abs(self, attr: torch.Tensor) -> torch.Tensor:
        return attr.abs() if self.absolute else attr

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        scores, raw, resolved, _ = self._attribute(x, target, diagnostics=False)
        return scores, raw, resolved

    def attribute_with_diagnostics(self, x: torch.Tensor, target: torch.Tensor):
        return self._attribute(x, target, diagnostics=True)

    def _attribute(self, x: torch.Tensor, target: torch.Tensor, diagnostics: bool):
        single = target.dim() == 1
        target2 = target[:, None] if single else target
        if diagnostics:
            scores, attr, resolved, extra = self.elementwise_with_diagnostics(x, target2)
        else:
            scores, attr, resolved = self.elementwise(x, target2)
            extra = {}
        raw = self.reduce(attr)
        if single:
            raw, resolved = raw[:, 0], resolved[:, 0]
            extra = {k: v[:, 0] for k, v in extra.items()}
        return scores, raw, resolved, extra

    def elementwise_with_diagnostics(self, x: torch.Tensor, target: torch.Tensor):
        """:meth:`elementwise` plus a dict of (M, T) diagnostics (none by default)."""
        return (*self.elementwise(x, target), {})

    def constant(self, kind: str, shape: tuple[int, ...], seed: int, like: torch.Tensor) -> torch.Tensor:
        """:func:`seeded_tensor`, cached per (kind, shape, seed, device, dtype) on this method."""
        key = (kind, tuple(int(s) for s in shape), int(seed), like.device, like.dtype)
        value = self._constants.get(key)
        if value is None:
            value = seeded_tensor(kind, shape, seed, like)
            self._constants = {key: value}  # one set of constants at a time; replaced whole (threads)
        return value

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "reduction": self.reduction, "absolute": self.absolute}


class Saliency(GradientMethod):
    r"""Vanilla gradient saliency (Simonyan, Vedaldi & Zisserman 2014, arXiv:1312.6034).

    .. math:: M_{ij} = \max_c \left| \frac{\partial S_t(x)}{\partial x_{cij}} \right|

    Args:
        model: a module mapping inputs to (N, K) scores.
        reduction: how channels are reduced: ``"max"`` (the paper's, default), ``"sum"``, ``"l2"``
            norm, ``"mean"``, or ``"none"`` (maps keep the input's shape).
        absolute: take the gradient's absolute value first. Default: yes, except for
            ``"mean"`` (the signed mean). ``absolute=False`` with ``reduction="none"`` is the raw gradient.
        output: picks the scores from a model returning a tuple / dict (index, key or callable).
        layout: ``"image"`` (N, C, H, W), ``"signal"`` (N, C, L) or ``"tabular"`` (N, F).

    Shapes: inputs (N, C, H, W) -> maps and raw (N, H, W); (N, C, L) -> (N, L); (N, F) -> (N, F).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> x = torch.rand(2, 3, 64, 64)
        >>> result = pyattr.Saliency(model)(x)          # explains the arg-max class
        >>> result.maps.shape
        torch.Size([2, 64, 64])
    """

    name = "saliency"

    def __init__(self, model: nn.Module, reduction: str = "max", absolute: bool | None = None, *,
                 output: OutputSelector = None, layout: str = "image"):
        super().__init__(model, reduction, absolute, output=output, layout=layout)

    def default_absolute(self, reduction: str) -> bool:
        return reduction != "mean"

    def elementwise(self, x, target, clean=None):
        scores, grads, resolved = self.input_gradients(x, target, clean)
        return scores, self._abs(grads), resolved


class InputXGradient(GradientMethod):
    r"""Input x Gradient (Shrikumar et al. 2016, arXiv:1605.01713).

    .. math:: A_{c,i} = x_{c,i} \, \frac{\partial S_t(x)}{\partial x_{c,i}}

    For a linear model :math:`S_t = w_t^\top x + b_t` this is :math:`x \odot w_t`, whose sum is
    the score minus the bias. Default reduction: the signed ``"sum"`` over channels.

    Args: as :class:`Saliency` (``absolute`` defaults to False).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.InputXGradient(model)(torch.rand(2, 3, 64, 64), target=1).raw.shape
        torch.Size([2, 64, 64])
    """

    name = "inputxgradient"
    signed_evidence = True
    default_reduction = "sum"

    def __init__(self, model: nn.Module, reduction: str = "sum", absolute: bool | None = None, *,
                 output: OutputSelector = None, layout: str = "image"):
        super().__init__(model, reduction, absolute, output=output, layout=layout)

    def elementwise(self, x, target, clean=None):
        scores, grads, resolved = self.input_gradients(x, target, clean)
        return scores, self._abs(x.detach()[:, None] * grads), resolved


class GuidedBackprop(Saliency):
    r"""Guided Backpropagation (Springenberg et al. 2015, arXiv:1412.6806).

    The gradient of the target score where every ReLU passes back only positive gradients at
    positive inputs: :math:`g_{in} = \max(g_{out}, 0) \cdot [x > 0]`. The rule is applied to every
    ReLU called during the forward pass (``nn.ReLU``, ``F.relu``, ``torch.relu``, in place or not)
    by a scoped ``TorchFunctionMode`` (:mod:`pyattr.methods.modified_backward`); no hook is put on the
    model and the exported graph holds the rule as forward ops. Known to be insensitive to the
    model's upper layers (it fails the randomization check of Adebayo et al. 2018).

    Args: as :class:`Saliency`.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.GuidedBackprop(model)(torch.rand(2, 3, 64, 64)).maps.shape
        torch.Size([2, 64, 64])
    """

    name = "guidedbackprop"
    relu_rule = "guided"


class DeconvNet(Saliency):
    r"""DeconvNet (Zeiler & Fergus 2014, arXiv:1311.2901), as a modified gradient.

    Every ReLU passes back the positive part of the incoming gradient, whatever its forward input
    was: :math:`g_{in} = \max(g_{out}, 0)`. Applied like :class:`GuidedBackprop`'s rule.

    Args: as :class:`Saliency`.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.DeconvNet(model)(torch.rand(2, 3, 64, 64)).maps.shape
        torch.Size([2, 64, 64])
    """

    name = "deconvnet"
    relu_rule = "deconv"


_BASE_METHODS: dict[str, type[GradientMethod]] = {
    "saliency": Saliency, "inputxgradient": InputXGradient, "guidedbackprop": GuidedBackprop,
    "deconvnet": DeconvNet,
}


class SmoothGrad(GradientMethod):
    r"""SmoothGrad (Smilkov et al. 2017, arXiv:1706.03825) over any gradient method.

    With :math:`A` the inner method's element-wise attribution, :math:`\epsilon_s` (s = 1..S)
    standard normal tensors and :math:`\sigma = \text{noise\_level} \cdot (\max x - \min x)` per input:

    - ``"smoothgrad"``: :math:`\frac1S \sum_s A(x + \sigma \epsilon_s)`
    - ``"smoothgrad_sq"``: :math:`\frac1S \sum_s A(x + \sigma \epsilon_s)^2`
    - ``"vargrad"``: the variance :math:`\frac1S \sum_s A_s^2 - (\frac1S \sum_s A_s)^2`

    then the inner method's channel reduction. The target is resolved on the clean input (an
    arg-max target stays the same class for every noisy sample) and ``scores`` are the clean
    input's.

    Noise: the S tensors :math:`\epsilon_s` (shape of one input) are drawn once from ``seed``
    (CPU generator) and are the same for every input of a batch; the exported graph holds them
    as a constant, so eager and exported results agree exactly and are reproducible. The samples
    are batched: ``chunk_size`` samples per input go through the model in one pass (memory grows
    with batch x chunk_size), ``ceil(S / chunk_size)`` passes in all.

    Args:
        model: a module mapping inputs to (N, K) scores.
        method: the inner method: a name (``"saliency"``, ``"inputxgradient"``, ``"guidedbackprop"``,
            ``"deconvnet"``) built on ``model`` with ``**options``, or a gradient method instance
            (e.g. ``IntegratedGradients(model)``) on the same model.
        noise_level: the noise's standard deviation as a fraction of each input's value range.
        samples: S, the number of noisy samples.
        variant: ``"smoothgrad"``, ``"smoothgrad_sq"`` or ``"vargrad"``.
        seed: seed of the noise.
        chunk_size: noisy samples per input in one batched pass; None (default): 16 in eager calls, all
            ``samples`` in an exported graph (one pass; pass an int to bound the runtime's memory instead).
        output, layout: as :class:`Saliency` (taken from the instance when ``method`` is one).
        **options: the inner method's options (``reduction``, ``absolute``).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> sg = pyattr.SmoothGrad(model, "saliency", noise_level=0.1, samples=32, seed=0)
        >>> sg(torch.rand(2, 3, 64, 64)).maps.shape
        torch.Size([2, 64, 64])
    """

    name = "smoothgrad"

    def __init__(self, model: nn.Module, method: str | GradientMethod = "saliency", *, noise_level: float = 0.15,
                 samples: int = 16, variant: str = "smoothgrad", seed: int = 0, chunk_size: int | None = None,
                 output: OutputSelector = None, layout: str = "image", **options):
        if isinstance(method, str):
            if method not in _BASE_METHODS:
                raise ValueError(f"unknown inner method {method!r} for SmoothGrad; use one of "
                                 f"{', '.join(_BASE_METHODS)} or pass a gradient method instance")
            inner = _BASE_METHODS[method](model, output=output, layout=layout, **options)
        elif isinstance(method, GradientMethod):
            if options:
                raise ValueError("options go to the inner method's constructor; pass them there")
            if method.model is not model:
                raise InputError("the inner method must explain the same model as SmoothGrad")
            inner = method
        else:
            raise InputError(f"method must be a method name or a gradient method, got {type(method).__name__}")
        super().__init__(model, inner.reduction, inner.absolute, output=inner.output, layout=inner.layout)
        if variant not in NOISE_VARIANTS:
            raise ValueError(f"unknown SmoothGrad variant {variant!r}; use one of {', '.join(NOISE_VARIANTS)}")
        if not (isinstance(samples, int) and samples >= 1):
            raise ValueError(f"samples must be an int >= 1, got {samples!r}")
        check_upfront("SmoothGrad", "samples", samples, PER_POINT_BYTES, "samples' bookkeeping")
        check_chunk_size(chunk_size)
        if not noise_level >= 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level!r}")
        self.inner = inner
        self.noise_level = float(noise_level)
        self.samples = samples
        self.variant = variant
        self.seed = int(seed)
        self.chunk_size = chunk_size

    def reduce(self, attr: torch.Tensor) -> torch.Tensor:
        return self.inner.reduce(attr)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """The (S, ...) noise added to every input of ``x``: ``sigma * epsilon_s``, sigma per input;
        returned as (N, S, ...)."""
        eps = self.noise_draws(x)
        sigma = self.noise_level * _sample_range(x)
        return sigma[:, None] * eps[None]

    def noise_draws(self, x: torch.Tensor) -> torch.Tensor:
        """The (S, ...) standard normal draws (a constant of the method), checked to fit first."""
        check_upfront("SmoothGrad", "samples", self.samples, input_draw_bytes(x), "noise")
        return self.constant("normal", (self.samples, *x.shape[1:]), self.seed, x)

    def elementwise(self, x, target):
        scores = resolved = None
        per_pass = points_per_pass(self.chunk_size, self.samples, self._tracing)
        if not self._tracing:
            check_pass("SmoothGrad", x, min(per_pass, self.samples))
        looped = self.looped(math.ceil(self.samples / per_pass))
        if looped or not (self.folds_clean() and "clean" in inspect.signature(self.inner.elementwise).parameters):
            with torch.no_grad():
                scores = self.scores_of(x)
            resolved = self.resolve(scores, target)
        n = x.shape[0]
        total = total_sq = None
        if looped:
            total, total_sq = self._looped_sums(x, resolved, per_pass)
        noise = None if looped else self.noise(x)  # (N, S, ...)
        for start in range(0, 0 if looped else self.samples, per_pass):
            c = min(per_pass, self.samples - start)
            noisy = (x[:, None] + noise[:, start:start + c]).flatten(0, 1)  # sample-major: (N * c, ...)
            if resolved is None:
                scores, attr, resolved = self.inner.elementwise(noisy, target, clean=x)
            else:
                _, attr, _ = self.inner.elementwise(noisy, resolved.repeat_interleave(c, 0))
            attr = attr.view(n, c, *attr.shape[1:])
            if self.variant != "smoothgrad_sq":
                part = attr.sum(1)
                total = part if total is None else total + part
            if self.variant != "smoothgrad":
                part = attr.pow(2).sum(1)
                total_sq = part if total_sq is None else total_sq + part
        if self.variant == "smoothgrad":
            return scores, total / self.samples, resolved
        if self.variant == "smoothgrad_sq":
            return scores, total_sq / self.samples, resolved
        mean = total / self.samples
        return scores, total_sq / self.samples - mean * mean, resolved

    def _looped_sums(self, x: torch.Tensor, resolved: torch.Tensor, per_pass: int):
        """(sum of A_s, sum of A_s^2) over the samples (None where the variant needs no such sum), the passes one
        loop (:func:`~pyattr._loop.batched_loop`); the last chunk is padded with copies of the last noise tensor,
        counted with weight 0."""
        eps = self.noise_draws(x)
        index, keep = padded_passes(list(range(self.samples)), [1.0] * self.samples, per_pass, x)
        c = index.shape[1]
        sigma = self.noise_level * _sample_range(x)
        n = x.shape[0]
        plain, squared = self.variant != "smoothgrad_sq", self.variant != "smoothgrad"

        def one_pass(i: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
            noise = sigma[:, None] * eps[i.long()][None]  # (N, c, ...)
            noisy = (x[:, None] + noise).flatten(0, 1)
            _, attr, _ = self.inner.elementwise(noisy, resolved.repeat_interleave(c, 0))
            attr = attr.view(n, c, *attr.shape[1:])
            w = w.view(1, c, *[1] * (attr.dim() - 2))
            return (*((attr * w).sum(1),) * plain, *((attr.pow(2) * w).sum(1),) * squared)

        sums = [s.sum(0) for s in batched_loop(one_pass, index, keep)]
        return sums[0] if plain else None, sums[-1] if squared else None

    def metadata(self) -> dict[str, Any]:
        return {**self.inner.metadata(), "method": self.name, "inner": self.inner.name,
                "noise_level": self.noise_level, "samples": self.samples, "variant": self.variant,
                "seed": self.seed, "chunk_size": self.chunk_size}


def integration_points(steps: int, rule: str) -> tuple[list[float], list[float]]:
    """(alphas, weights) of the quadrature rule on [0, 1]: captum's points for every rule and captum's
    weights except for the trapezoid rule, whose weights here are 1/(n-1) with halved ends (captum's
    are 1/n with halved ends, which sum to (n-1)/n)."""
    if rule == "gausslegendre":
        import numpy as np

        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return [float(a) for a in 0.5 * (nodes + 1)], [float(w) for w in 0.5 * weights]
    if rule == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("the trapezoid rule needs steps >= 2")
        w = [1.0 / (steps - 1)] * steps
        w[0] = w[-1] = 0.5 / (steps - 1)
        return [i / (steps - 1) for i in range(steps)], w
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}.get(rule)
    if offset is None:
        raise ValueError(f"unknown integration rule {rule!r}; use one of {', '.join(IG_RULES)}")
    return [(i + offset) / steps for i in range(steps)], [1.0 / steps] * steps


def padded_passes(alphas: list[float], weights: list[float], per_pass: int, like: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The points of a looped multi-pass method as (passes, c) tensors, passes = ceil(P / per_pass) and
    c = ceil(P / passes) <= per_pass (the chunks as even as the count of passes allows); the last chunk is padded
    with copies of the last point of weight 0 (a loop's passes have one shape)."""
    total = len(alphas)
    passes = math.ceil(total / per_pass)
    c = math.ceil(total / passes)
    pad = passes * c - total
    return (constant_tensor(alphas + alphas[-1:] * pad, like).view(passes, c),
            constant_tensor(weights + [0.0] * pad, like).view(passes, c))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) or (N, C, L) inputs (edge-replicated borders)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    kernel = torch.tensor([t / sum(taps) for t in taps], dtype=x.dtype, device=x.device)
    channels = int(x.shape[1])
    if x.dim() == 3:
        return F.conv1d(F.pad(x, (radius, radius), mode="replicate"), kernel.view(1, 1, -1).repeat(channels, 1, 1),
                        groups=channels)
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


class IntegratedGradients(GradientMethod):
    r"""Integrated Gradients (Sundararajan, Taly & Yan 2017, arXiv:1703.01365).

    .. math:: A = (x - b) \odot \int_0^1 \nabla S_t(b + \alpha (x - b))\, d\alpha
              \approx (x - b) \odot \sum_k w_k \nabla S_t(b + \alpha_k (x - b))

    Completeness: :math:`\sum A = S_t(x) - S_t(b)` up to the quadrature error, which eager calls
    report per sample as ``result.completeness_error`` (one extra forward pass at the baseline).

    Args:
        model: a module mapping inputs to (N, K) scores.
        baseline: ``"zeros"``; ``"blur"`` (the input under a Gaussian blur of ``blur_sigma`` samples,
            images and signals); ``"uniform"`` (uniform noise over each input's [min, max], drawn once
            from ``seed``, the same for every input); or a tensor broadcastable to the inputs (one
            input's shape, or (N, ...) for eager calls).
        steps: the number of integration points.
        rule: ``"riemann_trapezoid"`` (default: points k/(n-1), weights 1/(n-1) with halved ends),
            ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"`` (captum's points, weights 1/n) or
            ``"gausslegendre"`` (captum's default). The integrand of a ReLU network is piecewise smooth
            with many kinks, where Gauss-Legendre's higher order buys nothing: on the built-in model
            (64 steps, 24 images) every rule's mean relative completeness error is 3e-3 to 5e-3 and
            Gauss-Legendre's is the largest (trapezoid 4.6e-3, Gauss-Legendre 5.1e-3 from a zero
            baseline; 2.7e-3 and 3.9e-3 from a blurred one).
        chunk_size: integration points per input in one batched pass (memory grows with
            batch x chunk_size); ``ceil(steps / chunk_size)`` passes in all. None (default): 16 in eager
            calls, all ``steps`` in an exported graph (one pass; pass an int to bound the runtime's memory).
        reduction, absolute: the channel reduction (default the signed ``"sum"``, so that the map
            adds up to the score difference) and whether ``|A|`` is taken first (default no).
        seed: seed of the ``"uniform"`` baseline.
        blur_sigma: the standard deviation of the ``"blur"`` baseline, in pixels (samples).
        output, layout: as :class:`Saliency`.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> ig = pyattr.IntegratedGradients(model, steps=64)
        >>> result = ig(torch.rand(2, 3, 64, 64), target=0)
        >>> result.completeness_error.shape
        torch.Size([2])
    """

    name = "integratedgradients"
    signed_evidence = True
    default_reduction = "sum"

    def __init__(self, model: nn.Module, baseline: str | torch.Tensor = "zeros", steps: int = 32,
                 rule: str = "riemann_trapezoid", chunk_size: int | None = None, reduction: str = "sum",
                 absolute: bool | None = None, *, seed: int = 0, blur_sigma: float = 4.0,
                 output: OutputSelector = None, layout: str = "image"):
        super().__init__(model, reduction, absolute, output=output, layout=layout)
        if isinstance(baseline, torch.Tensor):
            baseline = baseline.detach()
        elif baseline not in IG_BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; use one of {', '.join(IG_BASELINES)} or a tensor")
        if isinstance(baseline, str) and baseline == "blur" and layout == "tabular":
            raise InputError("a blurred baseline needs images or signals; use 'zeros', 'uniform' or a tensor")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        check_upfront("IntegratedGradients", "steps", steps, PER_POINT_BYTES, "integration points")
        check_chunk_size(chunk_size)
        if not blur_sigma > 0:
            raise ValueError(f"blur_sigma must be > 0, got {blur_sigma!r}")
        self.alphas, self.weights = integration_points(steps, rule)
        self.baseline = baseline
        self.steps = steps
        self.rule = rule
        self.chunk_size = chunk_size
        self.seed = int(seed)
        self.blur_sigma = float(blur_sigma)

    def baseline_of(self, x: torch.Tensor) -> torch.Tensor:
        """The baseline for inputs ``x``, shaped like ``x``."""
        if isinstance(self.baseline, torch.Tensor):
            return tensor_baseline(self.baseline, x, check=not self._tracing)
        if self.baseline == "zeros":
            return torch.zeros_like(x)
        if self.baseline == "blur":
            return gaussian_blur(x, self.blur_sigma)
        noise = self.constant("uniform", tuple(x.shape[1:]), self.seed, x)
        low = x.flatten(1).amin(1).view(-1, *[1] * (x.dim() - 1))
        return low + _sample_range(x) * noise[None]

    def elementwise(self, x, target):
        scores, attr, resolved, _ = self._integrate(x, target, diagnostics=False)
        return scores, attr, resolved

    def elementwise_with_diagnostics(self, x, target):
        return self._integrate(x, target, diagnostics=True)

    def _integrate(self, x: torch.Tensor, target: torch.Tensor, diagnostics: bool):
        scores = resolved = None
        per_pass = points_per_pass(self.chunk_size, self.steps, self._tracing)
        if not self._tracing:
            check_pass("IntegratedGradients", x, min(per_pass, self.steps))
        looped = self.looped(math.ceil(self.steps / per_pass))
        if looped or not self.folds_clean():  # else from the first pass, which runs the clean input too
            with torch.no_grad():
                scores = self.scores_of(x)
            resolved = self.resolve(scores, target)
        baseline = self.baseline_of(x).detach()
        delta = x - baseline
        n = x.shape[0]
        shape = (1, -1) + (1,) * (x.dim() - 1)  # (1, c, 1, ...) against (N, c, ...)
        total = None
        if looped:
            alphas, weights = padded_passes(self.alphas, self.weights, per_pass, x)
            c = alphas.shape[1]

            def one_pass(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                points = (baseline[:, None] + a.view(shape) * delta[:, None]).flatten(0, 1)
                _, grads, _ = self.input_gradients(points, resolved.repeat_interleave(c, 0))
                return (grads.view(n, c, *grads.shape[1:]) * w.view(1, -1, 1, *[1] * (x.dim() - 1))).sum(1)

            total = batched_loop(one_pass, alphas, weights).sum(0)  # one loop: (passes, N, T, ...) summed
        for start in range(0, 0 if looped else self.steps, per_pass):
            alphas = self.alphas[start:start + per_pass]
            weights = self.weights[start:start + per_pass]
            c = len(alphas)
            a = torch.tensor(alphas, dtype=x.dtype, device=x.device).view(shape)
            points = (baseline[:, None] + a * delta[:, None]).flatten(0, 1)
            if resolved is None:
                scores, grads, resolved = self.input_gradients(points, target, clean=x)
            else:
                _, grads, _ = self.input_gradients(points, resolved.repeat_interleave(c, 0))
            w = torch.tensor(weights, dtype=x.dtype, device=x.device).view(1, -1, 1, *[1] * (x.dim() - 1))
            part = (grads.view(n, c, *grads.shape[1:]) * w).sum(1)  # (N, T, ...)
            total = part if total is None else total + part
        attr = delta[:, None] * total
        extra = {}
        if diagnostics:
            with torch.no_grad():
                at_baseline = self.scores_of(baseline)
            gap = scores.gather(1, resolved) - at_baseline.gather(1, resolved)  # (N, T)
            extra["completeness_error"] = (attr.flatten(2).sum(2) - gap).abs()
        return scores, self._abs(attr), resolved, extra

    def metadata(self) -> dict[str, Any]:
        baseline = "tensor" if isinstance(self.baseline, torch.Tensor) else self.baseline
        return {**super().metadata(), "baseline": baseline, "steps": self.steps, "rule": self.rule,
                "chunk_size": self.chunk_size, "seed": self.seed, "blur_sigma": self.blur_sigma}
