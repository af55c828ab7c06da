r"""The perturbation family: maps from the target score's response to perturbed copies of the input.

No gradient is taken. Every method runs a fixed number :math:`P` of forward passes on perturbed copies of
each input (under ``torch.no_grad()``), batched ``chunk_size`` perturbations per pass: a pass holds
``N * chunk_size`` images, sample-major, so the target's run-time inputs are repeated per copy
(:meth:`~pyattr.methods.AttributionMethod.scores_of`) and every target kind works. In an exported graph the
``ceil(P / chunk_size)`` passes are one loop (:func:`pyattr._loop.batched_loop`: one ONNX ``Scan``; chunks of one
width, the last padded with empty masks; eager calls keep ``chunk_size`` a pass, the last chunk shorter, as captum)
and the batch stays dynamic; the masks are built in the graph
from the (static) image size, from small constants (RISE's seeded grids) or from a segment map given at
construction.

All targets of an (N, T) target come from the same passes (``multi_target``): T targets cost no extra pass.

- :class:`Occlusion` (Zeiler & Fergus 2014): a sliding window replaced by a baseline, captum's ``Occlusion``.
- :class:`FeatureAblation`: each segment of a segment map replaced by a baseline, captum's ``FeatureAblation``.
- :class:`RISE` (Petsiuk et al. 2018): random smooth masks, saliency = score-weighted mean of the masks.

Memory: one pass holds ``N * chunk_size`` perturbed images; an eager call whose perturbed batch would exceed
``max_pass_bytes`` (default 2 GiB of inputs; the model's activations come on top) raises
:class:`~pyattr.errors.InputError` naming a ``chunk_size`` that fits.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._callview import outside_trace
from .._loop import batched_loop
from ..errors import InputError
from .base import PER_POINT_BYTES, AttributionMethod, OutputSelector, check_pass, check_upfront
from .gradient import reduce_channel_dim

REDUCTIONS = ("mean", "sum", "max", "none")
DEFAULT_MAX_PASS_BYTES = 2 * 1024**3


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _int_tuple(value: Any, name: str, lengths: tuple[int, ...]) -> tuple[int, ...]:
    """An int or a tuple of ints (each >= 1) of one of ``lengths``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * lengths[0]
    if not isinstance(value, Sequence) or len(value) not in lengths:
        want = " or ".join(f"{n} ints" for n in lengths)
        raise InputError(f"{name} must be an int or a tuple of {want}, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must hold ints >= 1, got {tuple(value)!r}; e.g. {name}=8")
    return tuple(int(v) for v in value)


def _finite_float(value: Any, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise InputError(f"{name} must be finite, got {value!r}")
    return out


def as_constant(make) -> torch.Tensor:
    """``make()`` run outside any tracing in progress, so that a traced graph holds its result as a constant."""
    with outside_trace():
        return make()


class PerturbationMethod(AttributionMethod):
    """Base of the family: :meth:`perturbations` masks, scored in chunks (see the module's docstring).

    A subclass implements :meth:`count` (the number of perturbations P for an input shape) and
    :meth:`masks` (the chunk's masks); :class:`Occlusion` and :class:`FeatureAblation` share
    :meth:`ablation_map`, RISE has its own weighted sum."""

    multi_target: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, chunk_size: int | None = 32, max_pass_bytes: int = DEFAULT_MAX_PASS_BYTES,
                 output: OutputSelector = None):
        super().__init__(model, output=output)
        self.chunk_size = None if chunk_size is None else _positive_int(chunk_size, "chunk_size")
        self.max_pass_bytes = _positive_int(max_pass_bytes, "max_pass_bytes")
        self._constants: dict[tuple, Any] = {}

    # -- to implement ----------------------------------------------------------------------------
    def count(self, x: torch.Tensor) -> int:
        """P, the number of perturbed copies of each input (static: from the input's shape)."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def chunks(self, total: int) -> list[tuple[int, int]]:
        """[start, stop) ranges of ``chunk_size`` perturbations (all at once for ``chunk_size=None``)."""
        step = total if self.chunk_size is None else self.chunk_size
        return [(start, min(start + step, total)) for start in range(0, total, step)]

    def run_passes(self, one_pass, total: int, device: torch.device):
        """The outputs of ``one_pass(index, keep)`` for the chunks of the ``total`` perturbations, stacked (a tuple
        of stacked outputs when it returns a tuple): ``index`` (c,) long, the chunk's perturbations; ``keep`` (c,)
        bool, False for padding (whose masks must be empty). Eager calls: the chunks of :meth:`chunks` (the last
        shorter), as captum batches them. While tracing: ceil(P / chunk_size) chunks of one width (the last padded
        with ``keep`` False), ONE loop in the exported graph (:func:`pyattr._loop.batched_loop`)."""
        if not self._tracing:
            outs = [one_pass(torch.arange(start, stop, device=device), torch.ones(stop - start, dtype=torch.bool,
                                                                                 device=device))
                    for start, stop in self.chunks(total)]
            if isinstance(outs[0], tuple):
                return tuple(torch.stack(column) for column in zip(*outs))
            return torch.stack(outs)
        chunks = len(self.chunks(total))
        width = -(-total // chunks)
        ids = torch.arange(chunks * width, device=device)
        keep = (ids < total).reshape(chunks, width)
        return batched_loop(one_pass, ids.clamp_max(total - 1).reshape(chunks, width), keep)

    def check_memory(self, x: torch.Tensor, total: int) -> None:
        """Eager-only: raise InputError when one pass's perturbed inputs (N * chunk images) exceed the budget."""
        if not self._tracing:
            chunk = total if self.chunk_size is None else min(self.chunk_size, total)
            check_pass(type(self).__name__, x, chunk, what="perturbed images", max_bytes=self.max_pass_bytes,
                       per="perturbations per pass")

    def constant(self, key: tuple, make) -> Any:
        """``as_constant(make)``, cached per ``key`` on this method (one entry; replaced whole: threads)."""
        value = self._constants.get(key)
        if value is None:
            value = as_constant(make)
            self._constants = {key: value}
        return value

    def perturbed_scores(self, x: torch.Tensor, perturbed: torch.Tensor, resolved: torch.Tensor) -> torch.Tensor:
        """(N, c, T) target scores of ``perturbed`` (N, c, ...) copies of the inputs ``x`` (N, ...)."""
        n, c = perturbed.shape[0], perturbed.shape[1]
        scores = self.scores_of(perturbed.reshape(-1, *x.shape[1:]))  # sample-major (N * c, K)
        scores = scores.reshape(n, c, scores.shape[-1])
        return scores.gather(2, resolved[:, None, :].expand(-1, c, -1))

    def _targets(self, x: torch.Tensor, target: torch.Tensor):
        """(scores (N, K), resolved (N, T), selected clean scores (N, T))."""
        scores = self.scores_of(x)
        resolved = self.resolve(scores, target[:, None] if target.dim() == 1 else target)
        return scores, resolved, scores.gather(1, resolved)

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "chunk_size": self.chunk_size}


class _Ablation(PerturbationMethod):
    """Occlusion and Feature Ablation: masks replaced by a baseline, attribution = the score drop on the mask,
    averaged over the masks that cover each element (captum's ``use_weights``; 1 mask per element for
    Feature Ablation)."""

    average: ClassVar[bool] = False

    def __init__(self, model: nn.Module, *, baseline: float = 0.0, reduction: str = "mean", **options):
        super().__init__(model, **options)
        self.baseline = _finite_float(baseline, "baseline")
        if reduction not in REDUCTIONS:
            raise InputError(f"unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
        self.reduction = reduction

    @property
    def signed(self) -> bool:  # type: ignore[override]
        """Score drops are signed evidence (a negative value: the score rose without that part)."""
        return self.reduction != "max"

    def masks(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B, c, C', H, W) bool masks of the perturbations ``index`` (c,) (long, in [0, P)): B = 1 (the same for
        every input) or N, C' = 1 (every channel) or C."""
        raise NotImplementedError

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        with torch.no_grad():
            x = x.detach()
            total = self.count(x)
            self.check_memory(x, total)
            scores, resolved, clean = self._targets(x, target)

            def one_pass(index: torch.Tensor, keep: torch.Tensor):  # padding (keep False): empty masks, parts 0
                mask = self.masks(x, index) & keep[None, :, None, None, None]  # (B, c, C', H, W)
                perturbed = torch.where(mask, torch.full((), self.baseline, dtype=x.dtype, device=x.device),
                                        x[:, None])
                drop = clean[:, None, :] - self.perturbed_scores(x, perturbed, resolved)  # (N, c, T)
                flat = mask.flatten(2).to(x.dtype)  # (B, c, C'HW)
                part = drop.transpose(1, 2) @ flat  # (N, T, C'HW)
                return (part, flat.sum(1)) if self.average else part  # flat.sum(1): (B, C'HW)

            out = self.run_passes(one_pass, total, x.device)  # (passes, ...): one loop in an exported graph
            parts, weights = out if self.average else (out, None)
            attr = parts[0]
            weight = None if weights is None else weights[0]
            for i in range(1, int(parts.shape[0])):  # in order, as the passes' parts were added before
                attr = attr + parts[i]
                if weights is not None:
                    weight = weight + weights[i]
            if self.average:
                attr = attr / weight[:, None]
            c_mask = attr.shape[-1] // (int(x.shape[2]) * int(x.shape[3]))
            attr = attr.reshape(*attr.shape[:2], c_mask, *x.shape[2:])
            if c_mask != x.shape[1]:
                attr = attr.expand(-1, -1, x.shape[1], -1, -1)
            raw = reduce_channel_dim(attr, self.reduction, 2)
        if target.dim() == 1:
            raw, resolved = raw[:, 0], resolved[:, 0]
        return scores, raw, resolved

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "baseline": self.baseline, "reduction": self.reduction}


class Occlusion(_Ablation):
    r"""Occlusion (Zeiler & Fergus 2014, arXiv:1311.2901) with captum's ``Occlusion`` semantics.

    A window of ``patch`` elements slides over the input with ``stride``; for each position :math:`w` the
    window is replaced by ``baseline`` and the attribution of an element :math:`i` is the mean, over the
    windows that cover it, of the score drop:

    .. math:: A_i = \frac{1}{|\{w \ni i\}|} \sum_{w \ni i} \big(S_t(x) - S_t(x_{w \leftarrow b})\big)

    Positions per dimension: :math:`\lceil (D - k) / s \rceil + 1` (captum's): the last window may hang over
    the border and is cropped. ``patch=(h, w)`` spans every channel (captum's ``sliding_window_shapes=(C, h, w)``,
    the common case); ``patch=(c, h, w)`` slides over channels too (``stride`` then has 3 entries or is one int).
    The attribution has the input's shape (N, C, H, W); ``reduction`` turns it into the map: ``"mean"`` over
    channels (default: captum's value itself when the window spans the channels), ``"sum"``, ``"max"`` or
    ``"none"`` (keep (N, C, H, W)). Costs P = the number of windows forward passes (plus one), in
    ``ceil(P / chunk_size)`` batched passes.

    Args:
        model: a module mapping (N, C, H, W) images to (N, K) scores (or any target's model).
        patch: the window: an int (square), (h, w) or (c, h, w).
        stride: an int or a tuple as long as ``patch``; at most the patch in every dimension where the
            window does not span the input (captum's rule: otherwise some elements are never occluded).
        baseline: the value written into the window.
        reduction: the channel reduction, see above.
        chunk_size: windows per batched pass (a pass holds N * chunk_size images); ``None``: all at once.
        max_pass_bytes: the memory budget of one pass's perturbed inputs (module docstring).
        output: picks the scores out of a model returning a tuple / dict.

    Raises:
        InputError: a patch larger than the image, a stride < 1 or larger than the patch.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.Occlusion(model, patch=16, stride=8)(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 64, 64])
    """

    name = "occlusion"
    average = True

    def __init__(self, model: nn.Module, patch: int | tuple[int, ...] = 16, stride: int | tuple[int, ...] = 8, *,
                 baseline: float = 0.0, reduction: str = "mean", chunk_size: int | None = 32,
                 max_pass_bytes: int = DEFAULT_MAX_PASS_BYTES, output: OutputSelector = None):
        super().__init__(model, baseline=baseline, reduction=reduction, chunk_size=chunk_size,
                         max_pass_bytes=max_pass_bytes, output=output)
        if isinstance(patch, int) and not isinstance(patch, bool):
            patch = (patch, patch)
        self.patch = _int_tuple(patch, "patch", (2, 3))
        self.stride = _int_tuple(stride, "stride", (len(self.patch),))

    def windows(self, x: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """Per occluded dimension (channels when the patch has 3 entries, then H, W): (size, window, stride,
        positions). Raises InputError for a patch larger than the input or a stride larger than the patch."""
        dims = tuple(int(s) for s in x.shape[-len(self.patch):])
        out = []
        for d, k, s, what in zip(dims, self.patch, self.stride, ("channels", "height", "width")[-len(dims):]):
            if k > d:
                raise InputError(f"patch {self.patch} is larger than the input ({what} {d}); use a patch of at most "
                                 f"{dims}")
            if s > k and d != k:
                raise InputError(f"stride {self.stride} is larger than patch {self.patch} ({what}): some elements "
                                 f"would never be occluded; use a stride of at most the patch (captum's rule)")
            out.append((d, k, s, math.ceil((d - k) / s) + 1))
        return out

    def count(self, x: torch.Tensor) -> int:
        return math.prod(p for *_, p in self.windows(x))

    def masks(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        dims = self.windows(x)
        cover = []
        # window number -> one position per dimension, the last dimension fastest
        for i, (d, k, s, positions) in enumerate(dims):
            inner = math.prod(p for *_, p in dims[i + 1:])
            offset = (index // inner) % positions * s  # (c,)
            pos = torch.arange(d, device=x.device)
            cover.append((pos[None] >= offset[:, None]) & (pos[None] < offset[:, None] + k))  # (c, d)
        if len(cover) == 2:
            mask = cover[0][:, None, :, None] & cover[1][:, None, None, :]  # (c, 1, H, W)
        else:
            mask = cover[0][:, :, None, None] & cover[1][:, None, :, None] & cover[2][:, None, None, :]
        return mask[None]

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "patch": list(self.patch), "stride": list(self.stride)}


_call_state = threading.local()


class FeatureAblation(_Ablation):
    r"""Feature Ablation with captum's ``FeatureAblation`` semantics: every segment :math:`s` of a segment map
    is replaced by ``baseline`` in turn, and each element of the segment gets the whole score drop:

    .. math:: A_i = S_t(x) - S_t(x_{s(i) \leftarrow b})

    Segments:

    - default: a grid of ``cell`` (h, w) cells (the last row / column of cells may be smaller), spanning every
      channel; :math:`\lceil H / h \rceil \lceil W / w \rceil` segments;
    - ``feature_mask`` at construction: an integer tensor of segment ids of shape (H, W), (1|C, H, W) or
      (1, 1|C, H, W) (a (C, H, W) map makes per-channel segments), the same for every input. Ids need not be
      consecutive; each distinct id is one segment;
    - ``feature_mask=`` at call time (eager calls only): ``method(x, target, feature_mask=m)`` with m of shape
      (N|1, H, W) or (N|1, 1|C, H, W): per-sample segments (e.g. superpixels computed outside); the passes run
      over the union of the ids.

    In an exported graph the number of segments is static: the grid's (fixed by the image size) or the
    construction-time map's distinct ids; the segments are one-hot masks built in the graph from the id map
    (a constant), ``chunk_size`` of them per pass. Costs P = the number of segments forward passes (plus one).

    Args:
        model: a module mapping images to (N, K) scores.
        cell: the grid's cell, an int or (h, w); used when no feature mask is given.
        feature_mask: a segment-id map fixed at construction (see above).
        baseline, reduction, chunk_size, max_pass_bytes, output: as :class:`Occlusion`.

    Raises:
        InputError: a feature mask of the wrong shape or dtype (at construction or call).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> fa = pyattr.FeatureAblation(model, cell=16)
        >>> fa(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 64, 64])
        >>> seg = torch.arange(4).repeat_interleave(16)[None, :].expand(64, 64)  # 4 vertical stripes
        >>> fa(torch.rand(1, 3, 64, 64), feature_mask=seg).raw.shape
        torch.Size([1, 64, 64])
    """

    name = "featureablation"

    def __init__(self, model: nn.Module, cell: int | tuple[int, int] = 16, *, feature_mask: torch.Tensor | None = None,
                 baseline: float = 0.0, reduction: str = "mean", chunk_size: int | None = 32,
                 max_pass_bytes: int = DEFAULT_MAX_PASS_BYTES, output: OutputSelector = None):
        super().__init__(model, baseline=baseline, reduction=reduction, chunk_size=chunk_size,
                         max_pass_bytes=max_pass_bytes, output=output)
        self.cell = _int_tuple(cell, "cell", (2,))
        self.feature_mask = None if feature_mask is None else self._compact(feature_mask, None)
        self.segments = None if self.feature_mask is None else int(self.feature_mask.max()) + 1
        """The number of segments of the construction-time map (None: the grid's, from the image size)."""

    @staticmethod
    def _compact(mask: Any, x: torch.Tensor | None) -> torch.Tensor:
        """A checked (B, C'|1, H, W) long map of consecutive ids 0..F-1 (B = 1 or N)."""
        if not isinstance(mask, torch.Tensor):
            raise InputError(f"feature_mask must be an integer torch.Tensor of segment ids, got {type(mask).__name__}")
        if mask.is_floating_point() or mask.is_complex() or mask.dtype == torch.bool:
            raise InputError(f"feature_mask must hold integer segment ids, got dtype {mask.dtype}; "
                             "convert with .long()")
        m = mask.detach()
        if m.dim() == 2:
            m = m[None, None]
        elif m.dim() == 3:
            # (C', H, W) at construction; (N|1, H, W) at call time
            m = m[None] if x is None else m[:, None]
        if m.dim() != 4 or m.numel() == 0:
            raise InputError(f"feature_mask must have shape (H, W), (1|C, H, W) or (N|1, 1|C, H, W), got "
                             f"{tuple(mask.shape)}")
        if x is not None:
            n, c, h, w = (int(s) for s in x.shape)
            if (m.shape[0] not in (1, n) or m.shape[1] not in (1, c) or tuple(m.shape[2:]) != (h, w)):
                raise InputError(f"feature_mask of shape {tuple(mask.shape)} does not fit inputs of shape "
                                 f"{tuple(x.shape)}: give (H, W) = ({h}, {w}), ({n}|1, {h}, {w}) or "
                                 f"({n}|1, {c}|1, {h}, {w})")
        return torch.unique(m.long(), return_inverse=True)[1].contiguous()

    def __call__(self, x: torch.Tensor, target: Any = None, *, feature_mask: torch.Tensor | None = None):
        """As :meth:`AttributionMethod.__call__`; ``feature_mask``: a per-call segment map (class docstring)."""
        if feature_mask is None:
            return super().__call__(x, target)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return super().__call__(x, target)  # the base class's input error
        stack = getattr(_call_state, "masks", None)
        if stack is None:
            stack = _call_state.masks = []
        stack.append(self._compact(feature_mask.to(x.device), x))
        try:
            return super().__call__(x, target)
        finally:
            stack.pop()

    def segment_map(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(the (B, C'|1, H, W) id map of this call, the number of segments F)."""
        stack = getattr(_call_state, "masks", None)
        if stack:
            mask = stack[-1]
            return mask, int(mask.max()) + 1
        if self.feature_mask is not None:
            mask = self.feature_mask
            if tuple(mask.shape[2:]) != tuple(x.shape[2:]) or mask.shape[1] not in (1, x.shape[1]):
                raise InputError(f"the feature_mask given at construction has shape {tuple(mask.shape)}, which "
                                 f"does not fit inputs of shape {tuple(x.shape)}")
            return mask.to(x.device), self.segments
        h, w = (int(s) for s in x.shape[2:])
        ch, cw = self.cell
        if ch > h or cw > w:
            raise InputError(f"cell {self.cell} is larger than the input ({h}, {w}); use a smaller cell")
        cols = math.ceil(w / cw)
        rows = torch.arange(h, device=x.device) // ch
        ids = rows[:, None] * cols + torch.arange(w, device=x.device)[None] // cw
        return ids[None, None], math.ceil(h / ch) * cols

    def count(self, x: torch.Tensor) -> int:
        return self.segment_map(x)[1]

    def masks(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ids, _ = self.segment_map(x)
        return ids[:, None] == index[None, :, None, None, None]  # (B, c, C', H, W)

    def metadata(self) -> dict[str, Any]:
        meta = {**super().metadata()}
        if self.feature_mask is None:
            meta["cell"] = list(self.cell)
        else:
            meta["feature_mask"] = list(self.feature_mask.shape)
        return meta


def interpolation_matrix(size: int, up: int) -> torch.Tensor:
    """(up, size) float64 weights of 1-D linear upsampling from ``size`` to ``up`` points, half-pixel centres
    (``align_corners=False``; for upsampling the same as skimage's ``resize(order=1, mode='reflect')`` of the
    paper's code): ``R @ v`` is ``F.interpolate(v, up, mode='linear')``."""
    eye = torch.eye(size, dtype=torch.float64)[None]  # (1, size channels, size)
    return F.interpolate(eye, size=up, mode="linear", align_corners=False)[0].T.contiguous()


class RISE(PerturbationMethod):
    r"""RISE (Petsiuk, Das & Saenko 2018, arXiv:1806.07421): randomized input sampling.

    ``masks`` random binary grids :math:`G_i \in \{0, 1\}^{s \times s}` (each cell 1 with probability ``p``)
    are upsampled bilinearly to :math:`(s + 1) \lceil H/s \rceil \times (s + 1) \lceil W/s \rceil` and cropped to
    (H, W) at a random shift in :math:`[0, \lceil H/s \rceil) \times [0, \lceil W/s \rceil)`: the paper's
    ``generate_masks``. The masked inputs :math:`x \odot M_i` (plus ``baseline`` :math:`(1 - M_i)`; 0 in the
    paper) are scored and

    .. math:: S = \frac{1}{N_M\, p} \sum_{i=1}^{N_M} S_t(x \odot M_i)\, M_i

    the paper's normalization (:math:`E[M] \approx p`). The score is the target's (a class logit by default);
    ``softmax=True`` takes the softmax over the target's K scores first, the paper's probabilities (meaningful
    for class targets only).

    The grids and shifts are drawn at construction from ``seed`` (CPU generator): eager calls and exported
    graphs use the very same masks. The masks are built in the graph for the image size, chunk by chunk, as
    :math:`A_i G_i B_i^T` (rows of the bilinear interpolation matrices at the mask's shift), so an exported
    graph holds only the (masks, s, s) grids, not (masks, H, W) maps. Costs ``masks`` forward passes (plus one),
    ``ceil(masks / chunk_size)`` batched passes, ONE loop in an exported graph (:func:`pyattr._loop.batched_loop`;
    there the chunks are of one width, the last padded with empty masks).

    Args:
        model: a module mapping images to (N, K) scores.
        masks: :math:`N_M`, the number of masks (the paper: 4000 for ResNet50, 8000 for VGG16).
        cells: s, the grid's size (the paper: 7).
        p: the probability that a cell is kept (the paper: 0.5).
        seed: seed of the grids and shifts.
        baseline: the value the masked-out part fades to (0: the paper's).
        softmax: score the softmax of the target's scores (the paper's class probabilities).
        chunk_size: masks per batched pass (a pass holds N * chunk_size images); ``None``: all at once.
        max_pass_bytes: the memory budget of one pass's masked inputs (module docstring).
        output: picks the scores out of a model returning a tuple / dict.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.RISE(model, masks=64, seed=0)(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 64, 64])
    """

    name = "rise"

    def __init__(self, model: nn.Module, masks: int = 1000, *, cells: int = 7, p: float = 0.5, seed: int = 0,
                 baseline: float = 0.0, softmax: bool = False, chunk_size: int | None = 32,
                 max_pass_bytes: int = DEFAULT_MAX_PASS_BYTES, output: OutputSelector = None):
        super().__init__(model, chunk_size=chunk_size, max_pass_bytes=max_pass_bytes, output=output)
        self.num_masks = _positive_int(masks, "masks")
        self.cells = _positive_int(cells, "cells")
        self.p = _finite_float(p, "p")
        if not 0 < self.p <= 1:
            raise InputError(f"p (the probability of keeping a cell) must be in (0, 1], got {p!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.baseline = _finite_float(baseline, "baseline")
        self.softmax = bool(softmax)
        # the grids (float64 and the float32 draw) and shifts, made here
        check_upfront("RISE", "masks", self.num_masks, self.cells * self.cells * 13 + 24 + PER_POINT_BYTES,
                      f"low-resolution mask grids ({self.cells} x {self.cells} cells)")
        generator = torch.Generator().manual_seed(seed)
        self.grids = (torch.rand(self.num_masks, self.cells, self.cells, generator=generator) < self.p).double()
        self.shift_fractions = torch.rand(self.num_masks, 2, generator=generator, dtype=torch.float64)
        """Each mask's shift as a fraction of the cell: shift = floor(fraction * cell size)."""

    def count(self, x: torch.Tensor) -> int:
        return self.num_masks

    def geometry(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For (H, W) images: (interpolation matrix (up_H, s), rows (masks, H) of it for each mask's crop,
        the same two for W), the rows as long indices. Constants."""
        self.check_geometry(h, w)

        def make():
            out = []
            for axis, size in enumerate((h, w)):
                cell = math.ceil(size / self.cells)
                matrix = interpolation_matrix(self.cells, (self.cells + 1) * cell)
                shift = (self.shift_fractions[:, axis] * cell).floor().long().clamp_max(cell - 1)
                out += [matrix, shift[:, None] + torch.arange(size)[None]]
            return tuple(out)

        return self.constant(("geometry", h, w), make)

    def check_geometry(self, h: int, w: int) -> None:
        """InputError when the masks' crop rows for (H, W) images (long, masks x (H + W)) would not fit."""
        check_upfront("RISE", "masks", self.num_masks, 8 * (h + w + 2), f"crop rows at {h} x {w} pixels")

    def mask_maps(self, ids: torch.Tensor, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """(c, H, W) masks ``ids`` (c,) (long, on ``like``'s device) at the image size (traceable: built from
        constants)."""
        rh, ih, rw, iw = self.geometry(h, w)
        a = rh.to(like)[ih.to(like.device).index_select(0, ids)]  # (c, H, s)
        b = rw.to(like)[iw.to(like.device).index_select(0, ids)]  # (c, W, s)
        grids = self.grids.to(like).index_select(0, ids)
        return a @ grids @ b.transpose(1, 2)

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        with torch.no_grad():
            x = x.detach()
            self.check_memory(x, self.num_masks)
            h, w = int(x.shape[2]), int(x.shape[3])
            self.check_geometry(h, w)
            scores, resolved, _ = self._targets(x, target)

            def one_pass(mask_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
                width = int(mask_ids.shape[0])
                # padding (keep False): empty masks, whose part of the sum is 0
                m = self.mask_maps(mask_ids, h, w, x) * keep.to(x.dtype)[:, None, None]  # (width, H, W)
                mm = m[None, :, None]
                perturbed = x[:, None] * mm if self.baseline == 0 else x[:, None] * mm + self.baseline * (1 - mm)
                if self.softmax:
                    out = self.scores_of(perturbed.reshape(-1, *x.shape[1:])).softmax(-1)
                    out = out.reshape(-1, width, out.shape[-1])
                    s = out.gather(2, resolved[:, None, :].expand(-1, width, -1))
                else:
                    s = self.perturbed_scores(x, perturbed, resolved)  # (N, width, T)
                return s.transpose(1, 2) @ m.flatten(1)  # (N, T, HW)

            parts = self.run_passes(one_pass, self.num_masks, x.device)  # (passes, N, T, HW): one loop when traced
            saliency = parts[0]
            for i in range(1, int(parts.shape[0])):  # in order, as the passes' parts were added before
                saliency = saliency + parts[i]
            raw = (saliency / (self.num_masks * self.p)).reshape(*saliency.shape[:2], h, w)
        if target.dim() == 1:
            raw, resolved = raw[:, 0], resolved[:, 0]
        return scores, raw, resolved

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "masks": self.num_masks, "cells": self.cells, "p": self.p, "seed": self.seed,
                "baseline": self.baseline, "softmax": self.softmax}


__all__ = ["RISE", "FeatureAblation", "Occlusion", "PerturbationMethod", "interpolation_matrix"]
