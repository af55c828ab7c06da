r"""Eigen-CAM and Eigen-Grad-CAM: a layer's map as the projection on its first principal component.

Eigen-CAM (Muhammad & Yeasin 2020, "Eigen-CAM: Class Activation Map using Principal Components",
IJCNN 2020, arXiv:2008.00299) needs no gradient and no class: for each sample the layer's activations
A (C, h, w) are laid out as hw observations of C channels, :math:`X = A^\top` (hw, C), centred per
channel, and projected on the first right singular vector :math:`v_1` of the centred X (the top
eigenvector of :math:`X^\top X`):

.. math:: L = \mathrm{ReLU}\big((X - \bar X)\, v_1\big) \in \mathbb{R}^{h \times w}

Eigen-Grad-CAM does the same on :math:`\frac{\partial S_t}{\partial A} \odot A` (the element-wise
product that HiResCAM sums over channels), so it depends on the target.

ONNX has no SVD: :func:`principal_projection` finds :math:`v_1` with matrix products only (repeated
squaring of the normalized Gram matrix), so the whole method is one exportable graph.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InputError
from ..postprocess import TINY
from .cam import CAMMethod, GradientCAM, LayerSpec, fuse_maps

SQUARINGS = 20
"""Squarings of the Gram matrix in :func:`principal_projection`: its 2**20-th power, which separates the top
eigenvector from the second by the factor (lambda_2 / lambda_1) ** (2 ** 20): below 1e-8 for an eigen-gap
lambda_2 / lambda_1 <= 1 - 2e-5 (float32 itself cannot resolve much finer gaps)."""


def principal_direction(x: torch.Tensor, squarings: int = SQUARINGS) -> torch.Tensor:
    r"""The first principal direction of each sample's rows: (N, R, C) centred rows -> (N, C) unit vectors.

    :math:`v_1` is the top eigenvector of the (C, C) Gram matrix :math:`G = X^\top X` (the first right
    singular vector of X), found with matrix products only, so that the function traces into any graph
    (ONNX has no SVD or eigen-decomposition): the Gram matrix M of the smaller side, (C, C) or (R, R), is
    squared ``squarings`` times, each time as :math:`M^2 / \lVert M \rVert_F^2` (trace 1), which gives its
    :math:`2^s`-th power scaled: a multiple of the projector :math:`v_1 v_1^\top` once
    :math:`(\lambda_2/\lambda_1)^{2^s}` is negligible; its column of largest diagonal is :math:`\pm v_1`
    (on the (R, R) side :math:`\pm u_1`, and :math:`v_1 \propto X^\top u_1`). No step can overflow or
    underflow to 0 (X is scaled to max |x| = 1, every power to trace 1) and an all-zero X gives v = 0 (no NaN).

    Sign: singular vectors have no sign (LAPACK returns either). Here v is chosen with
    :math:`\sum_c v_c \ge 0`, which for a centred X means that the projection :math:`X v` correlates
    non-negatively with the rows' sums :math:`X \mathbf{1}` (:math:`(Xv) \cdot (X\mathbf{1}) =
    \lambda_1 v \cdot \mathbf{1}`): for Eigen-CAM the map is high where the channels' total activation is
    above its mean. (A "projection sums to >= 0" rule cannot work: a centred X projects to a zero sum.)
    When :math:`\sum_c v_c` is 0 the sign is +, and when it is within rounding of 0 either sign may come out.

    Ties: when :math:`\lambda_1 = \lambda_2` (to float precision) the power is a multiple of the projector on
    the whole top eigenspace, and v comes from the normalized projection onto it of the coordinate axis (of
    the smaller side: a channel, or a row) with the largest projection, the first such axis: a unit vector
    of the top eigenspace, as any SVD's choice is, but not necessarily the one LAPACK picks.

    Example:
        >>> x = torch.tensor([[[2.0, 1.0], [-2.0, -1.0], [0.0, 0.0]]])   # rows along (2, 1)
        >>> principal_direction(x)
        tensor([[0.8944, 0.4472]])
    """
    n, rows, cols = x.shape
    xs = x / x.abs().flatten(1).amax(1).clamp_min(TINY)[:, None, None]  # max |x| = 1 (or x = 0)
    by_columns = cols <= rows  # static (shapes only): the smaller Gram matrix
    power = torch.bmm(xs.transpose(1, 2), xs) if by_columns else torch.bmm(xs, xs.transpose(1, 2))
    for _ in range(squarings):
        # M <- M^2 / ||M||_F^2: for a symmetric M, trace(M^2) = ||M||_F^2, so the result has trace 1
        power = torch.bmm(power, power) / power.square().sum((1, 2), keepdim=True).clamp_min(TINY)
    size = power.shape[-1]
    best = torch.diagonal(power, dim1=1, dim2=2).argmax(1)  # (N,)
    column = power.gather(2, best[:, None, None].expand(n, size, 1))[..., 0]  # (N, size)
    v = column if by_columns else torch.bmm(xs.transpose(1, 2), column[..., None])[..., 0]
    v = v / v.square().sum(1, keepdim=True).sqrt().clamp_min(TINY)
    return torch.where(v.sum(1, keepdim=True) < 0, -v, v)


def principal_projection(maps: torch.Tensor, squarings: int = SQUARINGS) -> torch.Tensor:
    r"""Each (C, h, w) map projected on its first principal component: (N, C, h, w) -> (N, h, w), signed.

    pytorch-grad-cam's ``get_2d_projection`` without the SVD: :math:`X = A^\top` (hw, C) centred per channel,
    :math:`X v_1` with :math:`v_1` from :func:`principal_direction` (its sign convention: the projection
    correlates non-negatively with the channel sum of A). No ReLU here.

    Example:
        >>> a = torch.zeros(1, 2, 1, 3); a[0, 0, 0] = torch.tensor([0.0, 1.0, 2.0])
        >>> principal_projection(a)                                         # channel 0 varies: -1, 0, 1
        tensor([[[-1.,  0.,  1.]]])
    """
    n, _, h, w = maps.shape
    x = maps.flatten(2).transpose(1, 2)  # (N, hw, C)
    x = x - x.mean(1, keepdim=True)
    v = principal_direction(x, squarings)
    return torch.bmm(x, v[..., None]).reshape(n, h, w)


class EigenCAM(CAMMethod):
    r"""Eigen-CAM (Muhammad & Yeasin 2020, arXiv:2008.00299): the layer's activations projected on their
    first principal component, :math:`L = \mathrm{ReLU}\big((X - \bar X) v_1\big)` with X the (hw, C)
    activations of a sample and :math:`v_1` its first right singular vector
    (:func:`principal_projection`).

    **It does not depend on the target**: no gradient is taken, and every class (with a
    :class:`~pyattr.targets.DetectionTarget`, every box, matched or not) gets the same map; ``scores`` and
    ``target`` are still the model's and the resolved ones (T targets per input: one forward pass, the map
    repeated T times). The principal component's sign is fixed so that
    the map correlates non-negatively with the channel sum of the activations (pytorch-grad-cam's
    ``EigenCAM`` keeps LAPACK's arbitrary sign: its map can be the ReLU of the opposite projection).
    Raw map at the layer's resolution; several layers are fused as in :class:`CAMMethod`.

    Args:
        model, layer, fuse, reshape_transform: as :class:`~pyattr.methods.GradCAM`.
        squarings: squarings of the Gram matrix that find :math:`v_1` (:data:`SQUARINGS`).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.methods.EigenCAM(model, "layer3")(torch.rand(2, 3, 64, 64)).raw.shape
        torch.Size([2, 16, 16])
    """

    name = "eigencam"
    depends_on_target: ClassVar[bool] = False
    multi_target: ClassVar[bool] = True  # T targets: one forward pass, the one map repeated T times

    def __init__(self, model: nn.Module, layer: LayerSpec = None, *, squarings: int = SQUARINGS, **options):
        super().__init__(model, layer, **options)
        self.squarings = _check_squarings(squarings)

    def attribute_raw(self, x: torch.Tensor, target: torch.Tensor):
        with torch.no_grad():
            scores, outputs = self.forward_with_layers(x)
            resolved = self.resolve(scores, target)
            maps = [torch.relu(principal_projection(self.as_map(out, name), self.squarings))
                    for out, name in zip(outputs, self.layer_names)]
            raw = fuse_maps(maps, self.fuse)
        if target.dim() == 2:  # (N, T) targets (several classes, a detection target's boxes): (N, T, h, w)
            # (a copy, not an expand: reshaping an expand to (N * T, h, w) in postprocess leaves aten::sym_numel,
            # which has no direct ONNX translation)
            raw = raw[:, None].repeat(1, target.shape[1], 1, 1)
        return scores, raw, resolved

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "squarings": self.squarings}


class EigenGradCAM(GradientCAM):
    r"""Eigen-Grad-CAM (pytorch-grad-cam's variant of Eigen-CAM, after Muhammad & Yeasin 2020): the first
    principal component of the gradient-weighted activations,

    .. math:: L = \mathrm{ReLU}\big((X - \bar X)\, v_1\big), \qquad
              X = \Big(\frac{\partial S_t}{\partial A} \odot A\Big)^\top \in \mathbb{R}^{hw \times C}

    (:func:`principal_projection`; the sign convention: the map correlates non-negatively with
    :math:`\sum_k \frac{\partial S_t}{\partial A^k} A^k`, HiResCAM's signed map). A target whose score
    does not depend on the layer (an unmatched detection box) gets a zero map. Args as :class:`EigenCAM`.

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.methods.EigenGradCAM(model, "layer3")(torch.rand(2, 3, 64, 64), target=1).raw.shape
        torch.Size([2, 16, 16])
    """

    name = "eigengradcam"

    def __init__(self, model: nn.Module, layer: LayerSpec = None, *, squarings: int = SQUARINGS, **options):
        super().__init__(model, layer, **options)
        self.squarings = _check_squarings(squarings)

    def layer_map(self, act, grad):
        return torch.relu(principal_projection(grad * act, self.squarings))

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "squarings": self.squarings}


def _check_squarings(squarings: Any) -> int:
    if isinstance(squarings, bool) or not isinstance(squarings, int) or not 1 <= squarings <= 64:
        raise InputError(f"squarings must be an int in [1, 64] (default {SQUARINGS}), got {squarings!r}")
    return squarings


__all__ = ["SQUARINGS", "EigenCAM", "EigenGradCAM", "principal_direction", "principal_projection"]
