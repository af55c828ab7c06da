"""pyattr: attribution maps for PyTorch vision models, exported as single graphs.

Names are imported lazily, so that torch-free parts (``pyattr.render``, ``pyattr.colormaps``)
load without torch.

Running from a source checkout after ``pip install .``: the checkout's ``pyattr/`` has no compiled
core (``pyattr._C`` is built into site-packages), so ``import pyattr._C`` falls back to the
installed one (a finder placed after Python's own, used only when the checkout has none).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
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
    "DeepLift": "pyattr.methods",
    "DeepLiftShap": "pyattr.methods",
    "GradientShap": "pyattr.methods",
    "CAM": "pyattr.methods",
    "GradCAMPlusPlus": "pyattr.methods",
    "XGradCAM": "pyattr.methods",
    "LayerCAM": "pyattr.methods",
    "HiResCAM": "pyattr.methods",
    "ScoreCAM": "pyattr.methods",
    "EigenCAM": "pyattr.methods",
    "EigenGradCAM": "pyattr.methods",
    "SSCAM": "pyattr.methods",
    "ISCAM": "pyattr.methods",
    "AblationCAM": "pyattr.methods",
    "ReciproCAM": "pyattr.methods",
    "SmoothGradCAMPlusPlus": "pyattr.methods",
    "FullGrad": "pyattr.methods",
    "Occlusion": "pyattr.methods",
    "FeatureAblation": "pyattr.methods",
    "RISE": "pyattr.methods",
    "GuidedGradCAM": "pyattr.methods",
    "TokensToGrid": "pyattr.methods",
    "LRP": "pyattr.methods",
    "export": "pyattr.exporting",
    "read_metadata": "pyattr.exporting",
    "pointing_game": "pyattr.metrics",
    "energy_pointing_game": "pyattr.metrics",
    "PyattrError": "pyattr.errors",
    "InputError": "pyattr.errors",
    "LayerNotFoundError": "pyattr.errors",
    "ExportError": "pyattr.errors",
    "ClassTarget": "pyattr.targets",
    "DetectionTarget": "pyattr.targets",
    "SegmentationTarget": "pyattr.targets",
    "SimilarityTarget": "pyattr.targets",
    "Target": "pyattr.targets",
}
_SUBMODULES = {"zoo", "render", "colormaps", "methods", "exporting", "metrics", "models", "figures", "lrp",
               "postprocess", "errors", "sanity", "runtime", "targets",
               "detection"}

__all__ = [
    "CAM",
    "ISCAM",
    "LRP",
    "METHODS",
    "RISE",
    "SSCAM",
    "AblationCAM",
    "Attribution",
    "AttributionMethod",
    "ClassTarget",
    "DeconvNet",
    "DeepLift",
    "DeepLiftShap",
    "DetectionTarget",
    "EigenCAM",
    "EigenGradCAM",
    "ExportError",
    "FeatureAblation",
    "FullGrad",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientShap",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "InputError",
    "InputXGradient",
    "IntegratedGradients",
    "LayerCAM",
    "LayerNotFoundError",
    "Occlusion",
    "PyattrError",
    "ReciproCAM",
    "Saliency",
    "ScoreCAM",
    "SegmentationTarget",
    "SimilarityTarget",
    "SmoothGrad",
    "SmoothGradCAMPlusPlus",
    "Target",
    "TokensToGrid",
    "XGradCAM",
    "__version__",
    "colormaps",
    "detection",
    "energy_pointing_game",
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
    "targets",
    "zoo",
]


def _installed_core() -> Path | None:
    """An installed ``pyattr/_C`` extension elsewhere on ``sys.path`` (site-packages), for a source tree
    that has none of its own; None when this package has one or none is found."""
    here = Path(__file__).resolve().parent
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    if any((here / f"_C{suffix}").is_file() for suffix in suffixes):
        return None
    for entry in sys.path:
        folder = Path(entry or ".") / "pyattr"
        try:
            if folder.resolve() == here:
                continue
            for suffix in suffixes:
                if (folder / f"_C{suffix}").is_file():
                    return folder / f"_C{suffix}"
        except OSError:
            continue
    return None


class _InstalledCoreFinder(importlib.abc.MetaPathFinder):
    """Finds ``pyattr._C`` in site-packages when the imported ``pyattr`` (a source checkout) lacks it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "pyattr._C":
            return None
        core = _installed_core()
        return importlib.util.spec_from_file_location(fullname, core) if core is not None else None


if not any(isinstance(f, _InstalledCoreFinder) for f in sys.meta_path):
    sys.meta_path.append(_InstalledCoreFinder())


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
