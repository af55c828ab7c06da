"""pyattr.runtime runs method-with-metrics graphs (:class:`pyattr.metrics.graph.MethodWithMetrics`: a method, then
deletion / insertion curves and AUC, Average Drop, Increase in Confidence) without torch: the metric values it
returns per image equal the eager graph's within 1e-5, through ``AttributionRuntime.run`` / ``explain``, ``pyattr
run`` (JSON lines, ``--save-maps``) and the OpenVINO backend where it is installed.

One graph, exported once per module: Grad-CAM on the built-in model (sigmoid scores), steps 4, 3 images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchfree import run_without_torch

import pyattr
from pyattr import zoo
from pyattr.errors import InputError
from pyattr.metrics import confidence_change, deletion_insertion
from pyattr.metrics.graph import METRIC_OUTPUTS, MethodWithMetrics
from pyattr.runtime import AttributionRuntime
from pyattr.runtime.metadata import validate_metadata

TOL = 1e-5
PREPROCESSING = {"color": "RGB", "scale": 1 / 255, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                 "size": [64, 64], "resize": "bilinear", "layout": "NCHW"}
TARGETS = [-1, 2, 4]


@pytest.fixture(scope="module")
def scored_graph(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime_metrics")
    model = zoo.load_builtin()
    scored = MethodWithMetrics(pyattr.GradCAM(model, "layer3"), steps=4, score="sigmoid")
    path = pyattr.export(scored, torch.rand(1, 3, 64, 64), root / "gradcam_metrics.onnx",
                         class_names=zoo.SHAPE_CLASSES, preprocessing=PREPROCESSING)
    images = []
    for i, array in enumerate(zoo.generate(3, seed=17).images):
        images.append(root / f"img{i}.png")
        Image.fromarray(array).save(images[-1])
    x = torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in images])).permute(0, 3, 1, 2).float() / 255
    eager = [t.detach().numpy() for t in scored.graph(x, torch.tensor(TARGETS))]
    return {"root": root, "path": path, "images": images, "x": x, "eager": eager, "model": model}


def eager_metrics(setup) -> dict[str, np.ndarray]:
    return dict(zip(METRIC_OUTPUTS, setup["eager"][4:]))


def test_eager_graph_equals_the_metric_functions(scored_graph):
    """The reference the runtime is held to is itself the metric functions' numbers (sigmoid scores)."""
    model, x, eager = scored_graph["model"], scored_graph["x"], eager_metrics(scored_graph)
    maps, target = torch.from_numpy(scored_graph["eager"][3]), torch.from_numpy(scored_graph["eager"][1])
    dele, ins = deletion_insertion(model, x, maps, target, steps=4, score="sigmoid")
    conf = confidence_change(model, x, maps, target, score="sigmoid")
    for name, want in [("deletion_auc", dele.auc), ("insertion_curve", ins.scores), ("average_drop", conf.drop)]:
        np.testing.assert_allclose(eager[name], want.numpy(), rtol=0, atol=TOL, err_msg=name)


def test_runtime_without_torch_returns_the_metrics(scored_graph, tmp_path):
    out = tmp_path / "out.npz"
    code = """
    import sys
    import numpy as np
    from pyattr.runtime import AttributionRuntime

    runtime = AttributionRuntime(sys.argv[1], num_threads=1)
    x = runtime.preprocess(sys.argv[3:])
    ran = runtime.run(x, [-1, 2, 4])
    explained = runtime.explain(sys.argv[3:], [-1, 2, 4], batch_size=2)
    arrays = {"x": x, "classes": ran.explained_class, "maps": ran.maps, "names": np.array(list(ran.metrics))}
    arrays.update({"run_" + k: v for k, v in ran.metrics.items()})
    for name in ran.metrics:
        arrays["explain_" + name] = np.stack([e.metrics[name] for e in explained])
    np.savez(sys.argv[2], **arrays)
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")))
    print(__import__("json").dumps(explained[0].summary()))
    """
    result = run_without_torch(code, str(scored_graph["path"]), str(out), *map(str, scored_graph["images"]))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "[]"  # torch was never imported
    got = np.load(out)
    np.testing.assert_allclose(got["x"], scored_graph["x"].numpy(), rtol=0, atol=1e-6)
    assert got["names"].tolist() == list(METRIC_OUTPUTS)
    eager = scored_graph["eager"]
    assert got["classes"].tolist() == eager[1].tolist()
    np.testing.assert_allclose(got["maps"], eager[3], rtol=0, atol=1e-4)
    for name, want in eager_metrics(scored_graph).items():
        assert got["run_" + name].shape == want.shape == got["explain_" + name].shape, name
        np.testing.assert_allclose(got["run_" + name], want, rtol=0, atol=TOL, err_msg=name)
        np.testing.assert_allclose(got["explain_" + name], want, rtol=0, atol=TOL, err_msg=name)
    summary = json.loads(lines[1])
    assert summary["explained_class"] == int(eager[1][0])
    assert summary["metrics"]["deletion_auc"] == pytest.approx(float(eager[4 + 1][0]), abs=TOL)
    assert len(summary["metrics"]["deletion_curve"]) == eager[4].shape[1] == 5  # steps + 1 points


def test_cli_prints_and_saves_the_metrics_without_torch(scored_graph, tmp_path):
    code = """
    import runpy, sys
    sys.argv = ["pyattr.runtime", *sys.argv[1:]]
    runpy.run_module("pyattr.runtime", run_name="__main__")
    """
    files = [str(f) for f in scored_graph["images"]]
    out = tmp_path / "run"
    result = run_without_torch(code, str(scored_graph["path"]), *files, "--out", str(out), "--save-maps",
                               "--batch-size", "2", "--threads", "1")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == ["img0", "img1", "img2"]
    x = scored_graph["x"]
    eager = [t.detach().numpy() for t in MethodWithMetrics(pyattr.GradCAM(scored_graph["model"], "layer3"), steps=4,
                                                             score="sigmoid").graph(x, torch.full((3,), -1))]
    want = dict(zip(METRIC_OUTPUTS, eager[4:]))
    for j, line in enumerate(lines):
        assert set(line["metrics"]) == set(METRIC_OUTPUTS)
        for name, value in want.items():
            np.testing.assert_allclose(line["metrics"][name], value[j], rtol=0, atol=TOL, err_msg=name)
        saved = np.load(line["maps"])
        np.testing.assert_allclose(saved["metric_insertion_auc"], want["insertion_auc"][j], rtol=0, atol=TOL)


def test_openvino_backend_returns_the_same_metrics(scored_graph):
    pytest.importorskip("openvino")
    x = scored_graph["x"].numpy()
    ov = AttributionRuntime(scored_graph["path"], num_threads=1, backend="openvino").run(x, TARGETS)
    assert list(ov.metrics) == list(METRIC_OUTPUTS)
    for name, want in eager_metrics(scored_graph).items():
        np.testing.assert_allclose(ov.metrics[name], want, rtol=0, atol=TOL, err_msg=name)


def without_metric_outputs(path, out, metadata: dict):
    """The metrics graph with its metric outputs dropped and ``metadata`` as its pyattr metadata (no second export)."""
    import onnx

    model = onnx.load(str(path))
    kept = [o for o in model.graph.output if o.name not in METRIC_OUTPUTS]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    next(e for e in model.metadata_props if e.key == "pyattr").value = json.dumps(metadata)
    onnx.save(model, str(out))
    return out


def test_plain_graphs_have_no_metrics_and_bad_metric_metadata_is_named(scored_graph, tmp_path):
    meta = dict(AttributionRuntime(scored_graph["path"], num_threads=1).metadata)
    plain_meta = {k: v for k, v in meta.items() if k != "metrics"}
    plain_meta["outputs"] = meta["outputs"][:4]
    plain = without_metric_outputs(scored_graph["path"], tmp_path / "plain.onnx", plain_meta)
    runtime = AttributionRuntime(plain, num_threads=1)
    assert runtime.run(scored_graph["x"].numpy()[:1]).metrics is None
    assert "metrics" not in runtime.explain(scored_graph["images"][:1])[0].summary()

    for field, value, message in [
        ("outputs", ["deletion_auc", "deletion_auc"], "metadata field 'metrics.outputs'"),
        ("outputs", ["maps"], "metadata field 'metrics.outputs'"),
        ("outputs", [*METRIC_OUTPUTS[:-1]], "metadata field 'outputs' must be scores, explained_class"),
        ("score", "softmin", "metadata field 'metrics.score'"),
        ("steps", 0, "metadata field 'metrics.steps'"),
        ("baseline", "blur", "metadata field 'metrics.baseline'"),
    ]:
        with pytest.raises(InputError, match=message):
            validate_metadata({**meta, "metrics": {**meta["metrics"], field: value}})
    with pytest.raises(InputError, match="metrics graphs score class targets only"):
        validate_metadata({**meta, "target": {"kind": "segmentation"}, "inputs": ["images", "target", "region"]})

    # a file whose metadata promises metric outputs its graph does not have is refused, naming the outputs
    lying = without_metric_outputs(scored_graph["path"], tmp_path / "lying.onnx", meta)
    with pytest.raises(InputError, match="not a pyattr attribution graph.*deletion_curve"):
        AttributionRuntime(lying, num_threads=1)
