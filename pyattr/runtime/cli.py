"""The runtime's command line: ``python -m pyattr.runtime MODEL.onnx IMAGES... --out DIR``
(also ``pyattr run``). Torch-free, like the rest of :mod:`pyattr.runtime`.

Graphs exported with a target take its inputs from options:

* segmentation (``target=SegmentationTarget()``): ``--region MASK.png`` (one mask for every image; non-zero
  pixels are the region, resized nearest to the graph's input size) or ``--region FOLDER`` (each image's
  mask is the file of the folder with the image's file stem, e.g. ``masks/street1.png`` for
  ``photos/street1.jpg``); without ``--region`` the region is where the model predicts the class;
* similarity (``target=SimilarityTarget()``): ``--reference IMAGE`` (its embedding is computed by the same
  graph) or ``--reference-embedding FILE.npy`` (a float array (D,), (1, D), or (N, D): one row per image
  in order; read with ``allow_pickle=False``).

* detection (``pyattr export --task detection``: one map per box): ``--boxes FILE.json`` (the boxes to explain,
  see :func:`load_boxes_file` for the format) or ``--detector DETECTOR.onnx`` (a detector graph finds them first:
  ``--score-threshold``, default 0.3, and ``--max-boxes``, default 5 per image; :class:`~pyattr.runtime.Detector`
  for its two output layouts). Any number of boxes per image: the graph runs over chunks of its B boxes.

For these graphs a figure ``<name>_<method>_figure.png`` (image | mask or reference | heatmap | overlay; for
detection: the image with its boxes | one overlay per box) is written per image besides the overlay.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pyattr._files import publish, staging_folder, terminate_cleanly
from pyattr.errors import InputError, PyattrError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

MAX_EMBEDDING_FILE_BYTES = 256 << 20  # a --reference-embedding .npy: (N, D) float32 for N images
MAX_BOXES_FILE_BYTES = 64 << 20  # a --boxes .json
DEFAULT_SCORE_THRESHOLD, DEFAULT_MAX_BOXES = 0.3, 5  # --detector's, as pyattr explain --task detection's

DESCRIPTION = (
    "Run an exported attribution graph (.onnx from `pyattr export`) on images, without PyTorch: "
    "writes <name>_<method>_overlay.png per image into --out and prints one JSON line per image "
    "(image, explained_class, class_name, score, probability, predicted_class, overlay) on stdout. "
    "Segmentation graphs take --region, similarity graphs --reference or --reference-embedding; for "
    "those a figure <name>_<method>_figure.png (image | mask or reference | heatmap | overlay) is written "
    "too, and the JSON line names the target_kind (and the similarity). Method-with-metrics graphs "
    "(pyattr.metrics.MethodWithMetrics) add \"metrics\" to each line: deletion/insertion AUC and curves, "
    "Average Drop, ... Detection graphs take --boxes FILE.json "
    "or --detector DETECTOR.onnx and write per image an overlay (every box, the maximum of their maps), a "
    "figure (the boxes | one overlay per box) and a JSON line listing each box (box, class, score, matched, iou). "
    "Runs .onnx files only: TorchScript and .pt2 files execute code when loaded (see SECURITY.md)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The runtime's options (shared by ``python -m pyattr.runtime`` and ``pyattr run``)."""
    parser.add_argument("model", help="the exported graph, a .onnx file written by pyattr export")
    parser.add_argument("images", nargs="+", help="image files, or folders (their image files, sorted)")
    parser.add_argument("--out", default="pyattr_run", help="output folder (default pyattr_run)")
    parser.add_argument("--target", help="class to explain, id or name (default: each image's top class); graphs "
                        "exported with targets_per_input=T take T of them, comma-separated (e.g. 3,5,cat)")
    inputs = parser.add_mutually_exclusive_group()
    inputs.add_argument("--region", metavar="MASK",
                        help="segmentation graphs: a mask image for every image (non-zero pixels are the region), "
                             "or a folder holding each image's mask under the image's file stem (default: the "
                             "pixels the model predicts as the class)")
    inputs.add_argument("--reference", metavar="IMAGE",
                        help="similarity graphs: the reference image, embedded by the same graph")
    inputs.add_argument("--reference-embedding", metavar="FILE.npy",
                        help="similarity graphs: the reference embedding, a .npy float array (D,), (1, D) or "
                             "(N, D) (one row per image, in order)")
    inputs.add_argument("--boxes", metavar="FILE.json",
                        help="detection graphs: the boxes to explain, xyxy in each image's pixels: a JSON list with one "
                             "entry per image (in order) or an object keyed by image file name; an entry is a list of "
                             '{"box": [x0, y0, x1, y1], "class": id or name} or {"boxes": [[...]], "labels": [...]}')
    inputs.add_argument("--detector", metavar="DETECTOR.onnx",
                        help="detection graphs: find the boxes with this detector graph first (pyattr export --task "
                             "detection --detector-out writes the built-in one)")
    parser.add_argument("--score-threshold", type=float,
                        help=f"with --detector: explain the detections scored above this (default "
                             f"{DEFAULT_SCORE_THRESHOLD})")
    parser.add_argument("--max-boxes", type=int,
                        help=f"with --detector: the best this many detections per image (default {DEFAULT_MAX_BOXES})")
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
    parser.add_argument("--backend", choices=["onnxruntime", "openvino"], default="onnxruntime",
                        help="inference backend (default onnxruntime; openvino: pip install openvino, the same .onnx "
                             "compiled by OpenVINO in float32)")
    parser.add_argument("--providers", help="onnxruntime providers, comma-separated (default: CUDA if usable, else "
                                            "CPU); with --backend openvino: the OpenVINO device (default GPU if OpenVINO lists one, else CPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 0 = all cores)")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write <name>_<method>_maps.npz (map, raw, scores; embedding for similarity "
                             "graphs; metric_<name> for method-with-metrics graphs; detection: maps, raw, scores, "
                             "matched, iou, boxes, box_classes, input_boxes, "
                             "detector_scores) per image")


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
    if (args.score_threshold is not None or args.max_boxes is not None) and args.detector is None:
        raise InputError("--score-threshold and --max-boxes are options of --detector")
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        raise InputError("--score-threshold must be in [0, 1]")
    if args.max_boxes is not None and not 1 <= args.max_boxes <= 10_000:
        raise InputError("--max-boxes must be from 1 to 10000")
    try:
        check_num_threads(args.threads)
    except InputError as err:
        raise InputError(str(err).replace("num_threads", "--threads", 1)) from None
    images = expand_images(args.images)
    for image in images:  # headers only: a bad file stops the run before any work
        check_image_header(image)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    runtime = AttributionRuntime(args.model, providers=providers, num_threads=args.threads, backend=args.backend)
    # Signed relevance (LRP): by default drawn from the raw map, 0 at the middle of a diverging colormap.
    signed = bool(runtime.metadata.get("signed", False))
    args.cmap = args.cmap or ("bwr" if signed else "jet")
    args.source = args.source or ("raw" if signed else "maps")
    args.sign = args.sign or ("centered" if signed and args.source == "raw" else "all")
    kind = runtime.target_kind
    task = _task_inputs(args, runtime, images)  # regions / reference / boxes, every file read and checked
    if kind == "similarity" and args.target is not None:
        raise InputError(f"--target does not apply: {Path(args.model).name} explains a similarity (one score)")
    per = runtime.targets_per_input or 1
    if runtime.targets_per_input is not None:  # T ids for every image: each image gets T overlays
        given = [] if args.target is None else [v.strip() for v in args.target.split(",")]
        if args.target is not None and len(given) != per:
            raise InputError(f"--target: {Path(args.model).name} explains {per} targets per image; give {per} "
                             f"comma-separated class ids or names (e.g. --target {','.join(map(str, range(per)))}), "
                             f"got {len(given)}")
        target = None if args.target is None else runtime._target_columns(given, 1)[0]
    else:
        target = runtime.class_index(args.target) if args.target is not None else None
    out = prepare_output_folder(Path(args.out))  # the first write, after every check
    if kind == "detection":
        return _run_detection(args, runtime, images, task, target, out)

    names = unique_stems([p.stem.lstrip(".") or "image" for p in images])  # outputs are never hidden files
    method = runtime.method  # validated: a safe file-name part
    planned = [output_path(out, f"{name}_{method}", "_overlay.png") for name in names]
    figures = kind in ("segmentation", "similarity")
    with _staged(out) as (staging, lines):
        for start in range(0, len(images), args.batch_size):
            stop = start + args.batch_size
            chunk = images[start:stop]
            explained = runtime.explain(chunk, target, alpha=args.alpha, cmap=args.cmap, source=args.source,
                                        sign=args.sign, outlier_perc=args.outlier_perc,
                                        batch_size=args.batch_size, names=names[start:stop],
                                        region=None if task.regions is None else task.regions[start:stop],
                                        reference=None if task.reference is None else task.reference[start:stop])
            for i, e in enumerate(explained, start * per):
                overlay = planned[i] if per == 1 else output_path(out, f"{e.name}_{method}", "_overlay.png")
                _save_png(e.overlay, staging / overlay.name)
                line = {**e.summary(), "overlay": str(overlay)}
                if task.reference_name is not None:
                    line = {**e.summary(), "reference": task.reference_name, "overlay": str(overlay)}
                if figures:
                    figure = output_path(out, f"{e.name}_{method}", "_figure.png")
                    _figure(e, images[i // per], task, runtime, args).save(staging / figure.name, format="PNG")
                    line["figure"] = str(figure)
                if args.save_maps:
                    maps = output_path(out, f"{e.name}_{method}", "_maps.npz")
                    with open(staging / maps.name, "wb") as f:
                        extra = {} if e.embedding is None else {"embedding": e.embedding}
                        extra.update({f"metric_{k}": v for k, v in (e.metrics or {}).items()})
                        np.savez(f, map=e.map, raw=e.raw, scores=e.scores, **extra)
                    line["maps"] = str(maps)
                lines.append(line)
    for line in lines:
        print(json.dumps(line), flush=True)
    return 0


class _TaskInputs:
    """A run's target inputs: regions (N, H, W) float32 (-1 = predicted), a reference (N, D) float32, and
    what the figures show beside the image (the reference image); detection: the boxes of each image (dicts
    with boxes, labels) or the detector that finds them."""

    def __init__(self, regions=None, reference=None, reference_name=None, reference_image=None, boxes=None,
                 detector=None):
        self.regions = regions
        self.reference = reference
        self.reference_name = reference_name
        self.reference_image = reference_image
        self.boxes = boxes
        self.detector = detector


def _task_inputs(args: argparse.Namespace, runtime, images: list[Path]) -> _TaskInputs:
    """Read and check --region / --reference / --reference-embedding for ``runtime``'s target kind."""
    from .images import check_image_header, load_image

    kind, model = runtime.target_kind, Path(args.model).name
    given = next((f"--{name.replace('_', '-')}" for name in ("region", "reference", "reference_embedding", "boxes",
                                                              "detector")
                  if getattr(args, name, None) is not None), None)
    wanted = {"segmentation": ("--region",), "similarity": ("--reference", "--reference-embedding"),
              "detection": ("--boxes", "--detector")}.get(kind, ())
    if given is not None and given not in wanted:
        use = f"it takes {' or '.join(wanted)}" if wanted else "it takes no region, reference or boxes"
        raise InputError(f"{given} does not apply: {model} explains a {kind} target ({use})")
    n = len(images)
    if kind == "segmentation":
        if args.region is None:
            return _TaskInputs()
        masks = _region_files(Path(args.region), images)
        for mask in set(masks):
            check_image_header(mask)
        regions = runtime._explain_regions(masks, n)
        for i in range(n):  # a mask whose pixels are lost when resized to the graph's size
            if not regions[i].any():
                h, w = regions.shape[1:]
                raise InputError(f"--region: the mask {masks[i]} (for {images[i].name}) has no region pixels at the "
                                 f"graph's input size {h}x{w}: give a mask with non-zero pixels")
        return _TaskInputs(regions=regions)
    if kind == "similarity":
        if args.reference is not None:
            check_image_header(args.reference)
            picture = load_image(args.reference)
            reference = runtime.embed([picture])
            return _TaskInputs(reference=runtime._reference(reference, n), reference_name=str(args.reference),
                               reference_image=picture)
        if args.reference_embedding is not None:
            embedding = load_embedding(Path(args.reference_embedding))
            try:
                reference = runtime._reference(embedding, n)
            except InputError as err:
                raise InputError(f"--reference-embedding {args.reference_embedding}: {err}") from None
            return _TaskInputs(reference=reference, reference_name=str(args.reference_embedding))
        raise InputError(f"{model} explains the similarity to a reference: give --reference IMAGE or "
                         "--reference-embedding FILE.npy")
    if kind == "detection":
        if args.boxes is not None:
            return _TaskInputs(boxes=load_boxes_file(Path(args.boxes), images, runtime))
        if args.detector is not None:
            from .detection import Detector

            detector = Detector(args.detector, preprocessing=runtime.preprocessing, providers=runtime.providers,
                                num_threads=runtime.num_threads, backend=runtime.backend)
            if detector.class_names is None:
                detector.class_names = runtime.class_names
            elif runtime.class_names is not None and detector.class_names != runtime.class_names:
                raise InputError(f"--detector {Path(args.detector).name} has the classes {detector.class_names[:5]}... "
                                 f"but {model} explains {runtime.class_names[:5]}...: give the detector the explanation "
                                 "graph was exported for")
            return _TaskInputs(detector=detector)
        raise InputError(f"{model} explains detections (one map per box): give --boxes FILE.json (the boxes) or "
                         "--detector DETECTOR.onnx (a detector graph that finds them)")
    return _TaskInputs()


def _region_files(region: Path, images: list[Path]) -> list[Path]:
    """--region as one mask file per image: a file for all, or a folder matched by file stem."""
    if region.is_file():
        return [region] * len(images)
    if not region.is_dir():
        raise InputError(f"--region: no such file or folder: {region}")
    by_stem: dict[str, list[Path]] = {}
    for f in sorted(region.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(f.stem, []).append(f)
    masks = []
    for image in images:
        found = by_stem.get(image.stem, [])
        if len(found) != 1:
            problem = "no mask" if not found else f"{len(found)} masks ({', '.join(f.name for f in found)})"
            raise InputError(f"--region {region}: {problem} for the image {image.name}; the folder must hold "
                             f"exactly one mask image named {image.stem}.<png, jpg, ...> per image")
        masks.append(found[0])
    return masks


def load_embedding(path: Path) -> np.ndarray:
    """A reference embedding from a ``.npy`` file, read as data (``allow_pickle=False``): an object array,
    whose loading would unpickle (run) code, is refused; so are ``.npz`` archives and files over
    :data:`MAX_EMBEDDING_FILE_BYTES`."""
    if not path.is_file():
        raise InputError(f"--reference-embedding: no such file: {path}")
    if path.stat().st_size > MAX_EMBEDDING_FILE_BYTES:
        raise InputError(f"--reference-embedding {path}: {path.stat().st_size} bytes, over the limit of "
                         f"{MAX_EMBEDDING_FILE_BYTES}")
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            start = f.read(len(fmt.MAGIC_PREFIX))
            f.seek(0)
            if start.startswith(b"PK"):
                raise InputError(f"--reference-embedding {path} is an .npz archive; give a .npy file holding one "
                                 "float array (np.save(path, embedding))")
            if start != fmt.MAGIC_PREFIX:
                raise InputError(f"--reference-embedding {path} is not a .npy file (np.save writes them); refused "
                                 "without reading it as a pickle")
            version = fmt.read_magic(f)
            _, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
            if dtype.hasobject:  # decided from the header: nothing unpickled
                raise InputError(f"--reference-embedding {path} holds an object array (pickled Python objects), "
                                 "refused: loading it could run code. Save the embedding as a float array: "
                                 "np.save(path, embedding.astype(np.float32))")
            f.seek(0)
            value = np.load(f, allow_pickle=False)
    except InputError:
        raise
    except (ValueError, OSError, EOFError, SyntaxError) as err:  # a corrupt header or a truncated file
        raise InputError(f"--reference-embedding {path} is not a readable .npy array ({err})") from None
    if value.dtype.kind not in "biuf":
        raise InputError(f"--reference-embedding {path} holds a {value.dtype} array; give float numbers")
    return value


def load_boxes_file(path: Path, images: list[Path], runtime) -> list[dict[str, np.ndarray]]:
    """The boxes of ``--boxes FILE.json``, one dict (``boxes`` (B, 4) float32, ``labels`` (B,) int64, and
    ``scores`` when every box has one) per image; every box and class checked.

    The file holds, for each image, its boxes in the image's own pixels (xyxy: left, top, right, bottom):

    * a JSON list with one entry per image, in the order of the images on the command line (folders expanded,
      sorted), or an object whose keys are the images' file names (``"street.jpg"``) or stems (``"street"``);
    * an entry is a list of boxes ``{"box": [x0, y0, x1, y1], "class": 3}`` (``"class"``: an id or a class name
      of the graph's metadata; an optional ``"score"``), or torchvision's layout ``{"boxes": [[x0, y0, x1, y1],
      ...], "labels": [...]}`` (optional ``"scores"``); ``[]`` for an image without boxes.

    Example file for two images::

        [[{"box": [10, 12, 40, 44], "class": "circle"}, {"box": [30, 5, 60, 30], "class": 3}],
         {"boxes": [[4, 4, 20, 20]], "labels": [0]}]

    The JSON lines that ``pyattr run`` prints for detection graphs list each image's boxes in the first form.
    """
    from .detection import MAX_BOXES_PER_IMAGE, box_array, class_ids

    label = f"--boxes {path}"
    if not path.is_file():
        raise InputError(f"{label}: no such file")
    if path.stat().st_size > MAX_BOXES_FILE_BYTES:
        raise InputError(f"{label}: {path.stat().st_size} bytes, over the limit of {MAX_BOXES_FILE_BYTES}")
    try:
        data = json.loads(path.read_bytes(), parse_constant=_reject_json_constant)
    except (ValueError, RecursionError) as err:
        raise InputError(f"{label} is not valid JSON ({err}); see `pyattr run --help` for the format") from None
    if isinstance(data, dict):
        keys = {image.name: i for i, image in enumerate(images)}
        stems = {image.stem: i for i, image in enumerate(images)}
        entries: list = [None] * len(images)
        for key, value in data.items():
            i = keys.get(key, stems.get(key))
            if i is None:
                raise InputError(f"{label}: the key {key!r} names none of the {len(images)} images (keys are image "
                                 "file names or stems)")
            if entries[i] is not None:
                raise InputError(f"{label}: two entries for the image {images[i].name}")
            entries[i] = value
        missing = [images[i].name for i, e in enumerate(entries) if e is None]
        if missing:
            raise InputError(f"{label}: no entry for the image(s) {', '.join(missing[:5])}; give each image an "
                             "entry ([] for no box)")
    elif isinstance(data, list):
        if len(data) != len(images):
            raise InputError(f"{label} holds {len(data)} entries for {len(images)} images; give one entry per image, "
                             "in order ([] for an image without boxes), or key the entries by image file name")
        entries = data
    else:
        raise InputError(f"{label} must hold a JSON list (one entry per image) or an object keyed by image file "
                         f"name, got a {type(data).__name__}")
    result = []
    for i, entry in enumerate(entries):
        where = f"{label}, image {i} ({images[i].name})"
        if isinstance(entry, dict):
            unknown = sorted(set(entry) - {"boxes", "labels", "scores"})
            if unknown or "boxes" not in entry or "labels" not in entry:
                raise InputError(f"{where}: an entry in torchvision's layout holds 'boxes' and 'labels' (and "
                                 f"'scores'); got keys {sorted(entry)}")
            boxes, labels, scores = entry["boxes"], entry["labels"], entry.get("scores")
            if not isinstance(labels, list):
                raise InputError(f"{where}: 'labels' must be a list of class ids or names")
        elif isinstance(entry, list):
            if len(entry) > MAX_BOXES_PER_IMAGE:
                raise InputError(f"{where}: {len(entry)} boxes, over the limit of {MAX_BOXES_PER_IMAGE}")
            for b, item in enumerate(entry):
                if not isinstance(item, dict) or "box" not in item or "class" not in item \
                        or set(item) - {"box", "class", "score", "class_id", "matched", "iou", "detector_score"}:
                    raise InputError(f"{where}, box {b}: each box is {{\"box\": [x0, y0, x1, y1], \"class\": id or "
                                     f"name}} (optional \"score\"); got {str(item)[:80]}")
            boxes = [item["box"] for item in entry]
            labels = [item["class"] for item in entry]
            # a box's own score: "score", or "detector_score" in the JSON lines pyattr run prints (where "score" is
            # the explanation's objective)
            scores = [item.get("detector_score", item.get("score")) for item in entry]
            scores = scores if entry and all(v is not None for v in scores) else None
        else:
            raise InputError(f"{where}: an entry is a list of boxes or a dict with 'boxes' and 'labels', got "
                             f"{type(entry).__name__}")
        if isinstance(boxes, list) and any(not isinstance(b, list) or len(b) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in b) for b in boxes):
            bad = next(b for b in boxes if not (isinstance(b, list) and len(b) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)))
            raise InputError(f"{where}: a box must be 4 numbers [x0, y0, x1, y1] in the image's pixels, got "
                             f"{str(bad)[:80]}")
        try:
            xyxy = box_array(boxes, "boxes")
            ids = class_ids(labels, len(xyxy), "classes", runtime.class_index, runtime._box_classes()) \
                if len(xyxy) else np.zeros(0, np.int64)
            if len(xyxy) == 0 and len(labels):
                raise InputError(f"{len(labels)} classes for no box")
            if scores is not None:
                scores = np.asarray(scores, dtype=np.float64).reshape(-1)
                if len(scores) != len(xyxy) or not np.isfinite(scores).all():
                    raise InputError(f"'scores' must hold one finite number per box ({len(xyxy)})")
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
        except (TypeError, ValueError) as err:
            raise InputError(f"{where}: scores must be numbers ({err})") from None
        found = {"boxes": xyxy, "labels": ids}
        if scores is not None:
            found["scores"] = scores.astype(np.float32)
        result.append(found)
    return result


def _reject_json_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _run_detection(args: argparse.Namespace, runtime, images: list[Path], task: _TaskInputs, target: int | None,
                   out: Path) -> int:
    """``pyattr run`` for a detection graph: boxes from --boxes or from --detector (per batch), explained, drawn
    (:func:`pyattr.figures.detection_figure`), written through the staging folder; one JSON line per image."""
    from pyattr.figures import detection_figure

    from .images import load_image

    names = unique_stems([p.stem.lstrip(".") or "image" for p in images])
    method = runtime.method
    threshold = DEFAULT_SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold
    keep = DEFAULT_MAX_BOXES if args.max_boxes is None else args.max_boxes
    with _staged(out) as (staging, lines):
        for start in range(0, len(images), args.batch_size):
            chunk = [load_image(p) for p in images[start:start + args.batch_size]]  # decoded once per run
            if task.detector is not None:
                found = task.detector.detect(chunk, score_threshold=threshold, max_boxes=None,
                                             batch_size=args.batch_size)
            else:
                found = task.boxes[start:start + args.batch_size]
            if target is not None:  # --target: the boxes of that class only
                found = [{k: v[d["labels"] == target] for k, v in d.items()} for d in found]
            if task.detector is not None:
                found = [{k: v[:keep] for k, v in d.items()} for d in found]
            explained = runtime.explain(chunk, boxes=found, alpha=args.alpha, cmap=args.cmap, source=args.source,
                                        sign=args.sign, outlier_perc=args.outlier_perc, batch_size=args.batch_size,
                                        names=names[start:start + args.batch_size])
            for i, e in enumerate(explained, start):
                base = f"{e.name}_{method}"
                overlay, figure = output_path(out, base, "_overlay.png"), output_path(out, base, "_figure.png")
                _save_png(e.overlay, staging / overlay.name)
                _detection_figure(e, chunk[i - start], method, detection_figure).save(staging / figure.name,
                                                                                       format="PNG")
                line = {**e.summary(), "overlay": str(overlay), "figure": str(figure)}
                if args.save_maps:
                    maps = output_path(out, base, "_maps.npz")
                    extra = {} if e.detector_scores is None else {"detector_scores": e.detector_scores}
                    with open(staging / maps.name, "wb") as f:
                        np.savez(f, maps=e.maps, raw=e.raw, scores=e.scores, matched=e.matched, iou=e.iou,
                                 boxes=e.boxes, box_classes=e.box_classes, input_boxes=e.input_boxes, **extra)
                    line["maps"] = str(maps)
                lines.append(line)
    for line in lines:
        print(json.dumps(line), flush=True)
    return 0


def _detection_figure(e, rgb: np.ndarray, method: str, detection_figure):
    """The image with every box | one overlay per box, labelled with class, score and match."""
    d = len(e.boxes)
    scores = e.detector_scores if e.detector_scores is not None else e.scores
    labels = [f"{e.class_names[b]} {float(scores[b]):.2f}" + ("" if e.matched[b] else " (no match)") for b in range(d)]
    if d:
        title = f"{method}: why the box" if d == 1 else f"{method}: why each of the {d} boxes"
    else:
        title = f"{method}: no box to explain"
    return detection_figure(rgb, e.boxes, labels, e.overlays, title)


def _figure(e, image: Path, task: _TaskInputs, runtime, args: argparse.Namespace):
    """image | mask (or reference image) | heatmap | overlay, drawn by :func:`pyattr.figures.side_by_side`."""
    from PIL import Image

    from pyattr import render
    from pyattr.figures import side_by_side

    from .images import load_image

    rgb = load_image(image)
    size = rgb.shape[:2]
    if args.source == "maps":
        heat = np.clip(render.resize(e.map, size, num_threads=runtime.num_threads), 0, 1)
    else:
        heat = render.normalize(render.resize(e.raw, size, num_threads=runtime.num_threads), sign=args.sign,
                                outlier_perc=args.outlier_perc)
    context = None
    if e.target_kind == "similarity":
        if task.reference_image is not None:
            context = (task.reference_image, "reference")
        title = f"{runtime.method}: similarity {e.similarity:.3f} ({runtime.measure}) to {task.reference_name}"
    else:
        if e.region is not None:
            weights = np.clip(e.region / max(float(e.region.max()), 1e-12), 0, 1)
            grey = Image.fromarray((weights * 255).round().astype(np.uint8)).resize((size[1], size[0]), Image.NEAREST)
            context = (np.repeat(np.asarray(grey)[..., None], 3, axis=-1), "mask")
        title = (f"{runtime.method}: explains {e.class_name} over the {'given' if e.region is not None else 'predicted'}"
                 f" region (score {e.score:.2f}) | largest: {runtime.class_name(e.predicted_class)}")
    return side_by_side(rgb, heat, e.overlay, title, cmap=args.cmap, context=context)


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


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[tuple[Path, list[dict]]]:
    """A hidden staging folder inside ``out`` and the run's JSON lines: when the body finishes, the files each
    line names (overlay, figure, maps) move into place; the folder is removed either way, so a failed run
    leaves no partial output."""
    staging = _staging(out)
    lines: list[dict] = []
    try:
        yield staging, lines
        for line in lines:  # every image done: move the outputs into place
            for key in ("overlay", "figure", "maps"):
                if key in line:
                    publish(staging / Path(line[key]).name, Path(line[key]))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
