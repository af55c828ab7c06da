"""Attribution methods, one family per module."""

from __future__ import annotations

import inspect

from torch import nn

from ..errors import InputError
from .ablationcam import AblationCAM
from .base import Attribution, AttributionMethod
from .cam import (
    CAM,
    GradCAM,
    GradCAMPlusPlus,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    SmoothGradCAMPlusPlus,
    TokensToGrid,
    XGradCAM,
)
from .deeplift import DeepLift, DeepLiftShap, GradientShap
from .eigencam import EigenCAM, EigenGradCAM
from .fullgrad import FullGrad
from .gradient import DeconvNet, GuidedBackprop, InputXGradient, IntegratedGradients, Saliency, SmoothGrad
from .lrp import LRP, LRPEpsilonAlpha2Beta1, LRPEpsilonGammaBox, LRPEpsilonPlus, LRPEpsilonPlusFlat
from .perturbation import RISE, FeatureAblation, Occlusion
from .reciprocam import ReciproCAM
from .scorecam import ISCAM, SSCAM, ScoreCAM

METHODS: dict[str, type[AttributionMethod]] = {
    "saliency": Saliency,
    "gradcam": GradCAM,
    "cam": CAM,
    "gradcampp": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
    "scorecam": ScoreCAM,
    "sscam": SSCAM,
    "iscam": ISCAM,
    "ablationcam": AblationCAM,
    "reciprocam": ReciproCAM,
    "smoothgradcampp": SmoothGradCAMPlusPlus,
    "fullgrad": FullGrad,
    "inputxgradient": InputXGradient,
    "smoothgrad": SmoothGrad,
    "integratedgradients": IntegratedGradients,
    "deeplift": DeepLift,
    "deepliftshap": DeepLiftShap,
    "gradientshap": GradientShap,
    "guidedbackprop": GuidedBackprop,
    "deconvnet": DeconvNet,
    "guidedgradcam": GuidedGradCAM,
    "occlusion": Occlusion,
    "featureablation": FeatureAblation,
    "rise": RISE,
    "lrp": LRP,  # epsilon_plus unless composite=... is given
    "lrp_epsilon_plus": LRPEpsilonPlus,
    "lrp_epsilon_gamma_box": LRPEpsilonGammaBox,
    "lrp_epsilon_plus_flat": LRPEpsilonPlusFlat,
    "lrp_epsilon_alpha2_beta1": LRPEpsilonAlpha2Beta1,
}


def needs_layer(name: str) -> bool:
    """Whether the method called ``name`` explains a layer (takes a ``layer`` argument)."""
    return "layer" in inspect.signature(METHODS[name].__init__).parameters


def build_method(name: str, model: nn.Module, layer: str | None = None, **options) -> AttributionMethod:
    """A method by its registry name (``pyattr.METHODS``), e.g. ``build_method("gradcam", m, "layer4")``.

    ``layer`` goes to the methods that explain a layer; ``None`` lets those that can choose one
    (the CAM family: the last layer with spatial extent, found on the first call); it is ignored by
    the others (Saliency, FullGrad)."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    if needs_layer(name):
        default = inspect.signature(METHODS[name].__init__).parameters["layer"].default
        if layer is None and default is inspect.Parameter.empty:
            raise InputError(f"{name} explains a layer: name one (e.g. --layer layer4)")
        return METHODS[name](model, layer=layer, **options)
    return METHODS[name](model, **options)


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
    "DeconvNet",
    "DeepLift",
    "DeepLiftShap",
    "EigenCAM",
    "EigenGradCAM",
    "FeatureAblation",
    "FullGrad",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientShap",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "InputXGradient",
    "IntegratedGradients",
    "LayerCAM",
    "Occlusion",
    "ReciproCAM",
    "Saliency",
    "ScoreCAM",
    "SmoothGrad",
    "SmoothGradCAMPlusPlus",
    "TokensToGrid",
    "XGradCAM",
    "build_method",
    "needs_layer",
]
