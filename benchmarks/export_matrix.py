"""The heavy export matrix: every method x model x backend, exported once and checked against eager.

For each (model, method) the method is exported to ONNX, TorchScript and .pt2 from a batch-1
example; each file is run at several batch sizes with mixed targets (-1 = arg-max and explicit
ids) and compared with eager pyattr. Results (max abs error on normalized maps, relative error
on raw maps, export time, ONNX op types) go to benchmarks/results/export_matrix.{json,md}.

    python benchmarks/export_matrix.py                      # the full matrix (tens of minutes on 2 cores)
    python benchmarks/export_matrix.py --models resnet18 --methods gradcam --size 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

import pyattr
from pyattr.methods import METHODS, build_method, needs_layer
from pyattr.models import find_default_layer

MODELS = ["builtin", "resnet18", "vgg11", "mobilenet_v3_small", "densenet121", "efficientnet_b0", "resnet50",
          "convnext_tiny", "vit_b_16"]
BATCHES = (1, 3, 8)


def make_model(name: str, size: int):
    if name == "builtin":
        return pyattr.zoo.load_builtin(), 64
    torch.manual_seed(0)
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval(), size


def run_backend(fmt: str, path: Path, x: torch.Tensor, t: torch.Tensor):
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(o) for o in sess.run(None, {"images": x.numpy(), "target": t.numpy()})]
    if fmt == "torchscript":
        return list(torch.jit.load(str(path))(x, t))
    return list(torch.export.load(str(path)).module()(x, t))


def check(model_name: str, method_name: str, size: int, tmp: Path) -> list[dict]:
    model, size = make_model(model_name, size)
    layer = None
    if needs_layer(method_name):
        layer = "layer3" if model_name == "builtin" else find_default_layer(model, torch.zeros(1, 3, size, size))
    rows = []
    try:
        method = build_method(method_name, model, layer)
    except pyattr.PyattrError as err:
        return [{"model": model_name, "method": method_name, "format": f, "status": f"n/a: {err}"}
                for f in ("onnx", "torchscript", "pt2")]
    gen = torch.Generator().manual_seed(1)
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".pt"), ("pt2", ".pt2")):
        row = {"model": model_name, "method": method_name, "format": fmt, "layer": layer, "size": size}
        path = tmp / f"{model_name}_{method_name}{suffix}"
        try:
            t0 = time.perf_counter()
            pyattr.export(method, torch.rand(1, 3, size, size, generator=gen), path)
            row["export_s"] = round(time.perf_counter() - t0, 1)
            worst_maps = worst_raw = 0.0
            for b in BATCHES:
                x = torch.rand(b, 3, size, size, generator=gen)
                t = torch.randint(0, 6, (b,), generator=gen)
                t[::2] = -1
                ref = method(x, t)
                out = run_backend(fmt, path, x, t)
                assert torch.equal(out[1], ref.target), "explained classes differ"
                worst_maps = max(worst_maps, float((out[3] - ref.maps).abs().max()))
                worst_raw = max(worst_raw, float((out[2] - ref.raw).abs().max() / ref.raw.abs().max().clamp_min(1e-30)))
            row.update(max_abs_maps=worst_maps, max_rel_raw=worst_raw,
                       status="ok" if worst_maps <= 1e-4 else "MISMATCH")
            if fmt == "onnx":
                import onnx

                row["onnx_ops"] = sorted({n.op_type for n in onnx.load(str(path)).graph.node})
        except Exception as err:  # noqa: BLE001 - the matrix records every failure and goes on
            row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            row["trace"] = traceback.format_exc(limit=3)[-600:]
        finally:
            path.unlink(missing_ok=True)
        print(f"{model_name:18s} {method_name:10s} {fmt:12s} {row['status'][:90]}"
              f"{row.get('max_abs_maps', '')}", flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | method | format | status | max abs err (maps) | max rel err (raw) | export s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['format']} | {r['status'][:80]} | "
                     f"{r.get('max_abs_maps', float('nan')):.1e} | {r.get('max_rel_raw', float('nan')):.1e} | "
                     f"{r.get('export_s', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--size", type=int, default=64, help="input size of torchvision models (default 64)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "export_matrix"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            for method_name in args.methods.split(","):
                rows.extend(check(model_name, method_name, args.size, Path(tmp)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"pyattr": pyattr.__version__, "torch": torch.__version__, "batches": list(BATCHES),
            "device": "cpu", "input_size": args.size}
    try:
        import onnxruntime

        meta["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"Export matrix (pyattr {meta['pyattr']}, torch {meta['torch']}, onnxruntime {meta.get('onnxruntime')}, CPU, "
        f"input {args.size}x{args.size}, batches {list(BATCHES)}, tolerance 1e-4 on normalized maps)\n\n"
        + markdown(rows))
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{ok}/{len(rows)} ok; wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
