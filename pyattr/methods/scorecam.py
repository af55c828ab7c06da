"""Score-CAM and its smoothed (SS-CAM) and integrated (IS-CAM) variants: channel weights from the scores of the
input masked by each upsampled activation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._loop import batched_loop
from ..errors import InputError
from ..postprocess import TINY
from .base import PER_POINT_BYTES, check_upfront
from .cam import CAMMethod, LayerSpec, check_count, fuse_maps, scores_of_copies, weighted_sum


class ScoreCAM(CAMMethod):
    r"""Score-CAM (Wang et al. 2020, arXiv:1910.01279): gradient-free channel weights.

    Each channel :math:`A^k` of the layer becomes a mask :math:`M_k` at input resolution (bilinear
    upsampling, then min-max normalization to [0, 1] per channel and sample, :math:`\epsilon = 10^{-8}`
    in the denominator); the masked inputs :math:`x \odot M_k` are scored and

    .. math:: w_k = \mathrm{softmax}_k\big(S_t(x \odot M_k)\big), \qquad
              L = \mathrm{ReLU}\Big(\sum_k w_k A^k\Big)

    (the baseline score :math:`S_t(x_b)` of the paper cancels in the softmax). The masked forward
    passes are batched: ``chunk_size`` channels per pass, i.e. N * chunk_size images at once, which
    bounds memory (chunks of one width, ceil(C / ceil(C / chunk_size)) channels). An exported graph holds the
    ceil(C / chunk_size) passes as ONE loop (:func:`pyattr._loop.batched_loop`: an ONNX ``Scan``, a ``scan`` node
    in a ``.pt2``, a scripted ``for`` loop in TorchScript) whose body is one forward pass, so its size and export
    time do not grow with C; its batch stays dynamic. Costs C forward passes per image and layer.

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
        self.chunk_size = check_count(chunk_size, "chunk_size")
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

    passes = 1
    """Masked inputs per channel (:meth:`masked_input`), whose scores are averaged."""

    def pass_values(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What tells the :attr:`passes` masked inputs of a channel apart: tensors of :attr:`passes` rows, row s
        given to :meth:`masked_input` for pass s (SS-CAM's noise, IS-CAM's coefficients; Score-CAM's none)."""
        return ()

    def masked_input(self, x: torch.Tensor, masks: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        r"""The (N, c, C_in, H, W) inputs scored for a chunk of (N, c, H, W) masks in one pass, given that pass's
        rows of :meth:`pass_values`: Score-CAM's :math:`x \odot M_k`."""
        return x[:, None] * masks[:, :, None]

    def channel_scores(self, x: torch.Tensor, act: torch.Tensor, resolved: torch.Tensor) -> torch.Tensor:
        """(N, C) target scores of the inputs masked by each channel's mask (averaged over the :attr:`passes`).

        The C channels are split into ceil(C / chunk_size) chunks of one width (the last padded with constant
        channels, whose scores are dropped); each (chunk, pass) is one forward pass of N * width images, and the
        passes are one :func:`~pyattr._loop.batched_loop`: a Python loop in eager calls, one loop in an exported
        graph (whose size does not grow with C)."""
        size = (int(x.shape[-2]), int(x.shape[-1]))
        image_shape = tuple(int(s) for s in x.shape[1:])
        channels, passes = int(act.shape[1]), self.passes
        chunks = -(-channels // self.chunk_size)
        width = -(-channels // chunks)
        if chunks * width > channels:
            act = torch.cat([act, act.new_zeros(act.shape[0], chunks * width - channels, *act.shape[2:])], 1)
        groups = act.reshape(-1, chunks, width, *act.shape[2:]).transpose(0, 1)  # (chunks, N, width, h, w)
        values = self.pass_values(x)
        # pass i: chunk i // passes, pass i % passes (indices, not copies of the chunks)
        chunk_index = torch.arange(chunks, device=x.device).repeat_interleave(passes)[:, None]
        pass_index = torch.arange(passes, device=x.device).repeat(chunks)[:, None]

        def one_pass(chunk: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            masks = self.masks(groups.index_select(0, chunk)[0], size)  # (N, width, H, W)
            masked = self.masked_input(x, masks, *(v.index_select(0, index)[0] for v in values))
            return scores_of_copies(self._scores(masked.reshape(-1, *image_shape)), width, resolved)

        scores = batched_loop(one_pass, chunk_index, pass_index)  # (chunks * passes, N, width)
        if passes > 1:
            per_pass = scores.reshape(chunks, passes, *scores.shape[1:])
            total = per_pass[:, 0]
            for s in range(1, passes):  # in order, as the scores of the passes were added before
                total = total + per_pass[:, s]
            scores = total / passes
        return scores.permute(1, 0, 2).reshape(-1, chunks * width)[:, :channels]

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


class SSCAM(ScoreCAM):
    r"""SS-CAM (Wang et al. 2020, "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization",
    arXiv:2006.14255), as torchcam's ``SSCAM``: Score-CAM with Gaussian noise added to the masks,

    .. math:: w_k = \mathrm{softmax}_k\Big(\frac1S \sum_{s=1}^S S_t\big(x \odot (M_k + \sigma \epsilon_s)\big)\Big),
              \qquad L = \mathrm{ReLU}\Big(\sum_k w_k A^k\Big)

    with :math:`M_k` Score-CAM's masks in torchcam's order (min-max normalized at the layer's resolution, then
    upsampled: ``normalize_first=True``) and :math:`\epsilon_s` standard normal noise at the input's resolution
    (torchcam's baseline score, subtracted before the softmax, cancels in it). Costs S * C forward passes per image:
    S * ceil(C / chunk_size) passes, ONE loop in an exported graph (see :class:`ScoreCAM`).

    Noise: the S maps :math:`\epsilon_s` (1, H, W) are drawn from ``seed`` (CPU generator) and shared by every
    channel and every input of a batch; the exported graph holds them as a constant (S * H * W floats), so eager
    and exported maps agree. torchcam draws independent noise per sample, channel and pixel from torch's global
    generator (an (N, C, H, W) draw per sample s: the same marginal distribution; a noise constant of S x C x H x W
    would not fit an exported graph for a deep layer); given the same noise, pyattr and torchcam agree
    (the test feeds pyattr's noise to torchcam).

    Args:
        model, layer, fuse, reshape_transform, chunk_size, align_corners: as :class:`ScoreCAM`.
        samples: S (torchcam's ``num_samples``, 35).
        std: :math:`\sigma` (torchcam's 2.0).
        seed: seed of the noise.
        normalize_first: as :class:`ScoreCAM`; default ``True`` (torchcam's order).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.methods.SSCAM(model, "layer3", samples=2, chunk_size=64)(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 8, 8])
    """

    name = "sscam"

    def __init__(self, model: nn.Module, layer: LayerSpec = None, *, samples: int = 35, std: float = 2.0,
                 seed: int = 0, normalize_first: bool = True, **options):
        super().__init__(model, layer, normalize_first=normalize_first, **options)
        self.samples = check_count(samples, "samples")
        check_upfront("SSCAM", "samples", self.samples, PER_POINT_BYTES, "samples' bookkeeping")
        if not (isinstance(std, (int, float)) and not isinstance(std, bool) and std >= 0):
            raise InputError(f"std must be a number >= 0, got {std!r}")
        self.std = float(std)
        self.seed = int(seed)

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        r"""(S, 1, H, W) noise :math:`\sigma \epsilon_s` for inputs or masks ``like`` (..., H, W)."""
        from .gradient import seeded_tensor

        plane = int(like.shape[-2]) * int(like.shape[-1])
        check_upfront("SSCAM", "samples", self.samples, plane * (4 + like.element_size()), "noise maps")
        return self.std * seeded_tensor("normal", (self.samples, 1, *like.shape[-2:]), self.seed, like)

    @property
    def passes(self) -> int:
        return self.samples

    def pass_values(self, x):
        return (self.noise(x),)

    def masked_input(self, x, masks, noise):
        return x[:, None] * (masks + noise)[:, :, None]

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "samples": self.samples, "std": self.std, "seed": self.seed}


class ISCAM(ScoreCAM):
    r"""IS-CAM (Naidu et al. 2020, "IS-CAM: Integrated Score-CAM for axiomatic-based explanations",
    arXiv:2010.03023), as torchcam's ``ISCAM``: Score-CAM with the masked input integrated along a path,

    .. math:: w_k = \mathrm{softmax}_k\Big(\frac1S \sum_{i=1}^S S_t(c_i\, x \odot M_k)\Big), \qquad
              c_i = \sum_{j=1}^{i} \frac{j}{S}, \qquad L = \mathrm{ReLU}\Big(\sum_k w_k A^k\Big)

    (torchcam's coefficients :math:`c_i`, which reach :math:`(S + 1) / 2` at i = S; its baseline score cancels in
    the softmax), with :math:`M_k` Score-CAM's masks in torchcam's order (``normalize_first=True``). No randomness.
    Costs S * C forward passes per image: S * ceil(C / chunk_size) passes, ONE loop in an exported graph.

    Args:
        model, layer, fuse, reshape_transform, chunk_size, align_corners: as :class:`ScoreCAM`.
        samples: S (torchcam's ``num_samples``, 10).
        normalize_first: as :class:`ScoreCAM`; default ``True`` (torchcam's order).

    Example:
        >>> pyattr.methods.ISCAM(model, "layer3", samples=2, chunk_size=64)(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 8, 8])
    """

    name = "iscam"

    def __init__(self, model: nn.Module, layer: LayerSpec = None, *, samples: int = 10, normalize_first: bool = True,
                 **options):
        super().__init__(model, layer, normalize_first=normalize_first, **options)
        self.samples = check_count(samples, "samples")
        check_upfront("ISCAM", "samples", self.samples, PER_POINT_BYTES, "path coefficients")

    def coefficients(self) -> list[float]:
        """:math:`c_1 .. c_S`, accumulated in float64 as torchcam does (a Python float)."""
        coeffs, c = [], 0.0
        for i in range(self.samples):
            c += (i + 1) / self.samples
            coeffs.append(c)
        return coeffs

    @property
    def passes(self) -> int:
        return self.samples

    def pass_values(self, x):
        from .gradient import constant_tensor

        return (constant_tensor(self.coefficients(), x),)

    def masked_input(self, x, masks, coefficient):
        return coefficient * (x[:, None] * masks[:, :, None])

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "samples": self.samples}


__all__ = ["ISCAM", "SSCAM", "ScoreCAM"]
