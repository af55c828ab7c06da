"""A method and its faithfulness metrics as ONE exportable graph: the method's maps, then deletion and insertion
curves with their AUC and Average Drop / Increase in Confidence computed on them, the masked copies going through
the model inside the graph (one batched forward of N * K copies per curve).

    >>> import torch, pyattr
    >>> from pyattr.metrics.graph import MethodWithMetrics
    >>> model = pyattr.zoo.load_builtin()
    >>> scored = MethodWithMetrics(pyattr.GradCAM(model, "layer3"), steps=8)
    >>> pyattr.export(scored, torch.rand(1, 3, 64, 64), "gradcam_metrics.onnx")  # doctest: +SKIP

The graph takes ``images`` (N, C, H, W) and ``target`` (N,) int64 (-1: the arg-max), as the method's, and returns
``scores, explained_class, raw, maps`` (the method's outputs) then :data:`METRIC_OUTPUTS`. The definitions are
those of :func:`pyattr.metrics.deletion_insertion` (one constant baseline, torchcam's) and
:func:`pyattr.metrics.confidence_change`; ``tests/test_faithfulness.py`` holds the exported graphs to the eager
metrics.
"""

from __future__ import annotations

from typing import Any

import torch

from .._callview import call_view
from ..errors import InputError
from ..methods.base import AttributionMethod, mark_invalid, select_output
from ..targets.base import CLASS_TARGET, Target
from ._common import check_positive_int, check_score
from .perturbation import step_counts

METRIC_OUTPUTS = ("deletion_curve", "deletion_auc", "insertion_curve", "insertion_auc", "average_drop",
                  "confidence_increase")
"""The metric outputs of the graph, after the method's: deletion and insertion curves (N, K + 1) and their AUC (N,),
the relative drop ``max(0, Y - O) / (Y + 1e-7)`` (N,) and whether the score rose, ``O > Y`` (N,) as 0/1 float."""


def top_pixels(maps: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(N, len(counts), H*W) bool: for each count c, the c pixels of highest value, ties taken in row-major order
    (the pixels :func:`pyattr.metrics.pixel_ranks` ranks below c). Traceable without a stable sort (which ONNX
    lacks): the c-th largest value ``v`` comes from ``topk`` (its values do not depend on how ties are ordered),
    then the pixels above ``v`` and the first ``c - #(above v)`` of those equal to ``v`` (a cumulative sum).

    Example:
        >>> top_pixels(torch.tensor([[[0.5, 0.9], [0.5, 0.5]]]), [1, 2, 3]).int().tolist()
        [[[0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]]
    """
    flat = maps.flatten(1)
    values = torch.topk(flat, flat.shape[1], dim=1).values  # sorted, highest first
    c = torch.tensor(counts, device=flat.device)
    v = values[:, c.clamp_min(1) - 1][:, :, None]  # (N, K, 1): the c-th largest value
    above = flat[:, None, :] > v
    tied = flat[:, None, :] == v
    # a tied pixel is taken while #(above v) + its rank among the tied <= c. (Written as one comparison: OpenVINO
    # 2024.4 broadcast c (1, K, 1) - #above (N, K, 1) along the wrong axis, taking the wrong pixels.)
    top = above | (tied & (tied.long().cumsum(2) + above.sum(2, keepdim=True) <= c.view(1, -1, 1)))
    return top & (c > 0).view(1, -1, 1)


class MethodWithMetrics(AttributionMethod):
    """``method``'s graph followed by its metrics (module docstring), exportable with :func:`pyattr.export`.

    Calling it eagerly returns the method's :class:`~pyattr.methods.base.Attribution`; :meth:`graph` is what is
    exported. Class targets only (``target`` ids); the model's output selector is the method's.

    Args:
        method: a pyattr method (image layout).
        steps: the curves' intervals (:func:`pyattr.metrics.step_counts`: at most ``steps + 1`` points).
        baseline: the constant that deleted pixels become and that insertion starts from.
        score: ``"softmax"`` (default), ``"sigmoid"`` (multi-label models) or ``"logit"``.
    """

    graph_outputs = METRIC_OUTPUTS

    def __init__(self, method: AttributionMethod, *, steps: int = 16, baseline: float = 0.0, score: str = "softmax"):
        if not isinstance(method, AttributionMethod) or isinstance(method, MethodWithMetrics):
            raise InputError(f"method must be a pyattr attribution method, got {type(method).__name__}")
        if method.layout != "image":
            raise InputError(f"the metrics score images; the method explains layout {method.layout!r}")
        check_positive_int(steps, "steps", "the curves need at least one step")
        if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
            raise InputError(f"baseline must be a number (a constant image) in an exported graph, got {baseline!r}")
        super().__init__(method._model, output=method.output)
        self.method = method
        self.name = method.name
        self.steps, self.baseline, self.score = steps, float(baseline), check_score(score)

    def metadata(self) -> dict[str, Any]:
        meta = self.method.metadata()
        meta["metrics"] = {"steps": self.steps, "baseline": self.baseline, "score": self.score,
                           "outputs": list(METRIC_OUTPUTS)}
        return meta

    def check_target_kind(self, kind: Target) -> None:
        if kind is not CLASS_TARGET:
            raise InputError("a method-with-metrics graph scores class targets only")
        self.method.check_target_kind(kind)

    def _check_input(self, x: Any) -> torch.Tensor:
        return self.method._check_input(x)  # CAM methods find their layer here

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        return self.method.attribute_raw(x, target)

    def _score(self, model, xs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        scores = select_output(model(xs), self.output)
        if self.score == "softmax":
            scores = scores.softmax(1)
        elif self.score == "sigmoid":
            scores = scores.sigmoid()
        return scores.gather(1, ids[:, None])[:, 0]

    def graph(self, x: torch.Tensor, target: torch.Tensor | None, *inputs: torch.Tensor,
              kind: Target | None = None) -> tuple[torch.Tensor, ...]:
        outs = self.method.graph(x, target, *inputs, kind=kind)
        resolved, maps = outs[1], outs[3]
        n, c, h, w = x.shape
        ids = resolved.clamp_min(0)  # -1 marks an invalid sample: its metrics become NaN below
        counts = step_counts(h * w, self.steps)
        k = len(counts) - 1
        fractions = torch.tensor(counts, dtype=torch.float32, device=x.device) / (h * w)
        with call_view(self._model) as view:
            model = view.root
            original = self._score(model, x, ids)
            # deletion's points 1..k and insertion's 1..k-1 (its 0 is deletion's k): (N, 2k - 1, H*W) masks
            top = top_pixels(maps, counts[1:] + counts[1:-1])
            insert = torch.tensor([False] * k + [True] * (k - 1), device=x.device)
            keep = top == insert[None, :, None]  # insertion keeps the top pixels, deletion the others
            flat = x.flatten(2)[:, None]  # (N, 1, C, H*W)
            copies = torch.where(keep[:, :, None, :], flat, torch.full_like(flat, self.baseline))
            moved = self._score(model, copies.reshape(-1, c, h, w), ids.repeat_interleave(2 * k - 1))
            moved = moved.view(n, 2 * k - 1)
            masked = self._score(model, maps[:, None].to(x.dtype) * x, ids)
        deletion = torch.cat([original[:, None], moved[:, :k]], 1)
        insertion = torch.cat([moved[:, k - 1:k], moved[:, k:], original[:, None]], 1)
        widths = (fractions[1:] - fractions[:-1]).to(deletion.dtype)

        def area(curve: torch.Tensor) -> torch.Tensor:
            return ((curve[:, 1:] + curve[:, :-1]) * widths).sum(1) / 2

        diff = torch.relu(original - masked)
        metrics = (deletion, area(deletion), insertion, area(insertion), diff / (original + 1e-7),
                   (masked > original).to(x.dtype))
        return (*outs, *(mark_invalid(m, resolved >= 0) for m in metrics))
