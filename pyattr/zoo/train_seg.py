"""Train the shipped ShapesSegNet weights: ``python -m pyattr.zoo.train_seg``.

Per-pixel cross-entropy over the seven classes of :data:`pyattr.zoo.segmodel.SEG_CLASSES` (background
0, shape class ``k`` at ``k + 1``) on a fixed set of 24,000 images rendered by
:func:`pyattr.zoo.shapes.generate` from ``--seed`` (default :data:`DEFAULT_SEED`), their masks turned
into class maps by :func:`pyattr.zoo.segmodel.class_map`. Images and class maps get the same random
flip/transpose (:func:`pyattr.zoo.train.random_dihedral` on the image with its class map stacked as a
fourth channel). AdamW (peak lr 5e-3, weight decay 5e-4), batch 32, one-cycle schedule over
``--epochs`` epochs (default 2: 1500 steps). After every epoch the script prints the training loss
and the held-out mIoU on 1000 images rendered from seed 10_000 (:data:`pyattr.zoo.train.HELDOUT_SEED`);
at the end the per-class IoU too.

The shipped weights (``python -m pyattr.zoo.train_seg``, seed 1, 2 epochs) reach held-out mIoU 0.948
(per class in :data:`pyattr.zoo.SEG_INFO`; 0.939 after the first epoch). That run took 35 min on the
shared 2-core dev machine under a load of 3-6 (other jobs running); a training step takes 0.17 s on two
idle cores, so about 6 min there, rendering included. ``benchmarks/results/train_seg.log`` has its output.

IoU is computed over the whole held-out set (one confusion matrix over every pixel), per class
``TP / (TP + FP + FN)``; mIoU is the mean over the seven classes, background included.

Seeds: training refuses the held-out seed 10_000 and the benchmarks' seeds 40_000 (pointing-game
test images) and 45_000 (validation images). The run is seeded (``torch.manual_seed``, deterministic
data, single process), so it reproduces the same weights on the same machine, software and thread
count; across CPUs, thread counts or torch versions only the accuracy is expected to reproduce.

Usage::

    python -m pyattr.zoo.train_seg                           # full run, writes pyattr/zoo/shapesseg.pt
    python -m pyattr.zoo.train_seg --quick --out /tmp/s.pt   # seconds: smoke test of the whole pipeline
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pyattr.zoo.segmodel import NUM_SEG_CLASSES, SEG_CLASSES, SEG_WEIGHTS_PATH, ShapesSegNet, class_map
from pyattr.zoo.shapes import ShapesBatch
from pyattr.zoo.train import (
    HELDOUT_SEED,
    random_dihedral,
    render_dataset,
    run_command_line,
    save_state_dict_atomically,
    torch_threads,
)

DEFAULT_SEED = 1
"""Training seed of the shipped weights."""

RESERVED_SEEDS = (HELDOUT_SEED, 40_000, 45_000)
"""Held-out (10,000), pointing-game test (40,000) and validation (45,000) seeds: never trained on."""


def _class_maps(batch: ShapesBatch) -> np.ndarray:
    return class_map(batch.masks)


def render_segmentation_dataset(n: int, seed: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N,3,H,W) and class maps uint8 (N,H,W) of ``seed``'s stream (see :func:`class_map`)."""
    return render_dataset(n, seed, size, targets=_class_maps)


@torch.no_grad()
def confusion_matrix(
    model: nn.Module, images: torch.Tensor, class_maps: torch.Tensor, batch_size: int = 100
) -> torch.Tensor:
    """Pixel confusion matrix (K, K), int64, rows = true class, columns = predicted, of ``model`` in eval
    mode on uint8 images (N,3,H,W) with class maps (N,H,W)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(NUM_SEG_CLASSES * NUM_SEG_CLASSES, dtype=torch.int64)
    try:
        for start in range(0, len(images), batch_size):
            predicted = model(images[start : start + batch_size].float() / 255.0).argmax(1)
            truth = class_maps[start : start + batch_size].long()
            counts += torch.bincount(
                (truth * NUM_SEG_CLASSES + predicted).flatten(), minlength=NUM_SEG_CLASSES**2
            )
    finally:
        model.train(was_training)
    return counts.view(NUM_SEG_CLASSES, NUM_SEG_CLASSES)


def iou_from_confusion(confusion: torch.Tensor) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU (K,)) from a confusion matrix; a class absent from both truth and prediction
    has IoU ``nan`` and is left out of the mean.

    Example:
        >>> iou_from_confusion(torch.tensor([[3, 1], [0, 4]]))[1].round(3).tolist()
        [0.75, 0.8]
    """
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    per_class = (true_positive / union).numpy()  # 0/0 -> nan
    valid = ~np.isnan(per_class)
    return (float(per_class[valid].mean()) if valid.any() else float("nan")), per_class


def train(
    out_path: str | Path = SEG_WEIGHTS_PATH,
    epochs: int = 2,
    seed: int = DEFAULT_SEED,
    train_size: int = 24_000,
    heldout_size: int = 1000,
    batch_size: int = 32,
    learning_rate: float = 5e-3,
    weight_decay: float = 5e-4,
    num_threads: int = 2,
) -> tuple[float, np.ndarray]:
    """Train ShapesSegNet, print progress per epoch, save the state_dict; return held-out (mIoU, per-class IoU).

    Runs with ``num_threads`` torch threads and restores the previous setting on exit.
    """
    if seed in RESERVED_SEEDS:
        raise ValueError(f"seeds {RESERVED_SEEDS} are reserved for evaluation; got --seed {seed}")
    with torch_threads(num_threads):
        return _train(
            Path(out_path), epochs, seed, train_size, heldout_size, batch_size, learning_rate, weight_decay
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
) -> tuple[float, np.ndarray]:
    start_time = time.perf_counter()
    torch.manual_seed(seed)
    shuffle_generator = torch.Generator().manual_seed(seed)

    train_images, train_maps = render_segmentation_dataset(train_size, seed)
    heldout_images, heldout_maps = render_segmentation_dataset(heldout_size, HELDOUT_SEED)
    print(
        f"rendered {len(train_images)} training images (seed {seed}) and {len(heldout_images)} held-out "
        f"images (seed {HELDOUT_SEED}) in {time.perf_counter() - start_time:.1f} s",
        flush=True,
    )

    model = ShapesSegNet().to(memory_format=torch.channels_last)  # faster convolutions on CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.15
    )
    loss_function = nn.CrossEntropyLoss()

    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        permutation = torch.randperm(len(train_images), generator=shuffle_generator)
        loss_sum, seen = 0.0, 0
        for step in range(steps_per_epoch):
            batch_indices = permutation[step * batch_size : (step + 1) * batch_size]
            # One flip/transpose for image and class map alike: stack the map as a 4th channel.
            stacked = torch.cat([train_images[batch_indices], train_maps[batch_indices, None]], dim=1)
            stacked = random_dihedral(stacked, shuffle_generator)
            images = (stacked[:, :3].float() / 255.0).contiguous(memory_format=torch.channels_last)
            loss = loss_function(model(images), stacked[:, 3].long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(batch_indices)
            seen += len(batch_indices)
        mean_iou, _ = iou_from_confusion(confusion_matrix(model, heldout_images, heldout_maps))
        print(
            f"epoch {epoch}/{epochs}: train loss {loss_sum / max(seen, 1):.4f}, "
            f"held-out mIoU {mean_iou:.4f}, {time.perf_counter() - epoch_start:.0f} s",
            flush=True,
        )

    mean_iou, per_class = iou_from_confusion(confusion_matrix(model, heldout_images, heldout_maps))
    save_state_dict_atomically(model, out_path)
    per_class_text = ", ".join(f"{name} {iou:.4f}" for name, iou in zip(SEG_CLASSES, per_class))
    print(f"held-out mIoU {mean_iou:.4f} ({per_class_text})")
    print(f"wrote {out_path} in {time.perf_counter() - start_time:.0f} s total", flush=True)
    return mean_iou, per_class


def main(argv: list[str] | None = None) -> None:
    run_command_line(train, "Train the ShapesSegNet weights shipped with pyattr.", SEG_WEIGHTS_PATH, 2, DEFAULT_SEED,
                     argv)


if __name__ == "__main__":
    main()
