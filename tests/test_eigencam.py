"""Eigen-CAM and Eigen-Grad-CAM (issue 16 item 3).

- :func:`principal_direction` (matrix products only, no SVD) against ``torch.linalg.svd`` and ``eigh`` in
  float64 on random matrices with a clear eigen-gap, both Gram sides (C <= hw and C > hw), after the
  documented sign convention; the convention itself; the documented behaviour on a tie; zero, huge and
  tiny activations (no NaN, no overflow);
- agreement with pytorch-grad-cam 1.5.7's ``EigenCAM`` / ``EigenGradCAM`` (raw map at the layer's
  resolution, 1e-5 relative) on resnet18, vgg11 and the built-in model, after flipping its arbitrary
  LAPACK sign to pyattr's convention (the one deliberate difference);
- Eigen-CAM ignores the target, Eigen-Grad-CAM does not;
- the export contract (eager == onnxruntime == TorchScript == .pt2, batches 1 and 3) on the built-in model
  and resnet18.

The detection checks (Faster R-CNN vs pytorch-grad-cam, the built-in detector) are in test_targets_detection.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES_TORCHVISION, make_images, make_shapes
from contract import assert_export_contract
from test_methods import assert_maps_close

import pyattr
from pyattr.methods import METHODS, EigenCAM, EigenGradCAM, build_method
from pyattr.methods.cam import fuse_maps
from pyattr.methods.eigencam import principal_direction, principal_projection

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

# --------------------------------------------------------------------------------------------------
# The principal direction without SVD
# --------------------------------------------------------------------------------------------------


def with_spectrum(n: int, rows: int, cols: int, singular: list[float], seed: int) -> torch.Tensor:
    """(n, rows, cols) float64 matrices U diag(singular) V^T with random orthonormal U, V; U's columns are
    orthogonal to the ones vector, so that every column of X has mean 0 (X is centred, its spectrum exact)."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular)
    u = torch.randn(n, rows, k, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(u - u.mean(1, keepdim=True))[0]
    v = torch.linalg.qr(torch.randn(n, cols, k, generator=g, dtype=torch.float64))[0]
    return u @ torch.diag_embed(torch.tensor(singular, dtype=torch.float64).expand(n, k)) @ v.transpose(1, 2)


def svd_direction(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v1 with pyattr's sign convention, singular values) from torch.linalg.svd in float64."""
    _, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    v = vh[:, 0]
    return torch.where(v.sum(1, keepdim=True) < 0, -v, v), s


@pytest.mark.parametrize("rows, cols", [(64, 12), (9, 40), (16, 16)])
def test_principal_direction_matches_svd_and_eigh(rows, cols):
    k = min(rows, cols) - 1  # centring removes one dimension
    singular = [10.0, 8.0] + np.linspace(6.0, 0.5, k - 2).tolist()  # lambda_2 / lambda_1 = 0.64
    x = with_spectrum(5, rows, cols, singular, seed=rows * cols)
    v_ref, s = svd_direction(x)
    torch.testing.assert_close(s[:, :k], torch.tensor(singular, dtype=torch.float64).expand(5, k))
    v = principal_direction(x.float())
    assert v.dtype == torch.float32
    assert float((v.double() - v_ref).abs().max()) < 1e-5
    # eigh of the Gram matrix (ascending eigenvalues: the last), same sign convention
    _, vecs = torch.linalg.eigh(x.transpose(1, 2) @ x)
    top = vecs[..., -1]
    top = torch.where(top.sum(1, keepdim=True) < 0, -top, top)
    assert float((v.double() - top).abs().max()) < 1e-5
    # the projection: X v, as get_2d_projection's reshaped_activations @ VT[0]
    maps = x.float().transpose(1, 2).reshape(5, cols, rows, 1)  # (N, C, h, w) whose X is x
    proj = principal_projection(maps)
    expected = (x @ v_ref[..., None]).reshape(5, rows, 1)
    assert_maps_close(proj, expected, rtol=1e-5)


def test_sign_convention_and_its_meaning():
    """v sums to >= 0, so the map correlates non-negatively with the channel sum of the activations;
    A and -A give opposite maps (the same v, a centred X of the opposite sign)."""
    a = torch.rand(6, 20, 5, 5, generator=torch.Generator().manual_seed(3)) ** 3
    proj = principal_projection(a)
    x = a.flatten(2).transpose(1, 2)
    v = principal_direction(x - x.mean(1, keepdim=True))
    assert bool((v.sum(1) >= 0).all())
    channel_sum = a.sum(1)
    corr = (proj * (channel_sum - channel_sum.mean((1, 2), keepdim=True))).sum((1, 2))
    assert bool((corr > 0).all())
    torch.testing.assert_close(principal_projection(-a), -proj, rtol=1e-5, atol=1e-6)
    # the projection of centred data sums to 0: why "the map sums to >= 0" cannot be the convention
    assert float(proj.sum((1, 2)).abs().max()) < 1e-4 * float(proj.abs().max())


def test_tie_gives_a_unit_vector_of_the_top_eigenspace():
    """lambda_1 = lambda_2: v is the normalized column of largest diagonal of the eigenspace's projector,
    the first such: for an eigenspace spanned by axes 1 and 2 (equal norms), axis 1."""
    x = torch.tensor([[[0.0, 2, 0, 0], [0, -2, 0, 0], [0, 0, 2, 0], [0, 0, -2, 0], [0, 0, 0, 0.5], [0, 0, 0, -0.5]]])
    v = principal_direction(x)
    assert torch.equal(v, torch.tensor([[0.0, 1, 0, 0]]))
    # a rotated tie: v is some unit vector of the top eigenspace (which one depends on rounding)
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    xr = (x.double() @ q).float()
    v = principal_direction(xr)[0].double()
    gram = (xr[0].double().T @ xr[0].double())
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float((gram @ v - 8.0 * v).abs().max()) < 1e-4  # an eigenvector of the tied eigenvalue 8
    assert float(v.sum()) >= 0


def test_zero_huge_and_tiny_activations():
    a = torch.rand(3, 16, 6, 6, generator=torch.Generator().manual_seed(4))
    a[1] = 0
    proj = principal_projection(a)
    assert torch.equal(proj[1], torch.zeros(6, 6)) and bool(torch.isfinite(proj).all())
    for scale in (1e30, 1e-30):
        scaled = principal_projection(a * scale) / scale
        assert bool(torch.isfinite(scaled).all())
        torch.testing.assert_close(scaled, proj, rtol=1e-4, atol=1e-6 * float(proj.abs().max()))
    a[2] = 5.0  # constant per position: the centred X is 0
    assert torch.equal(principal_projection(a)[2], torch.zeros(6, 6))
    for bad in (0, 65, 2.0, True):
        with pytest.raises(pyattr.InputError, match="squarings"):
            EigenCAM(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), "0", squarings=bad)


# --------------------------------------------------------------------------------------------------
# pytorch-grad-cam
# --------------------------------------------------------------------------------------------------


def pgc_projection(cls, model, layer: str, x: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam's signed projection (its ``get_cam_image``: ``get_2d_projection``, before the ReLU
    of ``compute_cam_per_layer``) and the (N, C, h, w) array it projected."""
    cam = cls(model=model, target_layers=[model.get_submodule(layer)])
    try:
        targets = [ClassifierOutputTarget(int(t)) for t in target]
        outputs = cam.activations_and_grads(x)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = None
        if cam.uses_gradients:
            sum(t(o) for t, o in zip(targets, outputs)).backward()
            grads = cam.activations_and_grads.gradients[0].numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            projection = cam.get_cam_image(x, layer, targets, acts, grads, False)
        return projection, acts if grads is None else grads * acts
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)


def aligned_reference(projection: np.ndarray, projected: np.ndarray) -> tuple[torch.Tensor, int]:
    """pytorch-grad-cam's map with its SVD sign flipped to pyattr's convention (the map correlates
    non-negatively with the channel sum of what was projected), then its ReLU; and how many were flipped."""
    p = torch.from_numpy(projection).double()
    channel_sum = torch.from_numpy(projected).double().sum(1)
    corr = (p * (channel_sum - channel_sum.mean((1, 2), keepdim=True))).sum((1, 2))
    flip = corr < 0
    return torch.relu(torch.where(flip[:, None, None], -p, p)), int(flip.sum())


REFERENCE = {"resnet18": "layer3", "vgg11": "features.19", "builtin": pyattr.zoo.SHAPESNET_LAYER}


@pytest.mark.parametrize("model_name", tuple(REFERENCE))
def test_matches_pytorch_grad_cam(request, model_name):
    model = request.getfixturevalue(f"{model_name}_model" if model_name == "builtin" else model_name)
    layer = REFERENCE[model_name]
    x = make_shapes(4, seed=7) if model_name == "builtin" else make_images(4, seed=7)
    target = torch.tensor([0, 3, 5, 1])
    flipped = 0
    for ours, theirs in ((EigenCAM, pgc.EigenCAM), (EigenGradCAM, pgc.EigenGradCAM)):
        result = ours(model, layer)(x, target)
        assert torch.equal(result.target, target)
        reference, n = aligned_reference(*pgc_projection(theirs, model, layer, x.clone(), target))
        assert_maps_close(result.raw, reference, rtol=1e-5)
        flipped += n
    print(f"{model_name}: pytorch-grad-cam's sign flipped for {flipped} of 8 maps")


def test_eigencam_ignores_the_target_eigengradcam_does_not(builtin_model):
    x = make_shapes(3, seed=8)
    cam = EigenCAM(builtin_model, "layer3")
    assert not cam.depends_on_target and EigenGradCAM.depends_on_target
    a, b = cam(x, 0), cam(x, torch.tensor([5, -1, 2]))
    assert torch.equal(a.raw, b.raw) and torch.equal(a.maps, b.maps)
    assert b.target[0] == 5 and b.target[1] == b.scores[1].argmax()
    several = cam(x, torch.tensor([[0, 4], [1, 2], [3, 5]]))
    assert torch.equal(several.raw[:, 0], several.raw[:, 1])
    grad_cam = EigenGradCAM(builtin_model, "layer3")
    c, d = grad_cam(x, 0), grad_cam(x, 4)
    assert float((c.raw - d.raw).abs().max()) > 0.1 * float(c.raw.abs().max())


@pytest.mark.parametrize("cls", [EigenCAM, EigenGradCAM])
def test_batch_equals_samples_alone(builtin_model, cls):
    """The principal component is per sample: a batch gives each sample's own map."""
    x, target = make_shapes(3, seed=11), torch.tensor([-1, 3, 5])
    method = cls(builtin_model, "layer3")
    batch = method(x, target)
    assert float(batch.raw.abs().amax()) > 0
    for i in range(3):
        assert_maps_close(method(x[i:i + 1], target[i:i + 1]).raw, batch.raw[i:i + 1], rtol=1e-4)


def test_registered_and_layers_fused(builtin_model):
    assert METHODS["eigencam"] is EigenCAM and METHODS["eigengradcam"] is EigenGradCAM
    x = make_shapes(2, seed=9)
    fused = build_method("eigencam", builtin_model, ["layer2", "layer3"])(x)
    alone = [EigenCAM(builtin_model, name)(x).raw for name in ("layer2", "layer3")]
    torch.testing.assert_close(fused.raw, fuse_maps(alone, "mean"), rtol=1e-6, atol=1e-6)
    auto = EigenGradCAM(builtin_model)
    auto(x)
    assert auto.layer_name == "layer3"


# --------------------------------------------------------------------------------------------------
# The export contract
# --------------------------------------------------------------------------------------------------


# CI time (2 loaded cores): each method x model x format costs 10-30 s. In CI: Eigen-CAM on the built-in model in
# every format (C = 128 < hw = 256: the (C, C) Gram matrix), Eigen-Grad-CAM in ONNX on the built-in model and on
# resnet18 (layer3 at 4x4: C = 256 > hw = 16, the (hw, hw) side); the rest with -m slow.
CONTRACT_CASES = [
    ("builtin", "eigencam", ("onnx", "torchscript", "pt2")),
    ("builtin", "eigengradcam", ("onnx",)),
    ("resnet18", "eigengradcam", ("onnx",)),
    pytest.param("builtin", "eigengradcam", ("torchscript", "pt2"), marks=pytest.mark.slow),
    pytest.param("resnet18", "eigencam", ("onnx", "torchscript", "pt2"), marks=pytest.mark.slow),
    pytest.param("resnet18", "eigengradcam", ("torchscript", "pt2"), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model_name, name, formats", CONTRACT_CASES)
def test_export_contract(request, model_name, name, formats, tmp_path):
    if model_name == "builtin":
        model, x, k = request.getfixturevalue("builtin_model"), make_shapes(3, seed=10), 6
    else:
        model, x, k = request.getfixturevalue("resnet18"), make_images(3, seed=10), NUM_CLASSES_TORCHVISION
    method = build_method(name, model, "layer3")
    assert_export_contract(method, x, tmp_path, num_classes=k, formats=formats, batches=(1, 3))
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}[formats[0]]
    meta = pyattr.read_metadata(tmp_path / f"{name}{suffix}")
    assert meta["method"] == name and meta["layer"] == "layer3" and meta["squarings"] == 20
