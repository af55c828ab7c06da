"""What a method explains: targets between the model's output and the attribution method.

See :mod:`pyattr.targets.base` for the design and how to add a kind.

Example:
    >>> import torch, pyattr
    >>> from pyattr.targets import SegmentationTarget
    >>> seg = pyattr.zoo.load_builtin_segmenter()                       # doctest: +SKIP
    >>> cam = pyattr.GradCAM(seg, pyattr.zoo.SHAPESSEG_LAYER)            # doctest: +SKIP
    >>> cam(x, SegmentationTarget(classes=2)).maps.shape                 # doctest: +SKIP
    torch.Size([1, 64, 64])
"""

from __future__ import annotations

from .base import CLASS_TARGET, ClassTarget, Target, as_target, bound_target, current_target
from .detection import DetectionTarget
from .segmentation import SegmentationTarget
from .similarity import SimilarityTarget

TARGETS: dict[str, type[Target]] = {
    "class": ClassTarget,
    "detection": DetectionTarget,
    "segmentation": SegmentationTarget,
    "similarity": SimilarityTarget,
}
"""Target kinds by the name exported files record (``metadata["target"]["kind"]``)."""

__all__ = [
    "CLASS_TARGET",
    "TARGETS",
    "ClassTarget",
    "DetectionTarget",
    "SegmentationTarget",
    "SimilarityTarget",
    "Target",
    "as_target",
    "bound_target",
    "current_target",
]
