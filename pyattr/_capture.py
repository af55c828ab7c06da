"""Scoped access to a model's internals, undone on exit (also when the body raises).

Hooks are put on the modules of a per-call view (:mod:`pyattr._callview`), never on the user's modules."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ._callview import CallView, call_view, is_view
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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[CallView]:
    """Within the body, pyattr's methods on ``model`` (in this thread) run in eval mode on one per-call
    view of it (:func:`pyattr._callview.call_view`): the model's own training flags are never changed,
    so other threads that use it meanwhile see it as it is. Yields the :class:`CallView`."""
    with call_view(model) as view:
        yield view
