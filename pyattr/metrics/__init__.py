"""Metrics of explanations: localization against ground truth, and faithfulness to the model.

Localization (:mod:`pyattr.metrics.localization`): :func:`pointing_game`, :func:`energy_pointing_game`.

Faithfulness, all called as ``metric(model, x, explanation, target, **options)`` with (N, C, H, W) inputs,
(N, H, W) maps at the inputs' resolution or a pyattr method built on ``model``, and class ids (None: the
arg-max) or a :class:`~pyattr.targets.Target`; perturbed copies run ``chunk_size`` at a time:

- :func:`deletion`, :func:`insertion`, :func:`deletion_insertion`: RISE's curves and their AUC (torchcam's definition) -> :class:`Curve`;
- :func:`confidence_change` (:func:`average_drop`, :func:`increase_in_confidence`): Grad-CAM++'s Average Drop
  and Increase in Confidence -> :class:`ConfidenceChange`;
- :func:`road`, :func:`road_combined`: ROAD with noisy linear imputation (pytorch-grad-cam's; needs scipy)
  -> :class:`RoadResult`;
- :func:`infidelity`, :func:`sensitivity_max`: captum's definitions (Yeh et al. 2019);
- :func:`model_parameter_randomization`: Adebayo et al.'s cascading randomization test;
- :class:`MethodWithMetrics`: a method and its deletion/insertion/Average Drop as ONE exportable graph.

See docs/metrics.md for the definitions, their sources and examples.
"""

from __future__ import annotations

from .graph import METRIC_OUTPUTS, MethodWithMetrics
from .imputation import (
    RoadResult,
    linear_imputation,
    noisy_linear_imputation,
    removal_masks,
    removed_count,
    road,
    road_combined,
)
from .localization import energy_pointing_game, pointing_game
from .perturbation import (
    ConfidenceChange,
    Curve,
    average_drop,
    confidence_change,
    deletion,
    deletion_insertion,
    increase_in_confidence,
    insertion,
    pixel_ranks,
    step_counts,
)
from .randomization import model_parameter_randomization
from .robustness import infidelity, sensitivity_max

__all__ = [
    "METRIC_OUTPUTS",
    "ConfidenceChange",
    "Curve",
    "MethodWithMetrics",
    "RoadResult",
    "average_drop",
    "confidence_change",
    "deletion",
    "deletion_insertion",
    "energy_pointing_game",
    "increase_in_confidence",
    "infidelity",
    "insertion",
    "linear_imputation",
    "model_parameter_randomization",
    "noisy_linear_imputation",
    "pixel_ranks",
    "pointing_game",
    "removal_masks",
    "removed_count",
    "road",
    "road_combined",
    "sensitivity_max",
    "step_counts",
]
