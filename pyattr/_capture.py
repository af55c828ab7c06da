"""Scoped access to a model's internals, undone on exit (also when the body raises).

Hooks are put on the modules of a per-call view (:mod:`pyattr._callview`), never on the user's modules."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ._callview import _VIEW_MARK, CallView, call_view, is_view
from .errors import InputError, LayerNotFoundError


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule of ``model`` called ``name`` (as in ``model.named_modules()``).

    Raises :class:`LayerNotFoundError` listing the closest names when there is none.
    """
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Close names: {', '.join(close)}." if close else ""
    some = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    raise LayerNotFoundError(
        f"the model has no layer named {name!r}.{hint} Layer names are those of "
        f"model.named_modules(), e.g. {some}"
    )


@contextmanager
def capture_outputs(layers: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Record the output of each of ``layers`` during the body's forward pass.

    ``layers`` must be modules of a per-call view (:func:`pyattr._callview.call_view`), so that the
    hooks see this call's forward pass only. Yields a list filled in place (one entry per layer, the
    last call's output). Hooks live only inside the ``with`` block.
    """
    captured: list[torch.Tensor | None] = [None] * len(layers)
    handles = []

    def make_hook(i: int):
        def hook(_module, _inputs, output):
            captured[i] = output
        return hook

    try:
        for i, layer in enumerate(layers):
            if not is_view(layer):
                raise InputError(
                    f"cannot capture the output of a {type(layer).__name__} that is not part of a per-call view "
                    "(a TorchScript module, or a call outside a method call)")
            handles.append(layer.register_forward_hook(make_hook(i)))
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replace_output(layer: nn.Module, replacement: torch.Tensor) -> Iterator[None]:
    """Within the body, ``layer`` (a module of a per-call view) returns ``replacement`` instead of its own
    output (a forward hook, removed on exit)."""
    if not is_view(layer):
        raise InputError(f"cannot replace the output of a {type(layer).__name__} that is not part of a per-call view")
    handle = layer.register_forward_hook(lambda _module, _inputs, _output: replacement)
    try:
        yield
    finally:
        handle.remove()


class PrefixCache:
    """The outputs of the modules that ran before a layer in one forward pass (:func:`record_prefix`), for later
    passes of the same input that change only the layer's output (:func:`reuse_prefix`): those passes then skip
    the part of the model before the layer instead of recomputing it.

    ``outputs`` maps each cached module of the user's model (not of a view) to the tensor it returned. A module is
    cached when, in the recorded pass, it was called exactly once, its call ended before the layer's began, it
    returned a tensor, and that tensor was not modified in place afterwards (its version counter unchanged to the
    end of the pass: e.g. a BatchNorm output that an in-place ReLU then overwrote is recomputed, the ReLU's is
    reused). Its submodules then never run in a replay.
    """

    def __init__(self) -> None:
        self.outputs: dict[nn.Module, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.outputs)


@contextmanager
def record_prefix(view: CallView, layer: nn.Module) -> Iterator[PrefixCache]:
    """Record, during the body's forward pass on ``view``, which modules ran before ``layer`` (a module of the view)
    and what they returned; the yielded :class:`PrefixCache` is filled when the body ends. The hooks are put on the
    view's modules and removed on exit."""
    cache = PrefixCache()
    calls: dict[int, list] = {}  # id(view module) -> [module, calls, end event, output, version at return]
    events = [0, None]  # [event counter, event at which the layer's (first) call began]
    handles = []

    def before(module, _inputs):
        events[0] += 1
        if module is layer and events[1] is None:
            events[1] = events[0]

    def after(module, _inputs, output):
        events[0] += 1
        entry = calls.get(id(module))
        if entry is not None:
            entry[1] += 1
        else:
            version = output._version if isinstance(output, torch.Tensor) else None
            calls[id(module)] = [module, 1, events[0], output, version]

    try:
        for module in view.root.modules():
            if is_view(module):
                handles.append(module.register_forward_pre_hook(before))
                handles.append(module.register_forward_hook(after))
        yield cache
    finally:
        for h in handles:
            h.remove()
    start = events[1]
    if start is None:
        return
    for module, count, end, output, version in calls.values():
        if count == 1 and end < start and version is not None and output._version == version:
            cache.outputs[module.__dict__[_VIEW_MARK]] = output


_NO_FORWARD = object()


@contextmanager
def reuse_prefix(view: CallView, cache: PrefixCache | None, layer: nn.Module | None = None,
                 replacement: torch.Tensor | None = None) -> Iterator[None]:
    """Within the body, the modules of ``cache`` (their views in ``view``) return their recorded outputs without
    running, and ``layer`` (a module of the view), if given, returns ``replacement`` without running. Done by an
    instance ``forward`` on the view's modules (the user's modules are never touched), removed on exit."""
    patched = []

    def patch(module: nn.Module, value: torch.Tensor) -> None:
        patched.append((module, module.__dict__.get("forward", _NO_FORWARD)))
        module.__dict__["forward"] = lambda *_args, **_kwargs: value

    try:
        for original, output in (cache.outputs.items() if cache is not None else ()):
            module = view.of(original)
            if is_view(module):
                patch(module, output)
        if layer is not None:
            if not is_view(layer):
                raise InputError(f"cannot replace the output of a {type(layer).__name__} that is not part of a "
                                 "per-call view")
            patch(layer, replacement)
        yield
    finally:
        for module, previous in reversed(patched):
            if previous is _NO_FORWARD:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = previous


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[CallView]:
    """Within the body, pyattr's methods on ``model`` (in this thread) run in eval mode on one per-call
    view of it (:func:`pyattr._callview.call_view`): the model's own training flags are never changed,
    so other threads that use it meanwhile see it as it is. Yields the :class:`CallView`."""
    with call_view(model) as view:
        yield view
