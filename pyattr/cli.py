"""The ``pyattr`` command: explain images, export attribution graphs."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError, PyattrError
from .runtime.cli import unique_stems

SAMPLE_SEED = 30_000  # generated samples come from seeds never used to train the built-in model


def _warn_line(message, category, filename, lineno, file=None, line=None):
    print(f"pyattr: warning: {message}", file=sys.stderr)


def load_images(paths: list[str]) -> list[tuple[str, np.ndarray]]:
    """Read every image first (RGB uint8, :func:`pyattr.runtime.images.read_image`); any bad file stops
    the run before anything is written."""
    from .runtime.images import read_image

    return [(Path(p).stem, read_image(p)) for p in paths]


def method_options(name: str, bundle) -> dict:
    """Options a method takes from the model bundle: the input bounds of LRP's z^B rule (first layer) for
    models normalized outside (the built-in model normalizes inside; LRP reads its bounds itself)."""
    if name == "lrp_epsilon_gamma_box" and bundle.name != "builtin":
        import torch

        mean, std = torch.tensor(bundle.mean), torch.tensor(bundle.std)
        return {"low": (0 - mean) / std, "high": (1 - mean) / std}
    return {}


def cmd_explain(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from . import render
    from .figures import overlay_image, save_png_atomic, side_by_side
    from .methods import build_method, needs_layer
    from .models import load_model
    from .postprocess import resize_bilinear

    images = load_images(args.images) if args.images else []
    if not images and args.model != "builtin":
        raise InputError("give image files to explain (only the built-in model can generate its own samples)")
    bundle = load_model(args.model, args.device, args.size)
    truth = None
    if not images:
        from .zoo import generate

        batch = generate(args.samples, seed=SAMPLE_SEED)
        images = [(f"sample_{i:02d}", batch.images[i]) for i in range(args.samples)]
        truth = batch.labels

    layer = args.layer or (bundle.default_layer if needs_layer(args.method) else None)
    method = build_method(args.method, bundle.model, layer, **method_options(args.method, bundle))
    n_classes = len(bundle.class_names) if bundle.class_names else None
    if args.target is not None and n_classes is not None and not 0 <= args.target < n_classes:
        raise InputError(f"--target {args.target} is out of range: the model has {n_classes} classes (0..{n_classes - 1})")

    cmap = args.cmap or ("seismic" if method.signed else "jet")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stems = unique_stems([s for s, _ in images])
    h, w = bundle.input_size
    from tqdm import tqdm

    batches = range(0, len(images), args.batch_size)
    bar = tqdm(batches, desc=f"{args.method}", unit="batch", disable=len(batches) < 3 or args.quiet,
               file=sys.stderr)
    written = []
    for start in bar:
        chunk = images[start:start + args.batch_size]
        resized = np.stack([np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR)) for _, a in chunk])
        x = torch.from_numpy(resized).to(args.device).permute(0, 3, 1, 2).float() / 255
        result = method(bundle.normalize(x), target=args.target)
        probs = bundle.probabilities(result.scores)
        for j, (_, original) in enumerate(chunk):
            i = start + j
            pred = int(result.scores[j].argmax())
            explained = int(result.target[j])
            if method.signed:  # relevance: 0 at the middle of a diverging colormap, +-max|R| at its ends
                unit = torch.from_numpy(render.normalize(result.raw[j:j + 1].cpu().numpy(), sign="centered"))
            else:
                unit = result.maps[j:j + 1]
            heat = resize_bilinear(unit, original.shape[:2])[0].clamp(0, 1).cpu().numpy()
            over = overlay_image(original, heat, alpha=args.alpha, cmap=cmap)
            title = (f"{args.method}: explains {bundle.class_name(explained)} | predicted "
                     f"{bundle.class_name(pred)} ({float(probs[j, pred]):.2f})")
            base = out / f"{stems[i]}_{args.method}"
            save_png_atomic(over, f"{base}_overlay.png")
            save_png_atomic(side_by_side(original, heat, over, title, cmap=cmap), f"{base}_figure.png")
            written.append(f"{base}_figure.png")
            line = f"{stems[i]}: {title} -> {base}_figure.png"
            if truth is not None:
                present = [bundle.class_name(k) for k in np.flatnonzero(truth[i])]
                line += f"  [contains: {', '.join(present)}]"
            if not args.quiet:
                tqdm.write(line, file=sys.stdout)
    print(f"wrote {2 * len(written)} files to {out}/")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .exporting import FORMATS, export
    from .methods import build_method, needs_layer
    from .models import load_model

    path = Path(args.output)
    if args.format is None and path.suffix not in FORMATS:
        raise InputError(f"name the output .onnx, .pt or .pt2 (or pass --format), got {path.name!r}")
    bundle = load_model(args.model, args.device, args.size)
    layer = args.layer or (bundle.default_layer if needs_layer(args.method) else None)
    method = build_method(args.method, bundle.model, layer, **method_options(args.method, bundle))
    h, w = bundle.input_size
    example = bundle.normalize(torch.rand(1, 3, h, w, device=args.device))
    export(method, example, path, format=args.format, class_names=bundle.class_names,
           preprocessing=bundle.preprocessing(), metadata={"model": bundle.name})
    print(f"wrote {path} ({args.method}{' on ' + layer if layer else ''}, model {bundle.name}, input 3x{h}x{w}, "
          "dynamic batch)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    parser = argparse.ArgumentParser(
        prog="pyattr",
        description="Explain the decisions of PyTorch vision models, and export each explanation as one graph.",
        epilog="Examples:\n  pyattr explain                       # generated samples, built-in model\n"
               "  pyattr explain cat.jpg --model torchvision:resnet18:resnet18.pth --method gradcam\n"
               "  pyattr export gradcam.onnx --method gradcam\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pyattr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="builtin",
                       help="builtin (default) | torchvision:NAME[:WEIGHTS.pth] | FILE.pt (TorchScript)")
        p.add_argument("--method", default="gradcam", choices=sorted(METHODS), help="attribution method (default gradcam)")
        p.add_argument("--layer", help="layer for CAM methods, as in model.named_modules() (default: the model's last "
                                       "spatial layer)")
        p.add_argument("--size", type=int, help="input size the images are resized to (default: the model's)")
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")

    ex = sub.add_parser("explain", help="write heatmap overlays and figures for images",
                        description="Explain images: per image, an overlay PNG and a figure "
                                    "(image | heatmap | overlay). With no images, explains generated samples "
                                    "with the built-in model.")
    ex.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    model_options(ex)
    ex.add_argument("--target", type=int, help="class to explain (default: each image's top class)")
    ex.add_argument("--out", default="pyattr_out", help="output folder (default pyattr_out)")
    ex.add_argument("--samples", type=int, default=6, help="generated samples when no image is given (default 6)")
    ex.add_argument("--batch-size", type=int, default=16)
    ex.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in the overlay (default 0.5)")
    ex.add_argument("--cmap", help="colormap (default jet; for LRP's signed relevance seismic, white at zero)")
    ex.add_argument("--quiet", action="store_true", help="print only the summary line")
    ex.set_defaults(func=cmd_explain)

    xp = sub.add_parser("export", help="export a method + model as one graph (.onnx, .pt, .pt2)",
                        description="Export an attribution method on a model as ONE graph: forward and backward "
                                    "fused, made of forward ops only, with a dynamic batch dimension.")
    xp.add_argument("output", help="output file: .onnx, .pt (TorchScript) or .pt2 (torch.export)")
    model_options(xp)
    xp.add_argument("--format", choices=["onnx", "torchscript", "pt2"], help="override the format told by the suffix")
    xp.set_defaults(func=cmd_export)

    # `pyattr run` is handled by pyattr.runtime.cli (torch-free); listed here for --help.
    sub.add_parser("run", add_help=False, help="run an exported .onnx graph on images without torch "
                                               "(pyattr run --help)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if getattr(args, "batch_size", 1) < 1:
        raise InputError("--batch-size must be at least 1")
    if getattr(args, "samples", 1) < 1:
        raise InputError("--samples must be at least 1")
    if not 0.0 <= getattr(args, "alpha", 0.5) <= 1.0:
        raise InputError("--alpha must be in [0, 1]")
    if getattr(args, "size", None) is not None and args.size < 8:
        raise InputError("--size must be at least 8")
    cmap = getattr(args, "cmap", None)
    if cmap is not None:
        from .colormaps import COLORMAPS

        if cmap not in COLORMAPS:
            raise InputError(f"unknown colormap {cmap!r}; available: {', '.join(COLORMAPS)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # before build_parser, which imports torch: `pyattr run` stays torch-free
        from .runtime.cli import main as run_main

        return run_main(argv[1:], prog="pyattr run")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    warnings.showwarning = _warn_line
    try:
        _check_args(args)
        return args.func(args)
    except PyattrError as err:
        print(f"pyattr: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyattr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
