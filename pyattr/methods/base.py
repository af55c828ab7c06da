"""What every attribution method shares: input/target checks, the eager call, the traceable graph."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .._callview import active_view, call_view, is_tracing, set_tracing
from ..errors import InputError
from ..postprocess import nan_like, normalize_minmax, resize_bilinear
from ..targets.base import CLASS_TARGET, Target, as_target, bound_target, current_target

TargetLike = "int | list[int] | torch.Tensor | Target | None"
OutputSelector = int | str | Callable[[Any], torch.Tensor] | None

LAYOUTS: dict[str, str] = {"image": "(N, C, H, W)", "signal": "(N, C, L)", "tabular": "(N, F)"}
"""Input layouts and their shapes. Only images are resized; every layout is normalized per sample."""


@dataclass
class Attribution:
    """The result of an attribution call.

    Attributes:
        maps: the raw map resized to the input's resolution (images only) and min-max normalized
            to [0, 1] per sample (per sample and target with several targets): (N, H, W) for images
            (N, C, H, W with ``reduction="none"``), (N, L) or (N, C, L) for signals, (N, F) for tables.
        raw: the method's raw map before resizing and normalization (saliency: (N, H, W); CAMs:
            (N, h, w) at the layer's resolution).
        scores: (N, K) model outputs (logits) for the inputs.
        target: (N,) long, the class explained for each sample (arg-max where none was given);
            (N, T) when several targets per input were asked for, and ``maps``/``raw`` are then
            (N, T, ...). In exported graphs -1 marks a sample that has no valid map (its ``maps`` and
            ``raw`` are NaN): a non-finite input or score, or a target that is not a class id.
        completeness_error: for methods whose attributions should add up to a score difference
            (Integrated Gradients: ``|sum(attr) - (F(x) - F(baseline))|``), that error per sample
            (and target); ``None`` for the others. Eager calls only; not an output of exported graphs.
        outputs: the target's extra outputs (:attr:`pyattr.targets.Target.outputs`), e.g. a similarity
            target's ``"embedding"`` (N, D); empty for class targets.

    With a :class:`~pyattr.targets.Target` other than a class logit, ``scores`` are the target's scores:
    a segmentation target's per-class scores summed over the region (N, K), a similarity target's
    similarity (N, 1).
    """

    maps: torch.Tensor
    raw: torch.Tensor
    scores: torch.Tensor
    target: torch.Tensor
    completeness_error: torch.Tensor | None = None
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def in_inference_mode(*values: Any) -> bool:
    """Whether autograd is blocked: ``torch.inference_mode()`` is on, or a value is an inference tensor.
    Attribution and export need autograd; they then leave inference mode for the call
    (``with torch.inference_mode(False)``) and work on :func:`normal_copies` of their inputs."""
    return torch.is_inference_mode_enabled() or any(
        isinstance(v, torch.Tensor) and v.is_inference() for v in values
    )


def normal_copies(*values: Any) -> tuple[Any, ...]:
    """``values`` with every inference tensor cloned (call outside inference mode)."""
    return tuple(v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v for v in values)


def resolve_target(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targets with -1 replaced by each sample's arg-max class. ``target``: (N,) or (N, T).

    An id that is not a class (< -1 or >= K, which eager calls reject and an exported graph cannot)
    is replaced by the arg-max too, so that every index stays in range; :func:`valid_samples` marks
    such samples and the graph's outputs for them are made visibly invalid (see
    :class:`AttributionMethod`)."""
    best = scores.argmax(1)
    if target.dim() == 2:
        best = best[:, None]
    in_range = (target >= 0) & (target < scores.shape[1])
    return torch.where(in_range, target, best)


def valid_samples(x: torch.Tensor, scores: torch.Tensor, target: torch.Tensor,
                  inputs_finite: bool = False) -> torch.Tensor:
    """Which (sample, target) pairs can have a meaningful map: the sample's input and scores are all
    finite and the target is -1 or a class id in [0, K). Shape of ``target``: (N,) or (N, T). Traceable.
    ``inputs_finite``: ``x`` is known to be finite (an eager call checked it): its element-wise test is skipped
    (0.3 ms for a 224x224 image on one CPU thread), the result is the same."""
    finite = torch.isfinite(scores.flatten(1)).all(1)
    if not inputs_finite:
        finite = torch.isfinite(x.flatten(1)).all(1) & finite
    if target.dim() == 2:
        finite = finite[:, None]
    return finite & (target >= -1) & (target < scores.shape[1])


def mark_invalid(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values`` (N, ...) or (N, T, ...) with the entries of invalid samples set to NaN."""
    mask = valid.reshape(*valid.shape, *[1] * (values.dim() - valid.dim()))
    return torch.where(mask, values, nan_like(values))


def select_target(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resolve targets (-1 means arg-max) and return (sum of the selected scores, resolved target).

    Traceable: no Python branching on values. Summing over the batch gives each sample's
    gradient of its own score, since samples do not interact in eval mode.
    """
    resolved = resolve_target(scores, target)
    return scores.gather(1, resolved[:, None]).sum(), resolved


def select_output(output: Any, selector: Any) -> Any:
    """Pick the scores out of a model's output: ``selector`` is ``None`` (the output itself),
    an int (index into a tuple/list), a str (key of a dict) or a callable."""
    if selector is None:
        return output
    if callable(selector):
        return selector(output)
    return output[selector]


MAX_UPFRONT_BYTES = 2 * 1024**3
"""What a method may set aside up front for its count options (IG's steps, the samples of SmoothGrad, GradientSHAP,
SS-CAM / IS-CAM and Smooth Grad-CAM++, RISE's masks, an int number of random baselines): their noise, baselines,
mask grids and per-point values are made before the passes, which ``chunk_size`` then splits. A count whose share
would pass this raises :class:`InputError` naming the option (before anything is allocated)."""

MAX_PASS_BYTES = 2 * 1024**3
"""The default bound on one eager pass's input rows (N x chunk copies of an input); the perturbation methods take
their own ``max_pass_bytes``. Above it a call raises :class:`InputError` naming the ``chunk_size`` that fits."""

PER_POINT_BYTES = 64
"""Bookkeeping per step / sample / mask (Python floats and ints in lists, index tensors): what a count costs before
any image is touched."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n < 2**40 else f"{n / 2**40:.1f} TiB"


def check_upfront(owner: str, option: str, count: int, per_item: int, what: str) -> None:
    """Raise :class:`InputError` when ``count`` items of ``per_item`` bytes (``what``) would pass
    :data:`MAX_UPFRONT_BYTES`; the message names ``option`` and the largest count that fits."""
    need = int(count) * int(per_item)
    if need > MAX_UPFRONT_BYTES:
        fits = max(1, MAX_UPFRONT_BYTES // max(1, int(per_item)))
        raise InputError(f"{owner}: {option}={count} would set aside {_gib(need)} up front for its {what} "
                         f"({per_item} bytes each), over the {_gib(MAX_UPFRONT_BYTES)} a call may; use {option}={fits} "
                         "or fewer (they are drawn before the passes, so chunk_size does not split them)")


def input_draw_bytes(x: torch.Tensor) -> int:
    """Bytes of one input-sized draw: drawn in float32 (:func:`~pyattr.methods.gradient.seeded_tensor`), then
    copied to the inputs' dtype."""
    return x[0].numel() * (4 + x.element_size())


def check_pass(owner: str, x: torch.Tensor, per_input: int, *, what: str = "copies of the inputs",
               max_bytes: int | None = None, per: str = "points per pass") -> None:
    """Raise :class:`InputError` when one eager pass of ``per_input`` copies (``what``) of each of the N inputs of
    ``x`` would pass ``max_bytes`` (default :data:`MAX_PASS_BYTES`; a method's own ``max_pass_bytes`` is named as
    such); the message names the ``chunk_size`` (``per``) that fits."""
    limit = MAX_PASS_BYTES if max_bytes is None else max_bytes
    n = int(x.shape[0])
    per_row = x[0].numel() * x.element_size() if n else 0
    need = n * int(per_input) * per_row
    if need > limit:
        fits = max(1, limit // (n * per_row))
        budget = (f"pyattr.methods.base.MAX_PASS_BYTES ({_gib(limit)})" if max_bytes is None
                  else f"max_pass_bytes={limit} ({_gib(limit)})")
        raise InputError(f"{owner} would put {n} x {per_input} = {n * per_input} {what} ({_gib(need)}, the model's "
                         f"activations on top) through the model in one pass, over {budget}: pass chunk_size={fits} "
                         f"or less ({per}), a smaller batch" + (", or raise max_pass_bytes" if max_bytes else ""))


class AttributionMethod:
    """Base class. A subclass implements :meth:`attribute_raw`, a traceable function of tensors.

    Calling the method (``method(x, target)``) runs it eagerly and returns an :class:`Attribution`;
    :meth:`graph` is the single function that :func:`pyattr.export` traces into one graph.

    Thread safety: every call runs on its own view of the model (:mod:`pyattr._callview`): a copy of
    the module tree that shares the model's tensors, in eval mode, on which the call's hooks and
    LRP's canonical forwards live. The user's modules are never changed, not even during the call
    (training flags, hooks, attributes, weights; no parameter receives ``.grad``), and the state of a
    call (captured activations, whether it is being traced) belongs to it. One method object, or one
    per thread, may therefore be called from many threads at once on one model, in eval or training
    mode, and each call returns what it would return alone (bit for bit in ``tests/test_concurrency.py``,
    8 threads, one intra-op thread each). Inside a call ``self.model`` is the call's view (in the
    calling thread only); outside, the model given. (Not covered: ``torch.backends`` settings are
    process-wide, e.g. the attention kernel that export tracing selects with ``sdpa_kernel``.)

    Args:
        model: the module to explain.
        output: which part of the model's output holds the (N, K) scores, for models that return a
            tuple, list or dict: an index (``output=0``), a key (``output="logits"``) or a callable
            (``output=lambda out: out.logits``). ``None``: the output is the scores.
        layout: ``"image"`` (N, C, H, W; default), ``"signal"`` (N, C, L) or ``"tabular"`` (N, F),
            for methods that accept non-image inputs.

    Inputs that cannot give a meaningful map: eager calls raise :class:`~pyattr.errors.InputError` for
    inputs that hold NaN or infinity, for models whose scores are not finite, and for targets that are
    not class ids (floats, bools, ids < -1 or >= K). An exported graph cannot raise: for such a sample
    (a non-finite input or score, a target < -1 or >= K) it returns ``maps`` and ``raw`` full of NaN and
    ``explained_class`` -1, while the other samples of the batch get their usual results (``scores``
    are the model's, whatever they are). A map that comes out non-finite for another reason (e.g. a
    NaN gradient) is NaN as a whole after normalization (:func:`~pyattr.postprocess.normalize_minmax`).

    Several targets per input: a (N, T) target tensor gives (N, T, ...) maps. Methods with
    ``multi_target = True`` do one forward pass and T backward passes; the others run on the
    batch repeated T times (``x.repeat_interleave(T, 0)``), which costs T forward passes.
    """

    name: ClassVar[str] = "method"
    layouts: ClassVar[tuple[str, ...]] = ("image",)
    multi_target: ClassVar[bool] = False
    signed: ClassVar[bool] = False
    """True when the raw map is signed evidence (LRP's relevance), drawn centered on a diverging colormap:
    ``pyattr explain`` does, and exported files record it (``"signed"``) for ``pyattr run``."""
    graph_outputs: ClassVar[tuple[str, ...]] = ()
    """Names of outputs that :meth:`graph` returns after the method's and the target's (exported files record
    them in the metadata's ``outputs``), e.g. :class:`pyattr.metrics.graph.MethodWithMetrics`' metric outputs."""
    depends_on_target: ClassVar[bool] = True
    """False for a method whose map is the same whatever the target (Eigen-CAM: a principal component of the
    activations); its ``scores`` and ``target`` are still the model's and the resolved ones."""

    def __init__(self, model: nn.Module, *, output: OutputSelector = None, layout: str = "image"):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if layout not in self.layouts:
            raise InputError(f"{type(self).__name__} explains inputs of layout {', '.join(self.layouts)}; "
                             f"got layout={layout!r}")
        if output is not None and not isinstance(output, (int, str)) and not callable(output):
            raise InputError(f"output must be an int, a str, a callable or None, got {type(output).__name__}")
        self._model = model
        self.output = output
        self.layout = layout

    @property
    def model(self) -> nn.Module:
        """The explained model; within a call of this method (in the calling thread), its per-call view."""
        view = active_view(self._model)
        return self._model if view is None else view.root

    @model.setter
    def model(self, model: nn.Module) -> None:
        self._model = model

    @property
    def _tracing(self) -> bool:
        """Whether the calling thread is tracing for export (eager-only checks are skipped then).
        Per thread, not per method: setting it affects only the calling thread."""
        return is_tracing()

    @_tracing.setter
    def _tracing(self, value: bool) -> None:
        set_tracing(value)

    def in_call(self, module: nn.Module) -> nn.Module:
        """The current call's view of ``module`` (a module of the model, e.g. a layer resolved when the
        method was made); ``module`` itself outside a call. Raises :class:`InputError` for a module that
        pyattr cannot hook (a TorchScript module shared by the view)."""
        view = active_view(self._model)
        return module if view is None else view.hookable(module)

    # -- to implement --------------------------------------------------------------------------
    def attribute_raw(
        self, x: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (scores (N,K), raw map, resolved target (N,)). ``target``: (N,) long, -1 = arg-max.

        Methods with ``multi_target = True`` also take an (N, T) target and return an (N, T, ...)
        raw map and an (N, T) resolved target.
        """
        raise NotImplementedError

    def attribute_with_diagnostics(
        self, x: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`attribute_raw` plus per-sample diagnostics for eager calls (e.g. Integrated
        Gradients' ``completeness_error``). Not part of the exported graph."""
        scores, raw, resolved = self.attribute_raw(x, target)
        return scores, raw, resolved, {}

    def metadata(self) -> dict[str, Any]:
        """What goes into an exported file's metadata (method name and options)."""
        meta: dict[str, Any] = {"method": self.name}
        if self.layout != "image":
            meta["layout"] = self.layout
        if self.signed:
            meta["signed"] = True
        return meta

    # -- shared --------------------------------------------------------------------------------
    def scores_of(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, K) scores of the call's target (:mod:`pyattr.targets`; a class target's are the model's
        logits) for ``x``: the model's output, picked out by ``output``, given to the target with its
        run-time inputs. ``x`` may be the call's batch or a sample-major expansion of it.

        Eager calls check the shapes (skipped while tracing)."""
        out = select_output(self.model(x), self.output)
        bound = current_target()
        if bound is None or bound.target is CLASS_TARGET:
            if not self._tracing:
                check_scores(out, x, self.output)
            return out
        return bound.scores(out, x, checks=not self._tracing)

    def target_kind(self) -> Target:
        """The target of the current call (the default class target outside a call)."""
        bound = current_target()
        return CLASS_TARGET if bound is None else bound.target

    def select(self, scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`select_target`, plus a range check on eager calls (skipped while tracing)."""
        if not self._tracing:
            check_target_range(scores, target)
        return select_target(scores, target)

    def resolve(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """:func:`resolve_target`, plus a range check on eager calls (skipped while tracing)."""
        if not self._tracing:
            check_target_range(scores, target)
        return resolve_target(scores, target)

    def postprocess(self, raw: torch.Tensor, x: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """Raw maps -> maps: images are resized (bilinear) to the input's (H, W) when their last
        two dims differ from it; then every map is min-max normalized. ``lead``: the number of
        leading dims that index maps (1: (N, ...); 2: (N, T, ...))."""
        maps = raw
        if self.layout == "image" and raw.dim() >= lead + 2 and tuple(raw.shape[-2:]) != tuple(x.shape[-2:]):
            flat = raw.reshape(-1, *raw.shape[-2:])
            maps = resize_bilinear(flat, tuple(x.shape[-2:])).reshape(*raw.shape[:-2], *x.shape[-2:])
        if lead == 1:
            return normalize_minmax(maps)
        return normalize_minmax(maps.flatten(0, lead - 1)).view_as(maps)

    def graph(
        self, x: torch.Tensor, target: torch.Tensor | None, *inputs: torch.Tensor, kind: Target | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The whole traceable computation: (scores, resolved target, raw map, normalized maps, then the
        target's extra outputs). ``kind``: the target (default: a class logit), whose run-time inputs
        (``kind.inputs``, each (N, ...)) follow ``target``; ``target`` is None for a kind that derives its ids
        from its inputs (:attr:`~pyattr.targets.Target.target_input` False). (N, T) targets give (N, T, ...) maps.

        Runs on a per-call view of the model (the enclosing call's when there is one)."""
        kind = CLASS_TARGET if kind is None else kind
        if len(inputs) != len(kind.inputs):
            raise InputError(f"the {kind.kind} target takes the inputs {', '.join(kind.inputs) or 'none'} after "
                             f"target; got {len(inputs)}")
        given = kind.prepare_inputs(x, dict(zip(kind.inputs, inputs)))
        with call_view(self._model), bound_target(kind, given, x.shape[0]) as bound:
            self.check_target_kind(kind)
            if target is None:  # a kind without a target input (Target.target_input): ids from its inputs
                target = kind.graph_target(x, bound.inputs)
            scores, resolved, raw, maps, _ = self._compute_targets(x, target, bound, diagnostics=False)
            extra = tuple(bound.outputs[name] for name in kind.outputs)
        return (scores, resolved, raw, maps, *extra)

    def check_target_kind(self, kind: Target) -> None:
        """Raise :class:`InputError` when this method cannot explain targets of ``kind`` (all can by default)."""

    def _compute(self, x: torch.Tensor, target: torch.Tensor, diagnostics: bool, inputs_checked: bool = False):
        """``inputs_checked``: ``x`` passed :meth:`_check_input` (an eager call), so it is finite."""
        with torch.enable_grad():
            if diagnostics:
                scores, raw, resolved, extra = self.attribute_with_diagnostics(x, target)
            else:
                scores, raw, resolved = self.attribute_raw(x, target)
                extra = {}
        maps = self.postprocess(raw, x, lead=target.dim())
        # what eager calls reject (non-finite inputs or scores, target ids that are not classes) an exported
        # graph cannot: its outputs for those samples are made visibly invalid instead of plausible
        valid = valid_samples(x, scores.detach(), target, inputs_finite=inputs_checked)
        resolved = torch.where(valid, resolved, torch.full_like(resolved, -1))
        raw, maps = mark_invalid(raw.detach(), valid), mark_invalid(maps.detach(), valid)
        return scores.detach(), resolved, raw, maps, {k: v.detach() for k, v in extra.items()}

    def __call__(self, x: torch.Tensor, target: TargetLike = None) -> Attribution:
        """Explain ``x`` (N, ...) for ``target``: class ids (None / -1: the arg-max class, an int, an (N,) or
        (N, T) tensor) or a :class:`~pyattr.targets.Target` (segmentation, similarity, your own kind)."""
        if in_inference_mode(x, target):
            with torch.inference_mode(False):
                return self(*normal_copies(x, target))
        kind, classes = as_target(target)
        if in_inference_mode(classes):
            with torch.inference_mode(False):
                classes = normal_copies(classes)[0]
        with call_view(self._model):
            x = self._check_input(x)
            self.check_target_kind(kind)
            if classes is None:
                classes = kind.default_classes(x)
            t = self._check_target(classes, x.shape[0], x.device)
            with bound_target(kind, kind.prepare_inputs(x, kind.run_time_inputs(x)), x.shape[0]) as bound:
                return self._eager(x, t, bound)

    def _compute_targets(self, x: torch.Tensor, t: torch.Tensor, bound, diagnostics: bool, inputs_checked: bool = False):
        """:meth:`_compute` for (N,) or (N, T) targets: a method without ``multi_target`` runs on the batch
        repeated T times (sample-major) and its results are viewed back as (N, T, ...)."""
        if t.dim() == 2 and not self.multi_target:
            n, k = t.shape
            bound.repeats = k
            try:
                scores, resolved, raw, maps, extra = self._compute(x.repeat_interleave(k, 0), t.reshape(-1),
                                                                   diagnostics, inputs_checked)
            finally:
                bound.repeats = 1
            scores = scores.view(n, k, -1)[:, 0]
            resolved, raw, maps = (v.view(n, k, *v.shape[1:]) for v in (resolved, raw, maps))
            extra = {key: v.view(n, k, *v.shape[1:]) for key, v in extra.items()}
            return scores, resolved, raw, maps, extra
        return self._compute(x, t, diagnostics, inputs_checked)

    def _eager(self, x: torch.Tensor, t: torch.Tensor, bound) -> Attribution:
        # x passed _check_input (finite): valid_samples need not test it again
        scores, resolved, raw, maps, extra = self._compute_targets(x, t, bound, True, inputs_checked=True)
        return Attribution(maps=maps, raw=raw, scores=scores, target=resolved,
                           completeness_error=extra.get("completeness_error"),
                           outputs={k: v.detach() for k, v in bound.outputs.items()})

    def _check_input(self, x: Any) -> torch.Tensor:
        shape = LAYOUTS[self.layout]
        if not isinstance(x, torch.Tensor):
            raise InputError(
                f"inputs must be a torch.Tensor of shape {shape}, got {type(x).__name__}; "
                "convert images with torch.as_tensor(...) and stack them into a batch"
            )
        rank = shape.count(",") + 1
        if x.dim() != rank:
            hint = " (add a batch dimension with x[None])" if x.dim() == rank - 1 else ""
            if self.layout == "image" and x.dim() in (2, 3) and "signal" in self.layouts:
                hint += "; for 1-D signals (N, C, L) pass layout='signal', for tables (N, F) layout='tabular'"
            raise InputError(f"inputs must have shape {shape}, got {tuple(x.shape)}{hint}")
        if not x.is_floating_point():
            raise InputError(
                f"inputs must be floating point, got {x.dtype}; convert uint8 images with x.float() / 255 "
                "and apply the model's normalization"
            )
        if x.shape[0] == 0:
            raise InputError("inputs hold no sample (batch size 0)")
        values = x.detach()
        # one reduction first: a finite sum means every value is finite (an inf or a NaN makes the sum inf or NaN);
        # only a non-finite sum (or a sum of finite values that overflows) needs the element-wise test
        if not bool(torch.isfinite(values.sum())):
            finite = torch.isfinite(values.flatten(1)).all(1)
            if not bool(finite.all()):
                bad = torch.nonzero(~finite).flatten().tolist()
                shown = ", ".join(str(i) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
                raise InputError(
                    f"inputs hold NaN or infinite values (sample{'s' if len(bad) > 1 else ''} {shown}): no "
                    "attribution map of them has a meaning; fix or drop those inputs (e.g. torch.nan_to_num for a "
                    "few bad pixels)"
                )
        try:
            param = next(self.model.parameters())
        except StopIteration:
            param = None
        if param is not None and param.device != x.device:
            raise InputError(
                f"inputs are on {x.device} but the model is on {param.device}; move one with .to(device)"
            )
        view = active_view(self._model)
        modules = view.modules() if view is not None else self.model.modules()
        # the modules' own dicts, not parameters() / buffers(): 5x faster (resnet50: 0.06 vs 0.3 ms)
        if any(t is not None and t.is_inference() for m in modules for d in (m._parameters, m._buffers)
               for t in d.values()):
            raise InputError(
                "the model's parameters or buffers were created under torch.inference_mode(), so autograd cannot "
                "differentiate through them; build or load the model outside inference_mode"
            )
        return x.detach()

    def _check_target(self, target: Any, n: int, device: torch.device) -> torch.Tensor:
        if target is None:
            return torch.full((n,), -1, dtype=torch.long, device=device)
        if isinstance(target, bool):
            raise InputError("target must be a class index, not a bool")
        if isinstance(target, int):
            if target < 0:
                raise InputError(f"target must be a class index >= 0, got {target}")
            return torch.full((n,), target, dtype=torch.long, device=device)
        t = torch.as_tensor(target, device=device)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise InputError(f"target must hold integer class indices, got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(n)
        if not (t.shape == (n,) or (t.dim() == 2 and t.shape[0] == n and t.shape[1] > 0)):
            raise InputError(f"target must be None, an int, an ({n}, T) tensor (T classes per input) or a "
                             f"({n},) tensor of class ids, got shape {tuple(t.shape)}")
        if bool((t < -1).any()):
            raise InputError("target holds negative class ids (-1 alone means 'the arg-max class')")
        return t.long()


def check_target_range(scores: torch.Tensor, target: torch.Tensor) -> None:
    """Eager-only check that targets index into the scores (raises InputError)."""
    k = scores.shape[1]
    if bool((target >= k).any()):
        bad = int(target.max())
        raise InputError(f"target class {bad} is out of range: the model has {k} outputs (0..{k - 1})")


def check_scores(scores: Any, x: torch.Tensor, selector: Any) -> None:
    """Eager-only check that the (selected) model output is an (N, K) tensor of finite scores (raises InputError)."""
    if isinstance(scores, (tuple, list, dict)):
        kind = type(scores).__name__
        how = "output=0 (an index)" if not isinstance(scores, dict) else f"output={next(iter(scores), 'key')!r}"
        raise InputError(f"the model returned a {kind}, not a tensor of scores; pick the scores with {how} "
                         "or a callable output=...")
    if not isinstance(scores, torch.Tensor):
        raise InputError(f"the model's scores must be a tensor, got {type(scores).__name__}")
    if scores.dim() != 2 or scores.shape[0] != x.shape[0]:
        hint = "" if selector is None else f" (after output={selector!r})"
        raise InputError(f"the model's scores must have shape (N, K) with N = {x.shape[0]} inputs, got "
                         f"{tuple(scores.shape)}{hint}")
    values = scores.detach()
    # one reduction first (called once per pass of the perturbation methods): a finite sum means every score is
    # finite (an inf or a NaN makes the sum inf or NaN); only a non-finite sum (or a sum of finite scores that
    # overflows) needs the element-wise test
    if values.is_floating_point() and bool(torch.isfinite(values.sum())):
        return
    finite = torch.isfinite(values).all(1)
    if not bool(finite.all()):
        count = int((~finite).sum())
        raise InputError(
            f"the model's scores are NaN or infinite for {count} of {x.shape[0]} inputs (finite inputs): the "
            "target score has no gradient that means anything; check the model (overflow in float16? a division "
            "by zero?) and the inputs' range and normalization")
