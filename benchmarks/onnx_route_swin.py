"""ONNX export seconds of torchvision swin_t Saliency (64x64): the direct translation vs the public route.

Swin's shifted-window attention mask is built in place (``new_zeros``, then ``fill_`` on slices), which the
direct translation's out-of-place rewrite refuses; ``_onnx.fold_mutated_constants`` computes such constants at
export time so that the graph takes the direct route. The variant without it (the fold replaced by a no-op: the
export then takes torch.export + run_decompositions + torch.onnx) and the one with it are interleaved pair by
pair; each exported file is checked against eager at batch 3 (max abs error of the maps).

    python benchmarks/onnx_route_swin.py --pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--model", default="swin_t")
    args = parser.parse_args(argv)
    import onnxruntime as ort
    import torch
    import torchvision

    import pyattr
    from pyattr import exporting
    from pyattr.exporting import _onnx

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None, num_classes=10).eval()
    method = pyattr.Saliency(model)
    example = torch.rand(1, 3, 64, 64)
    fold, public = _onnx.fold_mutated_constants, exporting._onnx_via_torch
    tmp = Path(tempfile.mkdtemp())
    pairs = []
    try:
        for _ in range(args.pairs):
            row: dict = {"load1": round(os.getloadavg()[0], 2)}
            for variant in ("without_fold", "with_fold"):
                _onnx.fold_mutated_constants = fold if variant == "with_fold" else (lambda gm, constants: 0)
                routes: list[str] = []
                exporting._onnx_via_torch = lambda *a, routes=routes, **k: routes.append("public") or public(*a, **k)
                t0 = time.perf_counter()
                path = pyattr.export(method, example, tmp / f"{variant}.onnx")
                row[variant + "_s"] = round(time.perf_counter() - t0, 1)
                row[variant + "_route"] = routes[0] if routes else "direct"
                x, t = torch.rand(3, 3, 64, 64), torch.tensor([-1, 3, -1])
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                out = session.run(None, {"images": x.numpy(), "target": t.numpy()})
                row[variant + "_maps_err"] = float((torch.from_numpy(out[3]) - method(x, t).maps).abs().max())
            row["ratio"] = round(row["without_fold_s"] / row["with_fold_s"], 2)
            pairs.append(row)
            print(json.dumps(row), flush=True)
    finally:
        _onnx.fold_mutated_constants, exporting._onnx_via_torch = fold, public
    median = statistics.median(p["ratio"] for p in pairs)
    meta = {"command": "python benchmarks/onnx_route_swin.py " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
            "torch": torch.__version__, "torchvision": torchvision.__version__, "onnxruntime": ort.__version__,
            "threads": 1}
    out = HERE / "results" / f"onnx_route_{args.model}"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "pairs": pairs, "median_ratio": median}, indent=1)
                                        + "\n")
    lines = [f"# ONNX export of {args.model} Saliency (64x64): direct translation vs public route", "",
             f"Command: `{meta['command']}`", "",
             (f"{meta['machine']}; torch {meta['torch']}, torchvision {meta['torchvision']}, onnxruntime "
              f"{meta['onnxruntime']}; 1 thread. Load average (1 min) before each pair."), "",
             "| load | without the fold: s (route) | with it: s (route) | ratio | maps err without / with |",
             "|---|---|---|---|---|"]
    lines += [f"| {p['load1']:.1f} | {p['without_fold_s']} ({p['without_fold_route']}) | {p['with_fold_s']} "
              f"({p['with_fold_route']}) | {p['ratio']:.2f} | {p['without_fold_maps_err']:.1e} / "
              f"{p['with_fold_maps_err']:.1e} |" for p in pairs]
    lines += ["", f"Median per-pair ratio: **{median:.2f}x**."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"median ratio {median:.2f}; wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
