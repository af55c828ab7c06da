"""In-graph post-processing: tensor ops that trace and export with the method.

The host-side twin (NumPy / C++ ``pyattr._C``) lives in :mod:`pyattr.render`; both use the
same conventions: bilinear resize with ``align_corners=False`` and per-sample min-max
normalization ``(m - min) / max(max - min, tiny)`` with ``tiny`` the smallest normal float32,
so a constant map becomes all zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TINY = float(torch.finfo(torch.float32).tiny)


def normalize_minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalization of (N, ...) maps to [0, 1]."""
    flat = maps.flatten(1)
    lo = flat.amin(1, keepdim=True)
    hi = flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(TINY)).view_as(maps)


def resize_bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, h, w) maps to (N, H, W), ``align_corners=False``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def reduce_channels(maps: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce (N, C, H, W) maps over channels: 'max' of |.|, 'sum' of |.|, 'l2' norm, 'mean'."""
    if reduction == "max":
        return maps.abs().amax(1)
    if reduction == "sum":
        return maps.abs().sum(1)
    if reduction == "l2":
        return maps.pow(2).sum(1).sqrt()
    if reduction == "mean":
        return maps.mean(1)
    raise ValueError(f"unknown channel reduction {reduction!r}; use one of 'max', 'sum', 'l2', 'mean'")
