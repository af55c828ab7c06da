"""Inputs that cannot give a meaningful map: a clear error in eager calls, a visibly invalid result in graphs.

Eager calls raise :class:`InputError` for NaN/inf inputs, non-finite scores and targets that are not class
ids. An exported graph cannot raise: for such a sample its maps and raw map are NaN and its explained
class is -1, while the other samples of the batch keep their results. (Before: a NaN pixel gave
Saliency / Guided Backprop / DeconvNet / SmoothGrad a normal-looking [0, 1] map of an all-NaN score,
and an exported graph explained the arg-max class for target -2.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pyattr.errors import InputError
from pyattr.methods import METHODS, build_method
from pyattr.postprocess import normalize_minmax
from pyattr.zoo.model import ShapesNet

sys.path.insert(0, str(Path(__file__).parent))
from contract import run_exported

SIZE = 32
K = 6
OPTIONS = {"integratedgradients": {"steps": 4, "chunk_size": 4}, "smoothgrad": {"samples": 2},
           "scorecam": {"chunk_size": 16}, "occlusion": {"patch": 16, "stride": 16, "chunk_size": 2},
           "featureablation": {"cell": 16, "chunk_size": 2}, "rise": {"masks": 4, "chunk_size": 2},
           "sscam": {"samples": 1, "chunk_size": 16}, "iscam": {"samples": 1, "chunk_size": 16},
           "ablationcam": {"chunk_size": 16}, "smoothgradcampp": {"samples": 2, "chunk_size": 2},
           "deepliftshap": {"baselines": 2, "chunk_size": 2},
           "gradientshap": {"baselines": 2, "samples": 2, "chunk_size": 2}}


def small_model() -> ShapesNet:
    torch.manual_seed(1)
    return ShapesNet(widths=(8, 8, 16, 16)).eval()


def make(name: str, model):
    return build_method(name, model, "layer3", **OPTIONS.get(name, {}))


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# -- eager calls: clear errors ------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", list(METHODS))
def test_eager_call_rejects_non_finite_inputs(name, value):
    x = images()
    x[2, 1, 5, 7] = value
    with pytest.raises(InputError, match=r"NaN or infinite values \(sample 2\)"):
        make(name, small_model())(x)


@pytest.mark.parametrize("name", list(METHODS))
def test_eager_call_rejects_non_finite_scores(name):
    model = small_model()
    with torch.no_grad():
        model.fc.bias[3] = float("inf")  # finite inputs, an infinite score
    with pytest.raises(InputError, match="scores are NaN or infinite for 4 of 4 inputs"):
        make(name, model)(images())


@pytest.mark.parametrize("target", [-2, K, 99, 1.0, True, torch.tensor([0, 1, -3, 2]), torch.tensor([0.0, 1, 2, 3])])
def test_eager_call_rejects_targets_that_are_not_class_ids(target):
    with pytest.raises(InputError, match="target"):
        make("saliency", small_model())(images(), target)


# -- normalization never hides a non-finite value ------------------------------------------------------
def test_normalize_minmax_turns_any_non_finite_map_into_nan_and_keeps_the_others():
    maps = torch.tensor([[1.0, 3.0, 2.0], [0.0, float("nan"), 1.0], [0.0, float("inf"), 1.0],
                         [float("-inf"), 0.0, 1.0], [5.0, 5.0, 5.0]])
    out = normalize_minmax(maps)
    assert torch.equal(out[0], torch.tensor([0.0, 1.0, 0.5]))
    assert out[1:4].isnan().all()  # was [0, nan, 1], [0, nan, 0] and [nan, 0, 0]: two looked like maps
    assert torch.equal(out[4], torch.zeros(3))  # a constant map: zeros


# -- the graph's semantics, traced or not ---------------------------------------------------------------
def assert_marked_invalid(scores, explained, raw, maps, bad: list[int], good: list[int], expected=None):
    """Samples ``bad``: NaN raw and maps, explained class -1. Samples ``good``: finite, as ``expected``
    (an Attribution of those samples alone) when given."""
    assert explained[bad].eq(-1).all(), explained
    assert raw[bad].isnan().all() and maps[bad].isnan().all()
    assert raw[good].isfinite().all() and maps[good].isfinite().all()
    assert explained[good].ge(0).all()
    if expected is not None:
        assert torch.equal(explained[good].long(), expected.target)
        assert float((maps[good] - expected.maps).abs().max()) < 1e-4
        assert float((scores[good] - expected.scores).abs().max()) < 1e-4


def traced_semantics(method, x, t):
    """``method.graph`` as the tracer runs it: eager-only checks off (the thread's tracing flag)."""
    method._tracing = True
    try:
        return method.graph(x, t)
    finally:
        method._tracing = False


@pytest.mark.parametrize("name", list(METHODS))
def test_graph_marks_non_finite_inputs_and_bad_targets_invalid(name):
    model = small_model()
    method = make(name, model)
    x = images()
    x[1, 0, 3, 3] = float("nan")
    x[2, 2, 0, 0] = float("inf")
    outputs = traced_semantics(method, x, torch.tensor([-1, 0, -1, 2]))
    assert_marked_invalid(*outputs, bad=[1, 2], good=[0, 3], expected=method(x[[0, 3]], torch.tensor([-1, 2])))
    x = images(seed=1)
    outputs = traced_semantics(method, x, torch.tensor([-2, 5, K, 99]))
    assert_marked_invalid(*outputs, bad=[0, 2, 3], good=[1], expected=method(x[[1]], torch.tensor([5])))
    assert outputs[0].isfinite().all()  # the scores are still the model's


@pytest.mark.parametrize("name", ["saliency", "gradcam", "lrp"])
def test_graph_marks_samples_with_non_finite_scores_invalid(name):
    model = small_model()
    x = images(6)
    x[[1, 4]] *= 1e38  # finite inputs whose normalization inside the model overflows
    assert x.isfinite().all()
    with torch.no_grad():
        assert torch.equal(model(x).isfinite().all(1), torch.tensor([True, False, True, True, False, True]))
    outputs = traced_semantics(make(name, model), x, torch.full((6,), -1))
    assert_marked_invalid(*outputs, bad=[1, 4], good=[0, 2, 3, 5])


# -- exported graphs ------------------------------------------------------------------------------------
def check_exported(name: str, fmt: str, tmp_path: Path) -> None:
    import pyattr

    model = small_model()
    method = make(name, model)
    path = tmp_path / f"{name}.{ {'onnx': 'onnx', 'torchscript': 'pt', 'pt2': 'pt2'}[fmt] }"
    pyattr.export(method, images(1), path)
    x = images()
    x[1, 0, 3, 3] = float("nan")
    x[2, 2, 0, 0] = float("inf")
    outputs = run_exported(fmt, path, x, torch.tensor([-1, 0, -1, 2]))
    assert_marked_invalid(*outputs, bad=[1, 2], good=[0, 3], expected=method(x[[0, 3]], torch.tensor([-1, 2])))
    x = images(seed=1)
    outputs = run_exported(fmt, path, x, torch.tensor([-2, 5, K, 99]))  # -2 was explained as the arg-max
    assert_marked_invalid(*outputs, bad=[0, 2, 3], good=[1], expected=method(x[[1]], torch.tensor([5])))


def test_exported_onnx_graph_gives_nan_maps_and_class_minus_one_for_bad_samples(tmp_path):
    check_exported("saliency", "onnx", tmp_path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
@pytest.mark.parametrize("name", ["gradcam", "cam", "lrp", "integratedgradients", "fullgrad", "scorecam"])
def test_exported_graphs_give_nan_maps_and_class_minus_one_for_bad_samples(name, fmt, tmp_path):
    check_exported(name, fmt, tmp_path)
