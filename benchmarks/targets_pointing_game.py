"""Pointing game for the new targets on the built-in models: segmentation and similarity (issue 14, item 5).

Segmentation (the built-in ShapesSegNet, ``pyattr.zoo.load_builtin_segmenter``): for every object of
``generate(N, seed)``, its class is explained with a :class:`~pyattr.targets.SegmentationTarget`

- restricted to its own predicted region (``region=None``: the pixels the model predicts as the class), and
- over the whole image (``region`` all ones),

and each map is scored against the object's ground-truth mask: the pointing game (the map's maximum inside
the mask) and the energy pointing game (the share of the raw map's positive energy inside the mask, raw
maps bilinearly resized to the image).

Similarity (the built-in classifier's pooled features, ``pyattr.zoo.load_builtin_embedding``): queries of
``generate_similarity(N, seed)`` hold two or three shapes, the reference one of them, re-rendered; the query
is explained with a :class:`~pyattr.targets.SimilarityTarget` (cosine) to the reference's embedding, and the
map is scored against the shared shape's mask in the query.

    python benchmarks/targets_pointing_game.py                     # 300 images / pairs, every method
    python benchmarks/targets_pointing_game.py --n 50 --methods gradcam,saliency

Seed 40,000 is the benchmark set (never used to train either model). Writes JSON and Markdown to
``benchmarks/results/targets_pointing_game.{json,md}``.
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
from pyattr.postprocess import resize_bilinear
from pyattr.targets import SegmentationTarget, SimilarityTarget
from pyattr.zoo import (
    SHAPESNET_LAYER,
    generate,
    generate_similarity,
    load_builtin_embedding,
    load_builtin_segmenter,
)
from pyattr.zoo.segmodel import SHAPESSEG_LAYER

EVAL_SEED = 40_000
SKIPPED = {"cam": "reads a classifier's head: class logits only"}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def raw_at(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Raw maps (N, h, w) at the image's size (bilinear), for the energy pointing game."""
    return resize_bilinear(raw.float(), size)


def score(result: pyattr.Attribution, masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    size = tuple(masks.shape[-2:])
    hits = pyattr.pointing_game(result.maps, masks).numpy()
    energy = pyattr.energy_pointing_game(raw_at(result.raw, size), masks).numpy()
    return hits, energy


def segmentation(name: str, n: int, seed: int, batch_size: int) -> dict:
    model = load_builtin_segmenter()
    method = build_method(name, model, SHAPESSEG_LAYER)
    data = generate(n, seed=seed)
    pairs = [(i, int(k)) for i in range(n) for k in np.flatnonzero(data.labels[i])]
    images = to_tensor(data.images)
    out: dict[str, dict] = {}
    t0 = time.perf_counter()
    for where in ("own region", "whole image"):
        hits, energy = [], []
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            idx = torch.tensor([i for i, _ in chunk])
            classes = torch.tensor([k + 1 for _, k in chunk])  # segmenter class k + 1 is shape class k
            region = None if where == "own region" else torch.ones(len(chunk), *images.shape[-2:])
            result = method(images[idx], SegmentationTarget(classes=classes, region=region))
            masks = torch.from_numpy(np.stack([data.masks[i, k] for i, k in chunk]))
            h, e = score(result, masks)
            hits.append(h)
            energy.append(e)
        out[where] = {"pointing_game": float(np.concatenate(hits).mean()),
                      "energy": float(np.concatenate(energy).mean())}
    return {"method": name, **out, "objects": len(pairs), "images": n, "seconds": round(time.perf_counter() - t0, 1)}


def similarity(name: str, n: int, seed: int, batch_size: int) -> dict:
    model = load_builtin_embedding()
    method = build_method(name, model, SHAPESNET_LAYER)
    data = generate_similarity(n, seed=seed)
    queries, references = to_tensor(data.queries), to_tensor(data.references)
    with torch.no_grad():
        embeddings = model(references)
    hits, energy = [], []
    t0 = time.perf_counter()
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        result = method(queries[sl], SimilarityTarget(embeddings[sl]))
        h, e = score(result, torch.from_numpy(data.shared_masks[sl]))
        hits.append(h)
        energy.append(e)
    return {"method": name, "pointing_game": float(np.concatenate(hits).mean()),
            "energy": float(np.concatenate(energy).mean()), "pairs": n,
            "seconds": round(time.perf_counter() - t0, 1)}


def markdown(seg: list[dict], sim: list[dict], n: int, seed: int) -> str:
    lines = [(f"### Segmentation (built-in ShapesSegNet, layer `{SHAPESSEG_LAYER}`; {seg[0]['objects'] if seg else 0} "
             f"objects in {n} images, seed {seed})"), "",
             ("| method | pointing game, own region | energy, own region | pointing game, whole image | "
             "energy, whole image |"), "|---|---|---|---|---|"]
    for r in seg:
        a, b = r["own region"], r["whole image"]
        lines.append(f"| {r['method']} | **{100 * a['pointing_game']:.1f}%** | {100 * a['energy']:.1f}% | "
                     f"{100 * b['pointing_game']:.1f}% | {100 * b['energy']:.1f}% |")
    lines += ["", (f"### Similarity (built-in ShapesNet's pooled features, layer `{SHAPESNET_LAYER}`; {n} query/"
                  f"reference pairs, seed {seed}; cosine similarity)"), "",
              "| method | pointing game | energy |", "|---|---|---|"]
    for r in sim:
        lines.append(f"| {r['method']} | **{100 * r['pointing_game']:.1f}%** | {100 * r['energy']:.1f}% |")
    skipped = ", ".join(f"{k} ({why})" for k, why in SKIPPED.items())
    lines += ["", (f"Not run: {skipped}. Pointing game: the normalized map's maximum inside the object's mask; energy: "
                  "the share of the raw map's positive values inside it (raw maps resized bilinearly to 64x64).")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="images (segmentation) and pairs (similarity); default 300")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--methods", default="all", help="comma-separated method names, or all")
    parser.add_argument("--skip", default="", help="comma-separated method names to leave out of all")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "targets_pointing_game"))
    args = parser.parse_args()
    torch.manual_seed(0)
    skip = set(filter(None, args.skip.split(",")))
    names = ([m for m in METHODS if m not in SKIPPED and m not in skip] if args.methods == "all"
             else args.methods.split(","))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"n": args.n, "seed": args.seed, "torch": torch.__version__, "pyattr": pyattr.__version__}
    seg, sim = [], []
    for name in names:
        seg.append(segmentation(name, args.n, args.seed, args.batch_size))
        sim.append(similarity(name, args.n, args.seed, args.batch_size))
        a, b = seg[-1]["own region"], sim[-1]
        print(f"{name:28s} segmentation {100 * a['pointing_game']:5.1f}% (energy {100 * a['energy']:5.1f}%)  "
              f"similarity {100 * b['pointing_game']:5.1f}% (energy {100 * b['energy']:5.1f}%)  "
              f"[{seg[-1]['seconds'] + sim[-1]['seconds']:.0f} s]", flush=True)
        # written after every method: a long run that stops keeps the rows it has
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "segmentation": seg, "similarity": sim},
                                                       indent=1))
        out.with_suffix(".md").write_text(markdown(seg, sim, args.n, args.seed))
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
