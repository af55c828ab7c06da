r"""Recipro-CAM: the target's score when the layer keeps only one spatial position (or its neighbourhood)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._loop import batched_loop
from ..errors import InputError
from .cam import CAMMethod, LayerSpec, check_count, scores_of_copies

KERNELS = ("gaussian", "point")
GAUSSIAN_3X3 = ((1 / 16, 1 / 8, 1 / 16), (1 / 8, 1 / 4, 1 / 8), (1 / 16, 1 / 8, 1 / 16))
"""The paper's 3x3 kernel that weights a position's neighbourhood in its mosaic feature map."""


def position_masks(h: int, w: int, kernel: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """(h * w, h, w) spatial masks, row-major over positions: ``"point"`` keeps position (i, j) alone (1 there,
    0 elsewhere), ``"gaussian"`` weights its 3x3 neighbourhood by :data:`GAUSSIAN_3X3` (cut at the borders).
    The kernel is separable (the outer product of (1/4, 1/2, 1/4) with itself), so a mask is the outer product of a
    row and a column profile: a few tensor ops in a traced graph. ``like``: the device and dtype.

    Example:
        >>> position_masks(2, 2, "point")[1]
        tensor([[0., 1.],
                [0., 0.]])
    """
    options = {} if like is None else {"device": like.device, "dtype": like.dtype}

    def profile(size: int) -> torch.Tensor:  # (positions, size): row a is the kernel's profile centred at a
        eye = torch.eye(size, **options)
        if kernel == "point":
            return eye
        shifted = torch.zeros(size, size, **options)
        shifted[1:, :-1] += eye[1:, 1:]  # a -> a - 1
        shifted[:-1, 1:] += eye[:-1, :-1]  # a -> a + 1
        return 0.5 * eye + 0.25 * shifted

    rows, cols = profile(h), profile(w)
    return (rows[:, None, :, None] * cols[None, :, None, :]).reshape(h * w, h, w)


_MASKS: dict[tuple, torch.Tensor] = {}  # eager calls' position masks, per (h, w, kernel, dtype, device); never written


def _masks(h: int, w: int, kernel: str, like: torch.Tensor, cached: bool) -> torch.Tensor:
    """:func:`position_masks`, kept for the next eager call (``cached``; 0.1 ms of a small call's CPU time; maps of up
    to 512 positions); a traced graph computes them (a few ops, no constant of h * h * w * w values)."""
    if not cached or (h * w) ** 2 > 2 ** 18:  # up to 1 MB of float32 each (a 22 x 22 map), 16 kept at most
        return position_masks(h, w, kernel, like)
    key = (h, w, kernel, like.dtype, like.device)
    masks = _MASKS.get(key)
    if masks is None:
        if len(_MASKS) >= 16:
            _MASKS.clear()
        masks = _MASKS[key] = position_masks(h, w, kernel, like)
    return masks


class ReciproCAM(CAMMethod):
    r"""Recipro-CAM (Byun & Lee 2022, "Recipro-CAM: Fast gradient-free visual explanations for convolutional neural
    networks", arXiv:2209.14074): gradient-free, one batched pass of the network's part after the layer.

    For each position (i, j) of the layer's h x w map, a *mosaic* feature map keeps the activations at (i, j)
    only (``kernel="point"``) or its 3x3 neighbourhood weighted by a Gaussian (``kernel="gaussian"``, the
    paper's default), :math:`A \odot K_{ij}`; the rest of the network scores it and

    .. math:: L_{ij} = S_t(A \odot K_{ij})

    (signed; ``maps`` are min-max normalized). With ``softmax=True`` the score is the softmax probability of the
    target (the paper's code) instead of the score itself (OpenVINO XAI's logits).

    The h*w mosaics of each sample go through the rest of the network with the layer's output replaced
    (:meth:`~pyattr.methods.cam.CAMMethod.scores_with_layer_output`): ``chunk_size`` positions per pass
    (N * chunk_size maps), ceil(h*w / chunk_size) passes, ONE loop in an exported graph
    (:func:`pyattr._loop.batched_loop`); with ``split=True`` the part before the layer is not run again (an eager call
    runs the model's part after the layer alone, traced once per (model, layer) by :mod:`pyattr._tail`, or else reuses
    the outputs of the modules before the layer recorded in the first pass).

    OpenVINO XAI's ``ReciproCAM`` (for CNNs) is ``kernel="point"``: the test holds pyattr to it.

    Args:
        model, layer: see :class:`~pyattr.methods.cam.CAMMethod` (one layer, whose output is (N, C, h, w)).
        kernel: ``"gaussian"`` (default) or ``"point"``.
        softmax: score the mosaics by the target's softmax probability over the scores.
        chunk_size: positions per pass.
        split: run the part of the model before the layer once (``True``) or for every mosaic (``False``).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.methods.ReciproCAM(model, "layer3")(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 8, 8])
    """

    name = "reciprocam"
    multi_layer = False

    def __init__(self, model: nn.Module, layer: LayerSpec = None, *, kernel: str = "gaussian", softmax: bool = False,
                 chunk_size: int = 64, split: bool = True, **options):
        if options.get("reshape_transform") is not None:
            raise InputError("ReciproCAM replaces the layer's output, which needs it as an (N, C, h, w) map: use it "
                             "without reshape_transform")
        super().__init__(model, layer, **options)
        if kernel not in KERNELS:
            raise InputError(f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)}")
        self.kernel = kernel
        self.softmax = bool(softmax)
        self.chunk_size = check_count(chunk_size, "chunk_size")
        self.split = bool(split)

    def check_target_kind(self, kind) -> None:
        if self.softmax and not kind.class_scores:
            raise InputError(f"ReciproCAM(softmax=True) takes the softmax over class logits, not over a {kind.kind} "
                             "target's scores; use softmax=False")

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        with torch.no_grad():
            x = x.detach()
            scores, out, prefix = self.forward_with_prefix(x, self.split)
            _, resolved = self.select(scores, target)
            act = self.as_map(out, self.layer_names[0])
            h, w = int(act.shape[2]), int(act.shape[3])
            masks = _masks(h, w, self.kernel, act, cached=not self._tracing)  # (h * w, h, w)
            # ceil(h * w / chunk_size) passes of one width (the last padded with empty masks, their scores dropped):
            # one loop in an exported graph
            chunks = -(-(h * w) // self.chunk_size)
            width = -(-(h * w) // chunks)
            if chunks * width > h * w:
                masks = torch.cat([masks, masks.new_zeros(chunks * width - h * w, h, w)])

            def one_pass(chunk_masks: torch.Tensor) -> torch.Tensor:
                mosaics = (act[:, None] * chunk_masks[None, :, None]).flatten(0, 1)  # (N * width, C, h, w)
                out_scores = self.scores_with_layer_output(x, mosaics, width, self.split, prefix)
                if self.softmax:
                    out_scores = torch.softmax(out_scores, dim=1)
                return scores_of_copies(out_scores, width, resolved)

            per_pass = batched_loop(one_pass, masks.reshape(chunks, width, h, w))  # (chunks, N, width)
            raw = per_pass.permute(1, 0, 2).reshape(-1, chunks * width)[:, :h * w].reshape(-1, h, w)
        return scores, raw, resolved

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "kernel": self.kernel, "softmax": self.softmax, "chunk_size": self.chunk_size,
                "split": self.split}


__all__ = ["GAUSSIAN_3X3", "KERNELS", "ReciproCAM", "position_masks"]
