"""The deployment kit (export/): the Triton model repository and the libtorch C++ demo.

* Triton: the generated config.pbtxt parses as a protobuf text message against a subset of
  Triton's ModelConfig schema, and agrees with the ONNX graph's names, types and shapes; the
  committed example stays in step with the generator.
* libtorch: export/cpp is built with CMake against the installed torch package (cached in
  build/export_cpp: ~1 min the first time on 2 cores, seconds afterwards), run on PPM images,
  and its map must equal the TorchScript graph run in Python within 1e-4, its overlay the
  pyattr.render overlay of that map. Skipped when cmake or a C++ compiler is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pyattr
from pyattr import render
from pyattr.zoo import SHAPE_CLASSES, ShapesNet

ROOT = Path(__file__).resolve().parent.parent
EXPORT = ROOT / "export"
PREPROCESSING = {"color": "RGB", "scale": 1 / 255, "mean": [0.45, 0.5, 0.55], "std": [0.25, 0.2, 0.3],
                 "size": [64, 64], "resize": "bilinear", "layout": "NCHW"}
BUILTIN_PREPROCESSING = {"color": "RGB", "scale": 1 / 255, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                         "size": [64, 64], "resize": "bilinear", "layout": "NCHW"}


@pytest.fixture(scope="module")
def method():
    torch.manual_seed(0)
    return pyattr.GradCAM(ShapesNet().eval(), "layer3")


# --- Triton ---------------------------------------------------------------------------------


TRITON_SCHEMA = Path(__file__).resolve().parent / "data" / "triton_model_config.descriptor.txtpb"


def model_config_class():
    """Triton's ModelConfig message class, built from its real schema (model_config.proto from tritonclient 2.73.0,
    kept as a text-format FileDescriptorProto in tests/data: no tritonclient needed)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

    f = text_format.Parse(TRITON_SCHEMA.read_text(), descriptor_pb2.FileDescriptorProto())
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def triton_schema_from_tritonclient() -> str:
    """The text of tests/data/triton_model_config.descriptor.txtpb, from an installed tritonclient (to refresh it:
    pip install tritonclient in a scratch venv, then write this after the file's comment lines)."""
    import importlib.util

    import tritonclient
    from google.protobuf import descriptor_pb2, text_format

    spec = importlib.util.spec_from_file_location(  # the file alone: tritonclient.grpc's __init__ imports grpcio
        "model_config_pb2", Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    f = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(f)
    return text_format.MessageToString(f)


def test_triton_schema_is_the_real_one():
    """The schema file is Triton's, not a subset: fields and enum numbers the generator does not use are there."""
    config = model_config_class()()
    fields = config.DESCRIPTOR.fields_by_name
    assert {"sequence_batching", "ensemble_scheduling", "model_warmup", "response_cache", "version_policy"} <= set(fields)
    data_type = fields["input"].message_type.fields_by_name["data_type"].enum_type
    assert (data_type.values_by_name["TYPE_FP32"].number, data_type.values_by_name["TYPE_INT64"].number) == (11, 9)
    queue = fields["dynamic_batching"].message_type.fields_by_name
    assert {"preferred_batch_size", "max_queue_delay_microseconds", "preserve_ordering", "default_queue_policy"} <= \
        set(queue)


def parse_config(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_class()())


def test_triton_model_repository(method, tmp_path):
    import onnxruntime as ort

    graph = tmp_path / "gradcam.onnx"
    pyattr.export(method, torch.rand(1, 3, 64, 64), graph, class_names=SHAPE_CLASSES,
                  preprocessing=BUILTIN_PREPROCESSING, metadata={"model": "builtin"})
    repository = tmp_path / "model_repository"
    result = subprocess.run([sys.executable, str(EXPORT / "triton" / "make_model_repository.py"), str(graph),
                             "--repository", str(repository), "--max-batch-size", "32"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    folder = repository / "pyattr_gradcam"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["1", "1/model.onnx", "config.pbtxt"]
    assert (folder / "1" / "model.onnx").read_bytes() == graph.read_bytes()

    config = parse_config((folder / "config.pbtxt").read_text())
    assert (config.name, config.backend, config.max_batch_size) == ("pyattr_gradcam", "onnxruntime", 32)
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    types = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}
    data_type = config.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type
    for declared, actual in [(config.input, session.get_inputs()), (config.output, session.get_outputs())]:
        assert [t.name for t in declared] == [t.name for t in actual]
        for t, a in zip(declared, actual):
            assert data_type.values_by_number[t.data_type].name == types[a.type], t.name
            dims = a.shape[1:]  # without the dynamic batch
            if dims:
                assert list(t.dims) == dims and not t.HasField("reshape"), t.name
            else:  # (N,) tensors are declared [1] and reshaped to per-item scalars
                assert list(t.dims) == [1] and t.HasField("reshape") and list(t.reshape.shape) == [], t.name
    metadata = json.loads(config.parameters["pyattr"].string_value)
    assert metadata["method"] == "gradcam" and metadata["class_names"] == list(SHAPE_CLASSES)

    # the committed example is what the generator writes for the built-in model's Grad-CAM
    # (its metadata parameter aside, which carries the version)
    subprocess.run([sys.executable, str(EXPORT / "triton" / "make_model_repository.py"), str(graph),
                    "--repository", str(tmp_path / "default")], check=True, capture_output=True)
    generated = (tmp_path / "default" / "pyattr_gradcam" / "config.pbtxt").read_text()
    example = (EXPORT / "triton" / "model_repository" / "pyattr_gradcam" / "config.pbtxt").read_text()
    assert generated.split("parameters {")[0] == example.split("parameters {")[0]
    assert json.loads(parse_config(example).parameters["pyattr"].string_value)["method"] == "gradcam"


def test_triton_generator_rejects_other_graphs(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = subprocess.run([sys.executable, str(EXPORT / "triton" / "make_model_repository.py"), str(path),
                             "--repository", str(tmp_path / "r")], capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "is not a pyattr attribution graph" in result.stderr


# --- libtorch -------------------------------------------------------------------------------


def _toolchain() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler"
    return None


@pytest.fixture(scope="module")
def demo():
    """export/cpp built once into build/export_cpp (kept between runs: rebuilds are incremental)."""
    missing = _toolchain()
    if missing:
        pytest.skip(f"the libtorch demo needs cmake and a C++ compiler: {missing}")
    build = ROOT / "build" / "export_cpp"
    start = time.perf_counter()
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    for command in (["cmake", "-S", str(EXPORT / "cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DPython3_EXECUTABLE={sys.executable}"],
                    ["cmake", "--build", str(build)]):
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=env, timeout=1200)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    print(f"export/cpp built in {time.perf_counter() - start:.0f} s")
    return build / "pyattr_explain"


def reference(path: Path, image: np.ndarray, target: int) -> list[torch.Tensor]:
    """The TorchScript graph in Python, with the demo's preprocessing: bilinear resize
    (align_corners=False, no antialias), * scale, (x - mean) / std."""
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False) * PREPROCESSING["scale"]
    x = (x - torch.tensor(PREPROCESSING["mean"])[:, None, None]) / torch.tensor(PREPROCESSING["std"])[:, None, None]
    return list(torch.jit.load(str(path))(x, torch.tensor([target])))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_libtorch_demo(demo, method, tmp_path):
    graph = tmp_path / "gradcam.pt"
    pyattr.export(method, torch.rand(1, 3, 64, 64), graph, class_names=SHAPE_CLASSES, preprocessing=PREPROCESSING)
    rng = np.random.default_rng(3)
    for i, ((h, w), target, cmap) in enumerate([((64, 64), -1, "jet"), ((80, 96), 2, "viridis"),
                                                ((37, 150), -1, "jet_opencv")]):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[h // 3: h // 2, w // 3: w // 2] = [20, 200, 60]
        ppm = tmp_path / f"image{i}.ppm"
        Image.fromarray(image).save(ppm)
        prefix = tmp_path / f"out{i}"
        result = subprocess.run([str(demo), str(graph), str(ppm), str(prefix), "--target", str(target),
                                 "--alpha", "0.4", "--cmap", cmap], capture_output=True, text=True, check=False,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        line = json.loads(result.stdout)
        scores, explained, _, maps = reference(graph, image, target)
        k = int(explained[0])
        assert line["explained_class"] == k and line["class_name"] == SHAPE_CLASSES[k]
        assert target == -1 or k == target
        assert abs(line["score"] - float(scores[0, k])) <= 1e-4 * max(1.0, abs(float(scores[0, k])))
        got = np.load(line["map"])
        assert got.shape == (64, 64)
        np.testing.assert_allclose(got, maps[0].numpy(), rtol=0, atol=1e-4)
        overlay = np.asarray(Image.open(line["overlay"]))
        assert overlay.shape == (h, w, 3)
        expected = render.heatmap_overlay(maps[0].numpy(), image, 0.4, cmap, value_range=(0, 1))
        diff = np.abs(overlay.astype(int) - expected)
        assert np.mean(diff > 0) < 0.002 and diff.max() <= 8  # equal up to LUT-step flips

    bad = subprocess.run([str(demo), str(graph), str(tmp_path / "missing.ppm"), str(tmp_path / "x")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "pyattr_explain: error: cannot open image" in bad.stderr
    assert subprocess.run([str(demo)], capture_output=True, check=False).returncode == 2  # usage
