"""Eager cost of running the clean input in the first pass of Integrated Gradients / SmoothGrad ("folded", what
traced graphs do: ``folds_clean()`` True) against a separate no-grad forward for its scores and arg-max targets
("separate", what eager calls do), timed call by call in alternation at batch 1.

    OMP_NUM_THREADS=1 python benchmarks/fold_clean_eager.py                 # resnet18, 112 px, 1 thread
    python benchmarks/fold_clean_eager.py --model resnet50 --size 224 --rounds 10

Folding makes an exported graph trace the model once (one model's worth less export time); in an eager call the
clean row then also goes through the backward (its gradient is not used), in place of a no-grad forward. Reported:
median per-call wall and CPU time of each variant and the medians of the per-pair ratios folded / separate (load
is noisy: the pairs are interleaved and the order alternates; with 1 thread the CPU time is the steadier).
Results: ``benchmarks/results/fold_clean_eager.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyattr


class FoldedIG(pyattr.IntegratedGradients):
    def folds_clean(self) -> bool:
        return True


class FoldedSmoothGrad(pyattr.SmoothGrad):
    def folds_clean(self) -> bool:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fold_clean_eager"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    x = torch.rand(args.batch, 3, args.size, args.size)
    pairs = {
        "integratedgradients": (pyattr.IntegratedGradients(model), FoldedIG(model)),
        "smoothgrad": (pyattr.SmoothGrad(model), FoldedSmoothGrad(model)),
    }
    load_before = os.getloadavg()
    rows = []
    for name, (separate, folded) in pairs.items():
        a, b = separate(x), folded(x)  # warm-up, and the two agree
        diff = float((a.maps - b.maps).abs().max())
        wall: dict[str, list[float]] = {"separate": [], "folded": []}
        cpu: dict[str, list[float]] = {"separate": [], "folded": []}
        for i in range(args.rounds):
            order = [("separate", separate), ("folded", folded)]
            for label, method in order if i % 2 == 0 else order[::-1]:
                t0, c0 = time.perf_counter(), time.process_time()
                method(x)
                wall[label].append(time.perf_counter() - t0)
                cpu[label].append(time.process_time() - c0)
        ratios = [f / s for f, s in zip(wall["folded"], wall["separate"])]
        cpu_ratios = [f / s for f, s in zip(cpu["folded"], cpu["separate"])]
        row = {"method": name, "separate_ms": 1e3 * statistics.median(wall["separate"]),
               "folded_ms": 1e3 * statistics.median(wall["folded"]), "ratio_median": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios),
               "separate_cpu_ms": 1e3 * statistics.median(cpu["separate"]),
               "folded_cpu_ms": 1e3 * statistics.median(cpu["folded"]),
               "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratio_min": min(cpu_ratios),
               "cpu_ratio_max": max(cpu_ratios), "max_abs_maps_diff": diff}
        rows.append(row)
        print(json.dumps(row), flush=True)
    load_after = os.getloadavg()
    meta = {"command": "python " + " ".join(sys.argv), "model": args.model, "size": args.size, "batch": args.batch,
            "rounds": args.rounds, "threads": args.threads, "torch": torch.__version__, "pyattr": pyattr.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_before": load_before,
            "load_after": load_after}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    lines = ["# Eager cost of folding the clean input into the first pass (IG, SmoothGrad)", "",
             f"Command: `{meta['command']}`", "",
             (f"{args.model}, {args.size} px, batch {args.batch}, {args.threads} thread(s), {args.rounds} interleaved "
             f"rounds; pyattr {meta['pyattr']}, torch {meta['torch']}, {meta['machine']}; load average before "
             f"{load_before[0]:.2f}, after {load_after[0]:.2f} (a shared machine)."), "",
             ("| method | separate ms | folded ms | folded / separate, wall (median of pairs; min-max) | "
             "separate CPU ms | folded CPU ms | folded / separate, CPU (median; min-max) | maps differ by |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['separate_ms']:.1f} | {r['folded_ms']:.1f} | {r['ratio_median']:.3f} "
                     f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) | {r['separate_cpu_ms']:.1f} | "
                     f"{r['folded_cpu_ms']:.1f} | {r['cpu_ratio_median']:.3f} ({r['cpu_ratio_min']:.3f}-"
                     f"{r['cpu_ratio_max']:.3f}) | {r['max_abs_maps_diff']:.1e} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
