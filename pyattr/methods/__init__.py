"""Attribution methods, one family per module."""

from __future__ import annotations

import inspect

from torch import nn

from ..errors import InputError
from .base import Attribution, AttributionMethod
from .cam import GradCAM
from .gradient import Saliency

METHODS: dict[str, type[AttributionMethod]] = {"saliency": Saliency, "gradcam": GradCAM}


def needs_layer(name: str) -> bool:
    """Whether the method called ``name`` explains a layer (takes a ``layer`` argument)."""
    return "layer" in inspect.signature(METHODS[name].__init__).parameters


def build_method(name: str, model: nn.Module, layer: str | None = None, **options) -> AttributionMethod:
    """A method by its registry name (``pyattr.METHODS``), e.g. ``build_method("gradcam", m, "layer4")``."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    if needs_layer(name):
        if layer is None:
            raise InputError(f"{name} explains a layer: name one (e.g. --layer layer4)")
        return METHODS[name](model, layer=layer, **options)
    return METHODS[name](model, **options)


__all__ = ["METHODS", "Attribution", "AttributionMethod", "GradCAM", "Saliency", "build_method", "needs_layer"]
