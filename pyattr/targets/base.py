"""Targets: the scalar objective a method explains, between the model's output and the method.

A :class:`Target` maps the model's (selected) output, plus per-sample run-time inputs (a region mask, a
reference embedding), to per-sample scores ``(N, K)``; the method explains ``scores[n, target[n]]``, the
target's class id (-1: the arg-max of the scores). Methods never index logits themselves: they call
``method.scores_of(x)``, which runs the model and hands its output to the target of the call.

Kinds: :class:`ClassTarget` (a class logit; the default), :class:`~pyattr.targets.SegmentationTarget`
(a class's per-pixel scores summed over a region), :class:`~pyattr.targets.SimilarityTarget` (cosine or dot
product with a reference embedding). A new kind is a subclass of :class:`Target` (see its docstring).

Exported graphs take the target's run-time inputs as graph inputs after ``images`` and ``target``
(:attr:`Target.inputs`), each with the batch as its first dimension, and may return extra outputs after
``scores, explained_class, raw, maps`` (:attr:`Target.outputs`, e.g. the embedding).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import InputError


class Target:
    """Base class of targets. A subclass sets :attr:`kind`, :attr:`inputs` (names of its per-sample
    run-time tensors) and :attr:`outputs` (names of extra graph outputs), and implements :meth:`scores`
    (traceable: tensor ops only, no Python branch on values). Optional: :meth:`check_output` (eager
    checks of the model's output, raising :class:`InputError`), :meth:`run_time_inputs` (the values
    given to the target object, checked, as (N, ...) tensors), :meth:`example_inputs` (tensors to trace
    an export with), :meth:`extra_outputs` and :meth:`metadata`.

    Args:
        classes: the class id(s) to explain, as for a plain ``target``: ``None`` (-1, the arg-max of the
            target's scores), an int, an (N,) tensor or an (N, T) tensor of ids.

    Example (a custom kind: a class's logit minus the mean logit of the others; no run-time input)::

        class Contrast(pyattr.targets.Target):
            kind = "contrast"

            def scores(self, output, inputs):
                k = output.shape[1]
                return output - (output.sum(1, keepdim=True) - output) / (k - 1)

        pyattr.GradCAM(model, "layer4")(x, Contrast(classes=3))
    """

    kind: ClassVar[str] = "target"
    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()
    convention: ClassVar[str] = "target is an int64 (N,) tensor of ids into the target's scores; -1: the arg-max"
    class_scores: ClassVar[bool] = False
    """True when the scores are the model's class logits themselves (methods that read a classifier's weights,
    such as CAM, need it)."""
    target_input: ClassVar[bool] = True
    """False when exported graphs take no ``target`` input: the graph derives the ids from the target's own
    inputs (:meth:`graph_target`; a detection target explains every box it is given)."""

    def __init__(self, classes: Any = None):
        self.classes = classes

    # -- to implement ---------------------------------------------------------------------------
    def scores(self, output: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, K) scores from the model's output and the run-time inputs (each (N, ...)). Traceable."""
        raise NotImplementedError

    def check_output(self, output: Any, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
        """Eager-only checks of the model's output (and of the inputs against it); raise InputError."""

    def run_time_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-sample run-time tensors for the batch ``x`` (N, ...), checked; eager calls."""
        return {}

    def example_inputs(self, x: torch.Tensor, output: Any) -> dict[str, torch.Tensor]:
        """Tensors to trace an export with, batch ``x.shape[0]``; ``output``: the model's output for ``x``."""
        return self.run_time_inputs(x)

    def extra_outputs(self, output: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extra graph outputs (named in :attr:`outputs`) computed from the model's output."""
        return {}

    def evaluate(self, output: Any, inputs: dict[str, torch.Tensor], outputs: bool
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(:meth:`scores`, :meth:`extra_outputs` when ``outputs``, else {}): a kind whose outputs share work
        with its scores (a detection target's matching) computes both at once here."""
        return self.scores(output, inputs), (self.extra_outputs(output, inputs) if outputs else {})

    def check_export(self, method: Any) -> None:
        """Raise :class:`~pyattr.errors.ExportError` before tracing when ``method``'s model cannot be exported
        with this target (default: nothing to check)."""

    def prepare_inputs(self, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The run-time inputs as the scores use them, given the batch ``x`` (eager calls and exported graphs
        alike; traceable), e.g. boxes clipped to the image. Default: unchanged."""
        return inputs

    def default_classes(self, x: torch.Tensor) -> Any:
        """The class ids of an eager call whose target gave none (``classes=None``); None: -1, the arg-max."""
        return None

    def graph_target(self, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ids an exported graph explains when the kind takes no ``target`` input (:attr:`target_input`)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """What an exported file records about the target (JSON values)."""
        return {"kind": self.kind}

    def output_metadata(self, output: Any) -> dict[str, Any]:
        """What an exported file records about the model's output on the example (JSON values, merged into
        :meth:`metadata`), e.g. a detector's number of classes, which its graph's outputs do not show."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(classes={self.classes!r})"


class ClassTarget(Target):
    """A class logit of an (N, K) classifier output: today's behaviour and the default.

    ``method(x, 3)`` and ``method(x, ClassTarget(3))`` are the same call."""

    kind = "class"
    convention = "target is an int64 (N,) tensor of class ids; -1 explains the arg-max class"
    class_scores = True

    def scores(self, output: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return output

    def check_output(self, output: Any, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
        from ..methods.base import check_scores

        check_scores(output, x, None)


CLASS_TARGET = ClassTarget()


def as_target(target: Any) -> tuple[Target, Any]:
    """(the target object, its class ids) for what a method was called with: a :class:`Target`, or
    class ids for the default :class:`ClassTarget`."""
    if isinstance(target, Target):
        return target, target.classes
    if isinstance(target, type) and issubclass(target, Target):
        raise InputError(f"target={target.__name__} is a class: give an instance, e.g. {target.__name__}()")
    return CLASS_TARGET, target


# -- the target of the running call ----------------------------------------------------------------
_local = threading.local()


@dataclass
class BoundTarget:
    """A target with the run-time inputs of one call, for a batch of ``batch`` samples.

    ``scores_of`` may run the model on an expanded batch of ``r * batch`` inputs (Integrated Gradients'
    points, SmoothGrad's noisy copies, Score-CAM's masked images, the repeated batch of several
    targets): always sample-major (the ``r`` copies of sample ``n`` are rows ``n*r .. n*r + r - 1``), so
    the inputs are repeated the same way."""

    target: Target
    inputs: dict[str, torch.Tensor]
    batch: Any
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    repeats: Any = 1
    """Set while a method runs on the call's batch repeated this many times (sample-major: several targets
    per input); the extra outputs are then read from the first copy of each sample."""

    def inputs_for(self, m: Any) -> dict[str, torch.Tensor]:
        if not self.inputs:
            return {}
        r = m // self.batch
        if r == 1:
            return self.inputs
        if not isinstance(r, torch.SymInt) and r * self.batch != m:
            raise RuntimeError(f"pyattr bug: a batch of {m} inputs for a call of {self.batch} samples")
        return {k: v[:, None].expand(v.shape[0], r, *v.shape[1:]).reshape(-1, *v.shape[1:])
                for k, v in self.inputs.items()}

    def scores(self, output: Any, x: torch.Tensor, checks: bool) -> torch.Tensor:
        inputs = self.inputs_for(x.shape[0])
        if checks:
            self.target.check_output(output, x, inputs)
        rows = self.batch * self.repeats
        record = not self.outputs and bool(self.target.outputs) and x.shape[0] == rows
        scores, extra = self.target.evaluate(output, inputs, record)
        if checks and not self.target.class_scores:
            from ..methods.base import check_scores

            check_scores(scores, x, None)
        if record:
            r = self.repeats
            self.outputs = extra if r == 1 else {k: v.reshape(self.batch, r, *v.shape[1:])[:, 0]
                                                  for k, v in extra.items()}
        return scores


@contextmanager
def bound_target(target: Target, inputs: dict[str, torch.Tensor], batch: Any) -> Iterator[BoundTarget]:
    """Make ``target`` with ``inputs`` the target of the calling thread's current call."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    bound = BoundTarget(target, inputs, batch)
    stack.append(bound)
    try:
        yield bound
    finally:
        stack.pop()


def current_target() -> BoundTarget | None:
    """The target of the calling thread's current call (None outside a call)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def per_sample(value: Any, name: str, x: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """``value`` as a float (N, *shape) tensor on ``x``'s device: one per sample, or one for all (``shape``)
    broadcast to the batch. Raises InputError naming ``name`` and the shapes it accepts."""
    n = x.shape[0]
    t = torch.as_tensor(value, device=x.device)
    if t.is_inference():  # made under torch.inference_mode(): autograd cannot save it
        t = t.clone()
    if t.dtype == torch.bool:
        t = t.to(x.dtype)
    if not t.is_floating_point():
        t = t.to(x.dtype)
    want = ", ".join(str(s) for s in shape)
    if tuple(t.shape) == tuple(shape):
        t = t[None].expand(n, *shape)
    elif t.dim() == len(shape) + 1 and t.shape[0] == 1 and tuple(t.shape[1:]) == tuple(shape):
        t = t.expand(n, *shape)
    if tuple(t.shape) != (n, *shape):
        raise InputError(f"{name} must be {what}: ({n}, {want}) or ({want}) for these inputs, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} holds NaN or infinite values")
    return t.to(x.dtype).detach().contiguous()
