"""Faithfulness of several methods on the built-in model, with random and inverted maps as the floor and ceiling.

For generated images (a seed never used in training), each method explains the model's arg-max class; the maps
are scored with pyattr.metrics: deletion AUC (zero baseline), insertion AUC (blurred baseline), Average Drop,
Increase in Confidence, ROAD MoRF / LeRF mean change (fractions 0.2, 0.5, 0.8) and the ROAD combined score.
A faithful method sits between "inverted Grad-CAM" (1 - maps: the evidence last) and beats "random".

    OMP_NUM_THREADS=1 python benchmarks/metrics_quality.py      # -> benchmarks/results/metrics_quality.{md,json}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import pyattr
from pyattr import metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench.env import describe, load_average

METHODS = {
    "gradcam": lambda m: pyattr.GradCAM(m, pyattr.zoo.SHAPESNET_LAYER),
    "gradcampp": lambda m: pyattr.GradCAMPlusPlus(m, pyattr.zoo.SHAPESNET_LAYER),
    "layercam": lambda m: pyattr.LayerCAM(m, pyattr.zoo.SHAPESNET_LAYER),
    "saliency": lambda m: pyattr.Saliency(m),
    "inputxgradient": lambda m: pyattr.InputXGradient(m),
    "integratedgradients": lambda m: pyattr.IntegratedGradients(m, steps=16),
    "lrp": lambda m: pyattr.LRP(m, "epsilon_plus"),
}


def scores(model, x, maps, target, steps: int) -> dict[str, float]:
    dele = metrics.deletion(model, x, maps, target, steps=steps, baseline=0.0)
    ins = metrics.insertion(model, x, maps, target, steps=steps, baseline="blur")
    conf = metrics.confidence_change(model, x, maps, target)
    morf = metrics.road(model, x, maps, target, order="morf", fractions=[0.2, 0.5, 0.8])
    lerf = metrics.road(model, x, maps, target, order="lerf", fractions=[0.2, 0.5, 0.8])
    return {"deletion_auc": float(dele.auc.mean()), "insertion_auc": float(ins.auc.mean()),
            "average_drop": conf.average_drop, "increase_in_confidence": conf.increase_in_confidence,
            "road_morf": float(morf.mean_change.mean()), "road_lerf": float(lerf.mean_change.mean()),
            "road_combined": float(((lerf.mean_change - morf.mean_change) / 2).mean())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=72_000)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "metrics_quality"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = pyattr.zoo.load_builtin()
    batch = pyattr.zoo.generate(args.n, seed=args.seed)
    x = (torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255).contiguous()
    meta = describe(torch.device("cpu"), torch.get_num_threads())
    meta["command"] = " ".join(["python", "benchmarks/metrics_quality.py", *(argv or sys.argv[1:])])
    meta["load_start"] = load_average()
    gradcam = METHODS["gradcam"](model)(x)
    target = gradcam.target
    rows = {}
    maps_of = {name: (lambda make=make: make(model)(x, target).maps) for name, make in METHODS.items()}
    maps_of["random"] = lambda: torch.rand(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(1))
    maps_of["inverted gradcam"] = lambda: 1 - gradcam.maps
    for name, make_maps in maps_of.items():
        start = time.perf_counter()
        rows[name] = scores(model, x, make_maps(), target, args.steps)
        rows[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
    meta["load_end"] = load_average()
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    keys = ["deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence", "road_morf", "road_lerf",
            "road_combined"]
    better = ["low", "high", "low", "high", "low", "high", "high"]
    lines = ["# Faithfulness of methods on the built-in model", "",
             (f"{args.n} generated images (seed {args.seed}), each method explaining the model's arg-max class; "
              f"pyattr.metrics with softmax scores: deletion (zero baseline) and insertion (blurred baseline) "
              f"AUC over {args.steps} steps, Average Drop and Increase in Confidence, ROAD mean change over "
              "fractions 0.2 / 0.5 / 0.8 (rank selection, noise 0.01, seed 0). Means over the images. 'random': "
              "uniform random maps; 'inverted gradcam': 1 - Grad-CAM's maps."), "",
             (f"`{meta['command']}` — {meta['date']}, {meta['cpu']}, torch {meta['torch']}, pyattr "
              f"{meta['pyattr_commit']}, load average {meta['load_start']} -> {meta['load_end']}"), "",
             "| maps | " + " | ".join(f"{k} ({b})" for k, b in zip(keys, better)) + " |",
             "|---|" + "---|" * len(keys)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
