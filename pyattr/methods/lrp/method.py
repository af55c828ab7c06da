"""The LRP attribution method: rules applied per layer for one call, traced like any gradient.

Layer-wise Relevance Propagation (Bach et al. 2015, doi:10.1371/journal.pone.0130140; Montavon et al.
2019, doi:10.1007/978-3-030-28954-6_10) sends the target score backwards layer by layer. Here, as in
zennit, the gradient that flows between layers *is* the relevance: the backward starts with the
target's score at its logit (``one_hot * score``), and every layer with a rule gets, for the
duration of the call, a forward hook that wraps its output in a ``torch.autograd.Function`` whose
forward returns the output unchanged and whose backward is the rule (:mod:`.rules`). Layers without
a rule keep their gradient. The traced graph therefore holds the rules' modified forward passes and
their input gradients (transposed convolutions, matrix products), which the export decomposition
table turns into forward ops: one graph for ONNX, TorchScript and ``.pt2``.

The raw map is the relevance at the model's input, summed over channels (``reduction``). Element-wise
operations that are not modules (e.g. ShapesNet's ``(x - mean) / std``) keep their gradient, as in
zennit: the input relevance is then the first layer's input relevance divided by ``std``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..._callview import CallView, call_view, is_view
from ..._capture import find_layer
from ...errors import InputError
from ..base import AttributionMethod, OutputSelector
from ..gradient import reduce_channel_dim
from .canonizers import batch_norm_pairs, canonical_blocks, merge_batch_norm, out_of_place_activations
from .composites import (
    AVG_POOLS,
    COMPOSITES,
    CONVOLUTIONS,
    LINEARS,
    Composite,
    EpsilonGammaBox,
    EvalIdentity,
    LayoutLayer,
)
from .rules import LinearRule, Rule, term_parameters

RuleKey = str | type
_REDUCTIONS = ("sum", "max", "mean", "l2", "none")


class NoRuleError(InputError):
    """A layer of the model that no rule of the composite (or of ``rules``) applies to."""


def layer_function(module: nn.Module) -> Callable[..., torch.Tensor] | None:
    """``f(x, weight, bias)`` for the layer types linear rules apply to (no hook runs), else None."""
    if isinstance(module, CONVOLUTIONS):
        return module._conv_forward
    if isinstance(module, LINEARS):
        return F.linear
    if isinstance(module, AVG_POOLS):
        return lambda x, weight, bias: module.forward(x)
    return None


def input_gradient(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``g(x, weight, s) = J^T s``, the input gradient of ``f(x; weight, b)`` for a given output gradient ``s``,
    computed directly (no forward pass): for convolutions with zero padding (a transposed convolution, the
    op autograd runs, which the export decomposition table rewrites) and linear layers; else None."""
    if isinstance(module, CONVOLUTIONS) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        stride, padding, dilation, groups = list(module.stride), list(module.padding), list(module.dilation), module.groups
        zeros = [0] * len(stride)

        def conv_input_gradient(x, weight, s):
            return torch.ops.aten.convolution_backward(
                s, x, weight, None, stride, padding, dilation, False, zeros, groups, [True, False, False]
            )[0]

        return conv_input_gradient
    if isinstance(module, LINEARS):
        return lambda x, weight, s: s.matmul(weight)
    return None


# layers whose output is >= 0 whatever their input, and layers whose output is >= 0 when their input is
NONNEGATIVE_OUTPUTS = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
SIGN_KEEPING = AVG_POOLS + (
    EvalIdentity, LayoutLayer,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.Flatten, nn.Unflatten,
)


class _LayerRule(torch.autograd.Function):
    """Forward: the layer's output unchanged. Backward: the rule's relevance for the layer's input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output: torch.Tensor, backward: Callable | None) -> torch.Tensor:
        ctx.backward = backward
        ctx.save_for_backward(x)
        return output.clone()

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):
        (x,) = ctx.saved_tensors
        if ctx.backward is None:  # pass-through
            return relevance, None, None
        return ctx.backward(x, relevance), None, None


def _bounds_of(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The built-in models' input bounds after their in-model normalization (ShapesNet, and the segmenter and
    detector on :class:`~pyattr.zoo.segmodel.Stride4Backbone`): RGB in [0, 1] -> ((0, 1) - mean) / std."""
    from ...zoo.model import ShapesNet
    from ...zoo.segmodel import Stride4Backbone

    if isinstance(model, (ShapesNet, Stride4Backbone)):
        mean, std = model.mean.detach().flatten().clone(), model.std.detach().flatten().clone()
        return (0 - mean) / std, (1 - mean) / std
    return None


class LRP(AttributionMethod):
    """Layer-wise Relevance Propagation with a composite of rules.

    Args:
        model: the module to explain.
        composite: a name (``"epsilon_plus"``, ``"epsilon_gamma_box"``, ``"epsilon_plus_flat"``,
            ``"epsilon_alpha2_beta1"``) or a :class:`Composite`.
        rules: rules by layer name or layer type that take precedence over the composite,
            e.g. ``{"features.0": Flat(), nn.Linear: Epsilon(0.25)}`` (names win over types).
        low, high: input bounds of the first convolution for ``epsilon_gamma_box`` (floats or
            per-channel tensors, in the space the first layer sees: ``(0 - mean) / std`` for images
            normalized outside [0, 1]); taken from the model for pyattr's built-in models (classifier,
            segmenter, detector).
        canonize: merge BatchNorms into the preceding layer, canonical residual blocks and
            out-of-place activations (default True; applied to the call's view of the model only,
            never to the model itself).
        reduction: how the input relevance (N, C, H, W) becomes a map: ``"sum"`` (default:
            relevance adds up), ``"max"``, ``"mean"``, ``"l2"`` or ``"none"`` (keep channels).
        output: which part of the model's output holds the scores (see :class:`AttributionMethod`).
        layout: ``"image"`` (N, C, H, W), ``"signal"`` (N, C, L) or ``"tabular"`` (N, F; no reduction).

    ``raw`` is the signed relevance map (N, H, W); with LRP-0 / a small epsilon and zero biases
    it sums to the target's score. ``maps`` is it min-max normalized (render ``raw`` with a
    diverging colormap such as ``seismic`` to see the sign).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> result = pyattr.LRP(model, "epsilon_gamma_box")(torch.rand(2, 3, 64, 64))
        >>> result.raw.shape
        torch.Size([2, 64, 64])
    """

    name: ClassVar[str] = "lrp"
    signed: ClassVar[bool] = True
    multi_target: ClassVar[bool] = True  # (N, T) targets: one forward pass with the rules, T backward passes
    layouts: ClassVar[tuple[str, ...]] = ("image", "signal", "tabular")
    default_composite: ClassVar[str] = "epsilon_plus"

    def __init__(
        self,
        model: nn.Module,
        composite: str | Composite | None = None,
        *,
        rules: Mapping[RuleKey, Rule] | None = None,
        low: float | torch.Tensor | None = None,
        high: float | torch.Tensor | None = None,
        canonize: bool = True,
        reduction: str = "sum",
        output: OutputSelector = None,
        layout: str = "image",
    ):
        super().__init__(model, output=output, layout=layout)
        composite = self.default_composite if composite is None else composite
        if isinstance(composite, str):
            if composite not in COMPOSITES:
                raise InputError(
                    f"unknown LRP composite {composite!r}; use one of {', '.join(COMPOSITES)} "
                    "or a pyattr.lrp.Composite"
                )
            if composite == "epsilon_gamma_box":
                if low is None or high is None:
                    bounds = _bounds_of(model)
                    if bounds is None:
                        raise InputError(
                            "the epsilon_gamma_box composite needs the input bounds of the first convolution: "
                            "pass low=... and high=... (e.g. low=(0 - mean) / std, high=(1 - mean) / std per "
                            "channel, as tensors of shape (C,), for images in [0, 1] normalized with mean/std)"
                        )
                    low, high = bounds
                composite = EpsilonGammaBox(low, high)
            else:
                composite = COMPOSITES[composite]()
        if not isinstance(composite, Composite):
            raise InputError(
                f"composite must be a name or a pyattr.lrp.Composite, got {type(composite).__name__}"
            )
        if reduction not in _REDUCTIONS:
            raise InputError(f"unknown reduction {reduction!r}; use one of {', '.join(_REDUCTIONS)}")
        for key, rule in (rules or {}).items():
            if not isinstance(key, (str, type)):
                raise InputError(f"rules are keyed by layer name (str) or layer type, got {key!r}")
            if not isinstance(rule, Rule):
                raise InputError(
                    f"rules[{key!r}] must be an LRP rule (e.g. pyattr.lrp.Epsilon()), got {rule!r}"
                )
        self.composite = composite
        self.rules = dict(rules or {})
        self.canonize = bool(canonize)
        self.reduction = reduction
        if type(self) is LRP:
            self.name = f"lrp_{composite.name}"

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta.update(composite=self.composite.name, reduction=self.reduction)
        return meta

    # -- the plan ---------------------------------------------------------------------------------
    def assign_rules(self) -> tuple[dict[str, Rule], dict[str, str]]:
        """``({module name: rule}, {batch norm name: merged layer name})`` for the model as it is now.

        Raises :class:`NoRuleError` naming every leaf layer that has no rule."""
        model = self.model
        assigned = self.composite.assign(model)
        named = dict(model.named_modules())
        for key in self.rules:
            if isinstance(key, str):
                find_layer(model, key)  # LayerNotFoundError with close names
        for name, module in named.items():
            typed = [
                rule for key, rule in self.rules.items() if isinstance(key, type) and isinstance(module, key)
            ]
            if typed:
                assigned[name] = typed[0]
            if name in self.rules:
                assigned[name] = self.rules[name]
        merged = {}
        if self.canonize:
            for bn, layer in batch_norm_pairs(model).items():
                if isinstance(assigned.get(layer), LinearRule) and bn not in self.rules:
                    merged[bn] = layer
        problems = []
        for name, module in named.items():
            is_leaf = next(module.children(), None) is None
            rule = assigned.get(name)
            if name in merged:
                continue
            if rule is None and is_leaf and name:
                problems.append(f"{name!r} ({type(module).__name__})")
            elif isinstance(rule, LinearRule) and layer_function(module) is None:
                raise NoRuleError(
                    f"LRP rule {rule!r} cannot be applied to layer {name!r} ({type(module).__name__}): "
                    "linear rules apply to convolutions, linear and average-pooling layers; assign "
                    f"Pass() or Gradient() with rules={{{name!r}: pyattr.lrp.Pass()}}"
                )
        if problems:
            example = problems[0].split(" ")[0]
            raise NoRuleError(
                f"LRP has no rule for layer(s) {', '.join(problems)} in composite {self.composite.name!r}. Assign one "
                f"by name or type, e.g. LRP(model, rules={{{example}: pyattr.lrp.Epsilon()}}) or "
                "rules={nn.LayerNorm: pyattr.lrp.Pass()}; Pass() passes relevance through an element-wise layer, "
                "Gradient() keeps the layer's gradient"
            )
        return assigned, merged

    @contextmanager
    def applied(self, watch: tuple[str, ...] = ()) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block the forward of this call's view of the model (``self.model``, see
        :mod:`pyattr._callview`) carries the rules: hooks, canonical blocks and out-of-place activations,
        all on the view, so the user's modules and other threads' calls never see them. Yields a dict
        filled with the input tensors of the modules named in ``watch`` (relevance at a layer's input is
        the gradient with respect to that tensor)."""
        with call_view(self._model) as view, self._applied(view, watch) as watched:
            yield watched

    @contextmanager
    def _applied(self, view: CallView, watch: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
        assigned, merged = self.assign_rules()
        named = dict(self.model.named_modules())  # modules of the view
        merged_layers = {layer: bn for bn, layer in merged.items()}
        stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        watched: dict[str, torch.Tensor] = {}
        handles = []
        # tensors of this call known to be >= 0 by construction (not by their values), unchanged since:
        # id -> (tensor, its version counter then)
        nonnegatives: dict[int, tuple[torch.Tensor, int]] = {}

        def is_nonnegative(x: torch.Tensor) -> bool:
            known = nonnegatives.get(id(x))
            return known is not None and known[0] is x and known[1] == x._version

        def mark_nonnegative(module, inputs, output):
            if isinstance(output, torch.Tensor) and (
                    isinstance(module, NONNEGATIVE_OUTPUTS) or (inputs and is_nonnegative(inputs[0]))):
                nonnegatives[id(output)] = (output, output._version)

        def capture(name):
            def hook(_module, inputs, output):
                stored[name] = (inputs[0], output)

            return hook

        def watch_hook(name):
            def hook(_module, inputs):
                watched[name] = inputs[0]

            return hook

        def linear_rule(name, rule: LinearRule):
            module = named[name]
            fn, grad_fn = layer_function(module), input_gradient(module)

            def hook(_module, inputs, output):
                x = inputs[0]
                if not (x.requires_grad or output.requires_grad):
                    return None
                sources = (getattr(module, "weight", None), getattr(module, "bias", None))
                weight, bias = (t.detach() if isinstance(t, torch.Tensor) else None for t in sources)

                def params(index):
                    return self._derived((name, id(rule), index), sources,
                                         lambda: term_parameters(rule.terms[index], weight, bias))

                if type(rule).relevance is not LinearRule.relevance:  # a rule's own relevance(layer, x, w, b, r)
                    return _LayerRule.apply(x, output, lambda xs, r: rule.relevance(fn, xs, weight, bias, r))
                nonnegative, reference = is_nonnegative(x), output.detach()
                return _LayerRule.apply(x, output, lambda xs, r: rule.relevance(
                    fn, xs, weight, bias, r, output=reference, nonnegative=nonnegative, input_gradient=grad_fn,
                    term_params=params))

            return hook

        def merged_rule(bn_name, layer_name, rule: LinearRule):
            layer, fn = named[layer_name], layer_function(named[layer_name])
            grad_fn = input_gradient(layer)

            def hook(bn, inputs, output):
                if layer_name not in stored or stored[layer_name][1] is not inputs[0]:
                    raise InputError(
                        f"BatchNorm {bn_name!r} does not read the output of {layer_name!r}, the layer registered "
                        "before it, so the two cannot be merged for LRP; pass canonize=False, or give "
                        f"rules={{{bn_name!r}: pyattr.lrp.Pass()}} to leave this BatchNorm unmerged"
                    )
                x, _ = stored.pop(layer_name)
                sources = (layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)

                def params(index):
                    def make():
                        return term_parameters(rule.terms[index], *merge_batch_norm(layer, bn))

                    return self._derived((bn_name, id(rule), index), sources, make)

                if type(rule).relevance is not LinearRule.relevance:  # a rule's own relevance(layer, x, w, b, r)
                    weight, bias = merge_batch_norm(layer, bn)
                    return _LayerRule.apply(x, output, lambda xs, r: rule.relevance(fn, xs, weight, bias, r))
                nonnegative, reference = is_nonnegative(x), output.detach()
                return _LayerRule.apply(x, output, lambda xs, r: rule.relevance(
                    fn, xs, None, None, r, output=reference, nonnegative=nonnegative, input_gradient=grad_fn,
                    term_params=params))

            return hook

        def pass_hook(_module, inputs, output):
            x = inputs[0]
            if not isinstance(x, torch.Tensor) or x.shape != output.shape or not x.requires_grad:
                return None
            return _LayerRule.apply(x, output, None)

        with ExitStack() as stack:
            if self.canonize:
                stack.enter_context(out_of_place_activations(self.model))
                stack.enter_context(canonical_blocks(self.model))
            try:
                for name in watch:
                    layer = view.hookable(find_layer(self.model, name), name)
                    handles.append(layer.register_forward_pre_hook(watch_hook(name)))
                for name, module in named.items():
                    rule = assigned.get(name)
                    # a forward hook of the user's could change the output: then its sign is not known
                    user_hooked = bool(module._forward_hooks) or bool(module._forward_hooks_with_kwargs)
                    if name in merged_layers or name in merged or isinstance(rule, LinearRule) or (
                            rule is not None and rule.kind == "pass"):
                        module = view.hookable(module, name)  # not a shared TorchScript module
                    if name in merged_layers:
                        handles.append(module.register_forward_hook(capture(name)))
                    elif name in merged:
                        layer = merged[name]
                        handles.append(
                            module.register_forward_hook(merged_rule(name, layer, assigned[layer]))
                        )
                    elif isinstance(rule, LinearRule):
                        handles.append(module.register_forward_hook(linear_rule(name, rule)))
                    elif rule is not None and rule.kind == "pass":
                        handles.append(module.register_forward_hook(pass_hook))
                    if isinstance(module, NONNEGATIVE_OUTPUTS + SIGN_KEEPING) and not user_hooked and is_view(module):
                        # registered after the rule's hook: marks the output that the next layer reads
                        handles.append(module.register_forward_hook(mark_nonnegative))
                yield watched
            finally:
                for handle in handles:
                    handle.remove()
                stored.clear()
                nonnegatives.clear()

    def _derived(self, key: tuple, sources: tuple[torch.Tensor | None, ...], make: Callable[[], Any]) -> Any:
        """``make()``: tensors derived from the model's parameters (a BatchNorm merged into its layer, a
        rule's modified weights, e.g. ``w+``), made once and kept by this method between calls while every
        tensor of ``sources`` is the same tensor with the same storage and version counter (an in-place
        update such as ``optimizer.step()``, ``load_state_dict`` or ``model.to(...)`` makes them again). The
        kept tensors are detached and never changed; threads that miss at once both make them (same values).
        Not kept while tracing for export (the graph computes them from the parameters; onnxruntime folds
        them into constants)."""
        if self._tracing:
            return make()
        try:
            # the tensors themselves are held (not their id()s): a freed parameter's id and storage can be reused
            stamp = tuple((t, t.data_ptr(), t._version, t.dtype) if isinstance(t, torch.Tensor) else None
                          for t in sources)
        except RuntimeError:  # inference tensors have no version counter: nothing can be kept
            return make()
        cache = self.__dict__.setdefault("_derived_cache", {})
        hit = cache.get(key)
        if hit is not None and _same_sources(hit[0], stamp):
            return hit[1]
        value = make()
        cache[key] = (stamp, value)
        return value

    # -- the computation --------------------------------------------------------------------------
    def _relevance(self, x: torch.Tensor, target: torch.Tensor, watch: tuple[str, ...] = ()):
        x = x.detach().requires_grad_(True)
        with self.applied(watch) as watched:
            scores = self.scores_of(x)
            resolved = self.resolve(scores, target)
            selected = scores.gather(1, resolved[:, None] if resolved.dim() == 1 else resolved)  # (N, 1) / (N, T)
            missing = [n for n in watch if n not in watched]
            if missing:
                raise InputError(f"layer(s) {', '.join(missing)} did not run in the forward pass")
            tensors = [x] + [watched[n] for n in watch]
            if target.dim() == 1:
                grads = torch.autograd.grad(selected, tensors, grad_outputs=selected.detach(), allow_unused=True)
                grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
                return scores, resolved, grads[0], dict(zip(watch, grads[1:]))
            # (N, T) targets: the relevance of each column from the same forward pass (input only)
            columns = selected.shape[1]
            grads = [torch.autograd.grad(selected[:, j], x, grad_outputs=selected[:, j].detach(), allow_unused=True,
                                         retain_graph=j + 1 < columns)[0] for j in range(columns)]
        relevance = torch.stack([torch.zeros_like(x) if g is None else g for g in grads], 1)
        return scores, resolved, relevance, {}

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        scores, resolved, relevance, _ = self._relevance(x, target)
        if self.layout == "tabular":  # (N, F) or (N, T, F): no channel dim
            return scores, relevance, resolved
        return scores, reduce_channel_dim(relevance, self.reduction, target.dim()), resolved

    def relevances(
        self,
        x: torch.Tensor,
        target: int | torch.Tensor | None = None,
        layers: tuple[str, ...] | list[str] = (),
    ) -> dict[str, torch.Tensor]:
        """Eager: the relevance at the input of each named layer, plus ``""`` for the model's input
        (all with the shape of those inputs) and ``"score"`` (the (N,) explained scores)."""
        with call_view(self._model), torch.enable_grad():
            x = self._check_input(x)
            t = self._check_target(target, x.shape[0], x.device)
            scores, resolved, relevance, at = self._relevance(x, t, tuple(layers))
        out = {name: r.detach() for name, r in at.items()}
        out[""] = relevance.detach()
        out["score"] = scores.gather(1, resolved[:, None])[:, 0].detach()
        return out


def _preset(class_name: str, composite: str, doc: str) -> type[LRP]:
    return type(
        class_name,
        (LRP,),
        {"name": f"lrp_{composite}", "default_composite": composite, "__doc__": doc, "__module__": __name__},
    )


LRPEpsilonPlus = _preset(
    "LRPEpsilonPlus", "epsilon_plus", "LRP with the ``epsilon_plus`` composite (see :class:`LRP`)."
)
LRPEpsilonGammaBox = _preset(
    "LRPEpsilonGammaBox",
    "epsilon_gamma_box",
    "LRP with the ``epsilon_gamma_box`` composite (see :class:`LRP`).",
)
LRPEpsilonPlusFlat = _preset(
    "LRPEpsilonPlusFlat",
    "epsilon_plus_flat",
    "LRP with the ``epsilon_plus_flat`` composite (see :class:`LRP`).",
)
LRPEpsilonAlpha2Beta1 = _preset(
    "LRPEpsilonAlpha2Beta1",
    "epsilon_alpha2_beta1",
    "LRP with the ``epsilon_alpha2_beta1`` composite (see :class:`LRP`).",
)


def _same_sources(kept: tuple, now: tuple) -> bool:
    """Whether two stamps of :meth:`LRP._derived` name the same tensors (identity), storages, versions and dtypes."""
    return len(kept) == len(now) and all(
        a is b if a is None or b is None else (a[0] is b[0] and a[1:] == b[1:]) for a, b in zip(kept, now))
