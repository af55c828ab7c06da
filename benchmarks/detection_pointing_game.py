"""Pointing game for detection on the built-in detector (issue 15, item 4).

For every box that :func:`pyattr.zoo.detect` finds (default threshold 0.3, NMS) on ``generate(N, seed)`` and
that matches a ground-truth object (same class, IoU >= 0.5 with the object's tight mask box), the box is
explained with a :class:`~pyattr.targets.DetectionTarget` (objective: the matched candidate's class
probability; every box of an image in one call, (N, B, H, W) maps), and each map is scored against that
object:

- pointing game on the mask: the map's maximum inside the object's mask (the issue's measure);
- pointing game on the box: the maximum inside the object's box;
- energy pointing game: the share of the raw map's positive energy inside the mask (raw maps bilinearly
  resized to the image).

The detector's evidence sits at each object's peak cell, which its training puts on the object
(:func:`pyattr.zoo.train_det.dense_targets`; with CenterNet's centre peaks, a ring's peak was its hole and
every CAM missed every ring on the mask: 81.6% overall). Integrated Gradients (32 steps, zero baseline)
runs on the first 100 images only (:data:`SLOW_METHODS`); LRP's EpsilonGammaBox takes the input bounds of
the detector's first convolution from its normalization (as for every built-in model).

    python benchmarks/detection_pointing_game.py                      # 300 images, a set of methods
    python benchmarks/detection_pointing_game.py --n 50 --methods gradcam,saliency

Seed 40,000 is the benchmark set (never used to train the detector). Writes
``benchmarks/results/detection_pointing_game.{json,md}`` after every method.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import pyattr
from pyattr.methods import build_method, needs_layer
from pyattr.postprocess import resize_bilinear
from pyattr.targets import DetectionTarget
from pyattr.zoo import (
    DET_CLASSES,
    DETMODEL_LAYER,
    decode_detections,
    detect,
    generate,
    load_builtin_detector,
    mask_boxes,
)
from pyattr.zoo.detmodel import box_iou

EVAL_SEED = 40_000
DEFAULT_METHODS = ("gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "saliency", "inputxgradient",
                   "guidedbackprop", "integratedgradients", "lrp_epsilon_gamma_box")
SLOW_METHODS = {"integratedgradients": 100}
"""Methods run on fewer images (the first N of the same set): Integrated Gradients takes 32 backward passes
per box."""


def matched_boxes(model, images: torch.Tensor, data, start: int) -> list[dict]:
    """Per image: detected boxes that match a ground-truth object (class and IoU >= 0.5), with that object."""
    found = detect(model, images)
    out = []
    for j, det in enumerate(found):
        i = start + j
        gt, classes = mask_boxes(data.masks[i])
        keep = []
        for d in range(len(det["labels"])):
            hit = np.flatnonzero(classes == int(det["labels"][d]))
            if len(hit) and float(box_iou(det["boxes"][d:d + 1].numpy(), gt[hit])[0, 0]) >= 0.5:
                keep.append((d, int(classes[hit[0]])))
        out.append({"boxes": det["boxes"][[d for d, _ in keep]], "labels": det["labels"][[d for d, _ in keep]],
                    "objects": [k for _, k in keep], "image": i})
    return out


def run(name: str, n: int, seed: int, batch_size: int, layer: str | None = None) -> dict:
    model = load_builtin_detector()
    method = build_method(name, model, (layer or DETMODEL_LAYER) if needs_layer(name) else None)
    n = min(n, SLOW_METHODS.get(name, n))
    data = generate(n, seed=seed)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    rows = []  # (class, mask hit, box hit, energy)
    t0 = time.perf_counter()
    for s in range(0, n, batch_size):
        x = images[s:s + batch_size]
        with torch.no_grad():
            matches = matched_boxes(model, x, data, s)
        result = method(x, DetectionTarget.from_detections(matches, decode=decode_detections))
        raw = result.raw.float()
        if raw.shape[-2:] != x.shape[-2:]:
            raw = resize_bilinear(raw.flatten(0, 1), tuple(x.shape[-2:])).view(*raw.shape[:2], *x.shape[-2:])
        for j, m in enumerate(matches):
            for d, k in enumerate(m["objects"]):
                mask = torch.from_numpy(data.masks[m["image"], k])[None]
                box = torch.zeros_like(mask)
                x0, y0, x1, y1 = (int(v) for v in mask_boxes(data.masks[m["image"], k][None])[0][0])
                box[0, y0:y1, x0:x1] = True
                rows.append((k, bool(pyattr.pointing_game(result.maps[j, d:d + 1], mask)[0]),
                             bool(pyattr.pointing_game(result.maps[j, d:d + 1], box)[0]),
                             float(pyattr.energy_pointing_game(raw[j, d:d + 1], mask)[0])))
    arr = np.array([(k, a, b_, e) for k, a, b_, e in rows], dtype=np.float64)
    per_class = {DET_CLASSES[c]: {"mask": float(arr[arr[:, 0] == c, 1].mean()), "box": float(arr[arr[:, 0] == c, 2].mean()),
                                  "objects": int((arr[:, 0] == c).sum())} for c in range(len(DET_CLASSES))
                 if (arr[:, 0] == c).any()}
    return {"method": name, "layer": layer or DETMODEL_LAYER, "mask": float(arr[:, 1].mean()), "box": float(arr[:, 2].mean()),
            "energy": float(arr[:, 3].mean()), "images": n, "boxes": len(rows), "per_class": per_class,
            "seconds": round(time.perf_counter() - t0, 1)}


def markdown(results: list[dict], n: int, seed: int) -> str:
    layer = results[0].get("layer") if results else None
    lines = [(f"### Detection (built-in ShapesDetNet, layer `{layer or DETMODEL_LAYER}` for CAMs; the detected boxes "
             f"matched to objects in the first {n} images of seed {seed}, fewer where the images column says so)"), "",
             ("| method | images / boxes | pointing game, mask | pointing game, box | energy, mask | "
              + " | ".join(f"{c} (mask / box)" for c in DET_CLASSES) + " |"),
             "|---|---|---|---|---|" + "---|" * len(DET_CLASSES)]
    for r in results:
        cells = [f"{100 * r['per_class'][c]['mask']:.0f} / {100 * r['per_class'][c]['box']:.0f}"
                 if c in r["per_class"] else "-" for c in DET_CLASSES]
        lines.append(f"| {r['method']} | {r.get('images', n)} / {r['boxes']} | **{100 * r['mask']:.1f}%** | {100 * r['box']:.1f}% | "
                      f"{100 * r['energy']:.1f}% | " + " | ".join(cells) + " |")
    lines += ["", ("Pointing game: the normalized map's maximum inside the object's mask (or its tight box); energy: "
              "the share of the raw map's positive values inside the mask. Each detected box that matches an object "
              "(same class, IoU >= 0.5) is explained with DetectionTarget (the matched candidate's probability). "
              "integratedgradients: 32 steps from a zero baseline, on the first 100 images. lrp_epsilon_gamma_box: "
              "ZBox bounds low = (0 - mean) / std, high = (1 - mean) / std per channel (images in [0, 1], the "
              "detector's own normalization).")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--layer", help=f"the CAM layer (default {DETMODEL_LAYER})")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "detection_pointing_game"))
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"n": args.n, "seed": args.seed, "torch": torch.__version__, "pyattr": pyattr.__version__}
    results = []
    for name in args.methods.split(","):
        results.append(run(name, args.n, args.seed, args.batch_size, args.layer))
        r = results[-1]
        print(f"{name:24s} mask {100 * r['mask']:5.1f}%  box {100 * r['box']:5.1f}%  energy {100 * r['energy']:5.1f}%  "
              f"[{r['boxes']} boxes, {r['seconds']:.0f} s]", flush=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        out.with_suffix(".md").write_text(markdown(results, args.n, args.seed))
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
