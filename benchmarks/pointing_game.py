"""Pointing game of every pyattr method on the built-in model, on freshly generated images.

For each image and each class present in it, the class is explained and the map's maximum is
checked against that class's ground-truth mask. Prints a table and writes JSON + Markdown.

    python benchmarks/pointing_game.py                 # 500 images, every method
    python benchmarks/pointing_game.py --n 100 --methods gradcam
    python benchmarks/pointing_game.py --seed 45000 --methods gradcam --weights run.pt   # a candidate model

Image seeds: 40,000 is the test set the README reports; 45,000 is the validation set on which the shipped
training seed was chosen (see ``pyattr/zoo/train.py``). Neither is ever used for training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import pyattr
from pyattr.methods import METHODS, build_method
from pyattr.zoo import SHAPE_CLASSES, SHAPESNET_LAYER, generate, load_builtin

EVAL_SEED = 40_000  # never used for training (train seeds < 10_000, held-out mAP 10_000, CLI samples 30_000)
VALIDATION_SEED = 45_000  # model selection only (the shipped training seed); never reported as the result


def evaluate(method_name: str, n: int, seed: int, batch_size: int = 64, weights: str | None = None,
             options: dict | None = None) -> dict:
    model = load_builtin(weights=weights)
    method = build_method(method_name, model, SHAPESNET_LAYER, **taken_options(method_name, options or {}))
    data = generate(n, seed=seed)
    pairs = [(i, k) for i in range(n) for k in np.flatnonzero(data.labels[i])]
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    hits = np.zeros(len(pairs), dtype=bool)
    t0 = time.perf_counter()
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        idx = torch.tensor([i for i, _ in chunk])
        tgt = torch.tensor([int(k) for _, k in chunk])
        maps = method(images[idx], target=tgt).maps
        masks = torch.from_numpy(np.stack([data.masks[i, k] for i, k in chunk]))
        hits[s:s + len(chunk)] = pyattr.pointing_game(maps, masks).numpy()
    seconds = time.perf_counter() - t0
    classes = np.array([k for _, k in pairs])
    per_class = {SHAPE_CLASSES[k]: float(hits[classes == k].mean()) for k in range(len(SHAPE_CLASSES))
                 if (classes == k).any()}
    return {"method": method_name, "hit_rate": float(hits.mean()), "per_class": per_class,
            "objects": len(pairs), "images": n, "seconds": round(seconds, 2)}


def taken_options(method_name: str, options: dict) -> dict:
    """The entries of ``options`` that the method's constructor takes (``--options`` applies to several methods)."""
    import inspect

    params = inspect.signature(METHODS[method_name].__init__).parameters
    return {k: v for k, v in options.items() if k in params}


def options_label(row: dict) -> str:
    return "".join(f" ({k}={v})" for k, v in row.get("options", {}).items())


def markdown(rows: list[dict]) -> str:
    head = "| method | all | " + " | ".join(SHAPE_CLASSES) + " |\n"
    head += "|---|---|" + "---|" * len(SHAPE_CLASSES) + "\n"
    lines = [f"| {r['method']}{options_label(r)} | **{100 * r['hit_rate']:.1f}%** | "
             + " | ".join(f"{100 * r['per_class'].get(c, float('nan')):.1f}%" for c in SHAPE_CLASSES) + " |"
             for r in rows]
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="images (default 500)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED,
                        help=f"image seed (default {EVAL_SEED}, the test set; {VALIDATION_SEED}: the validation set)")
    parser.add_argument("--methods", default="all", help="comma-separated method names, or all")
    parser.add_argument("--weights", default=None,
                        help="a ShapesNet state_dict to score instead of the built-in model (model selection)")
    parser.add_argument("--options", type=json.loads, default={},
                        help='method options as JSON, given to the methods that take them, e.g. \'{"masks": 250}\'')
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pointing_game"))
    args = parser.parse_args()
    if args.weights is not None and not Path(args.weights).is_file():
        parser.error(f"--weights {args.weights}: no such file (write one with python -m pyattr.zoo.train --out FILE)")
    torch.manual_seed(0)
    names = list(METHODS) if args.methods == "all" else args.methods.split(",")
    rows = []
    for name in names:
        row = evaluate(name, args.n, args.seed, weights=args.weights, options=args.options)
        if taken_options(name, args.options):
            row["options"] = taken_options(name, args.options)
        rows.append(row)
        print(f"{name:12s} {100 * row['hit_rate']:5.1f}%  ({row['objects']} objects, {row['seconds']} s)", flush=True)
    table = markdown(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.weights or "builtin ShapesNet", "seed": args.seed, "pyattr": pyattr.__version__,
            "torch": torch.__version__}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"Pointing game on {args.n} generated images (seed {args.seed}), {args.weights or 'built-in model'}, "
        f"each present class "
        f"explained.\n\n" + table)


if __name__ == "__main__":
    main()
