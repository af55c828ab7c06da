"""The full evaluation suite on CPU: 16 methods x ``pyattr evaluate``'s default metrics on N generated images of the
built-in model, timed per method (its maps) and per method x metric, reported per image.

The 16 methods are the first 16 of :func:`pyattr.evaluate.default_methods` (``pyattr.methods.METHODS`` in
registration order, without the ``lrp`` alias and without SS-CAM / IS-CAM, which take thousands of passes per
image); the metrics are ``pyattr evaluate``'s default set (every metric the generated images allow except
sensitivity-max). The run is ``pyattr evaluate`` itself (``pyattr.cli.main``), with its defaults (batch 16, internal batch 16,
deletion steps 20, grid 0: no pictures), its ``results.json`` read back (``metric_seconds``: per method and metric).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/evaluate_suite.py --n 4            # a first measure
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/evaluate_suite.py --n 500          # the goal
    -> benchmarks/results/evaluate_suite_n<N>.{json,md}

``--budget S`` picks N itself: it times the suite on ``--probe`` images first, then runs the largest N (at most
``--n``) whose projected time fits in S seconds, and records the projection for ``--n``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench.env import describe, load_average

from pyattr.evaluate import METRICS, default_methods

RESULTS = Path(__file__).resolve().parent / "results"
N_METHODS = 16


def suite_methods() -> list[str]:
    return default_methods()[:N_METHODS]


def default_metrics() -> list[str]:
    return [name for name in METRICS if name != "sensitivity_max"]


def run_suite(n: int, args: argparse.Namespace) -> tuple[dict, float]:
    """``pyattr evaluate --methods <the 16> --n N`` into a temporary folder; its results.json and the wall time."""
    from pyattr.cli import main as pyattr_main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ev"
        argv = ["evaluate", "--methods", ",".join(suite_methods()), "--metrics", ",".join(default_metrics()),
                "--n", str(n), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
                "--internal-batch", str(args.internal_batch), "--grid", "0", "--out", str(out)]
        if not args.progress:
            argv.append("--quiet")
        began, cpu = time.perf_counter(), time.process_time()
        code = pyattr_main(argv)
        wall = time.perf_counter() - began
        print(f"{n} images: {wall:.1f} s wall, {time.process_time() - cpu:.1f} s CPU (this process)", flush=True)
        if code != 0:
            raise SystemExit(f"pyattr evaluate failed ({code})")
        return json.loads((out / "results.json").read_text()), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="images (the most, with --budget)")
    parser.add_argument("--budget", type=float, help="seconds the run may take: N is chosen from a probe run")
    parser.add_argument("--probe", type=int, default=4, help="images of the probe run (with --budget)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--internal-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=40_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = load_average()
    probe = None
    n = args.n
    if args.budget is not None:
        _probe_result, probe_wall = run_suite(args.probe, args)
        per_image = probe_wall / args.probe
        n = max(1, min(args.n, int(args.budget / per_image) // args.batch_size * args.batch_size or args.probe))
        probe = {"n": args.probe, "wall_s": probe_wall, "per_image_s": per_image,
                 "projected_s_for_n": per_image * args.n, "n_goal": args.n}
        print(f"probe: {args.probe} images in {probe_wall:.1f} s ({per_image:.2f} s per image); "
              f"{args.n} images projected at {per_image * args.n / 60:.1f} min; running {n}", flush=True)
    result, wall = run_suite(n, args)
    methods, metrics = suite_methods(), default_metrics()
    per_image = {m: {"maps": result["seconds"][m] / n,
                     **{k: result["metric_seconds"][m][k] / n for k in metrics}} for m in methods}
    doc = {"n_images": n, "wall_s": wall, "per_image_s": wall / n, "projected_s_for_500": wall / n * 500,
           "methods": methods, "metrics": metrics, "seconds_per_image": per_image, "table": result["table"],
           "probe": probe,
           "settings": {"batch_size": args.batch_size, "internal_batch": args.internal_batch, "seed": args.seed,
                        "threads": args.threads, "deletion_steps": "default (20)"},
           "env": describe(torch.device("cpu"), args.threads), "load_average": {"start": load_start, "end": load_average()},
           "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"evaluate_suite_n{n}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    stem.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


def markdown(doc: dict) -> str:
    methods, metrics, per = doc["methods"], doc["metrics"], doc["seconds_per_image"]
    n = doc["n_images"]
    lines = [f"# The evaluation suite on CPU: {len(methods)} methods x {len(metrics)} metrics x {n} images",
             "",
             (f"`{doc['command']}` ({doc['settings']['threads']} thread(s); load average {doc['load_average']}; "
             f"{doc['env'].get('cpu', '')})."),
             "",
             (f"Wall time {doc['wall_s'] / 60:.1f} min for {n} images: {doc['per_image_s']:.2f} s per image for the "
             f"whole suite; 500 images projected at {doc['projected_s_for_500'] / 60:.1f} min."),
             ""]
    if doc.get("probe"):
        p = doc["probe"]
        lines += [(f"Probe run: {p['n']} images in {p['wall_s']:.1f} s ({p['per_image_s']:.2f} s per image); "
                  f"{p['n_goal']} images projected from it at {p['projected_s_for_n'] / 60:.1f} min."), ""]
    lines += [("Milliseconds per image: the method's maps, then each metric on those maps (Average Drop's masked pass "
              "is shared with Increase in Confidence and counted under Average Drop)."), "",
              "| method | maps | " + " | ".join(metrics) + " | total |",
              "|---|" + "---:|" * (len(metrics) + 2)]
    totals = {k: 0.0 for k in ["maps", *metrics]}
    for m in methods:
        row = per[m]
        for k in totals:
            totals[k] += row[k]
        lines.append(f"| {m} | " + " | ".join(f"{row[k] * 1e3:.1f}" for k in ["maps", *metrics])
                     + f" | {sum(row.values()) * 1e3:.1f} |")
    lines.append("| **all** | " + " | ".join(f"**{totals[k] * 1e3:.1f}**" for k in ["maps", *metrics])
                 + f" | **{sum(totals.values()) * 1e3:.1f}** |")
    lines += ["", "Mean metric values (the report's table):", "",
              "| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(
            "n/a" if doc["table"][m][k] is None or doc["table"][m][k] != doc["table"][m][k]
            else f"{doc['table'][m][k]:.3f}" for k in metrics) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
