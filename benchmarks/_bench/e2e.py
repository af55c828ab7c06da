"""End to end: a folder of JPEG/PNG files in, one overlay PNG per image out.

The folder holds generated images of mixed sizes and formats (seeded: smooth color fields with
shapes). Every pipeline does the same work per image: decode, resize to the model's input size (224 x 224),
normalize (ImageNet mean/std), Grad-CAM of the arg-max class, a jet overlay at alpha 0.5 on the
resized RGB image, PNG encode (zlib level 1) and write. Images go through the model in batches.

- ``pyattr eager``: Pillow decode/resize, ``pyattr.GradCAM``, the fused C++ overlay
  (:func:`pyattr.render.heatmap_overlay` on the raw layer-resolution maps), Pillow PNG;
- ``pyattr ONNX``: the same with the exported graph in onnxruntime (no torch in the loop);
- ``pytorch-grad-cam``: its usual pipeline (README / tutorial): ``cv2.imread``, ``cv2.resize``,
  ``preprocess_image``, ``GradCAM(...)(input_tensor, targets=None)``, then per image
  ``show_cam_on_image(rgb, cam, use_rgb=True)`` and ``cv2.imwrite``. Given the same batches
  (its tutorial runs one image at a time; batching only helps it).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SIZES = [(320, 240), (500, 375), (224, 224), (640, 480), (375, 500), (256, 256)]


def make_folder(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` images (JPEG and PNG alternately, sizes from :data:`SIZES`) in ``folder``."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([np.sin(xx / (20 + 10 * c) + rng.uniform(0, 6)) * np.cos(yy / (25 + 5 * c))
                         for c in range(3)], -1)
        rgb = ((base * 0.5 + 0.5) * 255).astype(np.uint8)
        image = Image.fromarray(rgb)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
            size = int(rng.integers(30, 60))
            color = tuple(int(v) for v in rng.integers(0, 255, 3))
            draw.ellipse([x0, y0, x0 + size, y0 + size], fill=color)
        path = folder / (f"img_{i:03d}.jpg" if i % 2 == 0 else f"img_{i:03d}.png")
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths


def _batches(paths: list[Path], batch: int):
    for start in range(0, len(paths), batch):
        yield paths[start:start + batch]


def _load_pil(paths: list[Path], size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR))
                     for p in paths])


def _normalize(rgb: np.ndarray) -> np.ndarray:
    x = (rgb.astype(np.float32) / 255 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _save_pil(overlays: np.ndarray, paths: list[Path], out: Path) -> None:
    from PIL import Image

    for overlay, p in zip(overlays, paths):
        Image.fromarray(overlay).save(out / f"{p.stem}_gradcam.png", compress_level=1)


def pyattr_eager(model, layer_name: str, device: torch.device, batch: int, size: int
                 ) -> Callable[[list[Path], Path], None]:
    import pyattr
    from pyattr import render

    cam = pyattr.GradCAM(model, layer_name)

    def run(paths: list[Path], out: Path) -> None:
        for chunk in _batches(paths, batch):
            rgb = _load_pil(chunk, size)
            result = cam(torch.from_numpy(_normalize(rgb)).to(device))
            overlays = render.heatmap_overlay(result.raw.cpu().numpy(), rgb, alpha=0.5, cmap="jet")
            _save_pil(overlays, chunk, out)
    return run


def pyattr_onnx(session, batch: int, size: int) -> Callable[[list[Path], Path], None]:
    from pyattr import render

    def run(paths: list[Path], out: Path) -> None:
        for chunk in _batches(paths, batch):
            rgb = _load_pil(chunk, size)
            x = _normalize(rgb)
            _, _, raw, _ = session.run(None, {"images": x, "target": np.full(len(x), -1, np.int64)})
            overlays = render.heatmap_overlay(raw, rgb, alpha=0.5, cmap="jet")
            _save_pil(overlays, chunk, out)
    return run


def pytorch_grad_cam(model, layer, device: torch.device, batch: int, size: int
                     ) -> Callable[[list[Path], Path], None]:
    import cv2
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import preprocess_image, show_cam_on_image

    def run(paths: list[Path], out: Path) -> None:
        with GradCAM(model=model, target_layers=[layer]) as cam:
            for chunk in _batches(paths, batch):
                rgbs = [np.float32(cv2.resize(cv2.imread(str(p))[:, :, ::-1], (size, size))) / 255 for p in chunk]
                input_tensor = torch.cat([preprocess_image(rgb, mean=MEAN.tolist(), std=STD.tolist())
                                          for rgb in rgbs]).to(device)
                grayscale = cam(input_tensor=input_tensor, targets=None)
                for rgb, g, p in zip(rgbs, grayscale, chunk):
                    visualization = show_cam_on_image(rgb, g, use_rgb=True)
                    cv2.imwrite(str(out / f"{p.stem}_gradcam.png"), visualization[:, :, ::-1])
        model.zero_grad(set_to_none=True)
    return run


def folder_runner(pipeline: Callable[[list[Path], Path], None], paths: list[Path], out: Path) -> Callable[[], None]:
    def run():
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        pipeline(paths, out)
        written = len(list(out.glob("*.png")))
        if written != len(paths):
            raise RuntimeError(f"{written} overlays written for {len(paths)} images")
    return run
