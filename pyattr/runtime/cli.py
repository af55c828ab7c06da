"""The runtime's command line: ``python -m pyattr.runtime MODEL.onnx IMAGES... --out DIR``
(also ``pyattr run``). Torch-free, like the rest of :mod:`pyattr.runtime`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pyattr.errors import InputError, PyattrError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

DESCRIPTION = (
    "Run an exported attribution graph (.onnx from `pyattr export`) on images, without PyTorch: "
    "writes <name>_<method>_overlay.png per image into --out and prints one JSON line per image "
    "(image, explained_class, class_name, score, predicted_class, overlay) on stdout."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The runtime's options (shared by ``python -m pyattr.runtime`` and ``pyattr run``)."""
    parser.add_argument("model", help="the exported graph, a .onnx file written by pyattr export")
    parser.add_argument("images", nargs="+", help="image files, or folders (their image files, sorted)")
    parser.add_argument("--out", default="pyattr_run", help="output folder (default pyattr_run)")
    parser.add_argument("--target", help="class to explain, id or name (default: each image's top class)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity (default 0.5)")
    parser.add_argument("--cmap", help="colormap (default jet; seismic for LRP graphs)")
    parser.add_argument("--source", choices=["maps", "raw"],
                        help="draw the graph's normalized maps (default) or its raw maps normalized here "
                             "(default for LRP graphs: signed relevance)")
    parser.add_argument("--sign", help="with --source raw: all, absolute, positive, negative, centered "
                                       "(default all; centered for LRP graphs)")
    parser.add_argument("--outlier-perc", type=float, default=0.0,
                        help="with --source raw: percent of extreme values clipped (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per graph run (default 16)")
    parser.add_argument("--providers", help="onnxruntime providers, comma-separated (default: CUDA if usable, else CPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 0 = all cores)")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write <name>_<method>_maps.npz (map, raw, scores) per image")


def run(args: argparse.Namespace) -> int:
    """Run the runtime for parsed ``args``; raises :class:`pyattr.errors.PyattrError` on bad input."""
    from pyattr.colormaps import COLORMAPS
    from pyattr.figures import save_png_atomic
    from pyattr.render import SIGNS

    from . import AttributionRuntime

    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if not 0.0 <= args.alpha <= 1.0:
        raise InputError("--alpha must be in [0, 1]")
    if args.cmap is not None and args.cmap not in COLORMAPS:
        raise InputError(f"unknown colormap {args.cmap!r}; available: {', '.join(COLORMAPS)}")
    if args.sign is not None and args.sign not in SIGNS:
        raise InputError(f"unknown --sign {args.sign!r}; use one of {', '.join(SIGNS)}")
    if not 0.0 <= args.outlier_perc < 50.0:
        raise InputError("--outlier-perc must be in [0, 50)")
    images = expand_images(args.images)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    runtime = AttributionRuntime(args.model, providers=providers, num_threads=args.threads)
    # Signed relevance (LRP): by default drawn from the raw map, 0 at the middle of a diverging colormap.
    signed = bool(runtime.metadata.get("signed", False))
    args.cmap = args.cmap or ("seismic" if signed else "jet")
    args.source = args.source or ("raw" if signed else "maps")
    args.sign = args.sign or ("centered" if signed and args.source == "raw" else "all")
    target = runtime.class_index(args.target) if args.target is not None else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = unique_stems([p.stem for p in images])
    method = runtime.method
    for start in range(0, len(images), args.batch_size):
        chunk = images[start:start + args.batch_size]
        explained = runtime.explain(chunk, target, alpha=args.alpha, cmap=args.cmap, source=args.source,
                                    sign=args.sign, outlier_perc=args.outlier_perc, batch_size=args.batch_size,
                                    names=names[start:start + args.batch_size])
        for e in explained:
            base = out / f"{e.name}_{method}"
            save_png_atomic(e.overlay, f"{base}_overlay.png")
            line = {**e.summary(), "overlay": f"{base}_overlay.png"}
            if args.save_maps:
                np.savez(f"{base}_maps.npz", map=e.map, raw=e.raw, scores=e.scores)
                line["maps"] = f"{base}_maps.npz"
            print(json.dumps(line), flush=True)
    return 0


def expand_images(paths: list[str]) -> list[Path]:
    """Files as given, folders as their image files (sorted); every path must exist."""
    images: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"no image files in folder {p}")
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            raise InputError(f"no such file: {p}")
    return images


def unique_stems(stems: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for s in stems:
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.append(s if n == 0 else f"{s}_{n}")
    return out


def main(argv: list[str] | None = None, prog: str = "python -m pyattr.runtime") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except PyattrError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
