"""ShapesSegNet: the small fully convolutional segmenter that pyattr ships, trained on :mod:`pyattr.zoo.shapes`.

Seven per-pixel classes (:data:`SEG_CLASSES`): index 0 is the background and shape class ``k`` of
:data:`pyattr.zoo.shapes.SHAPE_CLASSES` is index ``k + 1`` (so ``circle`` is 1 and ``ring`` is 6).
:func:`class_map` turns the per-class masks of :func:`pyattr.zoo.shapes.generate` into that labelling.

Layout (FCN-style, spatial sizes at 64x64; ``stem``/``layer1``/``layer2`` as in
:class:`pyattr.zoo.model.ShapesNet`)::

    normalize (fixed mean/std buffers)                         (N, 3, 64, 64)
    stem:   conv3x3(3->24) + BN + ReLU + max-pool 2x2          (N, 24, 32, 32)
    layer1: BasicBlock(24->32)                                 (N, 32, 32, 32)
    layer2: BasicBlock(32->64, stride 2)                       (N, 64, 16, 16)
    layer3: BasicBlock(64->96, dilation 2)                     (N, 96, 16, 16)
    head:   conv3x3(96->64, dilation 2) + BN + ReLU  <- default CAM layer (N, 64, 16, 16)
    classifier: conv1x1(64->7)                                 (N, 7, 16, 16)
    bilinear upsample to the input size                        (N, 7, 64, 64) logits

The dilated convolutions give every output cell a receptive field of 72 px, so a pixel on one side of
an object (at most 28 px across) sees the whole outline, which is what tells a star from a circle.
Every layer is a standard module (no in-place op, no custom autograd function), so the export path
(TorchScript, torch.export, ONNX) and the LRP rules handle the model as they handle ShapesNet.

Example:
    >>> import torch
    >>> model = ShapesSegNet().eval()
    >>> model(torch.rand(2, 3, 64, 64)).shape
    torch.Size([2, 7, 64, 64])
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pyattr.zoo.model import _INPUT_MEAN, _INPUT_STD, BasicBlock
from pyattr.zoo.shapes import SHAPE_CLASSES

SEG_CLASSES: tuple[str, ...] = ("background", *SHAPE_CLASSES)
"""Per-pixel class names of :class:`ShapesSegNet`: background at 0, shape class ``k`` at ``k + 1``."""

NUM_SEG_CLASSES = len(SEG_CLASSES)

SHAPESSEG_LAYER = "head"
"""Name of the default explanation layer: the last feature map before the 1x1 classifier,
(N, 64, H/4, W/4)."""

SEG_WEIGHTS_PATH = Path(__file__).resolve().parent / "shapesseg.pt"
"""Where the shipped weights live (a plain ``state_dict`` written by :mod:`pyattr.zoo.train_seg`)."""


class Stride4Backbone(nn.Module):
    """The shared body of the built-in segmenter and detector: fixed input normalization, stem, three residual
    blocks and a dilated ``head`` at stride 4 (layout in the module docstring). Subclasses create their own 1x1
    output convolutions, then call :meth:`init_backbone`; :meth:`features` gives ``head``'s (N, C, H/4, W/4) map.

    Args:
        widths: channels of (stem, layer1, layer2, layer3, head).
    """

    def __init__(self, widths: tuple[int, int, int, int, int] = (24, 32, 64, 96, 64)) -> None:
        super().__init__()
        stem_width, width1, width2, width3, head_width = widths
        self.register_buffer("mean", torch.tensor(_INPUT_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_INPUT_STD).view(1, 3, 1, 1))
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
        )
        self.layer1 = BasicBlock(stem_width, width1)
        self.layer2 = BasicBlock(width1, width2, stride=2)
        self.layer3 = BasicBlock(width2, width3, dilation=2)
        self.head = nn.Sequential(
            nn.Conv2d(width3, head_width, 3, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(head_width),
            nn.ReLU(inplace=False),
        )

    def init_backbone(self) -> None:
        """He-init the body's convolutions and zero the last BN of each block (blocks start as identity).
        Called by subclasses after creating their output convolutions (which keep their own init)."""
        for part in (self.stem, self.layer1, self.layer2, self.layer3, self.head):
            for module in part.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for module in self.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> ``head``'s (N, C, H/4, W/4) features."""
        x = (x - self.mean) / self.std
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))


class ShapesSegNet(Stride4Backbone):
    """Semantic segmenter for the shapes images: background + the six shape classes, per pixel.

    Args:
        num_classes: number of per-pixel classes (7 for :data:`SEG_CLASSES`).
        widths: channels of (stem, layer1, layer2, layer3, head).

    Input: float (N, 3, H, W) RGB in [0, 1], H and W divisible by 4 (normalization happens inside,
    from the fixed ``mean``/``std`` buffers). Output: logits (N, num_classes, H, W); ``argmax(1)``
    is the predicted class map in :data:`SEG_CLASSES` order. ``head`` outputs (N, 64, H/4, W/4).

    Example:
        >>> import torch
        >>> model = ShapesSegNet().eval()
        >>> model(torch.rand(1, 3, 32, 48)).shape
        torch.Size([1, 7, 32, 48])
    """

    def __init__(
        self,
        num_classes: int = NUM_SEG_CLASSES,
        widths: tuple[int, int, int, int, int] = (24, 32, 64, 96, 64),
    ) -> None:
        super().__init__(widths)
        self.classifier = nn.Conv2d(widths[-1], num_classes, 1)
        self.init_backbone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = self.features(x)
        return F.interpolate(self.classifier(x), size=size, mode="bilinear", align_corners=False)


def class_map(masks: np.ndarray) -> np.ndarray:
    """Per-pixel class indices in :data:`SEG_CLASSES` order from per-class masks.

    Args:
        masks: bool (..., 6, H, W), e.g. ``generate(n, seed).masks``; at most one class per pixel
            (:func:`pyattr.zoo.shapes.generate` guarantees it: a later object hides an earlier one).

    Returns:
        uint8 (..., H, W): 0 where no mask is set, ``k + 1`` where class ``k``'s mask is.

    Example:
        >>> masks = np.zeros((6, 2, 2), dtype=bool); masks[3, 0, 1] = True
        >>> class_map(masks).tolist()
        [[0, 4], [0, 0]]
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim < 3 or masks.shape[-3] != len(SHAPE_CLASSES):
        raise ValueError(f"masks must be (..., {len(SHAPE_CLASSES)}, H, W), got {masks.shape}")
    indices = np.arange(1, len(SHAPE_CLASSES) + 1, dtype=np.uint8).reshape(-1, 1, 1)
    return (masks * indices).max(axis=-3).astype(np.uint8)


def load_builtin_segmenter(
    device: str | torch.device = "cpu", weights: str | os.PathLike | None = None
) -> ShapesSegNet:
    """Load the shipped ShapesSegNet weights, in eval mode, on ``device``.

    Args:
        device: where the model goes.
        weights: another ShapesSegNet ``state_dict`` file to load instead (``python -m
            pyattr.zoo.train_seg --out FILE`` writes one).

    Raises:
        FileNotFoundError: when ``pyattr/zoo/shapesseg.pt`` (or ``weights``) is missing (train it with
            ``python -m pyattr.zoo.train_seg``).

    Example:
        >>> model = load_builtin_segmenter()
        >>> model(torch.rand(1, 3, 64, 64)).argmax(1).shape
        torch.Size([1, 64, 64])
    """
    path = SEG_WEIGHTS_PATH if weights is None else Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"ShapesSegNet weights not found at {path}; train them with `python -m pyattr.zoo.train_seg`"
        )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = ShapesSegNet()
    model.load_state_dict(state_dict)
    return model.to(device).eval()
