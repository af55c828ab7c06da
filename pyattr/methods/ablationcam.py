r"""Ablation-CAM: channel weights from the drop of the target score when each channel is switched off."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._capture import PrefixCache
from .._loop import batched_loop
from ..errors import InputError
from .cam import CAMMethod, LayerSpec, check_count, scores_of_copies, weighted_sum

ABLATION_OFFSET = 1e7
"""For a layer whose activations are not >= 0 with a 0 among them (its minimum is not 0), an ablated channel is set
to ``min(A) - ABLATION_OFFSET`` (pytorch-grad-cam's ``AblationLayer``) instead of 0."""


class AblationCAM(CAMMethod):
    r"""Ablation-CAM (Desai & Ramaswamy 2020, "Ablation-CAM: Visual Explanations for Deep Convolutional Network via
    Gradient-free Localization", WACV 2020): the weight of channel k is the relative drop of the target score
    when the channel is ablated,

    .. math:: w_k = \frac{y - y_k}{y}, \qquad L = \mathrm{ReLU}\Big(\sum_k w_k A^k\Big)

    with :math:`y` the target score and :math:`y_k` the score when the layer's channel k is replaced by the
    ablation value: 0 where the sample's activations have minimum 0 (post-ReLU layers), else
    :math:`\min A - 10^7` (pytorch-grad-cam's ``AblationLayer``, :data:`ABLATION_OFFSET`). A score of exactly 0
    is divided by 1 instead (no inf / NaN).

    The layer's activations are computed once; the ablated copies (N * ``chunk_size`` per pass, ceil(C / chunk_size)
    passes, ONE loop in an exported graph: :func:`pyattr._loop.batched_loop`) go through the rest of the network with the layer's output replaced
    (:meth:`~pyattr.methods.cam.CAMMethod.scores_with_layer_output`; ``split=False`` for a model that uses
    tensors from before the layer after it). Costs C passes of the network's part after the layer per image: with
    ``split=True`` an eager call runs the model's part after the layer alone, traced once per (model, layer)
    (:mod:`pyattr._tail`), where that part depends on the layer's output only; else the modules that ran before the
    layer return their outputs recorded in the first pass (:meth:`~pyattr.methods.cam.CAMMethod.forward_with_prefix`)
    instead of running again. An eager call builds its copies once and, pass after pass, restores the channels the
    previous pass ablated and ablates the next ones.

    Differences from pytorch-grad-cam 1.5.7's ``AblationCAM`` (the test's reference): none for layers with
    minimum 0. For a layer with another minimum, pytorch-grad-cam's ablation value drifts within a batch (its
    ablation layer takes the minimum of the batch after the earlier copies were ablated: the i-th copy of a
    batch gets :math:`\min A - (i+1) \cdot 10^7`); pyattr uses :math:`\min A - 10^7` for every channel (equal to
    pytorch-grad-cam with ``batch_size=1``). ``ratio_channels_to_ablate`` (an experimental speed-up) is not offered.

    Args:
        model, layer, reshape_transform: see :class:`~pyattr.methods.cam.CAMMethod` (one layer).
        chunk_size: channels ablated per pass (each pass holds N * chunk_size copies).
        split: run the part of the model before the layer once (``True``) or for every copy (``False``).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.methods.AblationCAM(model, "layer3", chunk_size=64)(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 8, 8])
    """

    name = "ablationcam"
    multi_layer = False

    def __init__(self, model: nn.Module, layer: LayerSpec = None, *, chunk_size: int = 32, split: bool = True,
                 **options):
        super().__init__(model, layer, **options)
        self.chunk_size = check_count(chunk_size, "chunk_size")
        self.split = bool(split)

    @staticmethod
    def ablation_value(act: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) activations -> (N,) value of an ablated channel: 0 where the sample's minimum is 0,
        else that minimum - :data:`ABLATION_OFFSET`."""
        low = act.flatten(1).amin(1)
        return torch.where(low == 0, torch.zeros_like(low), low - ABLATION_OFFSET)

    def ablated_scores(self, x: torch.Tensor, out: torch.Tensor, act: torch.Tensor,
                       resolved: torch.Tensor, prefix: PrefixCache | None = None) -> torch.Tensor:
        """(N, C) target scores with each channel of the layer ablated in turn. ``out``: the layer's output as it
        returned it, ``act``: as an (N, C, h, w) map; ``prefix``: the record of the part before the layer
        (:meth:`~pyattr.methods.cam.CAMMethod.forward_with_prefix`), which the passes then skip."""
        if self.reshape_transform is not None:
            raise InputError("AblationCAM replaces the layer's output, which needs it as an (N, C, h, w) map: "
                             "use it without reshape_transform (or Score-CAM for transformers)")
        channels = int(act.shape[1])
        value = self.ablation_value(act)[:, None, None, None]  # (N, 1, 1, 1)
        samples = torch.arange(act.shape[0], device=act.device)[:, None]  # (N, 1)
        # ceil(C / chunk_size) passes of one width; pass i ablates channels i * width + j (beyond C in the last
        # pass: channel C - 1 again, whose scores are dropped)
        chunks = -(-channels // self.chunk_size)
        width = -(-channels // chunks)
        ablated = torch.arange(chunks * width, device=act.device).clamp_max(channels - 1).reshape(chunks, width)
        copy = torch.arange(width, device=act.device)
        reuse = not self._tracing  # eager: one buffer of copies for every pass (see below)
        state: dict = {"buffer": None, "version": None, "previous": None}

        def one_pass(channel_ids: torch.Tensor) -> torch.Tensor:
            buffer = state["buffer"]
            # eager: the buffer holds the previous pass's copies unless the model wrote into the layer's output in
            # place (its version counter moved): then restore the channels it ablated and ablate this pass's (2 * N *
            # width * h * w values written instead of N * width * C * h * w copied; the same copies)
            if reuse and buffer is not None and buffer._version == state["version"]:
                previous = state["previous"]
                buffer.index_put_((samples, copy, previous), act[:, previous])
                copies = buffer.index_put_((samples, copy, channel_ids), value)
            else:
                # width copies of each sample's activations (one dense copy, as x.repeat_interleave(width, 0)); then
                # copy j's channel channel_ids[j] is set to the ablation value in place: an index_put of N * width * h * w
                copies = act[:, None].expand(-1, width, -1, -1, -1).clone(memory_format=torch.contiguous_format)
                copies = copies.index_put_((samples, copy, channel_ids), value)  # (N, width, C, h, w)
                if reuse:
                    state["buffer"] = copies
            if reuse:
                state["version"], state["previous"] = copies._version, channel_ids
            scores = self.scores_with_layer_output(x, copies.flatten(0, 1), width, self.split, prefix)
            return scores_of_copies(scores, width, resolved)

        scores = batched_loop(one_pass, ablated)  # (chunks, N, width): one loop in an exported graph
        return scores.permute(1, 0, 2).reshape(-1, chunks * width)[:, :channels]

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        with torch.no_grad():
            x = x.detach()
            scores, out, prefix = self.forward_with_prefix(x, self.split)
            _, resolved = self.select(scores, target)
            act = self.as_map(out, self.layer_names[0])
            y = scores.gather(1, resolved[:, None])  # (N, 1)
            ablated = self.ablated_scores(x, out, act, resolved, prefix)
            weights = (y - ablated) / torch.where(y == 0, torch.ones_like(y), y)
        return scores, weighted_sum(weights, act), resolved

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "chunk_size": self.chunk_size, "split": self.split}


__all__ = ["ABLATION_OFFSET", "AblationCAM"]
