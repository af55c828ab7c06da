"""Score-CAM: channel weights from the scores of the input masked by each upsampled activation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..postprocess import TINY
from .cam import CAMMethod, LayerSpec, fuse_maps, weighted_sum


class ScoreCAM(CAMMethod):
    r"""Score-CAM (Wang et al. 2020, arXiv:1910.01279): gradient-free channel weights.

    Each channel :math:`A^k` of the layer becomes a mask :math:`M_k` at input resolution (bilinear
    upsampling, then min-max normalization to [0, 1] per channel and sample, :math:`\epsilon = 10^{-8}`
    in the denominator); the masked inputs :math:`x \odot M_k` are scored and

    .. math:: w_k = \mathrm{softmax}_k\big(S_t(x \odot M_k)\big), \qquad
              L = \mathrm{ReLU}\Big(\sum_k w_k A^k\Big)

    (the baseline score :math:`S_t(x_b)` of the paper cancels in the softmax). The masked forward
    passes are batched: ``chunk_size`` channels per pass, i.e. N * chunk_size images at once, which
    bounds memory; the C / chunk_size passes are unrolled in an exported graph, whose batch stays
    dynamic. Costs C forward passes per image and layer.

    Args:
        model, layer, fuse, reshape_transform: see :class:`~pyattr.methods.cam.CAMMethod`.
        chunk_size: channels per masked forward pass (each pass holds N * chunk_size images).
        normalize_first: min-max normalize the activations at the layer's resolution and then
            upsample (torchcam's order) instead of upsampling first (the paper's code, pytorch-grad-cam).
        align_corners: the bilinear upsampling's convention; pytorch-grad-cam uses ``True``
            (``nn.UpsamplingBilinear2d``), torchcam and the default ``False``.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.methods.ScoreCAM(model, "layer3", chunk_size=64)(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 8, 8])
    """

    name = "scorecam"
    eps = 1e-8

    def __init__(self, model: nn.Module, layer: LayerSpec = None, *, chunk_size: int = 32,
                 normalize_first: bool = False, align_corners: bool = False, fuse: str = "mean",
                 reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None, **options):
        super().__init__(model, layer, fuse=fuse, reshape_transform=reshape_transform, **options)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise InputError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.normalize_first = bool(normalize_first)
        self.align_corners = bool(align_corners)

    def _normalize(self, maps: torch.Tensor) -> torch.Tensor:
        """Per (sample, channel) min-max over space: (m - min) / (max - min + eps)."""
        lo = maps.amin((2, 3), keepdim=True)
        hi = maps.amax((2, 3), keepdim=True)
        # The clamp is a no-op here; it keeps constant channels at 0 in ONNX, where onnxscript's
        # optimizer drops the "+ 1e-8" (its x + 0 -> x rule matches constants within 1e-8 of 0).
        return (maps - lo) / (hi - lo + self.eps).clamp_min(TINY)

    def masks(self, act: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, c, h, w) activations -> (N, c, H, W) masks in [0, 1]."""
        if self.normalize_first:
            return F.interpolate(self._normalize(act), size=size, mode="bilinear", align_corners=self.align_corners)
        return self._normalize(F.interpolate(act, size=size, mode="bilinear", align_corners=self.align_corners))

    def channel_scores(self, x: torch.Tensor, act: torch.Tensor, resolved: torch.Tensor) -> torch.Tensor:
        """(N, C) target scores of the inputs masked by each channel's mask."""
        size = (int(x.shape[-2]), int(x.shape[-1]))
        image_shape = tuple(int(s) for s in x.shape[1:])
        channels = int(act.shape[1])
        chunks = []
        for start in range(0, channels, self.chunk_size):
            stop = min(start + self.chunk_size, channels)
            masks = self.masks(act[:, start:stop], size)  # (N, c, H, W)
            masked = (x[:, None] * masks[:, :, None]).reshape(-1, *image_shape)  # (N * c, C_in, H, W)
            scores = self._scores(masked)
            scores = scores.reshape(-1, stop - start, int(scores.shape[-1]))  # (N, c, K)
            index = resolved[:, None, None].expand(-1, stop - start, 1)
            chunks.append(scores.gather(2, index)[:, :, 0])
        return torch.cat(chunks, 1) if len(chunks) > 1 else chunks[0]

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        with torch.no_grad():
            x = x.detach()
            scores, outputs = self.forward_with_layers(x)
            _, resolved = self.select(scores, target)
            maps = []
            for out, name in zip(outputs, self.layer_names):
                act = self.as_map(out, name)
                weights = torch.softmax(self.channel_scores(x, act, resolved), dim=1)
                maps.append(weighted_sum(weights, act))
        return scores, fuse_maps(maps, self.fuse), resolved

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "chunk_size": self.chunk_size, "normalize_first": self.normalize_first,
                "align_corners": self.align_corners}


__all__ = ["ScoreCAM"]
