"""Make docs/lrp_builtin.png: signed LRP relevance of each LRP composite on one generated image.

Red: positive relevance (evidence for the class), blue: negative (the ``bwr`` diverging colormap, zero at
the center, per-map symmetric range), drawn over the image with an opacity proportional to ``|R| / max|R|``:
where the relevance is zero the image shows through unchanged (a plain overlay of a white-at-zero colormap
bleaches it).

    python docs/make_lrp_figure.py      # writes docs/lrp_builtin.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from make_figures import CELL, class_grid
from PIL import Image

from pyattr import render
from pyattr.methods import build_method
from pyattr.zoo import load_builtin

COMPOSITES = ["epsilon_plus", "epsilon_gamma_box", "epsilon_plus_flat", "epsilon_alpha2_beta1"]


def main() -> None:
    model = load_builtin()

    def relevance(name: str, x: torch.Tensor, image, k: int) -> Image.Image:
        raw = build_method(f"lrp_{name}", model)(x, target=k).raw.numpy()
        big = np.asarray(Image.fromarray(image).resize((CELL, CELL), Image.NEAREST))
        over = render.heatmap_overlay_signed(raw, big[None], alpha=1.0, cmap="bwr", outlier_perc=0.5)[0]
        return Image.fromarray(over)

    class_grid(COMPOSITES, relevance, Path(__file__).parent / "lrp_builtin.png", header_size=12)


if __name__ == "__main__":
    main()
