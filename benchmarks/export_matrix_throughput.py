"""Seconds per export-matrix cell: the script of an earlier commit (one subprocess per cell) vs this one.

For each (model, method), alternately: the three formats run by ``export_matrix.py`` as it was at
``--before`` (a git revision; default 26c3097, before cells were grouped: one subprocess per cell, each
paying for the process start, the imports, the model, the eager references, one export and a load of the
file per checked batch) and by this checkout's (one subprocess per (model, method) group: all of that once,
then three exports, each file loaded once). Both check the same thing: the rows must agree but for the
timings (``same rows``). Reported: seconds per cell of each, their ratio per pair and the median ratio; the
load average before each pair (the machine is shared).

    python benchmarks/export_matrix_throughput.py --models resnet18,mobilenet_v3_small,convnext_tiny \\
        --methods saliency,gradcam --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMATS = ["onnx", "torchscript", "pt2"]
TIMINGS = ("cell_s", "export_s", "trace")


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small,convnext_tiny")
    parser.add_argument("--methods", default="saliency,gradcam")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--name", default="export_matrix_throughput")
    parser.add_argument("--before", default="26c3097", help="git revision of the per-cell script")
    args = parser.parse_args(argv)
    matrix = _load(HERE / "export_matrix.py", "export_matrix")
    folder = Path(tempfile.mkdtemp())
    (folder / "export_matrix.py").write_text(subprocess.run(
        ["git", "show", f"{args.before}:benchmarks/export_matrix.py"], cwd=HERE, check=True, capture_output=True,
        text=True).stdout)
    before = _load(folder / "export_matrix.py", "export_matrix_before")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    pairs = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            cells = [before.run_in_subprocess((model, method, f), args.timeout, args.threads) for f in FORMATS]
            per_cell = (time.perf_counter() - t0) / len(FORMATS)
            t0 = time.perf_counter()
            group = matrix.run_group_in_subprocess(model, method, FORMATS, args.timeout, args.threads)
            per_group = (time.perf_counter() - t0) / len(FORMATS)
            same = all({k: v for k, v in a.items() if k not in TIMINGS}
                       == {k: v for k, v in b.items() if k not in TIMINGS} for a, b in zip(cells, group))
            pairs.append({"model": model, "method": method, "load1": load, "per_cell_s": round(per_cell, 2),
                          "grouped_s": round(per_group, 2), "ratio": round(per_cell / per_group, 2),
                          "statuses": [r["status"] for r in group], "same_rows": same})
            print(json.dumps(pairs[-1]), flush=True)
    median = statistics.median(p["ratio"] for p in pairs)
    meta = {"before": args.before, "command": "python benchmarks/export_matrix_throughput.py " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), {platform.python_version()}",
            **matrix.environment(), "threads": args.threads}
    out = HERE / "results" / args.name
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "pairs": pairs, "median_ratio": median}, indent=1)
                                        + "\n")
    lines = ["# Export matrix: seconds per cell, one subprocess per cell vs per (model, method) group", "",
             f"Per cell: `export_matrix.py` at {args.before}; grouped: this checkout's.", "",
             f"Command: `{meta['command']}`", "",
             (f"{meta['machine']}; torch {meta['torch']}, onnxruntime {meta.get('onnxruntime')}; "
              f"{args.threads} thread(s). Variants interleaved pair by pair; load average (1 min) before each pair."),
             "", "| model | method | load | per-cell subprocess, s/cell | grouped, s/cell | ratio | same rows |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['model']} | {p['method']} | {p['load1']:.1f} | {p['per_cell_s']:.1f} | {p['grouped_s']:.1f} | "
              f"{p['ratio']:.2f} | {p['same_rows']} |" for p in pairs]
    lines += ["", f"Median per-pair ratio: **{median:.2f}x** fewer seconds per cell grouped."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"median ratio {median:.2f}; wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
