"""``pyattr batch GRAPH INPUTS... --out DIR``: :func:`pyattr.runtime.batch.run_batch` from the command line
(torch-free; needs ``pip install "pyattr[ray]"``).

Prints one JSON line (the :class:`~pyattr.runtime.batch.BatchSummary`) on stdout; a progress bar on stderr (not
with ``--quiet``). Exit code 0 when every input has its row in ``results.parquet`` -- images that could not be
read or explained are rows with an ``error`` (counted in ``failed``, and named on stderr) -- and 2 with one
``pyattr: error:`` line when nothing could run (Ray missing, a graph that is not a pyattr export, an output folder
that cannot be written, a bad option).

Example::

    pyattr batch gradcam.onnx photos/ more.jpg --out explained/ --actors 2 --batch-size 16
    pyattr batch gradcam.onnx table.parquet --column path --out explained/ --no-overlays
    pyattr batch gradcam.onnx photos/ --out explained/ --address auto      # on a running Ray cluster
"""

from __future__ import annotations

import argparse
import sys

from pyattr._files import terminate_cleanly
from pyattr.errors import PyattrError

DESCRIPTION = (
    "Explain a dataset with an exported .onnx graph on a Ray Data actor pool (pip install \"pyattr[ray]\"): inputs "
    "are image files, URIs (s3://, gs://, ...), folders (searched recursively) or a .parquet table of paths. Writes "
    "OUT/results.parquet (key, input, explained_class, class_name, score, probability, predicted_class, map "
    "(zlib float32), overlay, error per input), OUT/overlays/<stem>-<key>.png, and OUT/parts/ (one file per batch). "
    "A rerun into the same --out skips the inputs already explained. Prints one JSON summary line."
)


def build_parser(prog: str) -> argparse.ArgumentParser:
    from .cli import _Parser

    parser = _Parser(prog=prog, description=DESCRIPTION)
    parser.add_argument("model", help="the exported graph, a .onnx file written by pyattr export")
    parser.add_argument("inputs", nargs="+", help="image files, URIs, folders, or a .parquet table of paths")
    parser.add_argument("--out", required=True, help="output folder (reruns into it resume)")
    parser.add_argument("--column", help="the .parquet table's column of paths (default: path, uri, image or file)")
    parser.add_argument("--actors", type=int, default=1, help="actors in the pool, one graph session each (default 1)")
    parser.add_argument("--batch-size", type=int, help="images per graph run (default 16; a fixed-batch graph: its)")
    parser.add_argument("--threads-per-actor", type=int, default=1, help="CPUs per actor (default 1)")
    parser.add_argument("--gpus", default="auto",
                        help="GPUs per actor: auto (one each, shared when actors outnumber GPUs; none without GPUs) "
                             "or a number (default auto)")
    parser.add_argument("--overlays", action=argparse.BooleanOptionalAction, default=True,
                        help="write overlays/<stem>-<key>.png (default on)")
    parser.add_argument("--target", help="class to explain, id or name (default: each image's top class)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity (default 0.5)")
    parser.add_argument("--cmap", help="colormap (default jet; bwr for signed graphs)")
    parser.add_argument("--backend", choices=["onnxruntime", "openvino"], default="onnxruntime",
                        help="inference backend (default onnxruntime)")
    parser.add_argument("--providers", help="onnxruntime providers, comma-separated, or the OpenVINO device "
                                            "(default: CUDA / GPU where present, else CPU)")
    parser.add_argument("--address", help="a Ray cluster to join (auto, ray://HOST:10001); default: a local one")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None, prog: str = "pyattr batch") -> int:
    """The command line; returns the exit code (see the module docstring)."""
    from .batch import run_batch

    args = build_parser(prog).parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    try:
        with terminate_cleanly():
            summary = run_batch(args.model, args.inputs, args.out, actors=args.actors, batch_size=args.batch_size,
                                overlays=args.overlays, target=args.target, alpha=args.alpha, cmap=args.cmap,
                                backend=args.backend, providers=providers, threads_per_actor=args.threads_per_actor,
                                gpus=args.gpus, address=args.address, column=args.column, progress=not args.quiet)
    except PyattrError as err:
        print(f"pyattr: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyattr: error: interrupted; a rerun with the same --out resumes", file=sys.stderr)
        return 130
    if summary.failed:
        print(f"pyattr: {summary.failed} of {summary.total} input(s) could not be explained; their reasons are in "
              f"the error column of {summary.results}", file=sys.stderr)
    print(summary.to_json(), flush=True)
    return 0
