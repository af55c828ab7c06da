"""Heatmap overlays for a batch: pyattr's fused C++ path vs the OpenCV chain vs matplotlib.

Run: python benchmarks/bench_render.py [--batch 64] [--map 7] [--size 224] [--repeats 25] [--out FILE]

The job: a batch of raw attribution maps (``--map`` x ``--map``, e.g. Grad-CAM at a ResNet's
last stage) and uint8 RGB images (``--size`` x ``--size``) -> jet overlays, alpha 0.5:
bilinear resize to the image size, per-map min-max, colormap, alpha blend.

Variants, all in one run:

* ``pyattr fused``: :func:`pyattr.render.heatmap_overlay` (C++, one pass per sample), all
  cores and one thread;
* ``pyattr steps``: the same through separate C++ calls (resize, normalize, overlay);
* ``pyattr NumPy``: the NumPy fallback (identical pixels);
* ``OpenCV chain``: per image ``cv2.resize`` (INTER_LINEAR) -> ``cv2.normalize`` (NORM_MINMAX to
  uint8) -> ``cv2.applyColorMap`` (JET) -> ``cv2.addWeighted``;
* ``matplotlib``: ``cv2.resize`` per image, NumPy min-max, ``matplotlib.colormaps["jet"](x, bytes=True)``
  over the batch, NumPy blend.

Variants are interleaved in every repeat (so that a busy machine slows them alike); the table
gives the median and interquartile range of the wall time, and the median CPU time of the
process (all threads). The ratios printed last are OpenCV chain / pyattr fused (all cores, and
one thread), the issue's goal being >= 4x on a 2-core machine; the CPU-time ratio does not
depend on how many cores other jobs leave free. A check line gives the largest difference
between pyattr (cmap ``jet_opencv``) and the OpenCV chain, in uint8 levels.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np

from pyattr import render


def opencv_chain(maps: np.ndarray, images: np.ndarray, alpha: float) -> np.ndarray:
    import cv2

    size = (images.shape[2], images.shape[1])
    out = np.empty_like(images)
    for i in range(len(maps)):
        resized = cv2.resize(maps[i], size, interpolation=cv2.INTER_LINEAR)
        levels = cv2.normalize(resized, None, 0, 255, cv2.NORM_MINMAX, dtype=cv2.CV_8U)
        colors = cv2.applyColorMap(levels, cv2.COLORMAP_JET)  # BGR
        out[i] = cv2.addWeighted(images[i], 1.0 - alpha, colors, alpha, 0.0)
    return out


def matplotlib_chain(maps: np.ndarray, images: np.ndarray, alpha: float) -> np.ndarray:
    import cv2
    import matplotlib

    size = (images.shape[2], images.shape[1])
    resized = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_LINEAR) for m in maps])
    lo = resized.min(axis=(1, 2), keepdims=True)
    hi = resized.max(axis=(1, 2), keepdims=True)
    unit = (resized - lo) / np.maximum(hi - lo, np.finfo(np.float32).tiny)
    colors = matplotlib.colormaps["jet"](unit, bytes=True)[..., :3]
    blended = (1.0 - alpha) * images + alpha * colors
    return (blended + 0.5).astype(np.uint8)


def steps(maps: np.ndarray, images: np.ndarray, alpha: float, backend: str) -> np.ndarray:
    size = images.shape[1:3]
    unit = render.normalize(render.resize(maps, size, backend=backend), backend=backend)
    return render.overlay(unit, images, alpha, "jet", backend=backend)


def measure(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, np.ndarray]:
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: (np.array(wall[name]) * 1e3, np.array(cpu[name]) * 1e3) for name in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--map", type=int, default=7, help="raw map side (default 7)")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, 1.0, (args.batch, args.map, args.map)).astype(np.float32)
    images = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    a = args.alpha

    variants: dict[str, Callable[[], object]] = {}
    if render.HAVE_C:
        variants["pyattr fused C++ (all cores)"] = lambda: render.heatmap_overlay(maps, images, a, "jet")
        variants["pyattr fused C++ (1 thread)"] = lambda: render.heatmap_overlay(maps, images, a, "jet", num_threads=1)
        variants["pyattr steps C++ (all cores)"] = lambda: steps(maps, images, a, "C++")
    variants["pyattr NumPy fallback"] = lambda: steps(maps, images, a, "numpy")
    try:
        import cv2

        cv_name = f"OpenCV chain ({cv2.getNumThreads()} threads)"
        variants[cv_name] = lambda: opencv_chain(maps, images, a)
        variants["matplotlib colormap path"] = lambda: matplotlib_chain(maps, images, a)
    except ImportError:
        cv_name = None

    lines = [
        (f"{args.batch} raw maps {args.map}x{args.map} -> {args.size}x{args.size} jet overlays (alpha {a}), "
         f"{args.repeats} interleaved runs after warm-up"),
        (f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
         f"load average {os.getloadavg()[0]:.1f} at start, pyattr backend {render.backend()}"),
        "",
        f"| {'variant':<32} | {'median ms':>9} | {'IQR ms':>7} | {'CPU ms':>7} | {'MPix/s':>7} |",
        f"|{'-' * 34}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 9}|",
    ]
    results = measure(variants, args.repeats)
    pixels = args.batch * args.size * args.size / 1e6
    for name, (wall, cpu) in results.items():
        q1, median, q3 = np.percentile(wall, [25, 50, 75])
        lines.append(f"| {name:<32} | {median:>9.2f} | {q3 - q1:>7.2f} | {np.median(cpu):>7.2f} | "
                     f"{pixels / median * 1e3:>7.1f} |")
    lines.append("")
    fused = "pyattr fused C++ (all cores)"
    if cv_name and fused in results:
        for name in (fused, "pyattr fused C++ (1 thread)"):
            ratio = np.median(results[cv_name][0]) / np.median(results[name][0])
            cpu_ratio = np.median(results[cv_name][1]) / np.median(results[name][1])
            verdict = "meets" if ratio >= 4 else "misses"
            lines.append(f"ratio OpenCV chain / {name}: {ratio:.1f}x wall ({verdict} the >= 4x goal), "
                         f"{cpu_ratio:.1f}x CPU time")
        ours = render.heatmap_overlay(maps, images, a, "jet_opencv")
        theirs = opencv_chain(maps, images[..., ::-1].copy(), a)[..., ::-1]  # OpenCV colors are BGR
        diff = np.abs(ours.astype(int) - theirs)
        lines.append(f"check: pyattr (jet_opencv) vs OpenCV chain: max {diff.max()} levels, "
                     f"{np.mean(diff > 1) * 100:.2f}% of values differ by more than 1")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
