"""A method eager vs its bound, interleaved call by call, one thread (see cams16_notes.md).

Run from the repository root:
``PYTHONPATH=. python benchmarks/results/cpu/cams16_interleaved.py METHOD MODEL SIZE [CALLS] [--out STEM]``
(CALLS: calls of each, default 9; the order alternates every pair). Prints each call's wall time and the median
per-pair ratio eager / bound, of wall time and of the thread's CPU time (``time.thread_time``: the time the
scheduler gave to other processes on a loaded machine is not in it). ``--out STEM`` also writes
``benchmarks/results/cpu/STEM.{md,json}`` with the command, the machine, the load and the versions.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from _bench import cases, env

parser = argparse.ArgumentParser()
parser.add_argument("method")
parser.add_argument("model")
parser.add_argument("size", type=int)
parser.add_argument("calls", type=int, nargs="?", default=9)
parser.add_argument("--out", default=None, help="results file stem under benchmarks/results/cpu")
args = parser.parse_args()

torch.set_num_threads(1)
device = torch.device("cpu")
load_before = env.load_average()
setup = cases.make_setup(args.model, cases.make_model(args.model, args.size, device), 1, args.size, device)
method = cases.build_pyattr(args.method, setup)
bound = cases.bound_fn(args.method, setup)


def eager():
    return method(setup.x, setup.target)


bound(), eager()
wall: dict[str, list[float]] = {"bound": [], "eager": []}
cpu: dict[str, list[float]] = {"bound": [], "eager": []}
for i in range(args.calls):
    for name, fn in ((("bound", bound), ("eager", eager)) if i % 2 == 0 else (("eager", eager), ("bound", bound))):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        wall[name].append(time.perf_counter() - t0)
        cpu[name].append(time.thread_time() - c0)
load_after = env.load_average()
ratio_wall = statistics.median(e / b for e, b in zip(wall["eager"], wall["bound"]))
ratio_cpu = statistics.median(e / b for e, b in zip(cpu["eager"], cpu["bound"]))
for name, values in wall.items():
    print(name, "ms", [round(1000 * v) for v in values])
print("median ratio eager / bound", ratio_wall)
print("median ratio eager / bound (thread CPU time)", ratio_cpu)
print("load average before / after", load_before, load_after)

if args.out:
    info = env.describe(device, 1)
    command = "PYTHONPATH=. python benchmarks/results/cpu/cams16_interleaved.py " + " ".join(sys.argv[1:])
    result = {
        "command": command, "method": args.method, "model": args.model, "size": args.size, "batch": 1,
        "calls": args.calls, "threads": 1, "load_before": load_before, "load_after": load_after, "machine": info,
        "wall_ms": {k: [round(1000 * v, 2) for v in vs] for k, vs in wall.items()},
        "cpu_ms": {k: [round(1000 * v, 2) for v in vs] for k, vs in cpu.items()},
        "median_ratio_wall": round(ratio_wall, 4), "median_ratio_cpu": round(ratio_cpu, 4),
    }
    stem = Path("benchmarks/results/cpu") / args.out
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    med = {k: round(1000 * statistics.median(v)) for k, v in wall.items()}
    med_cpu = {k: round(1000 * statistics.median(v)) for k, v in cpu.items()}
    stem.with_suffix(".md").write_text(
        f"# {args.method} on {args.model} at {args.size} px, eager vs its bound, interleaved\n\n"
        f"`{command}` · {info['date']} · pyattr {info['pyattr']} ({info['pyattr_commit']}) · torch {info['torch']} · "
        f"{info['cpu']} ({info['cpu_count']} cores) · 1 thread · batch 1 · {args.calls} calls each · "
        f"load average before / after {load_before} / {load_after}\n\n"
        "| | bound | pyattr eager | median per-pair ratio eager / bound |\n|---|---|---|---|\n"
        f"| wall ms (median) | {med['bound']} | {med['eager']} | {ratio_wall:.2f}x |\n"
        f"| thread CPU ms (median) | {med_cpu['bound']} | {med_cpu['eager']} | {ratio_cpu:.2f}x |\n")
    print("wrote", stem.with_suffix(".md"), stem.with_suffix(".json"))
