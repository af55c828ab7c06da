"""The runtime's command line: ``python -m pyattr.runtime MODEL.onnx IMAGES... --out DIR``
(also ``pyattr run``). Torch-free, like the rest of :mod:`pyattr.runtime`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from pyattr._files import publish, staging_folder, terminate_cleanly
from pyattr.errors import InputError, PyattrError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

DESCRIPTION = (
    "Run an exported attribution graph (.onnx from `pyattr export`) on images, without PyTorch: "
    "writes <name>_<method>_overlay.png per image into --out and prints one JSON line per image "
    "(image, explained_class, class_name, score, probability, predicted_class, overlay) on stdout. "
    "Runs .onnx files only: TorchScript and .pt2 files execute code when loaded (see SECURITY.md)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The runtime's options (shared by ``python -m pyattr.runtime`` and ``pyattr run``)."""
    parser.add_argument("model", help="the exported graph, a .onnx file written by pyattr export")
    parser.add_argument("images", nargs="+", help="image files, or folders (their image files, sorted)")
    parser.add_argument("--out", default="pyattr_run", help="output folder (default pyattr_run)")
    parser.add_argument("--target", help="class to explain, id or name (default: each image's top class)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity (default 0.5)")
    parser.add_argument("--cmap", help="colormap (default jet; bwr for signed graphs: LRP, IG, Input x Gradient)")
    parser.add_argument("--source", choices=["maps", "raw"],
                        help="draw the graph's normalized maps (default) or its raw maps normalized here "
                             "(default for signed graphs: the raw signed map, centred)")
    parser.add_argument("--sign", help="with --source raw: all, absolute, positive, negative, centered "
                                       "(default all; centered for signed graphs)")
    parser.add_argument("--outlier-perc", type=float, default=0.0,
                        help="with --source raw: percent of extreme values clipped (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per graph run (default 16)")
    parser.add_argument("--providers", help="onnxruntime providers, comma-separated (default: CUDA if usable, else CPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 0 = all cores)")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write <name>_<method>_maps.npz (map, raw, scores) per image")


def run(args: argparse.Namespace) -> int:
    """Run the runtime for parsed ``args``; raises :class:`pyattr.errors.PyattrError` on bad input.

    Nothing is written before every input is checked (options, the model file and its metadata, every
    image's header), and outputs are written into a hidden staging folder inside ``--out`` and moved
    into place only when every image is done: a failure leaves ``--out`` as it was."""
    from pyattr.colormaps import COLORMAPS
    from pyattr.render import SIGNS

    from . import MAX_BATCH, AttributionRuntime, check_num_threads
    from .images import check_image_header

    if not 1 <= args.batch_size <= MAX_BATCH:
        raise InputError(f"--batch-size must be from 1 to {MAX_BATCH}")
    if not 0.0 <= args.alpha <= 1.0:
        raise InputError("--alpha must be in [0, 1]")
    if args.cmap is not None and args.cmap not in COLORMAPS:
        raise InputError(f"unknown colormap {args.cmap!r}; available: {', '.join(COLORMAPS)}")
    if args.sign is not None and args.sign not in SIGNS:
        raise InputError(f"unknown --sign {args.sign!r}; use one of {', '.join(SIGNS)}")
    if not 0.0 <= args.outlier_perc < 50.0:
        raise InputError("--outlier-perc must be in [0, 50)")
    try:
        check_num_threads(args.threads)
    except InputError as err:
        raise InputError(str(err).replace("num_threads", "--threads", 1)) from None
    images = expand_images(args.images)
    for image in images:  # headers only: a bad file stops the run before any work
        check_image_header(image)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    runtime = AttributionRuntime(args.model, providers=providers, num_threads=args.threads)
    # Signed relevance (LRP): by default drawn from the raw map, 0 at the middle of a diverging colormap.
    signed = bool(runtime.metadata.get("signed", False))
    args.cmap = args.cmap or ("bwr" if signed else "jet")
    args.source = args.source or ("raw" if signed else "maps")
    args.sign = args.sign or ("centered" if signed and args.source == "raw" else "all")
    target = runtime.class_index(args.target) if args.target is not None else None
    out = prepare_output_folder(Path(args.out))  # the first write, after every check

    names = unique_stems([p.stem.lstrip(".") or "image" for p in images])  # outputs are never hidden files
    method = runtime.method  # validated: a safe file-name part
    planned = [output_path(out, f"{name}_{method}", "_overlay.png") for name in names]
    lines: list[dict] = []
    staging = _staging(out)
    try:
        for start in range(0, len(images), args.batch_size):
            chunk = images[start:start + args.batch_size]
            explained = runtime.explain(chunk, target, alpha=args.alpha, cmap=args.cmap, source=args.source,
                                        sign=args.sign, outlier_perc=args.outlier_perc,
                                        batch_size=args.batch_size, names=names[start:start + args.batch_size])
            for i, e in enumerate(explained, start):
                overlay = planned[i]
                _save_png(e.overlay, staging / overlay.name)
                line = {**e.summary(), "overlay": str(overlay)}
                if args.save_maps:
                    maps = output_path(out, f"{e.name}_{method}", "_maps.npz")
                    with open(staging / maps.name, "wb") as f:
                        np.savez(f, map=e.map, raw=e.raw, scores=e.scores)
                    line["maps"] = str(maps)
                lines.append(line)
        for line in lines:  # every image done: move the outputs into place
            for key in ("overlay", "maps"):
                if key in line:
                    publish(staging / Path(line[key]).name, Path(line[key]))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for line in lines:
        print(json.dumps(line), flush=True)
    return 0


def prepare_output_folder(out: Path) -> Path:
    """Create ``out`` (and parents) and check that files can be created in it; an :class:`InputError`
    naming the problem otherwise."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file, not a folder; give a folder for the outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise InputError(f"cannot create the output folder {str(out)!r}: a part of its path is a file") from err
    except OSError as err:
        raise InputError(f"cannot create the output folder {str(out)!r}: {err.strerror or err}") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into the output folder {str(out)!r}: permission denied")
    return out


def _staging(out: Path) -> Path:
    try:
        return staging_folder(out, "pyattr-run")
    except OSError as err:
        raise InputError(f"cannot write into the output folder {str(out)!r}: {err.strerror or err}") from err


def output_path(out: Path, base: str, suffix: str) -> Path:
    """``out / (base + suffix)``, refused unless it is a plain file name directly inside ``out``
    (no separator, no ``..``, not hidden): no output can land outside ``--out``."""
    name = base + suffix
    if (os.sep in name or (os.altsep and os.altsep in name) or "/" in name or name.startswith(".")
            or name in ("", ".", "..") or "\0" in name or len(name.encode()) > 255):
        raise InputError(f"refusing the output name {name!r}: not a plain file name inside --out")
    return out / name


def _save_png(picture: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(picture).save(path, format="PNG")


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
    """One distinct name per stem, in order: repeats get ``_1``, ``_2``, ... skipping names that are
    taken, by an earlier stem or a later one (``a``, ``a``, ``a_1`` -> ``a``, ``a_2``, ``a_1``)."""
    taken = set(stems)
    seen: set[str] = set()
    out = []
    for s in stems:
        name = s
        if name in seen:
            n = 1
            while f"{s}_{n}" in taken or f"{s}_{n}" in seen:
                n += 1
            name = f"{s}_{n}"
        seen.add(name)
        out.append(name)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one ``pyattr: error:`` line (exit code 2)."""

    def error(self, message: str):
        print(f"pyattr: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None, prog: str = "python -m pyattr.runtime") -> int:
    """The command line; every failure is one ``pyattr: error: ...`` line on stderr and exit code 2."""
    parser = _Parser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        with terminate_cleanly():
            return run(args)
    except PyattrError as err:
        print(f"pyattr: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`pyattr run ... | head -1`); the outputs are in place, stdout is gone
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        print("pyattr: error: stdout was closed before every result line was printed (broken pipe); "
              f"the outputs are in {args.out}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyattr: error: interrupted; temporary files removed", file=sys.stderr)
        return 130
