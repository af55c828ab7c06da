"""Pictures of explanations: overlays and side-by-side figures (Pillow, host-side rendering)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import render
from ._files import publish, temp_beside


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def overlay_image(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """(H, W, 3) uint8 image + (H, W) map in [0, 1] at the same size -> (H, W, 3) uint8 overlay."""
    return render.overlay(heatmap[None], image[None], alpha=alpha, cmap=cmap)[0]


def signed_overlay_image(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5,
                         cmap: str = "bwr") -> np.ndarray:
    """(H, W, 3) uint8 image + (H, W) centred signed map in [0, 1] (0.5 = zero) -> (H, W, 3) uint8 overlay
    whose opacity grows with ``|value|`` (:func:`pyattr.render.overlay_signed`): the photo shows through
    where the attribution is 0."""
    return render.overlay_signed(heatmap[None], image[None], alpha=alpha, cmap=cmap)[0]


def side_by_side(image: np.ndarray, heatmap: np.ndarray, overlay: np.ndarray, title: str,
                 cmap: str = "jet", panel: int = 256, *,
                 context: tuple[np.ndarray, str] | None = None) -> Image.Image:
    """A figure: image | heatmap | overlay, each ``panel`` pixels high, with a title line.

    ``context``: an extra (H', W', 3) uint8 picture and its label, drawn between the image and the heatmap:
    the region mask of a segmentation target or the reference image of a similarity target
    (image | mask | heatmap | overlay). Each panel keeps its own aspect ratio.
    """
    pictures = [(image, "image")]
    if context is not None:
        pictures.append(context)
    pictures += [(render.colorize(heatmap[None], cmap=cmap)[0], "heatmap"), (overlay, "overlay")]
    panels = []
    for array, label in pictures:
        h, w = array.shape[:2]
        scale = panel / h
        resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
        panels.append((Image.fromarray(array).resize((max(1, round(w * scale)), panel), resample), label))
    font = _font(16)
    pad, head = 8, 30
    fig = Image.new("RGB", (sum(p.width for p, _ in panels) + (len(panels) + 1) * pad, panel + head + pad), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((pad, 6), title, fill="black", font=font)
    x = pad
    for p, label in panels:
        fig.paste(p, (x, head))
        draw.text((x + 4, head + 4), label, fill="white", font=_font(12), stroke_width=2, stroke_fill="black")
        x += p.width + pad
    return fig


def _panel(array: np.ndarray, panel: int) -> tuple[Image.Image, float]:
    h, w = array.shape[:2]
    scale = panel / h
    resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
    return Image.fromarray(array).resize((max(1, round(w * scale)), panel), resample), scale


def detection_figure(image: np.ndarray, boxes: np.ndarray, labels: list[str], overlays: list[np.ndarray],
                     title: str, panel: int = 192) -> Image.Image:
    """A figure of a detection explanation: the image with every box, then one overlay per box with its box.

    Args:
        image: (H, W, 3) uint8.
        boxes: (B, 4) xyxy in the image's pixels.
        labels: one text per box (e.g. ``"circle 0.98"``), drawn above its panel with the box's number.
        overlays: one (H, W, 3) uint8 heatmap overlay per box (the box's own map).
        title: the figure's title line.
        panel: each panel's height in pixels (boxes are drawn at that resolution, 2 pixels wide).
    """
    from .render import BOX_PALETTE, draw_boxes

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    colors = BOX_PALETTE[np.arange(len(boxes)) % len(BOX_PALETTE)]
    base, scale = _panel(image, panel)
    first = draw_boxes(np.asarray(base), boxes * scale, colors=colors, thickness=2) if len(boxes) else np.asarray(base)
    pictures = [(first, "detections" if len(boxes) else "no detection")]
    for b, (over, label) in enumerate(zip(overlays, labels)):
        big, _ = _panel(over, panel)
        pictures.append((draw_boxes(np.asarray(big), boxes[b:b + 1] * scale, colors=colors[b], thickness=2),
                         f"#{b + 1} {label}"))
    font = _font(16)
    pad, head = 8, 30
    width = sum(p.shape[1] for p, _ in pictures) + (len(pictures) + 1) * pad
    fig = Image.new("RGB", (width, panel + head + pad), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((pad, 6), title, fill="black", font=font)
    x = pad
    for b, (p, label) in enumerate(pictures):
        fig.paste(Image.fromarray(p), (x, head))
        if b == 0:
            for i, box in enumerate(boxes):
                draw.text((x + float(box[0]) * scale + 3, head + float(box[1]) * scale + 2), str(i + 1),
                          fill=tuple(int(c) for c in colors[i]), font=_font(14), stroke_width=2, stroke_fill="black")
        draw.text((x + 4, head + 4) if b == 0 else (x + 4, head + panel - 20), label, fill="white", font=_font(12),
                  stroke_width=2, stroke_fill="black")
        x += p.shape[1] + pad
    return fig


def mask_image(mask: np.ndarray) -> np.ndarray:
    """(H, W) region weights (>= 0; 1 = fully inside) -> (H, W, 3) uint8 picture, white inside."""
    level = (np.clip(mask, 0, 1) * 255).astype(np.uint8)
    return np.repeat(level[:, :, None], 3, axis=2)


def save_png_atomic(picture: Image.Image | np.ndarray, path: str | os.PathLike) -> Path:
    """Write a PNG through a temporary file and a rename: never a partial file at ``path``."""
    path = Path(path)
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    tmp = temp_beside(path, ".png")
    try:
        picture.save(tmp, format="PNG")
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
