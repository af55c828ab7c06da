"""The ``pyattr`` command: explain images, export attribution graphs."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from ._files import process_alive
from .errors import InputError, PyattrError
from .runtime.cli import unique_stems  # torch-free: one rule for both CLIs' output names

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


def _check_device(device: str) -> None:
    """A torch device that exists here; else an InputError that says which do."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA GPU is usable here (torch.cuda.is_available() is "
                             "False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return
    if dev.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return
    raise InputError(f"--device {device}: not usable here; use --device cpu (or cuda on a machine with a GPU)")


def resolve_target(target: str | None, bundle) -> int | None:
    """``--target``: a class id or a class name (exact, then case-insensitive) of the model; None = top class."""
    if target is None:
        return None
    names = bundle.class_names
    text = target.strip()
    if text.lstrip("-").isdigit():
        k = int(text)
        if names is not None and not 0 <= k < len(names):
            raise InputError(f"--target {k} is out of range: the model has {len(names)} classes "
                             f"(0..{len(names) - 1})")
        if k < 0:
            raise InputError(f"--target must be a class id >= 0 or a class name, got {k}")
        return k
    if not names:
        raise InputError(f"--target {target!r}: this model has no class names; give a class id")
    if text in names:
        return names.index(text)
    folded = [n.casefold() for n in names]
    if text.casefold() in folded:
        return folded.index(text.casefold())
    raise InputError(f"--target: unknown class name {target!r}.{_did_you_mean(text, names)}")


def _did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    if not close:
        folded = {c.casefold(): c for c in choices}
        close = [folded[c] for c in difflib.get_close_matches(word.casefold(), list(folded), n=3, cutoff=0.5)]
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _multi_pass_options(name: str, args: argparse.Namespace, batch: int) -> dict:
    """Memory-bounded passes for the multi-pass methods: about ``--internal-batch`` model inputs per
    forward/backward pass (Integrated Gradients' points, SmoothGrad's samples, Score-CAM's masks);
    ``--steps`` for Integrated Gradients."""
    import inspect

    from .methods import METHODS

    params = inspect.signature(METHODS[name].__init__).parameters
    options = {}
    if "chunk_size" in params:
        options["chunk_size"] = max(1, args.internal_batch // max(1, batch))
    if args.steps is not None:
        if "steps" not in params:
            raise InputError(f"--steps is an option of integratedgradients, not of {name}")
        options["steps"] = args.steps
    return options


PERTURBATION_FLAGS = {"patch": ("occlusion",), "stride": ("occlusion",), "cell": ("featureablation",),
                      "masks": ("rise",)}
"""The perturbation methods' CLI options (``--patch``, ``--stride``, ``--cell``, ``--masks``) and who takes them."""


def perturbation_options(name: str, args: argparse.Namespace) -> dict:
    """``--patch`` / ``--stride`` (occlusion: a square window and its step), ``--cell`` (featureablation: the
    grid's square cell), ``--masks`` (rise: the number of random masks) as method options; an InputError for a
    flag given to a method that does not take it."""
    options = {}
    for flag, methods in PERTURBATION_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if name not in methods:
            raise InputError(f"--{flag} is an option of {', '.join(methods)}, not of {name}")
        options[flag] = value
    return options


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "cannot allocate memory" in text)


def _memory_hint(name: str, args: argparse.Namespace) -> str:
    hint = f"lower --batch-size (now {args.batch_size})"
    if name in ("integratedgradients", "smoothgrad", "scorecam", "occlusion", "featureablation", "rise", "sscam",
                "iscam", "ablationcam", "reciprocam", "smoothgradcampp"):
        hint += f" or --internal-batch (now {args.internal_batch}, model inputs per pass)"
    if name == "integratedgradients":
        hint += f", or --steps (now {args.steps or 'the default 32'})"
    return hint


class _Progress:
    """A tqdm bar over images on stderr, shown from the first image, with the model's passes counted
    through a forward pre-hook on the CLI's own model (removed on exit), so that multi-pass methods
    (Score-CAM, Integrated Gradients, SmoothGrad) show progress within a batch."""

    def __init__(self, model, total: int, desc: str, disable: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="image", disable=disable, file=sys.stderr,
                        dynamic_ncols=True)
        self.passes = 0
        self.handle = None
        if not disable:
            try:
                self.handle = model.register_forward_pre_hook(self._count)
            except (AttributeError, RuntimeError, NotImplementedError):  # e.g. some TorchScript modules
                self.handle = None

    def _count(self, *_):
        self.passes += 1
        self.bar.set_postfix_str(f"model pass {self.passes}", refresh=True)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.bar.close()


def prepare_out(out: Path) -> list[Path]:
    """Check that ``out`` can be the output folder and create it; returns the folders created here
    (innermost first), for :func:`_remove_created` when the run fails."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; give a folder name")
    created = []
    folder = out
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_created(created)
        raise InputError(f"cannot create the output folder {out} ({err.strerror or type(err).__name__})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".pyattr-probe-"):
            pass
    except OSError as err:
        _remove_created(created)
        raise InputError(f"cannot write to the output folder {out} ({err.strerror or type(err).__name__})") from None
    return created


STAGING_PREFIX = ".pyattr-staging-"


def sweep_stale_staging(out: Path) -> list[Path]:
    """Remove staging folders left in ``out`` by runs that were killed (SIGKILL, power loss): those whose
    process id (in the name) no longer runs. Returns what was removed."""
    removed = []
    for folder in out.glob(f"{STAGING_PREFIX}*-*"):
        pid_text = folder.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if not folder.is_dir() or not pid_text.isdigit() or process_alive(int(pid_text)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C so that staging folders are removed."""


def _on_sigterm(signum, frame):
    raise Terminated


def _remove_created(folders: list[Path]) -> None:
    """Remove the folders a failed run created, innermost first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def load_region(path: str, size: tuple[int, int]) -> np.ndarray:
    """``--region MASK.png``: an image whose non-zero pixels (any channel) are the region, resized (nearest)
    to the model's input size -> (H, W) float32 0/1."""
    from PIL import Image

    from .runtime.images import read_image

    mask = read_image(path).max(axis=2) > 0
    if not mask.any():
        raise InputError(f"--region {path}: the mask is empty (no non-zero pixel); the region is where it is non-zero")
    h, w = size
    return (np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0).astype(np.float32)


def _task_inputs(args: argparse.Namespace, bundle, images: list) -> tuple[list, dict]:
    """Check the task's options; returns (images, what the task needs: region, reference images, truth)."""
    task = bundle.task
    if args.region is not None and task != "segmentation":
        raise InputError("--region is an option of --task segmentation")
    if args.reference is not None and task != "similarity":
        raise InputError("--reference is an option of --task similarity")
    info: dict = {"truth": None, "references": None, "region": None}
    if args.region is not None:
        info["region"] = load_region(args.region, bundle.input_size)
    if task == "similarity" and args.reference is not None:
        from .runtime.images import read_image

        info["references"] = [(Path(args.reference).stem, read_image(args.reference))]
    if images:
        if task == "similarity" and info["references"] is None:
            raise InputError("--task similarity explains why each image is similar to a reference: give "
                             "--reference IMAGE")
        return images, info
    if args.model != "builtin":
        raise InputError("give image files to explain (only the built-in model can generate its own samples)")
    from .zoo import generate, generate_similarity

    if task == "similarity":
        pairs = generate_similarity(args.samples, seed=SAMPLE_SEED)
        images = [(f"sample_{i:02d}", pairs.queries[i]) for i in range(args.samples)]
        if info["references"] is None:
            info["references"] = [(f"reference_{i:02d}", pairs.references[i]) for i in range(args.samples)]
        info["truth"] = [[int(k)] for k in pairs.shared_classes]
    else:
        batch = generate(args.samples, seed=SAMPLE_SEED)
        images = [(f"sample_{i:02d}", batch.images[i]) for i in range(args.samples)]
        info["truth"] = [list(np.flatnonzero(row)) for row in batch.labels]
    return images, info


def _name_list(flag: str, text: str, known, default: list[str], every: list[str] | None = None) -> list[str]:
    """A comma-separated ``--methods``/``--metrics`` value ("default" = ``default``, "all" = ``every``), each name
    checked."""
    if text.strip() == "default":
        return list(default)
    if text.strip() == "all":
        return list(default if every is None else every)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise InputError(f"{flag} is empty; give comma-separated names or all")
    for name in names:
        if name not in known:
            raise InputError(f"{flag}: unknown name {name!r}.{_did_you_mean(name, known)} Known: {', '.join(known)}")
    return list(dict.fromkeys(names))


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import METRICS, builtin_images, default_methods, evaluate
    from .methods import METHODS
    from .models import load_model
    from .report import write_report

    _check_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; give a folder name")
    methods = _name_list("--methods", args.methods, list(METHODS), default_methods(), default_methods(slow=True))
    files = load_images(args.images) if args.images else []
    if files and args.model == "builtin" and args.n is not None:
        raise InputError("--n is the number of generated images; it has no meaning with image files")
    bundle = load_model(args.model, args.device, args.size)
    if bundle.task != "classification":
        raise InputError("pyattr evaluate explains classifiers (--task classification)")
    with_masks = not files and args.model == "builtin"
    usable = [m for m in METRICS if with_masks or not METRICS[m].needs_masks]
    metrics = _name_list("--metrics", args.metrics, list(METRICS), [m for m in usable if METRICS[m].default], usable)
    missing = [m for m in metrics if m not in usable]
    if missing:
        raise InputError(f"--metrics {','.join(missing)} need ground-truth object masks, which only the built-in "
                         "model's generated images have (run without image files), or leave them out")
    target = resolve_target(args.target, bundle)
    if target is not None and with_masks:
        raise InputError("--target: the generated images explain each image's own object (their masks are its "
                         "ground truth); leave --target out, or give image files")
    if with_masks:
        n = args.n if args.n is not None else 32
        images, targets, masks = builtin_images(n, seed=args.seed, size=bundle.input_size[0])
        pictures = [(images[i].permute(1, 2, 0) * 255).round().byte().numpy() for i in range(n)]
        images = bundle.normalize(images.to(args.device))
        note = (f"{n} generated images (seed {args.seed}); each explains its largest object's class, whose mask is "
                "the ground truth")
    else:
        if not files:
            raise InputError(f"give image files to evaluate {bundle.name} on (the generated images are the built-in "
                             "model's)")
        from PIL import Image

        h, w = bundle.input_size
        pictures = [np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR)) for _, a in files]
        images, masks = _to_input(pictures, bundle, args.device), None  # pictures are at the input size already
        targets = None if target is None else torch.full((len(files),), target, dtype=torch.long,
                                                         device=images.device)
        note = f"{len(files)} images; each explains " + (
            "its top class" if target is None else f"class {bundle.class_name(target)}")
    batch = min(args.batch_size, int(images.shape[0]))

    def options_of(name: str) -> dict:
        return {**method_options(name, bundle), **_multi_pass_options(name, args, batch)}

    metric_options = {"score": "sigmoid" if bundle.multilabel else "softmax", "chunk_size": max(args.internal_batch, 16)}
    if args.deletion_steps is not None:
        metric_options["steps"] = args.deletion_steps
    ev = evaluate(methods, metrics, images=images, targets=targets, masks=masks, bundle=bundle, layer=args.layer,
                  batch_size=batch, grid=args.grid, options=metric_options, method_options=options_of,
                  progress=not args.quiet, model_name=bundle.name, pictures=pictures)
    ev.notes.append(note)
    created = prepare_out(out)
    try:
        paths = write_report(ev, out)
    except OSError as err:
        _remove_created(created)
        raise InputError(f"cannot write to {out}: {err.strerror or err}") from None
    if not args.quiet:
        from .report import markdown_table

        print(markdown_table(ev), end="")
    print(f"wrote {', '.join(str(p) for p in paths)} ({len(methods)} methods x {len(metrics)} metrics, "
          f"{ev.n_images} images)", flush=True)
    return 0


def _to_input(arrays: list[np.ndarray], bundle, device: str):
    import torch
    from PIL import Image

    h, w = bundle.input_size
    resized = np.stack([np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR)) for a in arrays])
    return bundle.normalize(torch.from_numpy(resized).to(device).permute(0, 3, 1, 2).float() / 255)


def _segmentation_classes(bundle, x, target: int | None):
    """The class each image explains: ``--target``, else the class (background excepted) with the most
    pixels predicted in the image (background when nothing else is predicted); and the predicted class maps."""
    import torch

    from .methods.base import select_output
    from .targets.segmentation import segmentation_logits

    with torch.no_grad():
        predicted = segmentation_logits(select_output(bundle.model(x), None)).argmax(1)  # (n, h, w)
    if target is not None:
        return torch.full((x.shape[0],), target, dtype=torch.long), predicted
    counts = torch.nn.functional.one_hot(predicted.flatten(1), int(predicted.max()) + 2).sum(1)
    names = bundle.class_names or []
    if names and names[0].strip("_").lower() == "background":
        counts[:, 0] = 0
    classes = counts.argmax(1)
    return torch.where(counts.amax(1) > 0, classes, torch.zeros_like(classes)), predicted


def _with_truth(line: str, info: dict, i: int, task: str) -> str:
    """A result line, with the shapes a generated sample holds (or shares with its reference)."""
    if info["truth"] is None:
        return line
    from .zoo import SHAPE_CLASSES

    present = [SHAPE_CLASSES[k] for k in info["truth"][i]]
    return line + f"  [{'shared' if task == 'similarity' else 'contains'}: {', '.join(present)}]"


def _detections_to_explain(bundle, x, target: int | None, args: argparse.Namespace):
    """--task detection: the detector's boxes per image (score threshold, NMS; of class ``target`` only when
    given; the ``--max-boxes`` best), and the DetectionTarget that explains them all in one call (boxes padded
    with class -1 to the chunk's largest count)."""
    import torch

    from .targets import DetectionTarget

    threshold = 0.3 if args.score_threshold is None else args.score_threshold
    with torch.no_grad():
        found = bundle.extra["detect"](bundle.model, x, score_threshold=threshold)
    keep = args.max_boxes or 5
    detections = []
    for det in found:
        pick = torch.arange(len(det["labels"])) if target is None else torch.nonzero(det["labels"] == target).flatten()
        detections.append({k: v[pick[:keep]].detach().cpu() for k, v in det.items()})
    return detections, DetectionTarget.from_detections(detections, decode=bundle.extra["decode"])


def _detection_pictures(bundle, result, j: int, det: dict, original: np.ndarray, size, method: str, signed: bool,
                        alpha: float, cmap: str):
    """(overlay: the image with every box and their maps' maximum, figure: detections | one overlay per box,
    title) of image ``j`` of a detection result."""
    import torch

    from . import render
    from .figures import detection_figure, overlay_image, signed_overlay_image
    from .postprocess import resize_bilinear

    d = len(det["labels"])
    h0, w0 = original.shape[:2]
    scale = torch.tensor([w0 / size[1], h0 / size[0], w0 / size[1], h0 / size[0]])
    boxes = (det["boxes"].float() * scale).numpy()
    matched = result.outputs["matched"][j].cpu()
    overlays, labels, heats = [], [], []
    for b in range(d):
        if signed:
            unit = torch.from_numpy(render.normalize(result.raw[j, b:b + 1].cpu().numpy(), sign="centered"))
        else:
            unit = result.maps[j, b:b + 1].cpu()
        heat = resize_bilinear(unit, (h0, w0))[0].clamp(0, 1).numpy()
        heats.append(heat)
        overlays.append(signed_overlay_image(original, heat, alpha=alpha, cmap=cmap) if signed
                        else overlay_image(original, heat, alpha=alpha, cmap=cmap))
        name = bundle.class_name(int(det["labels"][b]))
        labels.append(f"{name} {float(det['scores'][b]):.2f}" + ("" if bool(matched[b]) else " (no match)"))
    if d:
        combined = np.max(np.stack(heats), 0)
        over = (signed_overlay_image(original, combined, alpha=alpha, cmap=cmap) if signed
                else overlay_image(original, combined, alpha=alpha, cmap=cmap))
        over = render.draw_boxes(over, boxes, thickness=1)
        title = f"{method}: why the detected box" if d == 1 else f"{method}: why each of the {d} detected boxes"
    else:
        over = original.copy()
        title = f"{method}: no detection above the score threshold"
    figure = detection_figure(original, boxes, labels, overlays, title)
    found = ", ".join(f"#{b + 1} {labels[b]} [{', '.join(f'{v:.0f}' for v in boxes[b])}]" for b in range(d))
    return over, figure, title + (f": {found}" if d else "")


def cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from . import render
    from .figures import mask_image, overlay_image, save_png_atomic, side_by_side, signed_overlay_image
    from .methods import build_method, needs_layer
    from .models import load_model
    from .postprocess import resize_bilinear
    from .targets import SegmentationTarget, SimilarityTarget

    # 1. every input checked before anything is written
    _check_device(args.device)
    images = load_images(args.images) if args.images else []
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; give a folder name")
    bundle = load_model(args.model, args.device, args.size, task=args.task)
    images, info = _task_inputs(args, bundle, images)
    task = bundle.task
    if task != "detection" and (args.max_boxes is not None or args.score_threshold is not None):
        raise InputError("--max-boxes and --score-threshold are options of --task detection")
    target = resolve_target(args.target, bundle) if task != "similarity" else None
    if args.target is not None and task == "similarity":
        raise InputError("--target has no meaning for --task similarity (the similarity is the one score)")
    layer = args.layer or (bundle.default_layer if needs_layer(args.method) else None)
    batch_size = min(args.batch_size, len(images))
    options = {**method_options(args.method, bundle), **_multi_pass_options(args.method, args, batch_size),
               **perturbation_options(args.method, args)}
    method = build_method(args.method, bundle.model, layer, **options)
    if task != "classification":
        from .targets import TARGETS

        method.check_target_kind(TARGETS[task]())
    embeddings = None
    if info["references"] is not None:
        with torch.no_grad():
            embeddings = bundle.model(_to_input([a for _, a in info["references"]], bundle, args.device))
        from .targets.similarity import embedding_of

        embeddings = embedding_of(embeddings)
        if not (isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2):
            raise InputError(f"--task similarity needs a model that outputs an embedding (N, D); {bundle.name} "
                             "does not")
    signed = bool(method.signed)
    cmap = args.cmap or ("bwr" if signed else "jet")
    alpha = args.alpha if args.alpha is not None else (1.0 if signed else 0.5)
    stems = unique_stems([s for s, _ in images])
    names = [f"{stem}_{args.method}_{kind}.png" for stem in stems for kind in ("overlay", "figure")]
    for name in names:
        if (out / name).is_dir():
            raise InputError(f"cannot write {out / name}: a folder of that name is in the way")

    # 2. the work, written to a staging folder inside --out; published only when every image is done
    created = prepare_out(out)
    sweep_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out))
    lines = []
    progress = _Progress(bundle.model, len(images), args.method, disable=args.quiet)
    published = False
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x = _to_input([a for _, a in chunk], bundle, args.device)
            predicted = None
            if task == "segmentation":
                classes, predicted = _segmentation_classes(bundle, x, target)
                region = None if info["region"] is None else torch.from_numpy(info["region"]).to(args.device)
                explained_target = SegmentationTarget(classes=classes, region=region)
            elif task == "similarity":
                refs = embeddings if len(embeddings) == 1 else embeddings[start:start + len(chunk)]
                explained_target = SimilarityTarget(refs)
            elif task == "detection":
                detections, explained_target = _detections_to_explain(bundle, x, target, args)
            else:
                explained_target = target
            try:
                result = method(x, explained_target)
            except (MemoryError, RuntimeError) as err:
                if _is_out_of_memory(err):
                    h, w = bundle.input_size
                    raise InputError(f"out of memory running {args.method} on {len(chunk)} images of "
                                     f"{h}x{w}: {_memory_hint(args.method, args)}") from None
                raise
            logits = result.scores.detach().float().cpu()
            for j, (_, original) in enumerate(chunk):
                i = start + j
                if task == "detection":
                    over, figure, title = _detection_pictures(bundle, result, j, detections[j], original, x.shape[-2:],
                                                              args.method, signed, alpha, cmap)
                    base = f"{stems[i]}_{args.method}"
                    save_png_atomic(over, staging / f"{base}_overlay.png")
                    save_png_atomic(figure, staging / f"{base}_figure.png")
                    lines.append(_with_truth(f"{stems[i]}: {title} -> {out / base}_figure.png", info, i, task))
                    continue
                explained = int(result.target[j])
                if signed:  # evidence for (+) and against (-): 0 at the middle of a diverging colormap
                    unit = torch.from_numpy(render.normalize(result.raw[j:j + 1].cpu().numpy(), sign="centered"))
                else:
                    unit = result.maps[j:j + 1]
                heat = resize_bilinear(unit.cpu(), original.shape[:2])[0].clamp(0, 1).numpy()
                if signed:
                    over = signed_overlay_image(original, heat, alpha=alpha, cmap=cmap)
                else:
                    over = overlay_image(original, heat, alpha=alpha, cmap=cmap)
                context = None
                if task == "classification":
                    probs = bundle.probabilities(logits)
                    pred = int(logits[j].argmax())
                    title = (f"{args.method}: explains {bundle.class_name(explained)} (score "
                             f"{float(logits[j, explained]):.2f}, probability {float(probs[j, explained]):.2f}) | "
                             f"predicted {bundle.class_name(pred)}")
                elif task == "segmentation":
                    mine = (predicted[j] == explained).cpu().numpy()
                    if info["region"] is not None:
                        context = (mask_image(info["region"]), "region")
                        where = "the --region mask"
                    else:
                        context = (mask_image(mine.astype(np.float32)), f"{bundle.class_name(explained)} pixels")
                        where = f"its {int(mine.sum())} predicted pixels"
                    if info["region"] is None and not mine.any():
                        where = "no predicted pixel: an empty region"
                    title = (f"{args.method}: why {bundle.class_name(explained)} over {where} (score "
                             f"{float(logits[j, explained]):.1f})")
                else:
                    ref_name, ref_image = info["references"][0 if len(info["references"]) == 1 else i]
                    context = (ref_image, "reference")
                    title = f"{args.method}: why similar to {ref_name} (cosine {float(logits[j, 0]):.3f})"
                base = f"{stems[i]}_{args.method}"
                save_png_atomic(over, staging / f"{base}_overlay.png")
                save_png_atomic(side_by_side(original, heat, over, title, cmap=cmap, context=context),
                                staging / f"{base}_figure.png")
                lines.append(_with_truth(f"{stems[i]}: {title} -> {out / base}_figure.png", info, i, task))
            progress.update(len(chunk))
        progress.close()
        for name in names:
            os.replace(staging / name, out / name)
        published = True
    except OSError as err:
        raise InputError(f"cannot write to {out}: {err.strerror or err}") from None
    finally:
        progress.close()
        shutil.rmtree(staging, ignore_errors=True)
        if not published:
            _remove_created(created)
    if not args.quiet:
        for line in lines:
            print(line)
    print(f"wrote {len(names)} files to {out}/", flush=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .exporting import FORMATS, export
    from .methods import build_method, needs_layer
    from .models import load_model

    path = Path(args.output)
    if args.format is None and path.suffix not in FORMATS:
        raise InputError(f"name the output .onnx, .pt or .pt2 (or pass --format), got {path.name!r}")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give the file to write, e.g. {path / ('graph' + (path.suffix or '.onnx'))}")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: the folder {parent} is not writable")
    detector_path = _detector_out(args, path)
    _check_device(args.device)
    bundle = load_model(args.model, args.device, args.size, task=args.task)
    layer = args.layer or (bundle.default_layer if needs_layer(args.method) else None)
    method = build_method(args.method, bundle.model, layer, **method_options(args.method, bundle),
                          **perturbation_options(args.method, args))
    h, w = bundle.input_size
    example = bundle.normalize(torch.rand(1, 3, h, w, device=args.device))
    from .targets import TARGETS

    if bundle.task == "detection":
        kind = TARGETS["detection"](decode=bundle.extra["decode"], max_boxes=args.max_boxes or 10)
    elif args.max_boxes is not None:
        raise InputError("--max-boxes is an option of --task detection")
    else:
        kind = None if bundle.task == "classification" else TARGETS[bundle.task]()
    try:
        export(method, example, path, format=args.format, class_names=bundle.class_names,
               preprocessing=bundle.preprocessing(), metadata={"model": bundle.name, "multilabel": bundle.multilabel},
               target=kind, targets_per_input=args.targets_per_input)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from None
    per = f", {args.targets_per_input} targets per image" if args.targets_per_input else ""
    print(f"wrote {path} ({args.method}{' on ' + layer if layer else ''}, model {bundle.name}, input 3x{h}x{w}, "
          f"dynamic batch{per})")
    if detector_path is not None:
        from .exporting.detector import export_detector

        try:
            export_detector(bundle.model, example, detector_path, decode=bundle.extra["decode"],
                            class_names=bundle.class_names, preprocessing=bundle.preprocessing())
        except OSError as err:
            raise InputError(f"cannot write {detector_path}: {err.strerror or err}") from None
        print(f"wrote {detector_path} (the detector {bundle.name}: boxes and class scores of every candidate, "
              f"for pyattr run {path.name} IMAGES --detector {detector_path.name})")
    return 0


def _detector_out(args: argparse.Namespace, path: Path) -> Path | None:
    """--detector-out checked before any work: --task detection, an .onnx file in a writable folder, not the
    explanation graph's own path."""
    if args.detector_out is None:
        return None
    if args.task != "detection":
        raise InputError("--detector-out is an option of --task detection")
    out = Path(args.detector_out)
    if out.suffix.lower() != ".onnx":
        raise InputError(f"--detector-out: name the detector graph .onnx, got {out.name!r}")
    if out.resolve() == path.resolve():
        raise InputError("--detector-out must differ from the explanation graph's file")
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise InputError(f"--detector-out: cannot write {out} (a folder, or its folder is missing or not writable)")
    return out


MAX_SIZE = 4096
"""Largest ``--size`` (pixels per side): a 4096 x 4096 input already takes minutes and gigabytes."""
MAX_INTERNAL_BATCH = 4096


class UsageError(Exception):
    """A command-line mistake found by argparse (printed as one ``pyattr: error:`` line)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``pyattr: error: <message>`` and exit code 2, never a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _method_name(value: str) -> str:
    from .methods import METHODS

    if value in METHODS:
        return value
    folded = {k.replace("_", "").replace("-", ""): k for k in METHODS}
    key = value.lower().replace("_", "").replace("-", "").replace(" ", "")
    if key in folded:
        return folded[key]
    raise argparse.ArgumentTypeError(f"unknown method {value!r}.{_did_you_mean(value, METHODS)} "
                                     f"Methods: {', '.join(sorted(METHODS))}")


def _int_in(name: str, low: int, high: int | None = None):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {value!r}") from None
        if n < low or (high is not None and n > high):
            bound = f"in [{low}, {high}]" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {n}")
        return n
    return parse


def _float_in(name: str, low: float, high: float):
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {value!r}") from None
        if not low <= x <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{name} must be in [{low:g}, {high:g}], got {value}")
        return x
    return parse


def _cmap_name(value: str) -> str:
    from .colormaps import COLORMAPS

    if value in COLORMAPS:
        return value
    raise argparse.ArgumentTypeError(f"unknown colormap {value!r}.{_did_you_mean(value, COLORMAPS)} "
                                     f"Colormaps: {', '.join(COLORMAPS)}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyattr",
        description="Explain the decisions of PyTorch vision models, and export each explanation as one graph.",
        epilog="Examples:\n  pyattr explain                       # generated samples, built-in model\n"
               "  pyattr explain --task segmentation   # the built-in segmenter: why these pixels are a square\n"
               "  pyattr explain --task similarity     # generated query/reference pairs, built-in embedding\n"
               "  pyattr explain --task detection      # the built-in detector: one map per detected box\n"
               "  pyattr explain cat.jpg --model torchvision:resnet18:resnet18.pth --method gradcam\n"
               "  pyattr export gradcam.onnx --method gradcam\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pyattr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def model_source_options(p: argparse.ArgumentParser) -> None:
        """--model, --layer, --size, --device: the model and how it is fed (explain, export, evaluate)."""
        p.add_argument("--model", default="builtin",
                       help="builtin (default) | torchvision:NAME[:WEIGHTS.pth] | FILE.pt (TorchScript, trusted "
                            "files only: loading one runs its code)")
        p.add_argument("--layer", help="layer for CAM methods, as in model.named_modules() (default: the model's last "
                                       "spatial layer)")
        p.add_argument("--size", type=_int_in("--size", 8, MAX_SIZE),
                       help=f"input size the images are resized to, 8..{MAX_SIZE} (default: the model's)")
        p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N")

    def model_options(p: argparse.ArgumentParser) -> None:
        model_source_options(p)
        p.add_argument("--method", default="gradcam", type=_method_name, metavar="METHOD",
                       help="attribution method (default gradcam); `pyattr.METHODS` lists them: gradcam, "
                            "scorecam, saliency, integratedgradients, lrp_epsilon_plus, ...")
        p.add_argument("--task", default="classification",
                       choices=["classification", "segmentation", "similarity", "detection"],
                       help="what is explained: a class (default); segmentation: a class over a region of a "
                            "segmenter's per-pixel scores (the built-in segmenter with --model builtin, "
                            "torchvision:fcn_resnet50, ...); similarity: an embedding's cosine similarity to "
                            "a reference (the built-in classifier's pooled features with --model builtin); "
                            "detection: each box the built-in detector finds, one map per box")
        p.add_argument("--max-boxes", type=_int_in("--max-boxes", 1, 100),
                       help="--task detection: boxes explained per image (explain: the top-scored detections, "
                            "default 5; export: the graph's number of box inputs B, default 10)")
        p.add_argument("--patch", type=_int_in("--patch", 1, MAX_SIZE),
                       help="occlusion: the square window's side in pixels (default 16)")
        p.add_argument("--stride", type=_int_in("--stride", 1, MAX_SIZE),
                       help="occlusion: the window's step in pixels, at most --patch (default 8)")
        p.add_argument("--cell", type=_int_in("--cell", 1, MAX_SIZE),
                       help="featureablation: the side of the grid's square cells, one segment each (default 16)")
        p.add_argument("--masks", type=_int_in("--masks", 1, 100_000),
                       help="rise: the number of random masks, one forward pass each (default 1000)")

    ex = sub.add_parser("explain", help="write heatmap overlays and figures for images",
                        description="Explain images: per image, an overlay PNG and a figure "
                                    "(image | heatmap | overlay). With no images, explains generated samples "
                                    "with the built-in model. Signed methods (Integrated Gradients, "
                                    "Input x Gradient, LRP) are drawn centred on a diverging colormap: red for, "
                                    "blue against the class, the photo unchanged where the attribution is 0.")
    ex.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    model_options(ex)
    ex.add_argument("--target", help="class to explain, id or name (default: each image's top class; segmentation: "
                                     "the class with the most predicted pixels, background excepted)")
    ex.add_argument("--region", metavar="MASK",
                    help="--task segmentation: explain the class over this mask image's non-zero pixels (default: "
                         "the pixels the model predicts as the class)")
    ex.add_argument("--reference", metavar="IMAGE",
                    help="--task similarity: the reference image whose embedding each image is compared with "
                         "(default with generated samples: each sample's own reference)")
    ex.add_argument("--score-threshold", type=_float_in("--score-threshold", 0.0, 1.0),
                    help="--task detection: explain the detections scored above this (default 0.3)")
    ex.add_argument("--out", default="pyattr_out", help="output folder (default pyattr_out)")
    ex.add_argument("--samples", type=_int_in("--samples", 1, 10_000), default=6,
                    help="generated samples when no image is given (default 6)")
    ex.add_argument("--batch-size", type=_int_in("--batch-size", 1, 4096), default=16,
                    help="images per call of the method (default 16)")
    ex.add_argument("--steps", type=_int_in("--steps", 1, 100_000),
                    help="integration steps of integratedgradients (default 32)")
    ex.add_argument("--internal-batch", type=_int_in("--internal-batch", 1, MAX_INTERNAL_BATCH), default=16,
                    help="model inputs per forward/backward pass of the multi-pass methods (Integrated Gradients' "
                         "steps, SmoothGrad's samples, Score-CAM's masks, the perturbation methods' perturbed "
                         "copies), which bounds their memory (default 16)")
    ex.add_argument("--alpha", type=_float_in("--alpha", 0.0, 1.0),
                    help="heatmap opacity in the overlay (default 0.5; for signed methods the opacity at the "
                         "largest |attribution|, fading to 0 at zero, default 1)")
    ex.add_argument("--cmap", type=_cmap_name,
                    help="colormap (default jet; bwr for signed methods, white at zero)")
    ex.add_argument("--quiet", action="store_true", help="print only the summary line, no progress bar")
    ex.set_defaults(func=cmd_explain)

    xp = sub.add_parser("export", help="export a method + model as one graph (.onnx, .pt, .pt2)",
                        description="Export an attribution method on a model as ONE graph: forward and backward "
                                    "fused, made of forward ops only, with a dynamic batch dimension.")
    xp.add_argument("output", help="output file: .onnx, .pt (TorchScript) or .pt2 (torch.export)")
    model_options(xp)
    xp.add_argument("--format", choices=["onnx", "torchscript", "pt2"], help="override the format told by the suffix")
    xp.add_argument("--detector-out", metavar="DETECTOR.onnx",
                    help="--task detection: also write the detector itself (model + box decoding, every candidate, no "
                         "NMS) as an ONNX graph, for `pyattr run OUTPUT IMAGES --detector DETECTOR.onnx`")
    xp.add_argument("--targets-per-input", type=_int_in("--targets-per-input", 1, 1024), metavar="T",
                    help="explain T classes of every image in one run: the graph takes (N, T) class ids "
                         "(`pyattr run OUTPUT IMAGES --target 3,5,7`); default: one target per image")
    xp.set_defaults(func=cmd_export)

    ev = sub.add_parser("evaluate", help="score methods with faithfulness metrics; write an HTML report",
                        description="Evaluate attribution methods: every method x every metric on a model and images, "
                                    "with a progress bar. Writes results.json, results.md (the methods x metrics table) "
                                    "and report.html (a sortable table, the metrics' curves, an image x method grid; "
                                    "works offline) into --out. With no arguments: every method on the built-in model "
                                    "and 32 generated test images, whose object masks the pointing games use.")
    ev.add_argument("images", nargs="*", help="image files (default: generated images of the built-in model)")
    model_source_options(ev)
    ev.add_argument("--methods", default="default",
                    help="comma-separated method names; default: every method but SS-CAM and IS-CAM (thousands of "
                         "passes per image); all: every method")
    ev.add_argument("--metrics", default="default",
                    help="comma-separated metric names; default: every metric the images allow except those that re-run "
                         "the method many times (sensitivity_max); all: every metric the images allow")
    ev.add_argument("--target", help="class to explain in every image file, id or name (default: the top class)")
    ev.add_argument("--n", type=_int_in("--n", 1, 100_000), help="generated images (default 32)")
    ev.add_argument("--seed", type=_int_in("--seed", 0, 2**31 - 1), default=40_000,
                    help="seed of the generated images (default 40000, the built-in model's test set)")
    ev.add_argument("--deletion-steps", type=_int_in("--deletion-steps", 1, 10_000),
                    help="steps of the deletion/insertion curves (default: the metric's)")
    ev.add_argument("--batch-size", type=_int_in("--batch-size", 1, 4096), default=16,
                    help="images per method call (default 16)")
    ev.add_argument("--internal-batch", type=_int_in("--internal-batch", 1, MAX_INTERNAL_BATCH), default=16,
                    help="model inputs per pass of the multi-pass methods (default 16)")
    ev.add_argument("--steps", type=_int_in("--steps", 1, 100_000), help="integration steps of integratedgradients")
    ev.add_argument("--grid", type=_int_in("--grid", 0, 64), default=6, help="images in the report's grid (default 6)")
    ev.add_argument("--out", default="pyattr_eval", help="output folder (default pyattr_eval)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar and no table on stdout")
    ev.set_defaults(func=cmd_evaluate)

    # `pyattr run` is handled by pyattr.runtime.cli (torch-free); listed here for --help.
    sub.add_parser("run", add_help=False, help="run an exported .onnx graph on images without torch "
                                               "(pyattr run --help)")
    sub.add_parser("batch", add_help=False, help="explain a dataset with an exported .onnx graph on Ray Data, "
                                                 "resumable (pyattr batch --help)")
    return parser


def _require_torch(argv: list[str], parser: argparse.ArgumentParser) -> None:
    """A command other than ``run`` (explain, export, ...) on the torch-free install (``pip install pyattr``: the
    runtime only): one :class:`InputError` saying what to install, before argparse imports the methods (which
    need torch). ``--help`` and ``--version`` work without torch."""
    commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    if not argv or argv[0] not in commands or argv[0] in ("run", "batch") or "-h" in argv or "--help" in argv:
        return
    missing = []
    for name in ("torch", "torchvision"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise InputError(f"pyattr {argv[0]} needs PyTorch ({' and '.join(missing)} not installed): this is the torch-free "
                         "runtime install; add the attribution side with pip install \"pyattr[torch]\" (or pip install "
                         "torch torchvision). Exported .onnx graphs run without torch: pyattr run MODEL.onnx IMAGES")


def _error(message: str) -> int:
    text = " ".join(str(message).split()) or "failed"
    try:
        print(f"pyattr: error: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    return 2


def _silence_stdout() -> None:
    """After a broken pipe on stdout: point it at /dev/null so that Python's exit flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """The ``pyattr`` command; returns the exit code (0, 2 on any error, 130 on Ctrl-C). Every error is
    one line ``pyattr: error: <message>`` on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if argv[:1] == ["run"]:  # before build_parser, which imports torch: `pyattr run` stays torch-free
            from .runtime.cli import main as run_main

            return run_main(argv[1:], prog="pyattr run")
        if argv[:1] == ["batch"]:  # torch-free too: the Ray Data pipeline (pip install "pyattr[ray]")
            from .runtime.batch_cli import main as batch_main

            return batch_main(argv[1:], prog="pyattr batch")
        parser = build_parser()
        _require_torch(argv, parser)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        warnings.showwarning = _warn_line
        return args.func(args)
    except UsageError as err:
        command = f" {argv[0]}" if argv[:1] in (["explain"], ["export"], ["evaluate"]) else ""
        return _error(f"{err} (see pyattr{command} --help)")
    except PyattrError as err:
        return _error(str(err))
    except BrokenPipeError:
        _silence_stdout()
        return _error("stdout was closed before pyattr finished writing to it (broken pipe)")
    except KeyboardInterrupt:
        try:
            print("pyattr: interrupted", file=sys.stderr)
        except OSError:
            pass
        return 130
    except Terminated:
        try:
            print("pyattr: terminated", file=sys.stderr)
        except OSError:
            pass
        return 143
    except Exception as err:  # last resort: one line, never a traceback
        if os.environ.get("PYATTR_TRACEBACK"):
            raise
        return _error(f"unexpected {type(err).__name__}: {err} (set PYATTR_TRACEBACK=1 to see where; "
                      "please report it)")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
