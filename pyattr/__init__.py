"""pyattr: attribution maps for PyTorch vision models, exported as single graphs.

Names are imported lazily, so that torch-free parts (``pyattr.render``, ``pyattr.colormaps``)
load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Attribution": "pyattr.methods",
    "AttributionMethod": "pyattr.methods",
    "METHODS": "pyattr.methods",
    "Saliency": "pyattr.methods",
    "GradCAM": "pyattr.methods",
    "InputXGradient": "pyattr.methods",
    "SmoothGrad": "pyattr.methods",
    "IntegratedGradients": "pyattr.methods",
    "GuidedBackprop": "pyattr.methods",
    "DeconvNet": "pyattr.methods",
    "CAM": "pyattr.methods",
    "GradCAMPlusPlus": "pyattr.methods",
    "XGradCAM": "pyattr.methods",
    "LayerCAM": "pyattr.methods",
    "HiResCAM": "pyattr.methods",
    "ScoreCAM": "pyattr.methods",
    "FullGrad": "pyattr.methods",
    "GuidedGradCAM": "pyattr.methods",
    "TokensToGrid": "pyattr.methods",
    "LRP": "pyattr.methods",
    "export": "pyattr.exporting",
    "read_metadata": "pyattr.exporting",
    "pointing_game": "pyattr.metrics",
    "PyattrError": "pyattr.errors",
    "InputError": "pyattr.errors",
    "LayerNotFoundError": "pyattr.errors",
    "ExportError": "pyattr.errors",
}
_SUBMODULES = {"zoo", "render", "colormaps", "methods", "exporting", "metrics", "models", "figures", "lrp",
               "postprocess", "errors", "sanity", "runtime"}

__all__ = [
    "CAM",
    "LRP",
    "METHODS",
    "Attribution",
    "AttributionMethod",
    "DeconvNet",
    "ExportError",
    "FullGrad",
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "InputError",
    "InputXGradient",
    "IntegratedGradients",
    "LayerCAM",
    "LayerNotFoundError",
    "PyattrError",
    "Saliency",
    "ScoreCAM",
    "SmoothGrad",
    "TokensToGrid",
    "XGradCAM",
    "__version__",
    "colormaps",
    "errors",
    "export",
    "exporting",
    "figures",
    "lrp",
    "methods",
    "metrics",
    "models",
    "pointing_game",
    "postprocess",
    "read_metadata",
    "render",
    "runtime",
    "sanity",
    "zoo",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"pyattr.{name}")
    else:
        raise AttributeError(f"module 'pyattr' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
