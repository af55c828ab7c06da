"""Shared fixtures: seeded random-init torchvision models, the built-in ShapesNet, seeded input batches.

Every model is built once per session and handed out in eval mode. Tests must not change them
(no ``.grad``, no hooks, no mode switch left behind); a test that needs to mutate a model takes a
``copy.deepcopy`` first. All inputs are 64x64 to keep the suite fast on two CPU cores.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torchvision
from torch import nn

import pyattr

# Two cores: the suite runs as two pytest-xdist workers (pyproject's addopts), one torch thread each; run alone
# (``-n 0``) it keeps both threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

IMAGE_SIZE = 64
NUM_CLASSES_TORCHVISION = 10


@dataclass(frozen=True)
class ModelCase:
    """A model under test: its name, the module (eval mode), its Grad-CAM layer and class count."""

    name: str
    model: nn.Module
    layer: str
    num_classes: int


# Grad-CAM layers. For VGG the layer is the last ReLU of `features` (4x4 at 64x64 input), not the conv
# before it: that conv's output is overwritten by the in-place ReLU that follows it.
MODEL_LAYERS = {"builtin": pyattr.zoo.SHAPESNET_LAYER, "resnet18": "layer4", "vgg11": "features.19"}
MODEL_NAMES = tuple(MODEL_LAYERS)


def make_images(n: int, seed: int = 0, size: int = IMAGE_SIZE, channels: int = 3) -> torch.Tensor:
    """A seeded (n, channels, size, size) float32 batch, uniform in [0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=generator)


def make_shapes(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 64, 64) float32 images of the built-in model's shapes dataset, RGB in [0, 1] (contiguous)."""
    batch = pyattr.zoo.generate(n, seed=seed)
    return (torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255.0).contiguous()


def inputs_for(model_name: str, n: int, seed: int = 0) -> torch.Tensor:
    """Inputs that mean something to the model: shapes images for the built-in model, noise otherwise."""
    return make_shapes(n, seed) if model_name == "builtin" else make_images(n, seed)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, per sample, the worst sample."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.flatten(1).abs().amax(1)
    assert bool((scale > 0).all()), "a reference map is all zeros: the comparison proves nothing"
    return float(((actual - expected).flatten(1).abs().amax(1) / scale).max())


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """A module built under ``torch.manual_seed(seed)``, in eval mode, the global RNG untouched."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build().eval()
    finally:
        torch.random.set_rng_state(state)


@pytest.fixture(scope="session")
def resnet18() -> nn.Module:
    return seeded(0, lambda: torchvision.models.resnet18(num_classes=NUM_CLASSES_TORCHVISION))


@pytest.fixture(scope="session")
def vgg11() -> nn.Module:
    return seeded(1, lambda: torchvision.models.vgg11(num_classes=NUM_CLASSES_TORCHVISION))


@pytest.fixture(scope="session")
def builtin_model() -> nn.Module:
    """The shipped ShapesNet (``pyattr/zoo/shapesnet.pt``)."""
    return pyattr.zoo.load_builtin()


@pytest.fixture
def model_case(request: pytest.FixtureRequest) -> Callable[[str], ModelCase]:
    """``model_case(name)`` -> :class:`ModelCase` for ``name`` in :data:`MODEL_NAMES`."""

    def get(name: str) -> ModelCase:
        fixture = {"builtin": "builtin_model", "resnet18": "resnet18", "vgg11": "vgg11"}[name]
        model = request.getfixturevalue(fixture)
        num_classes = 6 if name == "builtin" else NUM_CLASSES_TORCHVISION
        return ModelCase(name, model, MODEL_LAYERS[name], num_classes)

    return get


@pytest.fixture(scope="session")
def images() -> Callable[..., torch.Tensor]:
    """The :func:`make_images` helper: ``images(n, seed=0)`` -> (n, 3, 64, 64) in [0, 1)."""
    return make_images


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a test module's calls (bit-identical results across threads need it: the summation
    order then never changes); modules that compare threads bit for bit use it with ``pytestmark``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
