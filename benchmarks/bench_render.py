"""Latency of overlaying a batch of attribution maps on images: pyattr._C vs NumPy vs OpenCV.

Run: python benchmarks/bench_render.py [--batch 64] [--size 224] [--repeats 15]

Each variant is warmed up, then timed ``--repeats`` times; the table gives the median and
the interquartile range. The OpenCV chain (per image: float map -> uint8, applyColorMap
JET, addWeighted) is a speed reference only: its JET table differs slightly from
matplotlib's and it returns BGR colors.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

from pyattr import render


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 2) -> np.ndarray:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.array(times) * 1e3


def opencv_overlay(maps: np.ndarray, images: np.ndarray, alpha: float) -> np.ndarray:
    import cv2

    out = np.empty_like(images)
    for i in range(len(maps)):
        colors = cv2.applyColorMap(cv2.convertScaleAbs(maps[i], alpha=255.0), cv2.COLORMAP_JET)
        out[i] = cv2.addWeighted(images[i], 1.0 - alpha, colors, alpha, 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size)
    maps = rng.random(shape, dtype=np.float32)
    images = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    a = args.alpha

    variants: dict[str, Callable[[], object]] = {}
    if render.HAVE_C:
        variants["pyattr C++ (all cores)"] = lambda: render.overlay(maps, images, a, backend="C++")
        variants["pyattr C++ (1 thread)"] = lambda: render.overlay(
            maps, images, a, num_threads=1, backend="C++"
        )
    variants["pyattr NumPy fallback"] = lambda: render.overlay(maps, images, a, backend="numpy")
    try:
        import cv2

        variants[f"OpenCV per image ({cv2.getNumThreads()} threads)"] = lambda: opencv_overlay(
            maps, images, a
        )
    except ImportError:
        print("opencv-python not installed: OpenCV row skipped")

    print(
        f"overlay of {args.batch} x {args.size}x{args.size} maps on uint8 RGB images, "
        f"{args.repeats} runs after warm-up, {os.cpu_count()} CPU cores\n"
    )
    print(f"{'variant':<32} {'median ms':>10} {'IQR ms':>8} {'MPix/s':>8} {'vs C++':>8}")
    pixels = np.prod(shape) / 1e6
    results = {name: timeit(fn, args.repeats) for name, fn in variants.items()}
    reference = np.median(next(iter(results.values())))
    for name, times in results.items():
        q1, median, q3 = np.percentile(times, [25, 50, 75])
        print(
            f"{name:<32} {median:>10.2f} {q3 - q1:>8.2f} {pixels / median * 1e3:>8.1f} {median / reference:>7.1f}x"
        )


if __name__ == "__main__":
    main()
