"""The part of a model after a layer, traced once per (model, layer) and run on a call's view.

Ablation-CAM and Recipro-CAM score many copies of a layer's output: each pass needs only what the model computes
from that output. :func:`layer_tail` records the model's forward pass symbolically (torch.fx proxies, *not*
``torch.fx.symbolic_trace``: that patches ``torch.nn.Module.__call__`` for the whole process while it traces, so a
model called meanwhile in another thread would be traced too) and keeps the steps after the layer when they depend
on nothing else computed from the input (:class:`LayerTail`). A pass then runs those steps only: the modules after
the layer (called on the call's view, with their hooks), and the tensor ops between them.

The tracing runs on a view of the model of its own (:mod:`pyattr._callview`), whose hooks are cleared and whose
modules that do not contain the layer record a call instead of running: only the forwards of the model and of the
layer's ancestors are traced through, so a module's own internals (control flow included) never need to be
traceable. The user's model is not touched. Tracing fails (and :func:`layer_tail` gives ``None``, the caller's
fallback being to replay the whole forward) for control flow on tensors in those forwards, a layer called more or
less than once, global module hooks, or a part after the layer that uses other tensors computed from the input (a
skip connection around the layer, the input's batch size). The caller compares the tail's scores with the model's
own on every call before trusting it, and drops it (:func:`forget`) when they differ
(:meth:`pyattr.methods.cam.CAMMethod.forward_with_prefix`): a plain attribute that the traced forwards read (kept
at its traced value) may have changed since.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from ._callview import CallView, is_view
from .errors import InputError

_LOCK = threading.RLock()  # a forward that explains another model while being traced re-enters
_TAILS: weakref.WeakKeyDictionary[nn.Module, dict[str, LayerTail | None]] = weakref.WeakKeyDictionary()
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


def global_hooks() -> bool:
    """Whether module hooks registered for every module (``torch.nn.modules.module.register_module_*``) exist."""
    module = torch.nn.modules.module
    return any(getattr(module, name, None) for name in _GLOBAL_HOOKS)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own."""
    return any(module.__dict__.get(name) for name in _HOOK_DICTS)


class _Tracer(fx.proxy.GraphAppendingTracer):
    """Records the ops applied to proxies; the model's parameters and buffers become ``get_attr`` nodes (read from
    the running call's view), other tensors met in the traced forwards are kept as constants."""

    def __init__(self, graph: fx.Graph, root: nn.Module):
        super().__init__(graph)
        self.attributes = {id(t): n for n, t in root.named_parameters()}
        self.attributes.update({id(t): n for n, t in root.named_buffers()})
        self.constants: list[torch.Tensor] = []

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor) and not isinstance(a, fx.Proxy):
            name = self.attributes.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
            self.constants.append(a)
            return self.create_node("call_function", _constant, (len(self.constants) - 1,), {})
        return super().create_arg(a)


def _constant(index: int) -> torch.Tensor:  # a marker in the graph; LayerTail.run looks the tensor up
    raise AssertionError("not called")


class LayerTail:
    """The steps of a model's forward after one layer, depending on the layer's output only (see the module
    docstring). :meth:`run` gives the model's output for a replaced layer output."""

    def __init__(self, graph: fx.Graph, layer: fx.Node, steps: list[fx.Node], constants: list[torch.Tensor]):
        self.graph = graph
        self.layer = layer
        self.steps = steps
        self.constants = constants
        self.output = next(n for n in graph.nodes if n.op == "output")
        self.module_names = sorted({n.target for n in steps if n.op in ("call_module", "get_attr")})

    def _resolve(self, view: CallView) -> dict[str, Any]:
        """The view's modules and tensors that the steps name (once per call: kept in the view's memo)."""
        key = ("tail", id(self))
        found = view.memo.get(key)
        if found is None:
            found = {}
            for name in self.module_names:
                owner, _, attr = name.rpartition(".")
                parent = view.root.get_submodule(owner) if owner else view.root
                found[name] = getattr(parent, attr)
            view.memo[key] = found
        return found

    def run(self, view: CallView, replacement: torch.Tensor) -> Any:
        """The model's output (on ``view``, a call's view of the traced model) when the layer returns
        ``replacement``."""
        named = self._resolve(view)
        env: dict[fx.Node, Any] = {self.layer: replacement}
        value = env.__getitem__
        for node in self.steps:
            args = fx.node.map_arg(node.args, value)
            kwargs = fx.node.map_arg(node.kwargs, value)
            op = node.op
            if op == "call_module":
                env[node] = named[node.target](*args, **kwargs)
            elif op == "call_function":
                env[node] = (self.constants[args[0]] if node.target is _constant else node.target(*args, **kwargs))
            elif op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:  # get_attr
                env[node] = named[node.target]
        return fx.node.map_arg(self.output.args[0], value)


def _trace(model: nn.Module, layer: nn.Module) -> LayerTail | None:
    view = CallView(model)  # a view of its own: its hooks and forwards are changed below
    root = view.root
    layer_view = view.of(layer)
    names = {id(m): n for n, m in root.named_modules()}
    layer_name = names.get(id(layer_view))
    if not layer_name or not is_view(layer_view) or not is_view(root):
        return None
    parts = layer_name.split(".")
    spine = {id(root)} | {id(root.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts))}
    graph = fx.Graph()
    tracer = _Tracer(graph, root)

    def recorder(name: str) -> Callable[..., fx.Proxy]:
        def record(*args, **kwargs):
            return tracer.create_proxy("call_module", name, args, kwargs)
        return record

    for name, module in root.named_modules():
        if not is_view(module):  # a TorchScript module (shared): it would run on proxies
            return None
        for hooks in _HOOK_DICTS:
            if module.__dict__.get(hooks):
                module.__dict__[hooks] = type(module.__dict__[hooks])()
        if id(module) not in spine:
            module.__dict__["forward"] = recorder(name)
    params = list(inspect.signature(root.forward).parameters.values())
    if not params or any(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                         for p in params[1:]):
        return None
    x = tracer.create_proxy("placeholder", "x", (), {})
    with torch.no_grad():
        out = root(x)
    graph.output(tracer.create_arg(out))
    return _tail_of(graph, layer_name, tracer.constants)


def _tail_of(graph: fx.Graph, layer_name: str, constants: list[torch.Tensor]) -> LayerTail | None:
    """The steps the output needs after the layer's node, or None when they need a value computed from the input
    other than through the layer."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer_name]
    if len(calls) != 1:
        return None
    layer = calls[0]
    from_input: set[fx.Node] = set()  # nodes computed from the input, not through the layer
    for node in graph.nodes:
        if node.op == "placeholder" or (node is not layer and any(a in from_input for a in node.all_input_nodes)):
            from_input.add(node)
    needed: set[fx.Node] = set()
    output = next(n for n in graph.nodes if n.op == "output")
    stack = list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node is layer or node in needed:
            continue
        if node in from_input:
            return None
        needed.add(node)
        stack.extend(node.all_input_nodes)
    if layer not in _ancestors(output):
        return None
    steps = [n for n in graph.nodes if n in needed]
    return LayerTail(graph, layer, steps, constants)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def layer_tail(model: nn.Module, layer_name: str, layer: nn.Module) -> LayerTail | None:
    """The part of ``model`` after ``layer`` (named ``layer_name`` in it), traced on the first request for this
    (model, layer) and kept while the model lives (not on the model); None where it cannot be traced (see the
    module docstring). Thread-safe: one thread traces, the others wait for its result."""
    with _LOCK:
        tails = _TAILS.get(model)
        if tails is None:
            tails = _TAILS[model] = {}
        if layer_name not in tails:
            try:
                tails[layer_name] = None if global_hooks() else _trace(model, layer)
            except InputError:  # the layer is no longer part of the model (a stale method): nothing to keep
                return None
            except Exception:  # noqa: BLE001 - anything the proxies cannot go through: replay the forward instead
                tails[layer_name] = None
        return tails[layer_name]


def forget(model: nn.Module, layer_name: str) -> None:
    """Drop the tail of (model, layer) and never trace it again (it disagreed with the model's forward)."""
    with _LOCK:
        _TAILS.setdefault(model, {})[layer_name] = None


__all__ = ["LayerTail", "forget", "global_hooks", "has_hooks", "layer_tail"]
