"""In-graph post-processing: tensor ops that trace and export with the method.

The host-side twin (NumPy / C++ ``pyattr._C``) lives in :mod:`pyattr.render`; both use the
same conventions: bilinear resize with ``align_corners=False`` and per-sample min-max
normalization ``(m - min) / max(max - min, tiny)`` with ``tiny`` the smallest normal float32,
so a constant map becomes all zeros, and a map with a NaN or infinite value becomes all NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._callview import outside_trace

TINY = float(torch.finfo(torch.float32).tiny)


def nan_like(values: torch.Tensor) -> torch.Tensor:
    """A 0-dim NaN of ``values``' dtype and device, made outside any tracing in progress: a traced graph
    holds it as a constant (TorchScript cannot write a NaN literal, so ``full_like(x, nan)`` would not
    script)."""
    with outside_trace():
        return torch.tensor(float("nan"), dtype=values.dtype, device=values.device)


def normalize_minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalization of (N, ...) maps to [0, 1].

    A map that holds any NaN or infinity becomes all NaN (never a normal-looking map: an infinite
    value would otherwise squash every other value to 0).

    Example:
        >>> normalize_minmax(torch.tensor([[1.0, 3.0], [0.0, float("inf")]]))
        tensor([[0., 1.],
                [nan, nan]])
    """
    flat = maps.flatten(1)
    lo = flat.amin(1, keepdim=True)
    hi = flat.amax(1, keepdim=True)
    scaled = (flat - lo) / (hi - lo).clamp_min(TINY)
    finite = torch.isfinite(flat).all(1, keepdim=True)
    return torch.where(finite, scaled, nan_like(scaled)).view_as(maps)


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
