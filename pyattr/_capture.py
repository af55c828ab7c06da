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
def _view_hooks(layers: Sequence[nn.Module], make_hook) -> Iterator[None]:
    """Within the body, each of ``layers`` (modules of a per-call view) has the forward hook ``make_hook(i)``
    (``i``: its index in ``layers``); the hooks are removed when the ``with`` block exits, also when it raises."""
    handles = []
    try:
        for i, layer in enumerate(layers):
            if not is_view(layer):
                raise InputError(
                    f"cannot capture the output of a {type(layer).__name__} that is not part of a per-call view "
                    "(a TorchScript module, or a call outside a method call)")
            handles.append(layer.register_forward_hook(make_hook(i)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_outputs(layers: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Record the output of each of ``layers`` during the body's forward pass.

    ``layers`` must be modules of a per-call view (:func:`pyattr._callview.call_view`), so that the
    hooks see this call's forward pass only. Yields a list filled in place (one entry per layer, the
    last call's output). Hooks live only inside the ``with`` block.
    """
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def make_hook(i: int):
        def hook(_module, _inputs, output):
            captured[i] = output
        return hook

    with _view_hooks(layers, make_hook):
        yield captured


@contextmanager
def add_to_outputs(layers: Sequence[nn.Module], addends: Sequence[torch.Tensor]
                   ) -> Iterator[list[torch.Tensor | None]]:
    """Within the body, each of ``layers`` (modules of a per-call view) returns its output plus the matching
    tensor of ``addends`` (a zero "probe" whose gradient is the gradient with respect to the output: the CAMs'
    route to a layer's gradient under ``torch.func.vjp``); yields the list of those sums, filled in place as
    :func:`capture_outputs`. Hooks live only inside the ``with`` block."""
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def make_hook(i: int):
        def hook(_module, _inputs, output):
            captured[i] = output + addends[i]
            return captured[i]
        return hook

    with _view_hooks(layers, make_hook):
        yield captured


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

    ``outputs`` maps each cached module of the user's model (not of a view) to the tensor it returned. Candidates
    are the outermost modules a replay calls: those whose parent contains the layer (for ``layer3.1.conv2`` of a
    ResNet: ``conv1``, ``bn1``, ..., ``layer2``, ``layer3.0``, ``layer3.1.bn1``, ...). One is cached when, in the
    recorded pass, it was called exactly once, its call ended before the layer's began, it returned a tensor, and
    that tensor was not modified in place afterwards (its version counter unchanged to the end of the pass: e.g. a
    BatchNorm output that an in-place ReLU then overwrote is recomputed, the ReLU's is reused). Exception: an
    output that a module with ``inplace=True`` (a ReLU) is about to overwrite is recorded as a copy taken just
    before (one copy in the recorded pass instead of a recomputation in every replay), when that in-place module is
    itself cached (else it would run in a replay and overwrite the copy). A module that is not cached runs in a
    replay (its submodules with it).
    """

    def __init__(self) -> None:
        self.outputs: dict[nn.Module, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.outputs)


def _outermost(view: CallView, layer: nn.Module) -> list[nn.Module]:
    """The modules of ``view`` whose parent is ``view.root`` or contains ``layer`` (the layer among them)."""
    spine = [view.root]
    for name, module in view.root.named_modules():
        if module is layer:
            parts = name.split(".")
            spine += [view.root.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]
            break
    found: dict[int, nn.Module] = {}
    for parent in spine:
        for child in parent.children():
            if is_view(child) and child is not view.root:
                found.setdefault(id(child), child)
    return list(found.values())


@contextmanager
def record_prefix(view: CallView, layer: nn.Module) -> Iterator[PrefixCache]:
    """Record, during the body's forward pass on ``view``, which modules ran before ``layer`` (a module of the view)
    and what they returned; the yielded :class:`PrefixCache` is filled when the body ends. The hooks are put on the
    candidates' views (a dozen modules for a ResNet, so the pass costs about a plain forward pass) and removed on
    exit."""
    cache = PrefixCache()
    # id(view module) -> [module, calls, end event, output or None, version at return, id of the in-place module
    # whose input the output is a copy of (or None)]
    calls: dict[int, list] = {}
    by_output: dict[int, list] = {}  # id(output) -> its entry
    events = [0, None]  # [event counter, event at which the layer's (first) call began]
    handles = []

    def before(module, inputs):
        events[0] += 1
        if module is layer and events[1] is None:
            events[1] = events[0]
        if events[1] is None and inputs and getattr(module, "inplace", False) is True:
            # an in-place module (ReLU(inplace=True)) about to overwrite a candidate's output: keep a copy of it
            entry = by_output.get(id(inputs[0]))
            if entry is not None and entry[3] is inputs[0] and entry[3]._version == entry[4]:
                entry[3] = entry[3].clone()
                entry[4], entry[5] = entry[3]._version, id(module)

    def after(module, _inputs, output):
        events[0] += 1
        entry = calls.get(id(module))
        if entry is not None:
            entry[1] += 1
            entry[3] = None  # called twice: never cached
        elif events[1] is None and isinstance(output, torch.Tensor):
            calls[id(module)] = by_output[id(output)] = [module, 1, events[0], output, output._version, None]
        else:  # not a tensor, or ran (first) after the layer began: counted only
            calls[id(module)] = [module, 1, events[0], None, None, None]

    try:
        for module in _outermost(view, layer):
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        yield cache
    finally:
        for h in handles:
            h.remove()
    start = events[1]
    if start is None:
        return
    kept = {key for key, (_, count, end, output, version, _) in calls.items()
            if count == 1 and end < start and output is not None and output._version == version}
    for key in kept:
        module, _, _, output, _, copied_for = calls[key]
        if copied_for is None or copied_for in kept:
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
