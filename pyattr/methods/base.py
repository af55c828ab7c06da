"""What every attribution method shares: input/target checks, the eager call, the traceable graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._capture import eval_mode
from ..errors import InputError
from ..postprocess import normalize_minmax, resize_bilinear

TargetLike = "int | list[int] | torch.Tensor | None"


@dataclass
class Attribution:
    """The result of an attribution call.

    Attributes:
        maps: (N, H, W) float maps at input resolution, min-max normalized per sample to [0, 1].
        raw: the method's raw map before resizing and normalization (saliency: (N, H, W); CAMs:
            (N, h, w) at the layer's resolution).
        scores: (N, K) model outputs (logits) for the inputs.
        target: (N,) long, the class explained for each sample (arg-max where none was given).
    """

    maps: torch.Tensor
    raw: torch.Tensor
    scores: torch.Tensor
    target: torch.Tensor


def select_target(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resolve targets (-1 means arg-max) and return (sum of the selected scores, resolved target).

    Traceable: no Python branching on values. Summing over the batch gives each sample's
    gradient of its own score, since samples do not interact in eval mode.
    """
    resolved = torch.where(target < 0, scores.argmax(1), target)
    return scores.gather(1, resolved[:, None]).sum(), resolved


class AttributionMethod:
    """Base class. A subclass implements :meth:`attribute_raw`, a traceable function of tensors.

    Calling the method (``method(x, target)``) runs it eagerly and returns an :class:`Attribution`;
    :meth:`graph` is the single function that :func:`pyattr.export` traces into one graph.
    During a call the model is put in eval mode (every module's flag is restored after), no
    hook outlives the call, no parameter receives ``.grad`` and no weight is touched.
    """

    name: ClassVar[str] = "method"

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._tracing = False

    # -- to implement --------------------------------------------------------------------------
    def attribute_raw(
        self, x: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (scores (N,K), raw map, resolved target (N,)). ``target``: (N,) long, -1 = arg-max."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """What goes into an exported file's metadata (method name and options)."""
        return {"method": self.name}

    # -- shared --------------------------------------------------------------------------------
    def select(self, scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`select_target`, plus a range check on eager calls (skipped while tracing)."""
        if not self._tracing:
            check_target_range(scores, target)
        return select_target(scores, target)

    def graph(
        self, x: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole traceable computation: (scores, resolved target, raw map, normalized maps)."""
        with torch.enable_grad():
            scores, raw, resolved = self.attribute_raw(x, target)
        maps = normalize_minmax(resize_bilinear(raw, tuple(x.shape[-2:])))
        return scores.detach(), resolved, raw.detach(), maps.detach()

    def __call__(self, x: torch.Tensor, target: TargetLike = None) -> Attribution:
        x = self._check_input(x)
        t = self._check_target(target, x.shape[0], x.device)
        with eval_mode(self.model):
            scores, resolved, raw, maps = self.graph(x, t)
        return Attribution(maps=maps, raw=raw, scores=scores, target=resolved)

    def _check_input(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(
                f"inputs must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}; "
                "convert images with torch.as_tensor(...) and stack them into a batch"
            )
        if x.dim() != 4:
            hint = " (add a batch dimension with x[None])" if x.dim() == 3 else ""
            raise InputError(f"inputs must have shape (N, C, H, W), got {tuple(x.shape)}{hint}")
        if not x.is_floating_point():
            raise InputError(
                f"inputs must be floating point, got {x.dtype}; convert uint8 images with x.float() / 255 "
                "and apply the model's normalization"
            )
        if x.shape[0] == 0:
            raise InputError("inputs hold no sample (batch size 0)")
        try:
            param = next(self.model.parameters())
        except StopIteration:
            param = None
        if param is not None and param.device != x.device:
            raise InputError(
                f"inputs are on {x.device} but the model is on {param.device}; move one with .to(device)"
            )
        return x.detach()

    def _check_target(self, target: Any, n: int, device: torch.device) -> torch.Tensor:
        if target is None:
            return torch.full((n,), -1, dtype=torch.long, device=device)
        if isinstance(target, bool):
            raise InputError("target must be a class index, not a bool")
        if isinstance(target, int):
            if target < 0:
                raise InputError(f"target must be a class index >= 0, got {target}")
            return torch.full((n,), target, dtype=torch.long, device=device)
        t = torch.as_tensor(target, device=device)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise InputError(f"target must hold integer class indices, got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise InputError(f"target must be None, an int or a ({n},) tensor of class ids, got shape "
                             f"{tuple(t.shape)}")
        if bool((t < -1).any()):
            raise InputError("target holds negative class ids (-1 alone means 'the arg-max class')")
        return t.long()


def check_target_range(scores: torch.Tensor, target: torch.Tensor) -> None:
    """Eager-only check that targets index into the scores (raises InputError)."""
    k = scores.shape[1]
    if bool((target >= k).any()):
        bad = int(target.max())
        raise InputError(f"target class {bad} is out of range: the model has {k} outputs (0..{k - 1})")
