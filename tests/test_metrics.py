"""pyattr.metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch

import pyattr


def test_pointing_game_hits_where_the_maximum_lies():
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 2] = 1.0
    maps[1, 3, 3] = 2.0
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, 1, 2] = masks[1, 0, 0] = True
    masks[2, 0, 0] = True  # an all-zero map: the first pixel is its maximum
    assert pyattr.pointing_game(maps, masks).tolist() == [True, False, True]


def test_energy_pointing_game_is_the_positive_share_inside():
    maps = torch.tensor([[[3.0, -5.0], [0.0, 1.0]], [[-1.0, -2.0], [0.0, 0.0]]])
    masks = torch.tensor([[[True, True], [False, False]], [[True, False], [False, False]]])
    got = pyattr.energy_pointing_game(maps, masks)
    torch.testing.assert_close(got, torch.tensor([0.75, 0.0]))
    with pytest.raises(ValueError, match="both be"):
        pyattr.energy_pointing_game(maps, masks[0])
