"""OpenVINO as the runtime's second backend: the same exported .onnx compiled by OpenVINO (CPU, float32) gives
onnxruntime's results within 1e-4, through AttributionRuntime, Detector and ``pyattr run --backend openvino``,
torch-free; a graph OpenVINO cannot read is an InputError naming the operation.

A representative slice (the full method x model matrix is ``benchmarks/openvino_agreement.py``, results in
``benchmarks/results/openvino_agreement.md``): Grad-CAM and LRP on the built-in classifier, the built-in detector's explanation and detector graphs, resnet18's Grad-CAM.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from runtime_graphs import good_metadata, graph_model
from torchfree import run_without_torch

import pyattr
from pyattr import zoo
from pyattr.errors import InputError
from pyattr.runtime import AttributionRuntime, Detector
from pyattr.runtime.backends import open_graph, read_metadata_props
from pyattr.runtime.cli import main as run_main

TOL = 1e-4
TARGETS = np.array([-1, 2, 4], np.int64)
PREPROCESSING = {"color": "RGB", "scale": 1 / 255, "mean": [0.45, 0.5, 0.55], "std": [0.25, 0.2, 0.3],
                 "size": [64, 64], "resize": "bilinear", "layout": "NCHW"}


def both(path, **kwargs):
    return (AttributionRuntime(path, num_threads=1, **kwargs),
            AttributionRuntime(path, num_threads=1, backend="openvino", **kwargs))


def assert_agree(a, b, what: str) -> None:
    """Two GraphOutputs / DetectionOutputs: the same classes, maps and scores within TOL, raw within TOL of its
    scale."""
    for name in a._fields:
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None
            continue
        assert x.shape == y.shape and x.dtype == y.dtype, (what, name, x.shape, y.shape, x.dtype, y.dtype)
        scale = max(1.0, float(np.abs(x).max())) if name == "raw" else 1.0
        np.testing.assert_allclose(y, x, rtol=0, atol=TOL * scale, err_msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def builtin_graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("openvino")
    torch.manual_seed(0)
    model = zoo.ShapesNet().eval()
    paths = {}
    # occlusion: its graph holds torch.full((), v), an Expand to an empty shape that OpenVINO 2024 refused; its
    # passes and Score-CAM's are one ONNX Scan whose body reads the images from outside it, which OpenVINO 2026.4
    # took for a missing input (a segmentation fault while reading occlusion's graph): pyattr passes them as states
    for name, method in [("gradcam", pyattr.GradCAM(model, "layer3")), ("lrp", pyattr.LRP(model)),
                         ("occlusion", pyattr.METHODS["occlusion"](model, patch=16, stride=16, chunk_size=8)),
                         ("scorecam", pyattr.METHODS["scorecam"](model, "layer3", chunk_size=16))]:
        paths[name] = pyattr.export(method, torch.rand(1, 3, 64, 64), root / f"{name}.onnx",
                                    class_names=zoo.SHAPE_CLASSES, preprocessing=PREPROCESSING)
    images = []
    for i, array in enumerate(zoo.generate(3, seed=3).images):
        images.append(root / f"img{i}.png")
        Image.fromarray(array).save(images[-1])
    return {"root": root, "paths": paths, "images": images}


@pytest.mark.parametrize("name", ["gradcam", "lrp", "occlusion", "scorecam"])
def test_builtin_methods_agree_with_onnxruntime(builtin_graphs, name):
    ort, ov = both(builtin_graphs["paths"][name])
    assert ov.backend == "openvino" and ov.providers == ["CPU"] and ov.metadata == ort.metadata
    assert ov.input_size == ort.input_size and ov.class_names == list(zoo.SHAPE_CLASSES)
    x = ort.preprocess(builtin_graphs["images"])
    a, b = ort.run(x, TARGETS), ov.run(x, TARGETS)
    assert a.maps.max() > 0.99 and a.raw.std() > 0  # something to compare
    assert_agree(a, b, name)
    assert ov.run(x[:1], "triangle").maps.shape == (1, 64, 64)  # batch sizes other than the first run's


def test_resnet18_gradcam_agrees(resnet18, tmp_path):
    path = pyattr.export(pyattr.GradCAM(resnet18, "layer4"), torch.rand(1, 3, 64, 64), tmp_path / "r18.onnx",
                         preprocessing=PREPROCESSING)
    ort, ov = both(path)
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    assert_agree(ort.run(x), ov.run(x), "resnet18 gradcam")


def test_detection_graphs_agree(tmp_path):
    """The detector and the detection explanation graph, both compiled by OpenVINO: the same boxes found and the
    same per-box maps as onnxruntime."""
    from pyattr.cli import main as pyattr_main

    graph, detector = tmp_path / "det.onnx", tmp_path / "detector.onnx"
    assert pyattr_main(["export", str(graph), "--task", "detection", "--max-boxes", "2",
                        "--detector-out", str(detector)]) == 0
    images = list(zoo.generate(2, seed=5).images)
    found = [Detector(detector, num_threads=1, backend=b).detect(images) for b in ("onnxruntime", "openvino")]
    assert sum(len(f["boxes"]) for f in found[0]) >= 2
    for a, b in zip(*found):
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_allclose(b["boxes"], a["boxes"], atol=1e-3)
        np.testing.assert_allclose(b["scores"], a["scores"], atol=TOL)
    ort, ov = both(graph)
    x = ort.preprocess(images)
    boxes = np.array([[4, 18, 26, 42], [34, 28, 57, 51], [0, 0, 64, 64]], np.float32)  # 3 > B: two chunks
    assert_agree(ort.run(x, boxes=boxes, box_classes=[3, 5, 0]), ov.run(x, boxes=boxes, box_classes=[3, 5, 0]),
                 "detection")


def test_cli_backend_openvino_without_torch(builtin_graphs, tmp_path):
    """``pyattr run --backend openvino`` in a process where torch cannot be imported: the maps it saves equal
    ``pyattr run``'s (onnxruntime) within 1e-4, and the JSON lines name the same classes."""
    path, images = builtin_graphs["paths"]["gradcam"], builtin_graphs["images"]
    outs = {b: tmp_path / b for b in ("onnxruntime", "openvino")}
    code = """
        import sys
        from pyattr.runtime.cli import main
        sys.exit(main(sys.argv[1:], prog="pyattr run"))
    """
    lines = {}
    for backend, out in outs.items():
        done = run_without_torch(code, path, *images, "--out", out, "--save-maps", "--backend", backend,
                                 "--threads", "1")
        assert done.returncode == 0, done.stderr
        lines[backend] = [json.loads(line) for line in done.stdout.splitlines()]
        assert "torch" not in done.stderr
    assert [d["explained_class"] for d in lines["openvino"]] == [d["explained_class"] for d in lines["onnxruntime"]]
    for image in images:
        a, b = (np.load(out / f"{image.stem}_gradcam_maps.npz") for out in outs.values())
        np.testing.assert_allclose(b["map"], a["map"], rtol=0, atol=TOL)
        assert (outs["openvino"] / f"{image.stem}_gradcam_overlay.png").is_file()


def test_unsupported_operation_is_named(tmp_path):
    """A pyattr-shaped graph with an operation OpenVINO has no conversion for: an InputError naming it."""
    model = graph_model()
    model.graph.node.append(helper.make_node("Frobnicate", ["maps"], ["unused"], domain="com.example"))
    model.graph.output.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, None))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    helper.set_model_props(model, {"pyattr": json.dumps(good_metadata())})
    path = tmp_path / "custom_op.onnx"
    onnx.save(model, path)
    with pytest.raises(InputError, match=r"OpenVINO cannot compile custom_op\.onnx: .*com\.example\.Frobnicate"):
        AttributionRuntime(path, backend="openvino")


def test_bad_backend_and_device(builtin_graphs):
    path = builtin_graphs["paths"]["gradcam"]
    with pytest.raises(InputError, match="unknown backend 'tensorrt'; the runtime has onnxruntime, openvino"):
        AttributionRuntime(path, backend="tensorrt")
    with pytest.raises(InputError, match="one OpenVINO device, got \\['NPU9'\\]"):
        AttributionRuntime(path, backend="openvino", providers=["NPU9"])
    with pytest.raises(SystemExit) as exit_:
        run_main([str(path), str(builtin_graphs["images"][0]), "--out", str(builtin_graphs["root"] / "x"),
                  "--backend", "tensorrt"])
    assert exit_.value.code == 2


def test_metadata_props_reader_matches_onnx(builtin_graphs, tmp_path):
    """The wire-format reader (no onnx, no session) returns what onnx.load finds, and refuses a cut file."""
    path = builtin_graphs["paths"]["gradcam"]
    expected = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert read_metadata_props(path) == expected and "pyattr" in expected
    data = path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) - 20])  # metadata_props are written last: the cut lands in them
    with pytest.raises(InputError, match="cut.onnx is not a readable ONNX file"):
        read_metadata_props(cut)
    graph = open_graph(path, "openvino", num_threads=1)
    assert [i.name for i in graph.inputs] == ["images", "target"]
    assert [o.name for o in graph.outputs] == ["scores", "explained_class", "raw", "maps"]
    assert graph.inputs[0].shape[1:] == (3, 64, 64) and isinstance(graph.inputs[0].shape[0], str)
