"""Train the shipped ShapesNet weights: ``python -m pyattr.zoo.train``.

Multi-label training (``BCEWithLogitsLoss``) on a fixed set of 24,000 images rendered by
:func:`pyattr.zoo.shapes.generate` from ``--seed`` (default :data:`DEFAULT_SEED`), with random flips and transposes
(the dihedral group of the square: no class changes under them), AdamW (peak lr 5e-3, weight
decay 5e-4), batch 32 and a one-cycle schedule over 4 epochs (3000 steps, 96k samples). After every
epoch the script prints the training loss and the macro mean average precision on 2000 held-out
images rendered from seed 10_000, a seed never used for training.

The fixed low-pass filter at the end of ``layer3`` (:class:`pyattr.zoo.model.Blur2d`) is switched off
while training and on for the held-out score and the saved model. It has no trainable weight, and the
global average pool of a blurred map equals that of the unblurred one up to the border, so the objective
barely changes; but in four runs trained *with* it, the network learnt to put a ring's evidence in the
ring's hole (which the blur then made the map's maximum: Grad-CAM hit rings 5-62% on the validation
images), while the five runs trained without it and blurred afterwards hit rings 58-80%.

The training seed: runs differ a lot in where their evidence sits (Grad-CAM's pointing game on the
validation images, seed 45,000, ranged from 90.0% to 94.3% over seeds 0 and 2-5, and from 75.6% to 90.2%
without the blur), so :data:`DEFAULT_SEED` is the seed of the best of those runs on the *validation*
images; the README reports the test images (seed 40,000). ``benchmarks/results/seed_selection.md`` has
every run.

The network sits on a plateau (held-out mAP ~0.5) until it has learnt rotation-invariant corner
features; with this recipe it leaves it after ~25-30k samples and reaches mAP > 0.999 by ~50k. Short
batch-64 runs with shorter schedules had only reached ~0.75 at 32k samples (a rough comparison).

The run is seeded (``torch.manual_seed``, deterministic data, single process), so it reproduces
the same weights on the same machine, software and thread count; bit-exact reproduction across CPUs,
thread counts or torch versions is not guaranteed (float reduction order differs), only the accuracy.

Threads: the default is 2 (the dev machine's cores). On a machine shared with other CPU jobs, 2
OpenMP threads can be several times *slower* than 1 (each step waits at barriers for a descheduled
thread); pass ``--threads 1`` there.

Usage::

    python -m pyattr.zoo.train                           # full run, writes pyattr/zoo/shapesnet.pt
    python -m pyattr.zoo.train --quick --out /tmp/s.pt   # seconds: smoke test of the whole pipeline
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pyattr._files import written_atomically
from pyattr.zoo.model import WEIGHTS_PATH, ShapesNet
from pyattr.zoo.shapes import SHAPE_CLASSES, ShapesBatch, generate, mean_average_precision

HELDOUT_SEED = 10_000
"""Seed of the held-out evaluation images; training refuses to use it."""

DEFAULT_SEED = 3
"""Training seed of the shipped weights: the best of seeds 0 and 2-5 on the validation pointing game (see above)."""

_GENERATE_CHUNK = 2000  # render in chunks and drop the masks, which training does not need


def _multi_hot_labels(batch: ShapesBatch) -> np.ndarray:
    return batch.labels


def render_dataset(
    n: int,
    seed: int,
    size: int = 64,
    targets: Callable[[ShapesBatch], np.ndarray] = _multi_hot_labels,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` images of ``seed``'s stream as (uint8 (N,3,H,W), ``targets`` (N,...)) tensors.

    ``targets`` maps a rendered :class:`~pyattr.zoo.shapes.ShapesBatch` to the training targets; the
    default is the multi-hot labels, float32 (N,6); the segmentation training
    (:mod:`pyattr.zoo.train_seg`) passes per-pixel class maps. Rendered in chunks whose masks are
    dropped once ``targets`` has read them, so memory stays at the images' 12 KiB each plus the targets.
    """
    images, labels = [], []
    for start in range(0, n, _GENERATE_CHUNK):
        chunk = generate(min(_GENERATE_CHUNK, n - start), seed, size, start=start)
        images.append(torch.from_numpy(chunk.images).permute(0, 3, 1, 2).contiguous())
        labels.append(torch.from_numpy(targets(chunk)))
    if not images:
        empty = generate(0, seed, size)
        return torch.empty(0, 3, size, size, dtype=torch.uint8), torch.from_numpy(targets(empty))
    return torch.cat(images), torch.cat(labels)


def random_dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply an independent random flip/transpose (one of 8 symmetries of the square) per image.

    Shapes: (N, C, H, H) -> (N, C, H, H). Every shape class is closed under these maps.
    """
    flips = torch.rand(images.shape[0], 3, generator=generator) < 0.5
    images = torch.where(flips[:, 0, None, None, None], images.flip(2), images)
    images = torch.where(flips[:, 1, None, None, None], images.flip(3), images)
    return torch.where(flips[:, 2, None, None, None], images.transpose(2, 3), images)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Logits (N, 6) of ``model`` in eval mode for uint8 images (N, 3, H, W)."""
    was_training = model.training
    model.eval()
    try:
        outputs = [
            model(images[i : i + batch_size].float() / 255.0) for i in range(0, len(images), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0, len(SHAPE_CLASSES))


def save_state_dict_atomically(model: nn.Module, out_path: Path) -> None:
    """Write ``model.state_dict()`` to a temp file next to ``out_path``, then publish it in one rename
    (:mod:`pyattr._files`, as exported graphs and PNGs are written)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # contiguous(): plain NCHW tensors whatever memory format the model was trained in.
    state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with written_atomically(out_path, ".tmp") as tmp:
        torch.save(state_dict, tmp)


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(num_threads)``, restoring the previous count after (the
    training scripts of the built-in models)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)


def train(
    out_path: Path = WEIGHTS_PATH,
    epochs: int = 4,
    seed: int = DEFAULT_SEED,
    train_size: int = 24_000,
    heldout_size: int = 2000,
    batch_size: int = 32,
    learning_rate: float = 5e-3,
    weight_decay: float = 5e-4,
    num_threads: int = 2,
) -> tuple[float, np.ndarray]:
    """Train ShapesNet, print progress per epoch, save the state_dict; return held-out (mAP, per-class AP).

    Runs with ``num_threads`` torch threads and restores the previous setting on exit.
    """
    if seed == HELDOUT_SEED:
        raise ValueError(f"seed {HELDOUT_SEED} is reserved for the held-out set")
    with torch_threads(num_threads):
        return _train(
            out_path, epochs, seed, train_size, heldout_size, batch_size, learning_rate, weight_decay
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

    train_images, train_labels = render_dataset(train_size, seed)
    heldout_images, heldout_labels = render_dataset(heldout_size, HELDOUT_SEED)
    print(
        f"rendered {len(train_images)} training images (seed {seed}) and {len(heldout_images)} held-out "
        f"images (seed {HELDOUT_SEED}) in {time.perf_counter() - start_time:.1f} s",
        flush=True,
    )

    model = ShapesNet().to(memory_format=torch.channels_last)  # ~10% faster convolutions on CPU
    blur = model.layer3.blur
    model.layer3.blur = nn.Identity()  # trained without the fixed low-pass; see the module docstring
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.15
    )
    loss_function = nn.BCEWithLogitsLoss()

    mean_ap, per_class = float("nan"), np.full(len(SHAPE_CLASSES), np.nan)
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        permutation = torch.randperm(len(train_images), generator=shuffle_generator)
        loss_sum, seen = 0.0, 0
        for step in range(steps_per_epoch):
            batch_indices = permutation[step * batch_size : (step + 1) * batch_size]
            images = random_dihedral(train_images[batch_indices], shuffle_generator).float() / 255.0
            images = images.contiguous(memory_format=torch.channels_last)
            labels = train_labels[batch_indices]
            loss = loss_function(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(batch_indices)
            seen += len(batch_indices)
        logits = predict_logits(model, heldout_images)
        mean_ap, per_class = mean_average_precision(logits.numpy(), heldout_labels.numpy())
        print(
            f"epoch {epoch}/{epochs}: train loss {loss_sum / max(seen, 1):.4f}, "
            f"held-out mAP {mean_ap:.4f}, {time.perf_counter() - epoch_start:.0f} s",
            flush=True,
        )

    model.layer3.blur = blur  # the shipped model: scored and saved with the low-pass on
    logits = predict_logits(model, heldout_images)
    mean_ap, per_class = mean_average_precision(logits.numpy(), heldout_labels.numpy())
    save_state_dict_atomically(model, out_path)
    per_class_text = ", ".join(f"{name} {ap:.4f}" for name, ap in zip(SHAPE_CLASSES, per_class))
    print(f"held-out mAP {mean_ap:.4f} with the layer3 blur ({per_class_text})")
    print(f"wrote {out_path} in {time.perf_counter() - start_time:.0f} s total", flush=True)
    return mean_ap, per_class


def run_command_line(train_fn, description: str, default_out: Path, default_epochs: int, default_seed: int,
                     argv: list[str] | None = None) -> None:
    """The training scripts' shared command line (``--out --epochs --seed --quick --threads``): calls
    ``train_fn(out, epochs=, seed=, num_threads=[, train_size=, heldout_size=])``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_out, help="where to write the state_dict")
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"number of epochs (default {default_epochs}; 1 with --quick)"
    )
    parser.add_argument(
        "--seed", type=int, default=default_seed, help=f"training data and initialization seed (default {default_seed})"
    )
    parser.add_argument("--quick", action="store_true", help="tiny run (seconds) for smoke testing")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    if args.quick:
        train_fn(args.out, epochs=args.epochs or 1, seed=args.seed, train_size=256, heldout_size=128,
                 num_threads=args.threads)
    else:
        train_fn(args.out, epochs=args.epochs or default_epochs, seed=args.seed, num_threads=args.threads)


def main(argv: list[str] | None = None) -> None:
    run_command_line(train, "Train the ShapesNet weights shipped with pyattr.", WEIGHTS_PATH, 4, DEFAULT_SEED, argv)


if __name__ == "__main__":
    main()
