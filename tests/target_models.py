"""Tiny seeded models for the target tests (tests/test_targets.py, tests/test_runtime_targets.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

K = 4  # classes of the tiny segmenter
D = 6  # embedding size of the tiny embedder


class TinySegmenter(nn.Module):
    """(N, 3, H, W) -> {"out": (N, K, H, W)}: conv-BN-ReLU, a stride-2 block, 1x1 classifier, upsample."""

    def __init__(self, classes: int = K):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(12, classes, 1)

    def forward(self, x):
        out = self.classifier(self.down(self.stem(x)))
        return {"out": F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)}


class TinyEmbedder(nn.Module):
    """(N, 3, H, W) -> embedding (N, D)."""

    def __init__(self, dim: int = D):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, dim)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def seeded(module: nn.Module, seed: int) -> nn.Module:
    """``module`` in eval mode with seeded, non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return module.eval()


def tiny_segmenter() -> TinySegmenter:
    """The seeded tiny segmenter, its logits scaled to ~+-70 (rather than +-0.7): clear per-pixel arg-maxes, so
    that a predicted region is the same in every runtime (near-ties can flip within float32 rounding)."""
    torch.manual_seed(0)
    model = seeded(TinySegmenter(), 1)
    with torch.no_grad():
        model.classifier.weight.mul_(100)
        model.classifier.bias.mul_(100)
    return model


def tiny_embedder() -> TinyEmbedder:
    torch.manual_seed(2)
    return seeded(TinyEmbedder(), 3)
