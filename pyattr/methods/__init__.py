"""Attribution methods, one family per module."""

from .base import Attribution, AttributionMethod
from .cam import GradCAM
from .gradient import Saliency

METHODS: dict[str, type[AttributionMethod]] = {"saliency": Saliency, "gradcam": GradCAM}

__all__ = ["METHODS", "Attribution", "AttributionMethod", "GradCAM", "Saliency"]
