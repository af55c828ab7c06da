"""Tiny hand-built pyattr-shaped ONNX graphs for the runtime's security and fuzz tests (milliseconds to
build, no torch trace): ``images`` (N, 3, H, W) + ``target`` (N,) -> ``scores`` (N, K) = channel means @ W,
``explained_class`` (target, or the arg-max where target < 0), ``raw`` = the channel mean (N, H, W), ``maps``
= raw min-max normalized per image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

WEIGHTS_SEED = 0
GOOD = object()  # write_graph's default: good_metadata()


def weights(k: int) -> np.ndarray:
    return np.random.default_rng(WEIGHTS_SEED).normal(size=(3, k)).astype(np.float32)


def scores_of(x: np.ndarray, k: int) -> np.ndarray:
    """The graph's scores for a preprocessed (N, 3, H, W) batch, computed here in NumPy."""
    return x.mean(axis=(2, 3)) @ weights(k)


def graph_model(k: int = 4, size: tuple[int, int] = (8, 8), batch: Any = "batch", broken: str | None = None):
    """``broken``: ``"class"`` makes explained_class 10 past the arg-max (out of range); ``"run"`` makes the
    graph fail when run (a Reshape to an impossible shape)."""
    h, w = size
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["pooled", "W"], ["scores"]),
        helper.make_node("ArgMax", ["scores"], ["argmax"], axis=1, keepdims=0),
        helper.make_node("Less", ["target", "zero"], ["negative"]),
        helper.make_node("Where", ["negative", "argmax", "target"],
                         ["explained_class" if broken != "class" else "explained_ok"]),
        helper.make_node("ReduceMean", ["images"], ["raw" if broken != "run" else "raw_ok"], axes=[1], keepdims=0),
        helper.make_node("ReduceMin", ["raw"], ["low"], axes=[1, 2], keepdims=1),
        helper.make_node("ReduceMax", ["raw"], ["high"], axes=[1, 2], keepdims=1),
        helper.make_node("Sub", ["raw", "low"], ["shifted"]),
        helper.make_node("Sub", ["high", "low"], ["spread"]),
        helper.make_node("Add", ["spread", "eps"], ["spread_eps"]),
        helper.make_node("Div", ["shifted", "spread_eps"], ["maps"]),
    ]
    init = [numpy_helper.from_array(weights(k), "W"), numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array(1e-12, np.float32), "eps")]
    if broken == "class":
        nodes.append(helper.make_node("Add", ["explained_ok", "ten"], ["explained_class"]))
        init.append(numpy_helper.from_array(np.array(10, np.int64), "ten"))
    if broken == "run":
        nodes.append(helper.make_node("Reshape", ["raw_ok", "bad_shape"], ["raw"]))
        init.append(numpy_helper.from_array(np.array([-1, 7, 5], np.int64), "bad_shape"))
    graph = helper.make_graph(
        nodes, "pyattr_test_graph",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, h, w]),
         helper.make_tensor_value_info("target", TensorProto.INT64, [batch])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, k]),
         helper.make_tensor_value_info("explained_class", TensorProto.INT64, [batch]),
         helper.make_tensor_value_info("raw", TensorProto.FLOAT, [batch, h, w]),
         helper.make_tensor_value_info("maps", TensorProto.FLOAT, [batch, h, w])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def good_metadata(k: int = 4, size: tuple[int, int] = (8, 8)) -> dict[str, Any]:
    return {
        "pyattr_version": "0.1.0", "method": "saliency", "input_shape": [3, *size],
        "inputs": ["images", "target"], "outputs": ["scores", "explained_class", "raw", "maps"],
        "preprocessing": {"color": "RGB", "scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                          "size": list(size), "resize": "bilinear", "layout": "NCHW"},
        "class_names": [f"class_{i}" for i in range(k)],
    }


def write_graph(path: Path, metadata: Any = GOOD, *, k: int = 4, size: tuple[int, int] = (8, 8),
                raw_text: str | None = None, broken: str | None = None) -> Path:
    """An ONNX file with the given metadata (a JSON-able value, or ``raw_text`` stored verbatim)."""
    model = graph_model(k, size, broken=broken)
    text = raw_text if raw_text is not None else json.dumps(good_metadata(k, size) if metadata is GOOD else metadata)
    model.metadata_props.add(key="pyattr", value=text)
    path.write_bytes(model.SerializeToString())
    return path
