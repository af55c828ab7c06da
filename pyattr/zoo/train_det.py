"""Train the shipped ShapesDetNet weights: ``python -m pyattr.zoo.train_det``.

Data: a fixed set of ``train_size`` images rendered once by :func:`pyattr.zoo.shapes.generate` from
``--seed`` (default :data:`DEFAULT_SEED`), kept as images plus per-pixel class maps
(:func:`pyattr.zoo.segmodel.class_map`). Each batch gets random flips/transposes
(:func:`pyattr.zoo.train.random_dihedral`, the class map stacked as a fourth channel), and the
detection targets are computed from the transformed class map (:func:`class_map_boxes`,
:func:`dense_targets`): every class occurs at most once per image, so each class's pixels are one
object and its tight box is the ground truth.

Targets and losses (CenterNet-style, Zhou et al. 2019, on the stride-4 grid), with each object's peak on
the object (:func:`dense_targets`):

- classes: per class a heat map with one peak per object, at the cell fully on the object (its 4x4
  patch inside the mask, :func:`cell_coverage`) nearest the box centre -- the centre cell for the solid
  shapes, a cell of the band for a ring, whose centre is its hole; the heat is a Gaussian around the box
  centre (sigma = the object's larger side / 6, at least half a cell) on the cells at least half on the
  object, scaled to 1 at the peak and clipped at 1, 0 elsewhere; penalty-reduced focal loss (alpha 2,
  beta 4), summed and divided by the number of objects. (The first weights, trained with CenterNet's
  centre peaks, put every ring's evidence in its hole: Grad-CAM hit 0% of rings on the mask.)
- boxes: the cells within the object's box where that heat, or the Gaussian around the centre, exceeds 0.3
  regress the distances to the four sides; GIoU loss plus 0.1 x L1 (in cells), weighted by that value,
  averaged over the weights. Decoding is unchanged: any cell predicts a box.

Initialization: ShapesDetNet's ``stem`` ... ``head`` are ShapesSegNet's layers, so they start from the
shipped segmenter's weights (``shapesseg.pt``, trained by :mod:`pyattr.zoo.train_seg` on the same seed-1
images; :func:`init_from_segmenter`) and only the two 1x1 convolutions start from scratch -- the usual
pretrained-backbone recipe, with the project's own backbone. From that start 150 steps already reached
held-out mAP@0.5 1.0 on 200 images; a random start (``train(..., from_segmenter=False)``) needs far more
steps than this 2-core machine gave it.

AdamW (peak lr 4e-3, weight decay 5e-4), batch 32, one-cycle schedule over ``--epochs`` epochs (default 1:
750 steps). After
every epoch: the training loss and the held-out mAP@0.5 (:func:`pyattr.zoo.detmodel.detection_average_precision`,
VOC all-point AP per class, averaged) of :func:`pyattr.zoo.detmodel.detect` at score threshold
:data:`EVAL_SCORE_THRESHOLD` on ``heldout_size`` images rendered from seed 10_000
(:data:`pyattr.zoo.train.HELDOUT_SEED`); at the end the per-class AP too.

The shipped weights (``python -m pyattr.zoo.train_det --threads 1``, seed 1, 1 epoch) reach held-out
mAP@0.5 1.0 on 1000 images (every class; 2000 images in ``benchmarks/results/builtin_detector.md``).
The run took 1197 s on one thread of the shared 2-core dev machine, 147 s of it rendering;
``benchmarks/results/train_det.log`` has its output.

Seeds: training refuses the held-out seed 10_000 and the benchmarks' seeds 40_000 (pointing-game
test images) and 45_000 (validation images). The run is seeded (``torch.manual_seed``, deterministic
data, single process), so it reproduces the same weights on the same machine, software and thread
count; across CPUs, thread counts or torch versions only the accuracy is expected to reproduce.

Usage::

    python -m pyattr.zoo.train_det --threads 1                # full run, writes pyattr/zoo/shapesdet.pt
    python -m pyattr.zoo.train_det --quick --out /tmp/d.pt    # seconds: smoke test of the whole pipeline
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pyattr.zoo.detmodel import (
    DET_CLASSES,
    DET_STRIDE,
    DET_WEIGHTS_PATH,
    NUM_DET_CLASSES,
    ShapesDetNet,
    detect,
    detection_average_precision,
    mask_boxes,
)
from pyattr.zoo.segmodel import SEG_WEIGHTS_PATH
from pyattr.zoo.shapes import generate
from pyattr.zoo.train import (
    HELDOUT_SEED,
    random_dihedral,
    run_command_line,
    save_state_dict_atomically,
    torch_threads,
)
from pyattr.zoo.train_seg import render_segmentation_dataset

DEFAULT_SEED = 1
"""Training seed of the shipped weights."""

RESERVED_SEEDS = (HELDOUT_SEED, 40_000, 45_000)
"""Held-out (10,000), pointing-game test (40,000) and validation (45,000) seeds: never trained on."""

EVAL_SCORE_THRESHOLD = 0.01
"""Score threshold of :func:`detect` when scoring mAP (low, so that the precision-recall curve is complete)."""

_REGRESSION_MIN_HEAT = 0.3
_L1_WEIGHT = 0.1
_MIN_HEAT_COVERAGE = 0.5  # heat only on cells whose 4x4 patch is at least half the object


def class_map_boxes(class_maps: torch.Tensor, num_classes: int = NUM_DET_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes of each class's pixels in class maps (0 = background, class ``k`` at ``k + 1``).

    Args:
        class_maps: integer (B, H, W).

    Returns:
        ``(present, boxes)``: bool (B, K) and float32 (B, K, 4) ``xyxy`` (``x1`` = last column + 1),
        zeros where the class is absent; the same boxes as :func:`pyattr.zoo.detmodel.mask_boxes`.

    Example:
        >>> maps = torch.zeros(1, 8, 8, dtype=torch.uint8); maps[0, 1:3, 4:7] = 3
        >>> present, boxes = class_map_boxes(maps)
        >>> present[0].tolist(), boxes[0, 2].tolist()
        ([False, False, True, False, False, False], [4.0, 1.0, 7.0, 3.0])
    """
    classes = torch.arange(1, num_classes + 1, device=class_maps.device).view(1, -1, 1, 1)
    one_hot = class_maps.long().unsqueeze(1) == classes  # (B, K, H, W)
    columns, rows = one_hot.any(2), one_hot.any(3)  # (B, K, W), (B, K, H)
    present = columns.any(-1)
    column_index = torch.arange(columns.shape[-1], device=class_maps.device)
    row_index = torch.arange(rows.shape[-1], device=class_maps.device)
    x0 = torch.where(columns, column_index, columns.shape[-1]).amin(-1)
    x1 = torch.where(columns, column_index, -1).amax(-1) + 1
    y0 = torch.where(rows, row_index, rows.shape[-1]).amin(-1)
    y1 = torch.where(rows, row_index, -1).amax(-1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=-1).float() * present.unsqueeze(-1)
    return present, boxes


def cell_coverage(class_maps: torch.Tensor, num_classes: int = NUM_DET_CLASSES) -> torch.Tensor:
    """Share of each stride-:data:`DET_STRIDE` cell's pixels that belong to each class.

    Args:
        class_maps: integer (B, H, W), 0 = background, class ``k`` at ``k + 1``; H and W divisible by the stride.

    Returns:
        float32 (B, K, H / 4, W / 4) in [0, 1]: the fraction of the cell's 4x4 pixel patch in class ``k``'s mask.

    Example:
        >>> maps = torch.zeros(1, 8, 8, dtype=torch.uint8); maps[0, 0:4, 2:4] = 6
        >>> cell_coverage(maps)[0, 5].tolist()
        [[0.5, 0.0], [0.0, 0.0]]
    """
    classes = torch.arange(1, num_classes + 1, device=class_maps.device).view(1, -1, 1, 1)
    one_hot = (class_maps.long().unsqueeze(1) == classes).float()  # (B, K, H, W)
    return F.avg_pool2d(one_hot, DET_STRIDE)


def dense_targets(
    present: torch.Tensor, boxes: torch.Tensor, coverage: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training targets on the grid of stride :data:`DET_STRIDE`, with each object's peak ON the object.

    CenterNet puts an object's peak at the cell holding its box centre. The centre of a non-convex
    object need not lie on it -- a ring's centre is its hole -- and the peak is where the detector's
    evidence (and so every explanation of the detection) concentrates. Here the peak is a cell ON the
    object: among the object's best-covered cells (``coverage``: the share of the cell's 4x4 pixels in
    the object's mask, :func:`cell_coverage`; 1 where the object has cells fully inside it), the one
    maximizing ``gauss``, the usual Gaussian around the box centre (sigma = the box's larger side / 6, at
    least half a cell; ties, as when the centre is a cell corner, go to the first cell in row-major
    order). For the solid shapes (circle, square, triangle, star, cross) that is the centre
    cell, as in CenterNet; for a ring it is a cell of the band nearest the hole. The class heat is
    ``gauss * coverage / (the peak's gauss * coverage)``, clipped at 1, on the cells at least half on the
    object (0 elsewhere: around the object and in a ring's hole): the peak has heat 1, and the cells on
    the object at least as close to the centre -- the other sides of a ring's band -- too, so the
    penalty-reduced focal loss hardly penalizes a score there, and NMS keeps one box.

    Box regression is unchanged in kind (any cell can predict any box): each cell regresses its
    (left, top, right, bottom) distances to the box of the object whose ``max(gauss, heat)`` is largest
    there, weighted by that value, where it exceeds 0.3 and the cell centre lies inside the box (the
    old centre region plus the cells around the new peak).

    Args:
        present: bool (B, K), which classes (objects) the image holds.
        boxes: float (B, K, 4) ``xyxy`` pixel boxes (:func:`class_map_boxes`).
        coverage: float (B, K, h, w), :func:`cell_coverage` of the class maps.

    Returns:
        ``(heat, peaks, distances, weights)``: heat float (B, K, h, w) in [0, 1]; peaks bool
        (B, K, h, w), one cell per present object (where heat is 1); distances float (B, 4, h, w),
        (left, top, right, bottom) from each cell centre to its object's box, in pixels; weights float
        (B, h, w), the regression weight of each cell (0 outside the box or below 0.3).

    Example:
        >>> maps = torch.zeros(1, 64, 64, dtype=torch.uint8)
        >>> yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
        >>> distance = ((xx - 32) ** 2 + (yy - 32) ** 2).sqrt()
        >>> maps[0][(distance > 5) & (distance < 12)] = 6  # a ring around (32, 32): its centre is the hole
        >>> present, boxes = class_map_boxes(maps)
        >>> heat, peaks, _, _ = dense_targets(present, boxes, cell_coverage(maps))
        >>> y, x = (int(i) for i in peaks[0, 5].nonzero()[0]); (y, x)
        (6, 6)
        >>> bool(maps[0, 4 * y + 1 : 4 * y + 3, 4 * x + 1 : 4 * x + 3].eq(6).all())  # its central pixels: ring
        True
        >>> float(cell_coverage(maps)[0, 5, y, x]), heat[0, 5, 7:9, 7:9].tolist()  # peak fully on it; hole: 0
        (1.0, [[0.0, 0.0], [0.0, 0.0]])
    """
    device = boxes.device
    height, width = coverage.shape[-2:]
    cell_x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5).view(1, 1, 1, width)
    cell_y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5).view(1, 1, height, 1)
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))  # (B, K, 1, 1), pixels
    centre_x, centre_y = (x0 + x1) / (2 * DET_STRIDE), (y0 + y1) / (2 * DET_STRIDE)  # cells
    sigma = (torch.maximum(x1 - x0, y1 - y0) / (6 * DET_STRIDE)).clamp(min=0.5)
    gauss = torch.exp(-((cell_x - centre_x) ** 2 + (cell_y - centre_y) ** 2) / (2 * sigma**2))
    gauss = gauss * present[..., None, None]
    # Peak candidates: the object's best-covered cells (fully on it where it has such cells); heat: the
    # cells at least half on it (or the best-covered ones).
    best_coverage = coverage.flatten(2).amax(-1)[..., None, None]  # (B, K, 1, 1)
    candidates = (gauss * coverage * (coverage >= best_coverage)).flatten(2)  # (B, K, h*w)
    best, best_index = candidates.max(-1)
    peaks = torch.zeros_like(candidates, dtype=torch.bool).scatter_(-1, best_index.unsqueeze(-1), True)
    peaks = peaks.view_as(coverage) & present[..., None, None]
    on_object = coverage >= best_coverage.clamp(max=_MIN_HEAT_COVERAGE)
    heat = (gauss * coverage * on_object / best.clamp(min=1e-30)[..., None, None]).clamp(max=1.0)
    heat = torch.where(peaks, 1.0, heat) * present[..., None, None]

    weights, owner = torch.maximum(gauss, heat).max(1)  # (B, h, w): the object nearest (in heat)
    owner_boxes = boxes.gather(1, owner.flatten(1).unsqueeze(-1).expand(-1, -1, 4))  # (B, h*w, 4)
    owner_boxes = owner_boxes.view(boxes.shape[0], height, width, 4).permute(0, 3, 1, 2)
    pixel_x, pixel_y = cell_x[0] * DET_STRIDE, cell_y[0] * DET_STRIDE  # (1, 1, w), (1, h, 1)
    distances = torch.stack(
        [
            pixel_x - owner_boxes[:, 0],
            pixel_y - owner_boxes[:, 1],
            owner_boxes[:, 2] - pixel_x,
            owner_boxes[:, 3] - pixel_y,
        ],
        dim=1,
    )
    inside = (distances > 0).all(1)
    weights = torch.where(inside & (weights > _REGRESSION_MIN_HEAT), weights, 0.0)
    return heat, peaks, distances, weights


def detection_loss(
    output: torch.Tensor, class_maps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, focal, box) losses of raw :class:`ShapesDetNet` output (B, 4 + K, h, w) for class maps (B, H, W)."""
    present, boxes = class_map_boxes(class_maps)
    heat, peaks, target, weights = dense_targets(present, boxes, cell_coverage(class_maps))
    logits = output[:, 4:]
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    probability = torch.sigmoid(logits)
    positive = -(1 - probability) ** 2 * log_p * peaks
    negative = -(probability**2) * (1 - heat) ** 4 * log_not_p * ~peaks
    num_objects = peaks.sum().clamp(min=1)
    focal = (positive.sum() + negative.sum()) / num_objects

    predicted = F.softplus(output[:, :4]) * DET_STRIDE  # (B, 4, h, w) distances, pixels
    left, top, right, bottom = predicted.unbind(1)
    t_left, t_top, t_right, t_bottom = target.unbind(1)
    area_p = (left + right) * (top + bottom)
    area_t = (t_left + t_right) * (t_top + t_bottom)
    inter = (torch.minimum(left, t_left) + torch.minimum(right, t_right)) * (
        torch.minimum(top, t_top) + torch.minimum(bottom, t_bottom)
    )
    union = area_p + area_t - inter
    enclosing = (torch.maximum(left, t_left) + torch.maximum(right, t_right)) * (
        torch.maximum(top, t_top) + torch.maximum(bottom, t_bottom)
    )
    giou = inter / union.clamp(min=1e-6) - (enclosing - union) / enclosing.clamp(min=1e-6)
    l1 = (predicted - target).abs().sum(1) / DET_STRIDE
    weight_sum = weights.sum().clamp(min=1e-6)
    box = (((1 - giou) + _L1_WEIGHT * l1) * weights).sum() / weight_sum
    return focal + box, focal.detach(), box.detach()


def heldout_ground_truth(n: int, seed: int = HELDOUT_SEED) -> tuple[torch.Tensor, list[tuple[np.ndarray, np.ndarray]]]:
    """Held-out images uint8 (N, 3, 64, 64) and their ground truth (boxes, labels) per image."""
    batch = generate(n, seed)
    images = torch.from_numpy(batch.images).permute(0, 3, 1, 2).contiguous()
    return images, [mask_boxes(masks) for masks in batch.masks]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    ground_truths: list[tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = 0.5,
    batch_size: int = 250,
) -> tuple[float, np.ndarray]:
    """Held-out (mAP, per-class AP) at ``iou_threshold`` of ``model`` (run in eval mode) on uint8 images."""
    was_training = model.training
    model.eval()
    try:
        found = []
        for start in range(0, len(images), batch_size):
            found += detect(model, images[start : start + batch_size].float() / 255.0, EVAL_SCORE_THRESHOLD)
    finally:
        model.train(was_training)
    return detection_average_precision(found, ground_truths, iou_threshold=iou_threshold)


def init_from_segmenter(model: ShapesDetNet, weights: str | Path = SEG_WEIGHTS_PATH) -> None:
    """Copy the shipped ShapesSegNet's ``stem``/``layer1``/``layer2``/``layer3``/``head`` (the same layers,
    same shapes) into ``model`` in place; ``box`` and ``cls`` keep their initialization."""
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    shared = {name: tensor for name, tensor in state_dict.items() if not name.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(shared, strict=False)
    if unexpected or any(not name.startswith(("box.", "cls.")) for name in missing):
        raise RuntimeError(f"segmenter weights do not fit ShapesDetNet: missing {missing}, unexpected {unexpected}")


def train(
    out_path: str | Path = DET_WEIGHTS_PATH,
    epochs: int = 1,
    seed: int = DEFAULT_SEED,
    train_size: int = 24_000,
    heldout_size: int = 1000,
    batch_size: int = 32,
    learning_rate: float = 4e-3,
    weight_decay: float = 5e-4,
    num_threads: int = 2,
    from_segmenter: bool = True,
) -> tuple[float, np.ndarray]:
    """Train ShapesDetNet, print progress per epoch, save the state_dict; return held-out (mAP@0.5, per-class AP).

    ``from_segmenter``: start the backbone and ``head`` from the shipped segmenter's weights
    (:func:`init_from_segmenter`); False starts from random initialization.
    Runs with ``num_threads`` torch threads and restores the previous setting on exit.
    """
    if seed in RESERVED_SEEDS:
        raise ValueError(f"seeds {RESERVED_SEEDS} are reserved for evaluation; got --seed {seed}")
    with torch_threads(num_threads):
        return _train(
            Path(out_path), epochs, seed, train_size, heldout_size, batch_size, learning_rate, weight_decay,
            from_segmenter,
        )


def _train(
    out_path: Path,
    epochs: int,
    seed: int,
    train_size: int,
    heldout_size: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    from_segmenter: bool,
) -> tuple[float, np.ndarray]:
    start_time = time.perf_counter()
    torch.manual_seed(seed)
    shuffle_generator = torch.Generator().manual_seed(seed)

    train_images, train_maps = render_segmentation_dataset(train_size, seed)
    heldout_images, heldout_truth = heldout_ground_truth(heldout_size)
    print(
        f"rendered {len(train_images)} training images (seed {seed}) and {len(heldout_images)} held-out "
        f"images (seed {HELDOUT_SEED}) in {time.perf_counter() - start_time:.1f} s",
        flush=True,
    )

    model = ShapesDetNet()
    if from_segmenter:
        init_from_segmenter(model)
        print(f"backbone and head initialized from {SEG_WEIGHTS_PATH.name}", flush=True)
    model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.15
    )

    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        permutation = torch.randperm(len(train_images), generator=shuffle_generator)
        sums, seen = np.zeros(3), 0
        for step in range(steps_per_epoch):
            batch_indices = permutation[step * batch_size : (step + 1) * batch_size]
            # One flip/transpose for image and class map alike: stack the map as a 4th channel.
            stacked = torch.cat([train_images[batch_indices], train_maps[batch_indices, None]], dim=1)
            stacked = random_dihedral(stacked, shuffle_generator)
            images = (stacked[:, :3].float() / 255.0).contiguous(memory_format=torch.channels_last)
            loss, focal, box = detection_loss(model(images), stacked[:, 3])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums += np.array([float(loss.detach()), float(focal), float(box)]) * len(batch_indices)
            seen += len(batch_indices)
            if step % 100 == 0:
                print(
                    f"  step {step}/{steps_per_epoch}: loss {float(loss.detach()):.4f} (focal {float(focal):.4f}, "
                    f"box {float(box):.4f}), {time.perf_counter() - epoch_start:.0f} s",
                    flush=True,
                )
        mean_ap, _ = evaluate(model, heldout_images, heldout_truth)
        loss_mean, focal_mean, box_mean = sums / max(seen, 1)
        print(
            f"epoch {epoch}/{epochs}: train loss {loss_mean:.4f} (focal {focal_mean:.4f}, box {box_mean:.4f}), "
            f"held-out mAP@0.5 {mean_ap:.4f}, {time.perf_counter() - epoch_start:.0f} s",
            flush=True,
        )

    mean_ap, per_class = evaluate(model, heldout_images, heldout_truth)
    save_state_dict_atomically(model, out_path)
    per_class_text = ", ".join(f"{name} {ap:.4f}" for name, ap in zip(DET_CLASSES, per_class))
    print(f"held-out mAP@0.5 {mean_ap:.4f} ({per_class_text})")
    print(f"wrote {out_path} in {time.perf_counter() - start_time:.0f} s total", flush=True)
    return mean_ap, per_class


def main(argv: list[str] | None = None) -> None:
    run_command_line(train, "Train the ShapesDetNet weights shipped with pyattr.", DET_WEIGHTS_PATH, 1, DEFAULT_SEED,
                     argv)


if __name__ == "__main__":
    main()
