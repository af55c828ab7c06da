"""A multi-pass method exported with its passes as one loop against the same passes unrolled (issue 12, item 4).

    OMP_NUM_THREADS=1 python benchmarks/loop_export.py --model resnet18 --layer layer4 --size 64 --chunk 32
    OMP_NUM_THREADS=1 python benchmarks/loop_export.py --method integratedgradients --model resnet18 --size 64 \
        --chunk 8 --option steps=32 --out benchmarks/results/loop_export_ig_resnet18
    OMP_NUM_THREADS=1 python benchmarks/loop_export.py --method smoothgradcampp --model builtin --layer layer3 \
        --chunk 4 --option samples=16 --out benchmarks/results/loop_export_sgcampp_builtin

For one model, layer and method (Score-CAM by default), the method is exported to ONNX twice: as pyattr exports
it (the passes one ``Scan``: :func:`pyattr._loop.batched_loop`) and within :func:`pyattr._loop.unrolled_loops`
(one copy of the pass per chunk, as before; a gradient method's pass is a forward and a backward pass).
``--model builtin`` is pyattr's built-in model; ``--option name=value`` passes more options to the method (ints,
floats or strings). Reported: export wall / CPU seconds, file size, node counts
(Conv nodes including those in loop bodies; CPU seconds are the measure on a loaded machine, wall seconds follow the
load), then onnxruntime run times of both graphs (CPU, 1 intra-op thread,
batch 1 and 3), the two sessions called alternately, one call each per pair; the median of the per-pair ratios
(looped / unrolled) is the result. Both graphs' outputs are checked against eager. Results go to ``--out``
(.md and .json) with the command, machine, load and versions.
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

import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyattr
from pyattr._loop import unrolled_loops
from pyattr.methods import build_method


def count_ops(graph, counts: dict[str, int]) -> dict[str, int]:
    import onnx

    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                count_ops(attr.g, counts)
    return counts


def export(method, x: torch.Tensor, path: Path, unrolled: bool) -> dict:
    import onnx

    start, cpu = time.perf_counter(), time.process_time()
    if unrolled:
        with unrolled_loops():
            pyattr.export(method, x, path)
    else:
        pyattr.export(method, x, path)
    row = {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu, "load": os.getloadavg()[0],
           "bytes": path.stat().st_size}
    ops = count_ops(onnx.load(str(path), load_external_data=False).graph, {})
    row.update(nodes=sum(ops.values()), conv=ops.get("Conv", 0), scan=ops.get("Scan", 0))
    return row


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--method", default="scorecam")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=7, help="interleaved onnxruntime call pairs per batch size")
    parser.add_argument("--batches", default="1,3")
    parser.add_argument("--export-repeats", type=int, default=2,
                        help="exports of each graph, in the order loop, unrolled, unrolled, loop, ...")
    parser.add_argument("--option", action="append", default=[], help="name=value: another option of the method")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loop_export"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.model == "builtin":
        model = pyattr.zoo.load_builtin()
    else:
        model = torchvision.models.get_model(args.model, weights=None).eval()
    options: dict = {"chunk_size": args.chunk}
    for item in args.option:
        key, value = item.split("=", 1)
        options[key] = parse_value(value)
    method = build_method(args.method, model, args.layer, **options)
    x = torch.rand(1, 3, args.size, args.size)
    env = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "load_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    import onnxruntime

    env["onnxruntime"] = onnxruntime.__version__
    result: dict = {"env": env, "args": vars(args), "export": {}, "run": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"loop": Path(tmp) / "loop.onnx", "unrolled": Path(tmp) / "unrolled.onnx"}
        runs: dict[str, list[dict]] = {"loop": [], "unrolled": []}
        order = [("loop", "unrolled") if i % 2 == 0 else ("unrolled", "loop") for i in range(args.export_repeats)]
        for name in (name for pair in order for name in pair):  # ABBA...: the first export pays one-time costs
            runs[name].append(export(method, x, paths[name], name == "unrolled"))
            print(name, runs[name][-1], flush=True)
        for name, rows in runs.items():
            result["export"][name] = {**rows[-1], "cpu": statistics.median(r["cpu"] for r in rows),
                                      "wall": statistics.median(r["wall"] for r in rows),
                                      "cpu_runs": [r["cpu"] for r in rows], "wall_runs": [r["wall"] for r in rows]}
        sessions = {name: session(path) for name, path in paths.items()}
        for b in (int(v) for v in args.batches.split(",")):
            xb = torch.rand(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(b))
            t = torch.full((b,), -1, dtype=torch.long)
            ref = method(xb, t)
            feeds = {"images": xb.numpy(), "target": t.numpy()}
            errors = {}
            for name, sess in sessions.items():
                raw = torch.from_numpy(np.asarray(sess.run(None, feeds)[2]))
                errors[name] = float((raw - ref.raw).abs().max() / ref.raw.abs().max().clamp_min(1e-12))
            times: dict[str, list[float]] = {"loop": [], "unrolled": []}
            for i in range(args.pairs + 1):  # the first pair warms up
                order = ("loop", "unrolled") if i % 2 == 0 else ("unrolled", "loop")
                for name in order:
                    start = time.perf_counter()
                    sessions[name].run(None, feeds)
                    if i:
                        times[name].append(time.perf_counter() - start)
            ratios = [a / b for a, b in zip(times["loop"], times["unrolled"])]
            result["run"][str(b)] = {"loop_s": statistics.median(times["loop"]),
                                     "unrolled_s": statistics.median(times["unrolled"]),
                                     "ratio_median": statistics.median(ratios), "ratios": ratios,
                                     "raw_rel_error_vs_eager": errors, "load": os.getloadavg()[0]}
            print(b, result["run"][str(b)], flush=True)
    env["load_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    env, args = result["env"], result["args"]
    options = "".join(f", {item}" for item in args.get("option", []))
    lines = [(f"# {args['method']} exported as one loop vs unrolled: {args['model']} {args['layer']}, "
             f"{args['size']} px, chunk {args['chunk']}{options}"), "",
             f"- command: `{env['command']}`",
             (f"- machine: {env['cpu']}, {env['cores']} cores (shared), torch threads 1, OMP_NUM_THREADS="
             f"{env['omp_threads']}; load average at start {env['load_start'][0]:.1f}, at end {env['load_end'][0]:.1f}"),
             (f"- torch {env['torch']}, torchvision {env['torchvision']}, onnxruntime {env['onnxruntime']}, "
             f"Python {env['python']}; {env['date']}"), "",
             (f"## Export (ONNX; {args.get('export_repeats', 1)} exports of each graph, order loop, unrolled, "
              "unrolled, loop...: medians, each run's CPU s in brackets)"), "",
             "| graph | wall s | cpu s | load | MB | nodes | Conv (with loop bodies) | Scan |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in result["export"].items():
        runs = ", ".join(f"{v:.1f}" for v in row.get("cpu_runs", []))
        lines.append(f"| {name} | {row['wall']:.1f} | {row['cpu']:.1f} [{runs}] | {row['load']:.1f} | "
                     f"{row['bytes'] / 1e6:.0f} | {row['nodes']} | {row['conv']} | {row['scan']} |")
    lines += ["", f"## onnxruntime run (CPU, 1 thread; {args['pairs']} interleaved pairs after a warm-up pair)", "",
              ("| batch | loop s (median) | unrolled s (median) | median per-pair ratio loop/unrolled | "
              "raw rel. error vs eager (loop / unrolled) | load |"), "|---|---|---|---|---|---|"]
    for b, row in result["run"].items():
        err = row["raw_rel_error_vs_eager"]
        lines.append(f"| {b} | {row['loop_s']:.3f} | {row['unrolled_s']:.3f} | {row['ratio_median']:.3f} | "
                     f"{err['loop']:.1e} / {err['unrolled']:.1e} | {row['load']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
