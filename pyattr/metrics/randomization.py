"""The model-parameter randomization test as a metric (Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018, arXiv:1810.03292), on top of :mod:`pyattr.sanity`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..methods.base import AttributionMethod
from ..sanity import RandomizationResult, randomization_cascade
from ._common import check_inputs


def model_parameter_randomization(model: nn.Module, x: torch.Tensor,
                                  method: str | Callable[[nn.Module], AttributionMethod], target: Any = None, *,
                                  layer: str | None = None, layers: Sequence[str] | None = None, seed: int = 0,
                                  absolute: bool = True, **options: Any) -> RandomizationResult:
    """Cascading model-parameter randomization: re-initialize the layers from the output down, cumulatively, on a
    copy of ``model``, and after each one compare the method's raw maps with the original ones by Spearman rank
    correlation (:func:`pyattr.sanity.randomization_cascade`). A method that depends on the model falls towards 0;
    one that stays high is mostly showing the input.

    Args:
        model: the classifier (never changed: the cascade runs on a deep copy).
        x: (N, C, H, W) inputs.
        method: a registry name (``"gradcam"``, see ``pyattr.METHODS``; ``layer`` and ``options`` go to it) or a
            factory ``lambda m: pyattr.GradCAM(m, "layer4")`` that builds the method on a model. (A method
            object is tied to its model's modules, so it cannot be moved to the randomized copy.)
        target: class ids (None: the original model's arg-max), kept for every stage.
        layer: the layer of a CAM method given by name.
        layers: the cascade, top first (default: the model's direct children with parameters, last to first).
        seed: seed of the re-initialization (the global random state is restored).
        absolute: correlate absolute values (Adebayo et al.'s main setting).

    Returns:
        :class:`pyattr.sanity.RandomizationResult`: ``layers``, ``correlations`` (the mean Spearman correlation
        after each stage), ``per_sample`` (stages, N), ``maps``, ``target``.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> result = pyattr.metrics.model_parameter_randomization(model, torch.rand(2, 3, 64, 64), "saliency",
        ...                                                       layers=["fc"])
        >>> result.layers, result.per_sample.shape
        (['fc'], torch.Size([1, 2]))
    """
    if isinstance(method, AttributionMethod):
        raise InputError(f"give the method by name (e.g. {method.name!r}) or as a factory "
                         f"(lambda m: pyattr.{type(method).__name__}(m, ...)): a method object is tied to its "
                         "model's modules and cannot explain the randomized copy")
    if isinstance(method, str):
        from ..methods import build_method

        name = method
        build_method(name, model, layer, **options)  # unknown names and missing layers fail here, clearly

        def factory(m: nn.Module) -> AttributionMethod:
            return build_method(name, m, layer, **options)
    elif callable(method):
        if layer is not None or options:
            raise InputError("layer= and method options go with a method name; a factory builds the method itself")
        factory = method
    else:
        raise InputError(f"method must be a registry name or a factory, got {type(method).__name__}")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x = check_inputs(x)
    return randomization_cascade(factory, model, x, layers=layers, target=target, seed=seed, absolute=absolute)
