"""Make docs/lrp_builtin.png: signed LRP relevance of each LRP composite on one generated image.

Red: positive relevance (evidence for the class), blue: negative, white: none (the ``seismic``
diverging colormap, zero at the center, per-map symmetric range).

    python docs/make_lrp_figure.py      # writes docs/lrp_builtin.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pyattr import render
from pyattr.figures import _font
from pyattr.methods import build_method
from pyattr.zoo import SHAPE_CLASSES, generate, load_builtin

COMPOSITES = ["epsilon_plus", "epsilon_gamma_box", "epsilon_plus_flat", "epsilon_alpha2_beta1"]
SEED, INDEX, CELL = 30_000, 3, 160  # the image of docs/builtin_methods.png


def main() -> None:
    model = load_builtin()
    data = generate(INDEX + 1, seed=SEED)
    image = data.images[INDEX]
    classes = [int(k) for k in np.flatnonzero(data.labels[INDEX])]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    head, left = 28, 90
    fig = Image.new("RGB", (left + CELL * (len(COMPOSITES) + 1), head + CELL * len(classes)), "white")
    draw = ImageDraw.Draw(fig)
    for j, name in enumerate(["image", *COMPOSITES]):
        draw.text((left + j * CELL + 6, 6), name, fill="black", font=_font(12))
    for i, k in enumerate(classes):
        y = head + i * CELL
        draw.text((6, y + CELL // 2 - 8), SHAPE_CLASSES[k], fill="black", font=_font(14))
        fig.paste(Image.fromarray(image).resize((CELL, CELL), Image.NEAREST), (left, y))
        for j, name in enumerate(COMPOSITES, start=1):
            raw = build_method(f"lrp_{name}", model)(x, target=k).raw.numpy()
            colored = render.heatmap(raw, (CELL, CELL), cmap="seismic", sign="centered", outlier_perc=0.5)[0]
            fig.paste(Image.fromarray(colored), (left + j * CELL, y))
    out = Path(__file__).parent / "lrp_builtin.png"
    fig.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
