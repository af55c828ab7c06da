"""Held-out accuracy of the built-in detector (ShapesDetNet): VOC mAP@0.5, per class, and stricter IoUs.

Runs :func:`pyattr.zoo.detect` (score threshold 0.01, per-class NMS at IoU 0.5) on
``generate(N, seed)`` images (default 2,000 images of the held-out seed 10,000, never trained on) and
scores it with :func:`pyattr.zoo.detection_average_precision` (PASCAL VOC all-point AP per class,
averaged over the six classes) against the tight boxes of the ground-truth masks
(:func:`pyattr.zoo.mask_boxes`), at IoU 0.5 (the issue's bar: >= 0.9), 0.75, and averaged over
0.50:0.05:0.95 (COCO's thresholds; VOC-style AP at each). Also: how often the default
``detect()`` (threshold 0.3) returns exactly the image's classes, and the eager speed.

Also a pointing game of Grad-CAM at :data:`pyattr.zoo.DETMODEL_LAYER`, written by hand (plain autograd,
no pyattr method or target: ``relu(sum_c mean_hw(d objective / d A_c) * A_c)``, bilinearly upsampled)
with objective = the logit of the class's best-scored candidate, on ``generate(300, seed=40_000)``
(the pointing-game test seed): a hit when the map's maximum lies in the object's box, or in its mask.

Usage::

    PYTHONPATH=$PWD python benchmarks/builtin_detector.py [--n 2000] [--seed 10000] [--weights FILE]
        [--out benchmarks/results/builtin_detector.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from pyattr.zoo import DET_CLASSES, DETMODEL_LAYER, detect, detection_average_precision, generate, mask_boxes
from pyattr.zoo.detmodel import load_builtin_detector
from pyattr.zoo.train_det import EVAL_SCORE_THRESHOLD


def gradcam_pointing_game(model: torch.nn.Module, n: int = 300, seed: int = 40_000) -> dict[str, np.ndarray]:
    """Per class, [box hits, mask hits, objects] of hand-written Grad-CAM at DETMODEL_LAYER (module docstring)."""
    batch = generate(n, seed)
    images = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255.0
    layer = dict(model.named_modules())[DETMODEL_LAYER]
    counts = {name: np.zeros(3, dtype=int) for name in DET_CLASSES}
    captured: list[torch.Tensor] = []
    for first in range(0, n, 50):
        captured.clear()
        handle = layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
        try:
            output = model(images[first : first + 50])
        finally:
            handle.remove()
        logits = output[:, 4:].flatten(2)  # (B, K, M)
        for index, name in enumerate(DET_CLASSES):
            rows = np.flatnonzero(batch.labels[first : first + 50, index])
            if rows.size == 0:
                continue
            (gradient,) = torch.autograd.grad(logits[rows, index].amax(1).sum(), captured[0], retain_graph=True)
            cam = F.relu((gradient.mean((2, 3), keepdim=True) * captured[0]).sum(1, keepdim=True))[rows]
            cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            for row, heat in zip(rows, cam):
                masks = batch.masks[first + row]
                boxes, labels = mask_boxes(masks)
                x0, y0, x1, y1 = boxes[list(labels).index(index)]
                y, x = divmod(int(heat.flatten().argmax()), heat.shape[-1])
                valid = bool(heat.max() > 0)
                counts[name] += [valid and x0 <= x < x1 and y0 <= y < y1, valid and masks[index, y, x], 1]
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=10_000)
    parser.add_argument("--weights", type=Path, default=None, help="a ShapesDetNet state_dict (default: shipped)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/builtin_detector.md"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_builtin_detector(weights=args.weights)
    batch = generate(args.n, args.seed)
    images = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255.0
    truth = [mask_boxes(masks) for masks in batch.masks]
    start = time.perf_counter()
    found = []
    for first in range(0, args.n, 250):
        found += detect(model, images[first : first + 250], score_threshold=EVAL_SCORE_THRESHOLD)
    seconds = time.perf_counter() - start

    thresholds = np.round(np.arange(0.5, 0.96, 0.05), 2)
    results = {float(t): detection_average_precision(found, truth, iou_threshold=float(t)) for t in thresholds}
    map50, ap50 = results[0.5]
    map75, ap75 = results[0.75]
    map_coco = float(np.mean([value[0] for value in results.values()]))
    ap_coco = np.mean([value[1] for value in results.values()], axis=0)

    default = detect(model, images)
    exact = np.mean(
        [sorted(d["labels"].tolist()) == np.flatnonzero(label).tolist() for d, label in zip(default, batch.labels)]
    )
    num_objects = sum(len(labels) for _, labels in truth)
    pointing = gradcam_pointing_game(model)
    total = sum(pointing.values())

    lines = [
        "# Built-in detector (ShapesDetNet): held-out accuracy",
        "",
        f"`python benchmarks/builtin_detector.py --n {args.n} --seed {args.seed}`"
        + (f" `--weights {args.weights}`" if args.weights else "")
        + f": {args.n} images of `generate(n, seed={args.seed})` (never trained on), {num_objects} objects; "
        f"`detect(score_threshold={EVAL_SCORE_THRESHOLD})`, per-class NMS at IoU 0.5; ground truth = the tight box of "
        "each object's mask. AP: PASCAL VOC all-point interpolation per class, averaged over the six classes "
        "(`pyattr.zoo.detection_average_precision`).",
        "",
        (f"**mAP@0.5 = {map50:.4f}** ({map50!r} unrounded; bar: >= 0.9) · mAP@0.75 = {map75:.4f} · "
        f"mAP@[.50:.95] = {map_coco:.4f} (VOC AP averaged over IoU 0.50:0.05:0.95)"),
        "",
        "| class | AP@0.5 | AP@0.75 | AP@[.50:.95] | objects |",
        "|---|---|---|---|---|",
    ]
    for index, name in enumerate(DET_CLASSES):
        count = sum(int((labels == index).sum()) for _, labels in truth)
        lines.append(f"| {name} | {ap50[index]:.4f} | {ap75[index]:.4f} | {ap_coco[index]:.4f} | {count} |")
    lines += [
        "",
        (f"With the default `detect()` (score threshold 0.3) the detected classes are exactly the image's classes "
        f"on {100 * exact:.2f}% of the images."),
        (f"Eager speed: {1000 * seconds / args.n:.2f} ms per image (forward + decode + NMS, batches of 250, "
        f"{args.threads} thread(s), shared machine)."),
        "",
        (f"Grad-CAM at `{DETMODEL_LAYER}` (by hand; objective: the logit of the class's best candidate), "
        f"`generate(300, seed=40000)`, {total[2]} objects: the map's maximum lies in the object's **box** for "
        f"{100 * total[0] / total[2]:.2f}%, in its **mask** for {100 * total[1] / total[2]:.2f}%. The detector's evidence peaks at each object's "
        "peak cell, which training puts on the object (`pyattr.zoo.train_det.dense_targets`): the cell of the "
        "object nearest its box centre, for a ring a cell of its band rather than its hole."),
        "",
        "| class | box hits | mask hits | objects |",
        "|---|---|---|---|",
        *(f"| {name} | {c[0] / c[2]:.2%} | {c[1] / c[2]:.2%} | {c[2]} |" for name, c in pointing.items()),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(
        "DET_INFO values: " + repr({"heldout_map50": round(map50, 4),
                                    "heldout_ap50_per_class": {n: round(float(a), 4) for n, a in zip(DET_CLASSES, ap50)}})
    )


if __name__ == "__main__":
    main()
