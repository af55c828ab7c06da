"""Counts that would not fit in memory: a clear InputError naming the option and the value that fits, raised
before anything that size is allocated (issue 16's bad input; before, ``RISE(masks=10**9)`` and
``DeepLiftShap(baselines=10**8)`` raised torch's allocator error, and ``GradientShap(samples=10**9)`` or
``IntegratedGradients(steps=10**9)`` grew until the kernel's OOM killer ended the process).

Each case runs under a lowered address-space limit where the platform has one, so that a check that came too late
would fail the test with MemoryError instead of exhausting the machine.
"""

from __future__ import annotations

import re
import resource

import pytest
import torch
from conftest import make_images

import pyattr
from pyattr.errors import InputError
from pyattr.methods import base

M = pyattr.methods


@pytest.fixture
def address_space_limit():
    """The process's address space capped at its current size + 6 GiB for the test (restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    cap = used + 6 * 2**30
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def fits_in_message(message: str, option: str) -> int:
    found = re.search(rf"use {option}=(\d+) or fewer", message)
    assert found, message
    return int(found.group(1))


HUGE = 10**9
CONSTRUCTION = [  # (make, option): counts whose bookkeeping alone passes the budget, refused by the constructor
    (lambda m: M.IntegratedGradients(m, steps=HUGE), "steps"),
    (lambda m: M.SmoothGrad(m, samples=HUGE), "samples"),
    (lambda m: M.GradientShap(m, samples=HUGE), "samples"),
    (lambda m: M.RISE(m, masks=HUGE), "masks"),
    (lambda m: M.SSCAM(m, "layer3", samples=HUGE), "samples"),
    (lambda m: M.ISCAM(m, "layer3", samples=HUGE), "samples"),
    (lambda m: M.SmoothGradCAMPlusPlus(m, "layer3", samples=HUGE), "samples"),
]


@pytest.mark.parametrize("make, option", CONSTRUCTION, ids=[f"case{i}" for i in range(len(CONSTRUCTION))])
def test_absurd_counts_are_refused_at_construction(builtin_model, address_space_limit, make, option):
    with pytest.raises(InputError, match=rf"{option}={HUGE} would set aside .* GiB up front") as err:
        make(builtin_model)
    fits = fits_in_message(str(err.value), option)
    assert 1 <= fits < HUGE and fits * base.PER_POINT_BYTES <= base.MAX_UPFRONT_BYTES


CALL = [  # (make, option, what): counts that fit as bookkeeping but not as draws of this input's size
    (lambda m: M.SmoothGrad(m, samples=30_000, chunk_size=2), "samples", "noise"),
    (lambda m: M.GradientShap(m, samples=30_000, chunk_size=2), "samples", "noise"),
    (lambda m: M.GradientShap(m, baselines=30_000, samples=2), "baselines", "random baselines"),
    (lambda m: M.DeepLiftShap(m, baselines=30_000, chunk_size=2), "baselines", "random baselines"),
    (lambda m: M.SmoothGradCAMPlusPlus(m, "layer3", samples=30_000, chunk_size=2), "samples", "noise"),
    (lambda m: M.SSCAM(m, "layer3", samples=1_000_000, chunk_size=64), "samples", "noise maps"),
]


@pytest.mark.parametrize("make, option, what", CALL, ids=[f"case{i}" for i in range(len(CALL))])
def test_draws_of_the_inputs_size_are_checked_before_they_are_made(builtin_model, address_space_limit, make,
                                                                   option, what):
    x = make_images(1, seed=0, size=128)  # 30,000 draws of one 3 x 128 x 128 input: 14 GiB
    method = make(builtin_model)
    with pytest.raises(InputError, match=rf"{option}=\d+ would set aside .* for its {what}") as err:
        method(x)
    fits = fits_in_message(str(err.value), option)
    per_item = x[0].numel() * 8 if what != "noise maps" else 128 * 128 * 8
    assert fits * per_item <= base.MAX_UPFRONT_BYTES < (fits + 1) * per_item


def test_rise_crop_rows_for_the_image_size(builtin_model, address_space_limit):
    """RISE's grids fit at construction; the masks' crop rows for a 4096 x 4096 image (masks x (H + W) longs) do
    not: refused before the model runs on the image."""
    rise = M.RISE(builtin_model, masks=100_000, chunk_size=1)
    x = torch.zeros(1, 3, 4096, 4096)
    with pytest.raises(InputError, match=r"masks=100000 would set aside .* crop rows at 4096 x 4096 pixels"):
        rise(x)


@pytest.mark.parametrize("make", [
    lambda m: M.IntegratedGradients(m, steps=5_000, chunk_size=5_000),
    lambda m: M.SmoothGrad(m, samples=5_000, chunk_size=5_000),
    lambda m: M.GradientShap(m, samples=5_000, chunk_size=5_000),
    lambda m: M.DeepLiftShap(m, baselines=torch.zeros(5_000, 3, 128, 128)[:, :, :1, :1], chunk_size=5_000),
    lambda m: M.SmoothGradCAMPlusPlus(m, "layer3", samples=5_000, chunk_size=5_000),
], ids=["ig", "smoothgrad", "gradientshap", "deepliftshap", "smoothgradcampp"])
def test_one_pass_too_large_names_the_chunk_size_that_fits(builtin_model, address_space_limit, make):
    """chunk_size copies of each input in one pass: 2 x 5,000 x 3 x 128 x 128 floats = 1.8 GiB of inputs at batch
    2 over a lowered 1 GiB pass budget; the message gives the chunk_size that fits it."""
    x = make_images(2, seed=1, size=128)
    per_row = x[0].numel() * 4
    old = base.MAX_PASS_BYTES
    base.MAX_PASS_BYTES = 2**30
    try:
        with pytest.raises(InputError, match=r"would put 2 x 5000 = 10000 copies of the inputs \(.* GiB, .*\) "
                                             r"through the model in one pass, over pyattr\.methods\.base\."
                                             r"MAX_PASS_BYTES") as err:
            make(builtin_model)(x)
    finally:
        base.MAX_PASS_BYTES = old
    fits = int(re.search(r"pass chunk_size=(\d+) or less", str(err.value)).group(1))
    assert 2 * fits * per_row <= 2**30 < 2 * (fits + 1) * per_row


def test_counts_within_the_budget_still_run(builtin_model):
    """The checks take nothing from ordinary settings (the results are the same objects' usual maps)."""
    x = make_images(2, seed=2, size=64)
    for method in (M.IntegratedGradients(builtin_model, steps=8), M.SmoothGrad(builtin_model, samples=4),
                   M.GradientShap(builtin_model, samples=4), M.DeepLiftShap(builtin_model, baselines=3),
                   M.RISE(builtin_model, masks=8), M.SSCAM(builtin_model, "layer3", samples=2, chunk_size=64),
                   M.ISCAM(builtin_model, "layer3", samples=2, chunk_size=64),
                   M.SmoothGradCAMPlusPlus(builtin_model, "layer3", samples=2)):
        result = method(x, target=1)
        assert bool(torch.isfinite(result.raw).all()) and result.raw.shape[0] == 2
