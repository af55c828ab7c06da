"""Composites: which rule each layer gets, by layer type and position (Montavon et al. 2019, sec. 10.3;
Kohlbrenner et al. 2020). The four named composites follow zennit's definitions:

===========================  ==============================  ================  ===============
composite                    first conv/linear layer         other convs       linear layers
===========================  ==============================  ================  ===============
``epsilon_plus``             (as other convs)                ZPlus             Epsilon
``epsilon_gamma_box``        ZBox(low, high) (first conv)    Gamma(0.25)       Epsilon
``epsilon_plus_flat``        Flat                            ZPlus             Epsilon
``epsilon_alpha2_beta1``     (as other convs)                AlphaBeta(2, 1)   Epsilon
===========================  ==============================  ================  ===============

All of them: element-wise activations and (unmerged) BatchNorm ``Pass``; average pooling (also
adaptive) ``Norm``; max-pooling, dropout, flatten and identity keep their gradient. "First" is the
first matching module in ``model.named_modules()`` order. Users map their own rules by layer name
or type with ``LRP(model, rules={"features.0": Flat(), nn.Linear: Epsilon(0.25)})``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .rules import AlphaBeta, Epsilon, Flat, Gamma, Gradient, Norm, Pass, Rule, ZBox, ZPlus

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEARS = (nn.Linear,)
AVG_POOLS = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ACTIVATIONS = (
    nn.ELU,
    nn.Hardshrink,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.LogSigmoid,
    nn.PReLU,
    nn.ReLU,
    nn.ReLU6,
    nn.RReLU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.Sigmoid,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softshrink,
    nn.Softsign,
    nn.Tanh,
    nn.Tanhshrink,
    nn.Threshold,
)
class _EvalIdentityType(type):
    def __instancecheck__(cls, obj) -> bool:
        kind = type(obj)
        return kind.__name__ in _EVAL_IDENTITY_NAMES and kind.__module__.split(".", 1)[0] in ("torchvision", "timm")


_EVAL_IDENTITY_NAMES = frozenset({"StochasticDepth", "DropPath", "DropBlock2d", "DropBlock3d"})


class EvalIdentity(metaclass=_EvalIdentityType):
    """Matches (``isinstance``) the stochastic regularizers of torchvision (``StochasticDepth``, ``DropBlock2d/3d``)
    and timm (``DropPath``): the identity in eval mode, which pyattr's calls run in (a call's view of the model is
    in eval mode whatever the user's flags). Matched by name, so that neither library is imported for it."""


class _LayoutType(type):
    def __instancecheck__(cls, obj) -> bool:
        kind = type(obj)
        return kind.__name__ == "Permute" and kind.__module__.split(".", 1)[0] == "torchvision"


class LayoutLayer(metaclass=_LayoutType):
    """Matches torchvision's ``Permute`` (ConvNeXt's, Swin's): a reordering of the dimensions, whose gradient carries
    relevance back unchanged, reordered (as ``nn.Flatten``). Matched by name (torchvision is not imported for it)."""


GRADIENT_LAYERS = (
    EvalIdentity,
    LayoutLayer,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
)

LayerMap = Sequence[tuple[type | tuple[type, ...], Rule]]


class Composite:
    """Rules by layer type, with an optional special map for the first matching layer.

    Args:
        layer_map: ``[(types, rule), ...]``, the first matching entry wins.
        first_map: the same for the first module (in ``named_modules()`` order) that matches it.
        name: a short name (used in exported metadata).
    """

    def __init__(self, layer_map: LayerMap, first_map: LayerMap = (), name: str = "custom"):
        self.layer_map = list(layer_map)
        self.first_map = list(first_map)
        self.name = name

    def assign(self, model: nn.Module) -> dict[str, Rule]:
        """``{module name: rule}`` for the modules this composite maps."""
        rules: dict[str, Rule] = {}
        first_done = not self.first_map
        for name, module in model.named_modules():
            if not first_done:
                rule = _match(self.first_map, module)
                if rule is not None:
                    rules[name] = rule
                    first_done = True
                    continue
            rule = _match(self.layer_map, module)
            if rule is not None:
                rules[name] = rule
        return rules

    def __repr__(self) -> str:
        return f"Composite({self.name!r})"


def _match(layer_map: LayerMap, module: nn.Module) -> Rule | None:
    return next((rule for types, rule in layer_map if isinstance(module, types)), None)


def base_layer_map(stabilizer: float = 1e-6) -> list[tuple[tuple[type, ...], Rule]]:
    """The entries every named composite shares."""
    return [
        (ACTIVATIONS, Pass()),
        (AVG_POOLS, Norm(stabilizer)),
        (BATCH_NORMS, Pass()),
        (GRADIENT_LAYERS, Gradient()),
    ]


def EpsilonPlus(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """ZPlus for convolutions, Epsilon for linear layers."""
    return Composite(
        base_layer_map(stabilizer) + [(CONVOLUTIONS, ZPlus(stabilizer)), (LINEARS, Epsilon(epsilon))],
        name="epsilon_plus",
    )


def EpsilonAlpha2Beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """AlphaBeta(2, 1) for convolutions, Epsilon for linear layers."""
    return Composite(
        base_layer_map(stabilizer)
        + [(CONVOLUTIONS, AlphaBeta(2.0, 1.0, stabilizer)), (LINEARS, Epsilon(epsilon))],
        name="epsilon_alpha2_beta1",
    )


def EpsilonPlusFlat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """Flat for the first convolution or linear layer, then as :func:`EpsilonPlus`."""
    return Composite(
        base_layer_map(stabilizer) + [(CONVOLUTIONS, ZPlus(stabilizer)), (LINEARS, Epsilon(epsilon))],
        first_map=[(CONVOLUTIONS + LINEARS, Flat(stabilizer))],
        name="epsilon_plus_flat",
    )


def EpsilonGammaBox(
    low: float | torch.Tensor,
    high: float | torch.Tensor,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    stabilizer: float = 1e-6,
) -> Composite:
    """ZBox(low, high) for the first convolution, Gamma for the others, Epsilon for linear layers.

    ``low``/``high``: the lowest/highest value the first convolution's input can take (a float or
    a per-channel tensor), e.g. ``(0 - mean) / std`` and ``(1 - mean) / std`` for normalized images."""
    return Composite(
        base_layer_map(stabilizer) + [(CONVOLUTIONS, Gamma(gamma, stabilizer)), (LINEARS, Epsilon(epsilon))],
        first_map=[(CONVOLUTIONS, ZBox(low, high, stabilizer))],
        name="epsilon_gamma_box",
    )


COMPOSITES = {
    "epsilon_plus": EpsilonPlus,
    "epsilon_gamma_box": EpsilonGammaBox,
    "epsilon_plus_flat": EpsilonPlusFlat,
    "epsilon_alpha2_beta1": EpsilonAlpha2Beta1,
}
"""Named composites: ``name -> factory``."""
