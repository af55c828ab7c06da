"""The class activation map family: maps made from a layer's activations, weighted per channel.

Every method here explains one or more layers (``layer=`` a name, a list of names, or ``None`` for
the last layer whose output still has spatial extent, found on the first call). Its raw map has the
layer's resolution; with several layers the per-layer maps are min-max normalized per sample,
resized to the largest layer's resolution and fused (``fuse="mean"`` or ``"max"``).

Transformers: a layer that outputs tokens (N, P + h*w, D) is turned into a (N, D, h, w) map by a
``reshape_transform`` such as :class:`TokensToGrid` (dropping the P class/register tokens).

Score-CAM lives in :mod:`pyattr.methods.scorecam`, FullGrad in :mod:`pyattr.methods.fullgrad`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._callview import call_view
from .._capture import PrefixCache, add_to_outputs, capture_outputs, find_layer, record_prefix, reuse_prefix
from .._loop import batched_loop, loop_passes
from .._tail import LayerTail, global_hooks, has_hooks, layer_tail
from .._tail import forget as forget_tail
from ..errors import InputError
from ..postprocess import normalize_minmax, resize_bilinear
from ..targets.base import CLASS_TARGET, current_target
from .base import (
    PER_POINT_BYTES,
    AttributionMethod,
    check_pass,
    check_scores,
    check_upfront,
    input_draw_bytes,
    select_output,
)

LayerSpec = "str | Sequence[str] | None"
FUSIONS = ("mean", "max")
_RESOLVE_LOCK = threading.Lock()  # the automatic layer choice is made once, also when threads race to it


class TokensToGrid:
    """A ``reshape_transform`` for vision transformers: tokens (N, P + h*w, D) -> map (N, D, h, w).

    The first ``prefix_tokens`` tokens (the class token of ViT; also register/distillation tokens)
    are dropped and the patch tokens laid out row-major on an ``(h, w)`` grid (square when
    ``grid`` is None). Linear in its input, so gradients go through it unchanged.

    Example:
        >>> import torch, torchvision, pyattr
        >>> vit = torchvision.models.vit_b_16(weights=None, image_size=64).eval()
        >>> cam = pyattr.GradCAM(vit, "encoder.layers.encoder_layer_11.ln_1",
        ...                      reshape_transform=TokensToGrid(prefix_tokens=1))
        >>> cam(torch.rand(2, 3, 64, 64)).raw.shape  # 64 / 16 = 4 patches a side
        torch.Size([2, 4, 4])
    """

    def __init__(self, prefix_tokens: int = 1, grid: tuple[int, int] | None = None):
        if prefix_tokens < 0:
            raise InputError(f"prefix_tokens must be >= 0, got {prefix_tokens}")
        self.prefix_tokens = int(prefix_tokens)
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise InputError(f"TokensToGrid expects tokens of shape (N, tokens, D), got {got}")
        patches = int(tokens.shape[1]) - self.prefix_tokens
        if self.grid is None:
            side = math.isqrt(max(patches, 0))
            if side * side != patches or patches == 0:
                raise InputError(f"{patches} patch tokens do not form a square grid; pass grid=(h, w)")
            h, w = side, side
        else:
            h, w = self.grid
            if h * w != patches:
                raise InputError(f"grid {self.grid} holds {h * w} patches, the layer has {patches} patch tokens")
        dim = int(tokens.shape[2])
        return tokens[:, self.prefix_tokens:].reshape(-1, h, w, dim).permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return f"TokensToGrid(prefix_tokens={self.prefix_tokens}, grid={self.grid})"


def fuse_maps(maps: Sequence[torch.Tensor], fuse: str) -> torch.Tensor:
    """Fuse per-layer (N, h_l, w_l) maps: each min-max normalized per sample, bilinearly resized to the
    largest (h, w) among them, then their mean or max. A single map is returned unchanged."""
    if len(maps) == 1:
        return maps[0]
    size = (max(int(m.shape[-2]) for m in maps), max(int(m.shape[-1]) for m in maps))
    stacked = torch.stack([resize_bilinear(normalize_minmax(m), size) for m in maps])
    return stacked.mean(0) if fuse == "mean" else stacked.amax(0)


def model_scores(method: AttributionMethod, x: torch.Tensor) -> torch.Tensor:
    """``method.scores_of(x)``; while tracing for export, attention runs in its math form, whose
    backward is made of forward ops (the fused CPU/GPU kernels' backward ops have no export rule)."""
    with math_attention_while_tracing(method):
        return method.scores_of(x)


def math_attention_while_tracing(method: AttributionMethod):
    """``sdpa_kernel(SDPBackend.MATH)`` while ``method`` is being traced, else a no-op context."""
    return sdpa_kernel([SDPBackend.MATH]) if method._tracing else contextlib.nullcontext()


def _layer_names(layer: Any) -> list[str] | None:
    if layer is None:
        return None
    if isinstance(layer, str):
        return [layer]
    if isinstance(layer, Sequence) and layer and all(isinstance(n, str) for n in layer):
        return list(layer)
    raise InputError(f"layer must be a layer name, a list of names or None, got {layer!r}")


class CAMMethod(AttributionMethod):
    """Base of the methods that explain layers: layer lookup (named, several, or automatic), the
    activation capture, the optional ``reshape_transform`` and the multi-layer fusion.

    Args:
        model: a module mapping (N, C, H, W) inputs to (N, K) scores.
        layer: a layer name as in ``model.named_modules()``, a list of names (maps fused), or
            ``None``: on the first call (or export), the last module whose output is (N, C, h, w)
            with h*w > 1 for that input (:func:`pyattr.models.find_default_layer`), then kept.
        fuse: how the maps of several layers are fused, ``"mean"`` or ``"max"`` (:func:`fuse_maps`).
        reshape_transform: a callable turning a layer's output into (N, C, h, w), e.g.
            :class:`TokensToGrid` for transformers; applied to activations and gradients alike.
        **options: passed to :class:`~pyattr.methods.base.AttributionMethod` (e.g. ``output=``).
    """

    multi_layer = True  # whether the method accepts several layers

    def __init__(self, model: nn.Module, layer: LayerSpec = None, *, fuse: str = "mean",
                 reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None, **options):
        super().__init__(model, **options)
        if fuse not in FUSIONS:
            raise InputError(f"unknown fuse {fuse!r}; use one of {', '.join(FUSIONS)}")
        if reshape_transform is not None and not callable(reshape_transform):
            raise InputError("reshape_transform must be callable, e.g. TokensToGrid(prefix_tokens=1)")
        names = _layer_names(layer)
        if names is not None and len(names) > 1 and not self.multi_layer:
            raise InputError(f"{type(self).__name__} explains one layer, got {len(names)}: {names}")
        if names is None and reshape_transform is not None:
            raise InputError("name the layer when using a reshape_transform (the automatic choice looks "
                             "for (N, C, h, w) outputs), e.g. 'encoder.layers.encoder_layer_11.ln_1' for a ViT")
        self.fuse = fuse
        self.reshape_transform = reshape_transform
        self.layer_names: list[str] | None = names
        self.layers: list[nn.Module] | None = None if names is None else [find_layer(model, n) for n in names]

    # -- layers ----------------------------------------------------------------------------------
    @property
    def layer_name(self) -> str | None:
        """The layer's name (names joined by ``+`` for several); None until resolved."""
        return None if self.layer_names is None else "+".join(self.layer_names)

    @property
    def layer(self) -> nn.Module | None:
        """The (first) explained layer module; None until resolved."""
        return None if self.layers is None else self.layers[0]

    def _check_input(self, x: Any) -> torch.Tensor:
        x = super()._check_input(x)
        if self.layer_names is None:
            self.resolve_layer(x)
        return x

    def resolve_layer(self, example: torch.Tensor) -> str:
        """Choose the layer for inputs like ``example`` (when none was named) and keep it."""
        if self.layer_names is None:
            from ..models import default_layer_choice

            with _RESOLVE_LOCK:
                if self.layer_names is None:
                    with call_view(self._model):  # the enclosing call's view, or one of its own
                        name, why = default_layer_choice(self._model, example[:1].detach())
                    if name is None and why is not None:
                        raise InputError(f"{type(self).__name__} found no layer to explain by itself: {why}")
                    if name is None:
                        raise InputError(
                            f"no layer of the model outputs an (N, C, h, w) map with h*w > 1 for inputs of shape "
                            f"{tuple(example.shape[1:])}; name the layer for {type(self).__name__}")
                    self.layers = [find_layer(self._model, name)]  # before the names: they mark it resolved
                    self.layer_names = [name]
        return self.layer_name

    def _require_layers(self) -> list[nn.Module]:
        if self.layers is None:
            raise InputError(f"{type(self).__name__} has no layer yet: call it (or pyattr.export) on an input, "
                             "or call resolve_layer(example) first")
        return self.layers

    # -- capture ---------------------------------------------------------------------------------
    def forward_with_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward pass with each layer's output captured: (scores, outputs as the layers returned them).
        The activations are captured on this call's view of the layers: other calls do not see them."""
        with call_view(self._model):  # the call's view (or, called alone, one of its own)
            layers = [self.in_call(m) for m in self._require_layers()]
            with capture_outputs(layers) as captured:
                scores = self._scores(x)
        outputs = []
        for name, out in zip(self.layer_names, captured):
            if out is None:
                raise InputError(f"layer {name!r} did not run in the model's forward pass")
            if not isinstance(out, torch.Tensor):
                raise InputError(f"layer {name!r} returns a {type(out).__name__}, not a tensor; choose another layer")
            outputs.append(out)
        return scores, outputs

    def forward_with_prefix(self, x: torch.Tensor, split: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor, PrefixCache | LayerTail | None]:
        """:meth:`forward_with_layers` for the (single) layer, plus what spares the passes of
        :meth:`scores_with_layer_output` (for the same ``x``) the part of the model before the layer: (scores, the
        layer's output, ``passes``). ``passes`` is, in eager calls where the model's part after the layer could be
        traced (:func:`pyattr._tail.layer_tail`; the layer without hooks of its own) and gives the model's scores
        bit for bit on this ``x``, that part (:class:`pyattr._tail.LayerTail`); else a record of the outputs of the
        modules that ran before the layer (:class:`pyattr._capture.PrefixCache`), which then return them instead of
        running again; None for ``split=False`` (the passes run the whole model)."""
        if not split:
            scores, (out,) = self.forward_with_layers(x)
            return scores, out, None
        with call_view(self._model) as view:
            layer = self.in_call(self._require_layers()[0])
            tail = None
            if not self._tracing and not has_hooks(layer) and not global_hooks():
                tail = layer_tail(self._model, self.layer_names[0], self._require_layers()[0])
            if tail is not None:
                scores, (out,) = self.forward_with_layers(x)
                if self._tail_agrees(tail, view, x, out, scores):
                    return scores, out, tail
                forget_tail(self._model, self.layer_names[0])  # it disagrees with the model: replay from now on
            with record_prefix(view, layer) as prefix:
                scores, (out,) = self.forward_with_layers(x)
        return scores, out, prefix

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        return model_scores(self, x)

    def as_map(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """A layer output (or its gradient) as an (N, C, h, w) map (``reshape_transform`` applied)."""
        if self.reshape_transform is not None:
            tensor = self.reshape_transform(tensor)
        if tensor.dim() != 4:
            hint = (" (a transformer's tokens? pass reshape_transform=TokensToGrid())"
                    if tensor.dim() == 3 and self.reshape_transform is None else "; choose a convolutional layer")
            raise InputError(f"layer {name!r} must give an (N, C, h, w) map for {type(self).__name__}, got "
                             f"{tuple(tensor.shape)}{hint}")
        return tensor

    def activations_and_grads(self, x: torch.Tensor, target: torch.Tensor):
        """(scores, [A_l], [dS_t/dA_l], resolved target): each layer's activation and the gradient
        of the summed target scores with respect to it, both as (N, C, h, w) maps."""
        scores, acts, grads, resolved = self.activations_and_column_grads(x, target)
        return scores, acts, grads[0], resolved

    def activations_and_column_grads(self, x: torch.Tensor, target: torch.Tensor):
        """(scores, [A_l], grads, resolved target) for an (N,) or (N, T) target: ``grads[j]`` is
        [dS_t/dA_l] for the target's column j (an (N,) target is one column), from one forward pass and
        one backward pass per column (the activations are the same for every column)."""
        x = x.detach().requires_grad_(True)  # so that A requires grad even for a frozen model
        scores, outputs = self.forward_with_layers(x)
        if target.dim() == 1:
            score, resolved = self.select(scores, target)
            columns = [score]
        else:
            resolved = self.resolve(scores, target)
            selected = scores.gather(1, resolved)  # (N, T)
            columns = [selected[:, j].sum() for j in range(selected.shape[1])]
        acts = [self.as_map(a, n) for a, n in zip(outputs, self.layer_names)]
        grads = []
        for j, column in enumerate(columns):
            layer_grads = torch.autograd.grad(column, outputs, retain_graph=j + 1 < len(columns))
            grads.append([self.as_map(g, n) for g, n in zip(layer_grads, self.layer_names)])
        return scores, acts, grads, resolved

    def scores_with_layer_output(self, x: torch.Tensor, replacement: torch.Tensor, copies: int,
                                 split: bool = True, prefix: PrefixCache | LayerTail | None = None) -> torch.Tensor:
        """The target's scores when the (single) layer outputs ``replacement`` instead of its own output:
        (N * c, K) scores for ``replacement`` (N * c, ...), ``copies`` = c maps per sample, sample-major (sample
        n's maps are rows n * c .. n * c + c - 1). The gradient-free CAMs that perturb the layer's activations
        (Ablation-CAM, Recipro-CAM) score their copies with it.

        ``split=True``: one forward pass of the N inputs in which the layer's output is replaced (a forward
        hook on this call's view of the layer): the part before the layer runs on N samples, the part after it
        on N * c. Right when the model sees its input after the layer only through the layer's output
        (sequential heads: ResNet's ``layer4`` -> pooling -> ``fc``, VGG's ``features`` -> ``classifier``; what
        OpenVINO XAI's Recipro-CAM assumes). A model that uses earlier tensors after the layer (a skip
        connection around it) fails then with a shape error (one sample alone broadcasts them, which is right).
        ``split=False``: the N * c copies of the input run through the whole model (the part before the layer
        is recomputed c times: slower, right for any model).

        ``prefix`` (from :meth:`forward_with_prefix` on the same ``x``; ``split=True`` only): a
        :class:`~pyattr._tail.LayerTail` runs the model's part after the layer on ``replacement``; with a
        :class:`~pyattr._capture.PrefixCache` the model's forward runs, the modules that ran before the layer
        returning their recorded outputs instead of running again and the layer returning ``replacement`` without
        running. Either way a pass costs the part of the model after the layer only."""
        with call_view(self._model) as view:
            if isinstance(prefix, LayerTail):
                return self._scores_of_copies_output(prefix.run(view, replacement), x, replacement.shape[0])
            layer = self.in_call(self._require_layers()[0])
            inputs = x if split else x.repeat_interleave(copies, 0)
            try:
                with reuse_prefix(view, prefix if split else None, layer, replacement), \
                        math_attention_while_tracing(self):
                    out = self.model(inputs)
            except RuntimeError as error:
                if not split or self._tracing:
                    raise
                raise InputError(f"the model failed when layer {self.layer_name!r} returned {replacement.shape[0]} "
                                 f"maps for {x.shape[0]} inputs ({error}): it uses tensors from before the layer "
                                 f"after it; pass split=False to {type(self).__name__}") from error
        out = select_output(out, self.output)
        if not self._tracing and split and isinstance(out, torch.Tensor) and out.shape[0] != replacement.shape[0]:
            raise InputError(
                f"the model returned {out.shape[0]} rows for {x.shape[0]} inputs whose layer {self.layer_name!r} "
                f"held {replacement.shape[0]} maps: the model uses tensors from before the layer after it; pass "
                f"split=False to {type(self).__name__}")
        return self._scores_of_copies_output(out, x, replacement.shape[0], selected=True)

    def _tail_agrees(self, tail: LayerTail, view, x: torch.Tensor, out: torch.Tensor, scores: torch.Tensor) -> bool:
        """Whether ``tail`` gives the model's ``scores`` bit for bit from the layer's output ``out`` (a copy of it:
        the model's part after the layer may write into it)."""
        try:
            again = self._scores_of_copies_output(tail.run(view, out.clone()), x, x.shape[0], inputs=x)
        except Exception:  # noqa: BLE001 - any failure means: do not use the tail
            return False
        return isinstance(again, torch.Tensor) and again.shape == scores.shape and torch.equal(again, scores)

    def _scores_of_copies_output(self, out: Any, x: torch.Tensor, rows: int, selected: bool = False,
                                 inputs: torch.Tensor | None = None) -> torch.Tensor:
        """The target's (rows, K) scores from the model's output ``out`` for ``rows`` maps of the layer (sample-major
        copies of the N inputs ``x``); ``selected``: ``output=`` already applied to ``out``; ``inputs``: the (rows,
        ...) inputs a target that reads them gets (default: the first input's rows, not copied)."""
        if not selected:
            out = select_output(out, self.output)
        stand_in = x[:1].expand(rows, *x.shape[1:]) if inputs is None else inputs
        bound = current_target()
        if bound is None or bound.target is CLASS_TARGET:
            if not self._tracing:
                check_scores(out, stand_in, self.output)  # only the row count is read
            return out
        return bound.scores(out, stand_in, checks=not self._tracing)

    def layer_activation_and_grad(self, x: torch.Tensor, target: torch.Tensor):
        """Single-layer form of :meth:`activations_and_grads`: (scores, A, dS/dA, resolved target)."""
        scores, acts, grads, resolved = self.activations_and_grads(x, target)
        return scores, acts[0], grads[0], resolved

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["layer"] = self.layer_names[0] if self.layer_names and len(self.layer_names) == 1 else self.layer_names
        if self.layer_names and len(self.layer_names) > 1:
            meta["fuse"] = self.fuse
        if self.reshape_transform is not None:
            meta["reshape_transform"] = repr(self.reshape_transform)
        return meta


class GradientCAM(CAMMethod):
    """A CAM whose per-layer map is a function of the layer's activation A and the gradient dS_t/dA
    (:meth:`layer_map`); the maps of several layers are fused."""

    def layer_map(self, act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) activation and gradient -> (N, h, w) map."""
        raise NotImplementedError

    multi_target = True
    """An (N, T) target (several classes, or a detection target's boxes) takes one forward pass and one
    backward pass to the layers per target, not T forward passes of the repeated batch: the activations
    are the same for every target, only the gradients differ."""

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        scores, acts, grads, resolved = self.activations_and_column_grads(x, target)
        raw = [fuse_maps([self.layer_map(a, g) for a, g in zip(acts, column)], self.fuse) for column in grads]
        return scores, raw[0] if target.dim() == 1 else torch.stack(raw, 1), resolved


def check_count(value: Any, what: str) -> int:
    """``value`` (a count option: ``chunk_size``, ``samples``) checked to be an int >= 1 (raises InputError)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what} must be an int >= 1, got {value!r}")
    return value


def scores_of_copies(scores: torch.Tensor, copies: int, resolved: torch.Tensor) -> torch.Tensor:
    """(N * c, K) scores of c perturbed copies per sample (sample-major) -> (N, c) scores of each sample's
    resolved target (N,)."""
    scores = scores.reshape(-1, copies, int(scores.shape[-1]))  # (N, c, K)
    return scores.gather(2, resolved[:, None, None].expand(-1, copies, 1))[:, :, 0]


def weighted_sum(weights: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k w_k A_k): (N, C) weights, (N, C, h, w) activations -> (N, h, w)."""
    return torch.relu((weights[:, :, None, None] * act).sum(1))


class GradCAM(GradientCAM):
    r"""Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391).

    With :math:`A^k` the target layer's activations and :math:`S_t` the target score,

    .. math:: \alpha_k = \frac{1}{hw}\sum_{ij} \frac{\partial S_t}{\partial A^k_{ij}}, \qquad
              L = \mathrm{ReLU}\Big(\sum_k \alpha_k A^k\Big)

    The raw map has the layer's resolution (h, w); ``maps`` are bilinearly resized to the input
    size and min-max normalized. Only the backward pass down to the layer is computed.

    Args:
        model: a module mapping (N, C, H, W) inputs to (N, K) scores.
        layer: the target layer's name as in ``model.named_modules()`` (e.g. ``"layer4"``), a list of
            names (maps fused, see :class:`CAMMethod`) or ``None`` (the last spatial layer).
        fuse, reshape_transform: see :class:`CAMMethod`.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> cam = pyattr.GradCAM(model, layer="layer3")
        >>> cam(torch.rand(4, 3, 64, 64), target=2).raw.shape
        torch.Size([4, 8, 8])
    """

    name = "gradcam"

    def layer_map(self, act, grad):
        return weighted_sum(grad.mean((2, 3)), act)


class GradCAMPlusPlus(GradientCAM):
    r"""Grad-CAM++ (Chattopadhay et al. 2018, arXiv:1710.11063), in the closed form of the paper's
    eq. 19 with the score's own gradient powers (as the paper's and pytorch-grad-cam's code):

    .. math:: a^k_{ij} = \frac{g_{ij}^2}{2 g_{ij}^2 + \sum_{ab} A^k_{ab}\, g_{ij}^3 + \epsilon}
              \;(0 \text{ where } g_{ij} = 0), \quad
              w_k = \sum_{ij} a^k_{ij}\,\mathrm{ReLU}(g_{ij}), \quad L = \mathrm{ReLU}\Big(\sum_k w_k A^k\Big)

    with :math:`g = \partial S_t / \partial A^k` and :math:`\epsilon = 10^{-6}`. Raw map at the
    layer's resolution. Args as :class:`GradCAM`.

    Example:
        >>> cam = pyattr.methods.GradCAMPlusPlus(model, "layer3")
        >>> cam(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 8, 8])
    """

    name = "gradcampp"
    eps = 1e-6

    def layer_map(self, act, grad):
        g2 = grad.pow(2)
        g3 = g2 * grad
        act_sum = act.sum((2, 3), keepdim=True)
        return weighted_sum(plusplus_weights(grad, g2, act_sum * g3, self.eps, grad != 0), act)


def plusplus_weights(grad: torch.Tensor, g2: torch.Tensor, third: torch.Tensor, eps: float,
                     nonzero: torch.Tensor) -> torch.Tensor:
    r"""Grad-CAM++'s channel weights :math:`w_k = \sum_{ij} a^k_{ij} \mathrm{ReLU}(g_{ij})` with
    :math:`a^k_{ij} = g2_{ij} / (2\, g2_{ij} + \mathrm{third} + \epsilon)`, 0 where ``nonzero`` is False.
    (N, C, h, w) tensors (``third`` broadcastable) -> (N, C)."""
    alpha = g2 / (2 * g2 + third + eps)
    alpha = torch.where(nonzero, alpha, torch.zeros_like(alpha))
    return (alpha * torch.relu(grad)).sum((2, 3))


class SmoothGradCAMPlusPlus(GradientCAM):
    r"""Smooth Grad-CAM++ (Omeiza et al. 2019, "Smooth Grad-CAM++: An Enhanced Inference Level Visualization
    Technique for Deep Convolutional Neural Network Models", arXiv:1908.01224), as torchcam's ``SmoothGradCAMpp``:
    Grad-CAM++ with the gradient's powers averaged over S noisy copies :math:`x_s = x + \sigma\epsilon_s`,

    .. math:: D_p = \frac1S \sum_{s=1}^S g_s^p, \quad g_s = \frac{\partial S_t}{\partial A}(x_s), \quad
              a^k_{ij} = \frac{D_2{}^k_{ij}}{2 D_2{}^k_{ij} + \sum_{ab} A^k_{ab} D_3{}^k_{ab} + \epsilon}, \quad
              w_k = \sum_{ij} a^k_{ij}\, \mathrm{ReLU}(g_S{}^k_{ij}), \quad
              L = \mathrm{ReLU}\Big(\sum_k w_k A_S^k\Big)

    with A the clean input's activations in the denominator, :math:`\sigma` = ``std`` (absolute, torchcam's
    0.3), S = ``samples`` (torchcam's 4) and :math:`\epsilon = 10^{-8}` (torchcam's; a = 0 where
    :math:`D_2 = 0`). As in torchcam, the weights take the ReLU of the *last* noisy copy's gradient
    :math:`g_S` (not of the mean gradient) and the map combines them with the last copy's activations
    :math:`A_S = A(x_S)` (torchcam's activation hook keeps the last forward pass's): the map depends on the
    noise. The target is resolved on the clean input; ``scores`` are the clean input's.

    Noise: the S tensors :math:`\epsilon_s` (shape of one input) are drawn from ``seed`` (CPU generator) and
    shared by the inputs of a batch; the exported graph holds them as a constant, so eager and exported maps
    agree (torchcam draws them from torch's global generator; the test feeds pyattr's noise to torchcam).
    ``chunk_size`` noisy copies per input go through the model in one forward and one backward pass
    (ceil(S / chunk_size) of each), plus one forward pass of the clean input.

    Args:
        model, layer, fuse, reshape_transform: as :class:`GradCAM`.
        samples: S.
        std: the noise's standard deviation :math:`\sigma` (in the input's units).
        seed: seed of the noise.
        chunk_size: noisy copies per input in one pass.

    Example:
        >>> pyattr.methods.SmoothGradCAMPlusPlus(model, "layer3", samples=4)(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 8, 8])
    """

    name = "smoothgradcampp"
    eps = 1e-8
    multi_target = False

    def __init__(self, model: nn.Module, layer: LayerSpec = None, *, samples: int = 4, std: float = 0.3,
                 seed: int = 0, chunk_size: int = 4, **options):
        super().__init__(model, layer, **options)
        self.samples = check_count(samples, "samples")
        check_upfront("SmoothGradCAMPlusPlus", "samples", self.samples, PER_POINT_BYTES, "samples' bookkeeping")
        self.chunk_size = check_count(chunk_size, "chunk_size")
        if not (isinstance(std, (int, float)) and not isinstance(std, bool) and std >= 0):
            raise InputError(f"std must be a number >= 0, got {std!r}")
        self.std = float(std)
        self.seed = int(seed)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        r"""The (S, ...) noise :math:`\sigma \epsilon_s` added to every input of ``x``."""
        from .gradient import seeded_tensor

        check_upfront("SmoothGradCAMPlusPlus", "samples", self.samples, input_draw_bytes(x), "noise")
        return self.std * seeded_tensor("normal", (self.samples, *x.shape[1:]), self.seed, x)

    def noisy_moments(self, x: torch.Tensor, resolved: torch.Tensor, shapes: list[torch.Size] | None = None
                      ) -> list[tuple[torch.Tensor, ...]]:
        """Per layer (D_2, D_3, g_S, A_S), each (N, C, h, w): the means over the noisy copies of the gradient's
        square and cube, the last copy's gradient and activations. ``shapes``: the layers' output shapes for
        one input (as the layers return them); with them, a traced graph's passes are one loop
        (:meth:`_looped_moments`)."""
        if not self._tracing:
            check_pass("SmoothGradCAMPlusPlus", x, min(self.chunk_size, self.samples))
        noise = self.noise(x)
        n = x.shape[0]
        if shapes is not None and loop_passes(math.ceil(self.samples / self.chunk_size)):
            return self._looped_moments(x, resolved, noise, shapes)
        sums: list[list[torch.Tensor]] | None = None
        for start in range(0, self.samples, self.chunk_size):
            c = min(self.chunk_size, self.samples - start)
            noisy = (x[:, None] + noise[None, start:start + c]).flatten(0, 1)  # sample-major (N * c, ...)
            _, acts, grads, _ = self.activations_and_grads(noisy, resolved.repeat_interleave(c, 0))
            parts, last = [], []
            for a, g in zip(acts, grads):
                g = g.detach().reshape(n, c, *g.shape[1:])
                g2 = g * g
                parts.append([g2.sum(1), (g2 * g).sum(1)])
                last.append((g[:, -1], a.detach().reshape(n, c, *a.shape[1:])[:, -1]))
            sums = parts if sums is None else [[u + v for u, v in zip(old, new)] for old, new in zip(sums, parts)]
        return [(d2 / self.samples, d3 / self.samples, g, a) for (d2, d3), (g, a) in zip(sums, last)]

    def _looped_moments(self, x: torch.Tensor, resolved: torch.Tensor, noise: torch.Tensor,
                        shapes: list[torch.Size]) -> list[tuple[torch.Tensor, ...]]:
        """:meth:`noisy_moments` with the passes one loop (:func:`~pyattr._loop.batched_loop`, traced graphs): the
        chunks are equal, the last one padded with copies of the last noisy copy (weight 0 in the sums; the last
        copy's gradient and activations are then the last row of the last pass)."""
        from .gradient import padded_passes

        index, keep = padded_passes(list(range(self.samples)), [1.0] * self.samples, self.chunk_size, x)
        n, c = x.shape[0], index.shape[1]

        def one_pass(i: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
            noisy = (x[:, None] + noise[i.long()][None]).flatten(0, 1)  # sample-major (N * c, ...)
            acts, grads = self.layer_grads_by_vjp(noisy, resolved.repeat_interleave(c, 0), shapes)
            outs: list[torch.Tensor] = []
            for a, g in zip(acts, grads):
                g = g.reshape(n, c, *g.shape[1:])
                g2 = g * g
                wv = w.view(1, c, *[1] * (g.dim() - 2))
                outs += [(g2 * wv).sum(1), (g2 * g * wv).sum(1), g[:, -1].clone(),
                         a.reshape(n, c, *a.shape[1:])[:, -1].clone()]
            return tuple(outs)

        ys = batched_loop(one_pass, index, keep)
        return [(ys[k].sum(0) / self.samples, ys[k + 1].sum(0) / self.samples, ys[k + 2][-1], ys[k + 3][-1])
                for k in range(0, len(ys), 4)]

    def layer_grads_by_vjp(self, x: torch.Tensor, target: torch.Tensor, shapes: list[torch.Size]
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """([A_l], [dS_t/dA_l]) as (N, C, h, w) maps, like :meth:`activations_and_grads`, with ``torch.func.vjp``
        (a loop's body, where ``torch.autograd.grad`` does not trace): each layer's output gets a zero tensor added
        (``shapes``: the outputs' shapes for one input), and the gradient with respect to that zero tensor is the
        gradient with respect to the output."""
        probes = [torch.zeros((x.shape[0], *s), dtype=x.dtype, device=x.device) for s in shapes]

        def selected_of(*probes: torch.Tensor):
            with call_view(self._model):
                layers = [self.in_call(m) for m in self._require_layers()]
                with add_to_outputs(layers, probes) as captured:
                    scores = self._scores(x)
            score, _ = self.select(scores, target)
            return score, list(captured)

        score, pullback, outputs = torch.func.vjp(selected_of, *probes, has_aux=True)
        grads = pullback(torch.ones_like(score))
        return ([self.as_map(a, n) for a, n in zip(outputs, self.layer_names)],
                [self.as_map(g, n) for g, n in zip(grads, self.layer_names)])

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        x = x.detach()
        with torch.no_grad():
            scores, outputs = self.forward_with_layers(x)
            _, resolved = self.select(scores, target)
        maps = []
        shapes = [out.shape[1:] for out in outputs]
        moments = self.noisy_moments(x, resolved, shapes)
        for out, name, (d2, d3, grad, act) in zip(outputs, self.layer_names, moments):
            third = (self.as_map(out, name).detach() * d3).sum((2, 3), keepdim=True)
            maps.append(weighted_sum(plusplus_weights(grad, d2, third, self.eps, d2 != 0), act))
        return scores.detach(), fuse_maps(maps, self.fuse), resolved

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "samples": self.samples, "std": self.std, "seed": self.seed,
                "chunk_size": self.chunk_size}


class XGradCAM(GradientCAM):
    r"""XGrad-CAM (Fu et al. 2020, arXiv:2008.02312): gradients weighted by the normalized activations,

    .. math:: w_k = \sum_{ij} \frac{A^k_{ij}}{\sum_{ab} A^k_{ab} + \epsilon}
              \frac{\partial S_t}{\partial A^k_{ij}}, \qquad L = \mathrm{ReLU}\Big(\sum_k w_k A^k\Big)

    Args as :class:`GradCAM`, and ``eps`` (:math:`\epsilon`): :math:`10^{-7}` as pytorch-grad-cam;
    torchcam adds :math:`10^{-8}`. Meant for non-negative (post-ReLU) activations: where a channel's
    sum is near 0 (signed activations) the weight is ill-conditioned and depends on ``eps``.

    Example:
        >>> pyattr.methods.XGradCAM(model, "layer3")(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 8, 8])
    """

    name = "xgradcam"

    def __init__(self, model: nn.Module, layer: LayerSpec = None, *, eps: float = 1e-7, **options):
        super().__init__(model, layer, **options)
        self.eps = float(eps)

    def layer_map(self, act, grad):
        den = act.sum((2, 3)) + self.eps
        # never 0 in eager; in ONNX a "+ eps" of at most 1e-8 is optimized away (x + 0 -> x), and a dead
        # channel would give 0 / 0: divide its zero numerator by 1 instead
        den = torch.where(den == 0, torch.ones_like(den), den)
        weights = (grad * act).sum((2, 3)) / den
        return weighted_sum(weights, act)


class LayerCAM(GradientCAM):
    r"""Layer-CAM (Jiang et al. 2021, IEEE TIP 30:5875): a per-position weight, the positive gradient,

    .. math:: L_{ij} = \mathrm{ReLU}\Big(\sum_k \mathrm{ReLU}\big(\tfrac{\partial S_t}{\partial A^k_{ij}}\big)
              A^k_{ij}\Big)

    Meant to be used on several layers at once (``layer=["layer2", "layer3"]``; fused by
    :func:`fuse_maps`, which normalizes each layer's map: the paper's tanh rescaling of shallow
    layers is not applied). Args as :class:`GradCAM`.

    Example:
        >>> pyattr.methods.LayerCAM(model, ["layer2", "layer3"])(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 16, 16])
    """

    name = "layercam"

    def layer_map(self, act, grad):
        return torch.relu((torch.relu(grad) * act).sum(1))


class HiResCAM(GradientCAM):
    r"""HiResCAM (Draelos & Carin 2020, arXiv:2011.08891): the element-wise product of gradient and
    activation summed over channels,

    .. math:: L_{ij} = \mathrm{ReLU}\Big(\sum_k \frac{\partial S_t}{\partial A^k_{ij}} A^k_{ij}\Big)

    For a head that is global average pooling + linear it equals CAM divided by h*w (ReLU'd).
    Args as :class:`GradCAM`.

    Example:
        >>> pyattr.methods.HiResCAM(model, "layer3")(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 8, 8])
    """

    name = "hirescam"

    def layer_map(self, act, grad):
        return torch.relu((grad * act).sum(1))


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InputError("CAM needs a model that ends in global average pooling + a linear layer; this model "
                         "has no nn.Linear (name the head with fc=...)")
    return linears[-1]


class CAM(CAMMethod):
    r"""CAM (Zhou et al. 2016, arXiv:1512.04150), for models that end in global average pooling + one
    linear layer. With :math:`A^k` the output of the layer feeding the pooling and :math:`W` the
    linear layer's weight,

    .. math:: L_{ij} = \sum_k W_{t,k} A^k_{ij}

    (no ReLU, as in the paper; ``maps`` are min-max normalized). Then
    :math:`\frac{1}{hw}\sum_{ij} L_{ij} + b_t = S_t`: the map's mean plus the bias is the score.
    No backward pass is needed.

    Args:
        model: the classifier.
        layer: the layer whose output is pooled (e.g. ``"layer4"`` for a ResNet), or ``None`` (the last
            layer whose output has spatial extent). One layer only.
        fc: the name of the linear head; ``None``: the last ``nn.Linear`` of ``model.named_modules()``.
            Its ``in_features`` must equal the layer's channel count (checked on each eager call).

    Example:
        >>> cam = pyattr.methods.CAM(model, "layer3")          # head found: "fc"
        >>> cam(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 8, 8])
    """

    name = "cam"
    multi_layer = False

    def __init__(self, model: nn.Module, layer: str | None = None, *, fc: str | None = None, **options):
        super().__init__(model, layer, **options)
        if fc is None:
            self.fc_name, self.fc = _last_linear(model)
        else:
            self.fc_name, self.fc = fc, find_layer(model, fc)
            if not isinstance(self.fc, nn.Linear):
                raise InputError(f"fc={fc!r} is a {type(self.fc).__name__}, not an nn.Linear")

    def check_target_kind(self, kind) -> None:
        if not kind.class_scores:
            raise InputError(f"CAM reads the classifier's linear head for a class, so it explains class logits only, "
                             f"not a {kind.kind} target; use Grad-CAM (or another CAM method) for it")

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        with torch.no_grad():
            scores, (out,) = self.forward_with_layers(x)
            act = self.as_map(out, self.layer_names[0])
            resolved = self.resolve(scores, target)
            weight = self.fc.weight.detach()
            if act.shape[1] != weight.shape[1]:
                raise InputError(
                    f"layer {self.layer_name!r} has {act.shape[1]} channels but the head {self.fc_name!r} takes "
                    f"{weight.shape[1]} features: CAM needs global average pooling + one linear layer after "
                    "the layer (use Grad-CAM for other heads)")
            cam = (weight[resolved][:, :, None, None] * act).sum(1)
        return scores, cam, resolved

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "fc": self.fc_name}


class GuidedGradCAM(CAMMethod):
    r"""Guided Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391, sec. 3): Guided Backpropagation
    multiplied element-wise by the Grad-CAM map upsampled to the input's size,

    .. math:: A_{cij} = G_{cij} \cdot \mathrm{up}(L^{\mathrm{Grad	ext{-}CAM}})_{ij}

    with :math:`G` the guided gradient (:class:`~pyattr.methods.gradient.GuidedBackprop`) and up the
    bilinear resize (``align_corners=False``) of the un-normalized Grad-CAM map (several layers: their
    fused map). Then the channel ``reduction`` (default: the max of :math:`|A|`, as Saliency). Two
    forward passes: the plain one for Grad-CAM, one under the guided ReLU rule. Raw map (N, H, W).

    Args:
        model, layer, fuse, reshape_transform: as :class:`GradCAM`.
        reduction: ``"max"`` (of absolute values, default), ``"sum"``, ``"l2"``, ``"mean"`` (signed).

    Example:
        >>> pyattr.methods.GuidedGradCAM(model, "layer3")(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 64, 64])
    """

    name = "guidedgradcam"

    def __init__(self, model: nn.Module, layer: LayerSpec = None, *, reduction: str = "max", **options):
        from .gradient import GuidedBackprop

        cam_options = {k: options.pop(k) for k in ("fuse", "reshape_transform") if k in options}
        super().__init__(model, layer, **cam_options, **options)
        self.guided = GuidedBackprop(model, reduction=reduction, **options)
        self.reduction = reduction

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        scores, acts, grads, resolved = self.activations_and_grads(x, target)
        cam = fuse_maps([weighted_sum(g.mean((2, 3)), a) for a, g in zip(acts, grads)], self.fuse)
        with math_attention_while_tracing(self):
            _, guided, _ = self.guided.input_gradients(x, resolved[:, None])  # (N, 1, C, H, W)
        attr = guided[:, 0] * resize_bilinear(cam, (int(x.shape[-2]), int(x.shape[-1])))[:, None]
        attr = self.guided._abs(attr[:, None])  # (N, 1, C, H, W), |.| unless reduction="mean"
        return scores, self.guided.reduce(attr)[:, 0], resolved

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "reduction": self.reduction}


__all__ = ["CAM", "CAMMethod", "GradCAM", "GradCAMPlusPlus", "GradientCAM", "GuidedGradCAM", "HiResCAM", "LayerCAM",
           "SmoothGradCAMPlusPlus", "TokensToGrid", "XGradCAM", "fuse_maps"]
