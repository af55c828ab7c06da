"""Make the README's pictures of the two new tasks, with ``pyattr explain`` itself on generated samples.

    python docs/make_target_figures.py   # writes docs/{segmentation,similarity,detection}_gradcam.png

Segmentation: the built-in segmenter, each sample's largest predicted shape explained over its own predicted
pixels (image | those pixels | heatmap | overlay). Similarity: the built-in embedding, each generated query
explained by its cosine similarity to its reference (image | reference | heatmap | overlay). Both stack the
first three samples' figures (seed 30,000, the CLI's sample seed). Detection: the built-in detector, every
detected box explained (detections | one overlay per box), samples 3 and 4 (several shapes each).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pyattr.cli import main

HERE = Path(__file__).resolve().parent


def stacked(folder: Path, out: Path, pick: tuple[int, ...] = (0, 1, 2)) -> None:
    paths = sorted(folder.glob("*_figure.png"))
    figures = [Image.open(paths[i]).convert("RGB") for i in pick]
    width = max(f.width for f in figures)
    canvas = Image.new("RGB", (width, sum(f.height for f in figures)), "white")
    y = 0
    for f in figures:
        canvas.paste(f, (0, y))
        y += f.height
    canvas.save(out, optimize=True)


def make(task: str, out: Path, pick: tuple[int, ...] = (0, 1, 2)) -> None:
    folder = Path(tempfile.mkdtemp())
    try:
        assert main(["explain", "--task", task, "--samples", str(max(pick) + 1), "--out", str(folder), "--quiet"]) == 0
        stacked(folder, out, pick)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"wrote {out} ({np.asarray(Image.open(out)).shape[1]} px wide)")


if __name__ == "__main__":
    make("segmentation", HERE / "segmentation_gradcam.png")
    make("similarity", HERE / "similarity_gradcam.png")
    make("detection", HERE / "detection_gradcam.png", pick=(3, 4))  # the samples with several shapes
