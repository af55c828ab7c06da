"""Localization metrics: scores of explanations against ground-truth masks."""

from __future__ import annotations

import torch

from ..errors import InputError


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pointing game (Zhang et al. 2016, arXiv:1608.00507) without tolerance: a hit when the map's
    maximum falls inside the object's mask.

    Args:
        maps: (N, H, W) attribution maps.
        masks: (N, H, W) boolean ground-truth masks of the explained objects.

    Returns:
        (N,) bool hits. Where several pixels share the maximum, the first in row-major order counts.

    Example:
        >>> maps = torch.zeros(1, 4, 4); maps[0, 1, 2] = 1
        >>> masks = torch.zeros(1, 4, 4, dtype=torch.bool); masks[0, 1, 2] = True
        >>> pointing_game(maps, masks)
        tensor([True])
    """
    if maps.shape != masks.shape or maps.dim() != 3:
        raise InputError(f"maps and masks must both be (N, H, W) and of the same shape, got {tuple(maps.shape)} and "
                         f"{tuple(masks.shape)}; resize the maps to the masks' size (pyattr.postprocess.resize_bilinear)")
    flat = maps.flatten(1).argmax(1)
    return masks.flatten(1).bool().gather(1, flat[:, None])[:, 0]


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM, arXiv:1910.01279, sec. 5.2): the share of
    the map's positive energy that falls inside the object's mask, ``sum(relu(L) * mask) / sum(relu(L))``.

    Args:
        maps: (N, H, W) attribution maps at the masks' resolution (signed maps: only positive values count).
        masks: (N, H, W) boolean ground-truth masks.

    Returns:
        (N,) float in [0, 1]; 0 for a map with no positive value.

    Example:
        >>> maps = torch.zeros(1, 2, 2); maps[0, 0, 0] = 3; maps[0, 1, 1] = 1
        >>> masks = torch.zeros(1, 2, 2, dtype=torch.bool); masks[0, 0, 0] = True
        >>> energy_pointing_game(maps, masks)
        tensor([0.7500])
    """
    if maps.shape != masks.shape or maps.dim() != 3:
        raise InputError(f"maps and masks must both be (N, H, W) and of the same shape, got {tuple(maps.shape)} and "
                         f"{tuple(masks.shape)}; resize the maps to the masks' size (pyattr.postprocess.resize_bilinear)")
    energy = maps.clamp_min(0).flatten(1)
    inside = (energy * masks.flatten(1).to(energy.dtype)).sum(1)
    total = energy.sum(1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(energy.dtype).tiny), torch.zeros_like(total))
