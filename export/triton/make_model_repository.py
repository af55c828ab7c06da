"""Lay out an NVIDIA Triton Inference Server model repository for an exported pyattr ONNX graph.

    python export/triton/make_model_repository.py gradcam.onnx --repository model_repository \\
        [--name pyattr_gradcam] [--max-batch-size 64] [--preferred-batch-sizes 8,16,32] \\
        [--max-queue-delay-us 500] [--kind KIND_GPU] [--count 1]

writes::

    model_repository/
      pyattr_gradcam/
        config.pbtxt       # onnxruntime backend, dynamic batching, the graph's inputs and outputs
        1/model.onnx       # a copy of the exported graph

The graph's batch dimension is dynamic, so ``max_batch_size`` > 0 and every ``dims`` below leaves
it out. The per-image scalars -- ``target`` (N,) and ``explained_class`` (N,) -- are declared as
``dims: [ 1 ]`` with ``reshape: { shape: [ ] }``, Triton's way to batch a tensor that has no
other dimension. The pyattr metadata (method, layer, preprocessing, class names) goes into the
config's ``parameters`` under ``pyattr``, so clients can read it from the model-config endpoint.

Needs only onnxruntime (to read the graph's shapes and metadata), not torch.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

DTYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(int64)": "TYPE_INT64",
          "tensor(int32)": "TYPE_INT32"}
INPUTS, OUTPUTS = ("images", "target"), ("scores", "explained_class", "raw", "maps")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")  # as pyattr.runtime.metadata: a folder name


def check_interface(session, onnx_path: Path) -> tuple[dict, dict]:
    """The graph's inputs and outputs by name; a SystemExit unless they are a pyattr graph's."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if tuple(inputs) != INPUTS or tuple(outputs) != OUTPUTS:
        raise SystemExit(f"{onnx_path.name} is not a pyattr attribution graph: inputs {list(inputs)}, "
                         f"outputs {list(outputs)}")
    return inputs, outputs


def read_pyattr_metadata(text: str | None, onnx_path: Path) -> dict:
    """The graph's pyattr metadata as a dict; its ``method`` names the model folder, so it must be a plain
    name (a file may come from anyone: ``../`` must not place the repository elsewhere)."""
    if text is None:
        raise SystemExit(f"{onnx_path.name} holds no pyattr metadata (export it with pyattr.export)")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise SystemExit(f"{onnx_path.name}: its pyattr metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), str) or not SAFE_NAME.match(meta["method"]):
        raise SystemExit(f"{onnx_path.name}: its metadata's method must be a name of letters, digits, '_', '.', "
                         "'+' or '-' (it names the model folder)")
    return meta


def tensor_entry(name: str, dtype: str, shape: list) -> str:
    """One input/output entry; ``shape`` includes the (dynamic) batch dimension."""
    if dtype not in DTYPES:
        raise SystemExit(f"{name}: unsupported ONNX type {dtype}")
    dims = shape[1:]
    if any(not isinstance(d, int) for d in dims):
        raise SystemExit(f"{name}: only the batch dimension may be dynamic, got shape {shape}")
    lines = [f'    name: "{name}"', f"    data_type: {DTYPES[dtype]}"]
    if dims:
        lines.append(f"    dims: [ {', '.join(map(str, dims))} ]")
    else:  # (N,) tensors: one value per batch item
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return "  {\n" + "\n".join(lines) + "\n  }"


def make_config(onnx_path: Path, name: str, max_batch_size: int, preferred: list[int], delay_us: int,
                kind: str, count: int) -> str:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs, outputs = check_interface(session, onnx_path)
    meta = read_pyattr_metadata(session.get_modelmeta().custom_metadata_map.get("pyattr"), onnx_path)
    metadata = json.dumps(meta)  # one line: no raw newline from the file reaches the config
    if any(b > max_batch_size for b in preferred):
        raise SystemExit(f"preferred batch sizes {preferred} exceed --max-batch-size {max_batch_size}")

    def entries(tensors: dict) -> str:
        return ",\n".join(tensor_entry(t.name, t.type, t.shape) for t in tensors.values())

    escaped = metadata.replace("\\", "\\\\").replace('"', '\\"')
    return "\n".join([
        (f"# Triton model configuration for a pyattr attribution graph ({meta['method']}), "
         "made by export/triton/make_model_repository.py"),
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        entries(inputs),
        "]",
        "output [",
        entries(outputs),
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
        f"  max_queue_delay_microseconds: {delay_us}",
        "}",
        "instance_group [",
        f"  {{ kind: {kind} count: {count} }}",
        "]",
        "parameters {",
        '  key: "pyattr"',
        f'  value: {{ string_value: "{escaped}" }}',
        "}",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the exported graph (.onnx)")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--name", help="model name (default: pyattr_<method>)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--preferred-batch-sizes", default="8,16,32")
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    parser.add_argument("--kind", default="KIND_GPU", choices=["KIND_GPU", "KIND_CPU", "KIND_AUTO"])
    parser.add_argument("--count", type=int, default=1, help="model instances per device")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"no such file: {args.model}")
    if args.max_batch_size < 1:
        raise SystemExit("--max-batch-size must be at least 1 (the graphs have a dynamic batch)")
    preferred = [int(b) for b in args.preferred_batch_sizes.split(",") if b.strip()]
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own types
        raise SystemExit(f"onnxruntime cannot load {args.model.name}: {str(err).strip()[:300]}") from err
    check_interface(session, args.model)
    method = read_pyattr_metadata(session.get_modelmeta().custom_metadata_map.get("pyattr"), args.model)["method"]
    name = args.name or f"pyattr_{method}"
    if not SAFE_NAME.match(name):
        raise SystemExit(f"--name {name!r} must be a plain folder name (letters, digits, '_', '.', '+', '-')")
    config = make_config(args.model, name, args.max_batch_size, preferred, args.max_queue_delay_us, args.kind,
                         args.count)
    folder = args.repository / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.model, folder / "1" / "model.onnx")
    (folder / "config.pbtxt").write_text(config)
    print(f"wrote {folder}/config.pbtxt and {folder}/1/model.onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
