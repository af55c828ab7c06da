"""Make the README's figure: one generated image with three shapes, each class explained by several methods.

Unsigned methods (CAMs, saliency, guided backprop): the normalized map on ``jet``, opacity 0.5.
Signed methods (Integrated Gradients): the raw attribution centred on ``bwr`` (red for the class, blue
against, zero at the white middle), with an opacity proportional to ``|A|`` (full at the 99th percentile of ``|A|``, captum's ``outlier_perc``), so that the image
shows through unchanged where the attribution is zero -- what ``pyattr explain`` draws.

    python docs/make_figures.py      # writes docs/builtin_methods.png
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pyattr import render
from pyattr.figures import _font
from pyattr.methods import build_method
from pyattr.zoo import SHAPE_CLASSES, SHAPESNET_LAYER, generate, load_builtin

METHODS = ["gradcam", "gradcampp", "scorecam", "saliency", "integratedgradients", "guidedbackprop"]
SEED, INDEX, CELL = 30_000, 3, 160


def class_grid(columns: list[str], cell: Callable[[str, torch.Tensor, np.ndarray, int], Image.Image],
               out: Path, header_size: int = 14) -> None:
    """The generated image (seed ``SEED``, index ``INDEX``), one row per class it holds: the image, then
    ``cell(column, x, image, class)`` (a ``CELL`` x ``CELL`` picture) for each column; saved to ``out``."""
    data = generate(INDEX + 1, seed=SEED)
    image = data.images[INDEX]
    classes = [int(k) for k in np.flatnonzero(data.labels[INDEX])]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    head, left = 28, 90
    fig = Image.new("RGB", (left + CELL * (len(columns) + 1), head + CELL * len(classes)), "white")
    draw = ImageDraw.Draw(fig)
    for j, name in enumerate(["image", *columns]):
        draw.text((left + j * CELL + 6, 6), name, fill="black", font=_font(header_size))
    for i, k in enumerate(classes):
        y = head + i * CELL
        draw.text((6, y + CELL // 2 - 8), SHAPE_CLASSES[k], fill="black", font=_font(14))
        fig.paste(Image.fromarray(image).resize((CELL, CELL), Image.NEAREST), (left, y))
        for j, name in enumerate(columns, start=1):
            fig.paste(cell(name, x, image, k), (left + j * CELL, y))
    fig.save(out)
    print(f"wrote {out}")


def main() -> None:
    model = load_builtin()

    def overlay(name: str, x: torch.Tensor, image: np.ndarray, k: int) -> Image.Image:
        method = build_method(name, model, SHAPESNET_LAYER)
        result = method(x, target=k)
        if method.signed:
            over = render.heatmap_overlay_signed(result.raw.numpy(), image[None], alpha=1.0, cmap="bwr",
                                                  outlier_perc=1.0)[0]
        else:
            over = render.overlay(result.maps.numpy(), image[None], alpha=0.5, cmap="jet")[0]
        return Image.fromarray(over).resize((CELL, CELL), Image.NEAREST)

    class_grid(METHODS, overlay, Path(__file__).parent / "builtin_methods.png")


if __name__ == "__main__":
    main()
