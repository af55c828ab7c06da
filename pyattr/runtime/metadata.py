"""Reading and checking the pyattr metadata of exported files, as data only (torch-free).

An exported file may come from anyone. Reading its metadata must never run code, and the metadata
must never steer the runtime into writing outside its output folder or allocating without bound:

* ``.pt`` (TorchScript) and ``.pt2`` (torch.export) files are zip archives; their metadata is the
  entry ``<archive>/extra/pyattr.json``, read here with :mod:`zipfile` (size-limited), never with
  ``torch.jit.load`` / ``torch.export.load`` (which unpickle, i.e. can execute code);
* ``.onnx`` files are protobuf; their metadata is the ``metadata_props`` entry ``pyattr``, read
  with onnxruntime (no pickle anywhere);
* :func:`validate_metadata` checks every field pyattr reads against a schema (types, ranges, names
  that are safe in file names, the preprocessing size equal to the graph's input size, one class
  name per score) and raises :class:`pyattr.errors.InputError` naming the field.

Example:
    >>> from pyattr.runtime.metadata import read_metadata
    >>> read_metadata("gradcam.pt2")["method"]                    # doctest: +SKIP
    'gradcam'
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyattr.errors import InputError

METADATA_KEY = "pyattr"
ZIP_ENTRY = re.compile(r"^[^/]+/extra/pyattr\.json$")  # TorchScript and .pt2 extra file, under the archive root

# Limits. Metadata is a few hundred bytes for a pyattr export; ImageNet's 1000 names are ~30 kB.
MAX_METADATA_BYTES = 4 << 20
MAX_CLASSES = 1_000_000
MAX_CLASS_NAME_CHARS = 1000
MAX_INPUT_SIDE = 8192  # one side of the graph's input image
MAX_INPUT_PIXELS = 4096 * 4096  # H * W of the graph's input image
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")  # method names: used in output file names
RESIZE_FILTERS = ("bilinear", "nearest", "bicubic", "lanczos", "box")
PREPROCESSING_KEYS = ("color", "scale", "mean", "std", "size", "resize", "layout")
LAYOUTS = ("image", "signal", "tabular")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The pyattr metadata of an exported file (``.onnx``, ``.pt`` or ``.pt2``), read as data and
    checked with :func:`validate_metadata`.

    Nothing in the file is executed: TorchScript and ``.pt2`` archives are opened as zip files and
    only their ``extra/pyattr.json`` entry is read. Raises :class:`pyattr.errors.InputError` for a
    missing, unreadable or corrupt file, a file without pyattr metadata, or metadata that fails the
    schema.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        text = _onnx_metadata_text(path)
    elif suffix in (".pt", ".pt2"):
        text = _zip_metadata_text(path)
    else:
        raise InputError(f"cannot tell the format of {path.name!r}: exported files end in .onnx, .pt or .pt2")
    return validate_metadata(parse_metadata(text, path.name))


def parse_metadata(text: str | bytes, name: str) -> dict[str, Any]:
    """The metadata JSON text of the file ``name`` as a dict; an :class:`InputError` when it is too
    large, not JSON or not a JSON object."""
    if len(text) > MAX_METADATA_BYTES:
        raise InputError(f"{name}: its pyattr metadata is {len(text)} bytes, over the limit of {MAX_METADATA_BYTES}")
    try:
        meta = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, ints of > 4300 digits
        raise InputError(f"{name}: its pyattr metadata is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise InputError(f"{name}: its pyattr metadata must be a JSON object, got {type(meta).__name__}")
    return meta


def _reject_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def _zip_metadata_text(path: Path) -> bytes:
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [info for info in archive.infolist() if ZIP_ENTRY.match(info.filename)]
            if not entries:
                raise InputError(f"{path.name} holds no pyattr metadata (no extra/pyattr.json entry; "
                                 "was it written by pyattr.export?)")
            if len(entries) > 1:
                raise InputError(f"{path.name} holds {len(entries)} pyattr metadata entries; a pyattr export "
                                 "has one")
            info = entries[0]
            if info.file_size > MAX_METADATA_BYTES:
                raise InputError(f"{path.name}: its pyattr metadata is {info.file_size} bytes, over the limit "
                                 f"of {MAX_METADATA_BYTES}")
            with archive.open(info) as entry:
                data = entry.read(MAX_METADATA_BYTES + 1)  # the header's size may lie
            if len(data) > MAX_METADATA_BYTES:
                raise InputError(f"{path.name}: its pyattr metadata is over the limit of {MAX_METADATA_BYTES} bytes")
            return data
    except InputError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise InputError(f"{path.name} is not a readable TorchScript / .pt2 archive "
                         f"({type(err).__name__}: {str(err)[:200]})") from err


def _onnx_metadata_text(path: Path) -> str:
    """The metadata entry of an ONNX file: parsed with the onnx package where installed (protobuf, no
    session built), else read from an onnxruntime session."""
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as err:  # protobuf's DecodeError and friends
            raise InputError(f"{path.name} is not a readable ONNX file ({type(err).__name__}: "
                             f"{str(err)[:200]})") from err
        texts = [entry.value for entry in model.metadata_props if entry.key == METADATA_KEY]
        text = texts[-1] if texts else None
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.intra_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"onnxruntime cannot load {path.name}: {first[:300]}") from err
        text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise InputError(f"{path.name} holds no pyattr metadata (was it written by pyattr.export?)")
    return text


# --- the schema -----------------------------------------------------------------------------------


def validate_metadata(meta: Any, *, input_shape: Sequence[Any] | None = None,
                      num_classes: int | None = None) -> dict[str, Any]:
    """Check pyattr metadata against its schema; returns ``meta`` unchanged.

    Args:
        meta: the decoded metadata.
        input_shape: the graph's image input shape ``(N, C, H, W)`` where known (entries that are
            not ints are dynamic and not compared): ``input_shape`` and ``preprocessing.size`` of the
            metadata must match it.
        num_classes: the graph's score dimension K where known: ``class_names`` must hold K names.

    Keys pyattr does not know are left alone (``pyattr.export(..., metadata=...)`` adds its own),
    except that they must not be used to smuggle values into the known ones.

    Raises:
        InputError: naming the first field that fails, e.g. ``metadata field 'method'``.
    """
    if not isinstance(meta, dict):
        raise InputError(f"pyattr metadata must be a JSON object, got {type(meta).__name__}")
    if "method" not in meta:
        raise InputError("metadata field 'method' is missing (every pyattr export names its method)")
    method = meta["method"]
    if not isinstance(method, str) or not SAFE_NAME.match(method):
        raise _field("method", method, "a name of 1-64 letters, digits, '_', '.', '+' or '-' "
                                       "starting with a letter or digit (it is used in output file names)")
    for key in ("pyattr_version", "target_convention", "model"):
        if key in meta and not (isinstance(meta[key], str) and len(meta[key]) <= 1000):
            raise _field(key, meta[key], "a string of at most 1000 characters")
    layer = meta.get("layer")
    if layer is not None and not _printable(layer, 1000) and not (
            isinstance(layer, list) and 1 <= len(layer) <= 64 and all(_printable(v, 1000) for v in layer)):
        raise _field("layer", layer, "a module name (a string of at most 1000 printable characters), a list of "
                                     "up to 64 of them (CAM on several layers), or null")
    if "signed" in meta and not isinstance(meta["signed"], bool):
        raise _field("signed", meta["signed"], "true or false")
    per_input = meta.get("targets_per_input")
    if per_input is not None and not (_int(per_input) and 1 <= per_input <= 1024):
        raise _field("targets_per_input", per_input, "an int from 1 to 1024 (the targets the graph explains per image)")
    if "multilabel" in meta and not isinstance(meta["multilabel"], bool):
        raise _field("multilabel", meta["multilabel"], "true or false")
    if "layout" in meta and meta["layout"] not in LAYOUTS:
        raise _field("layout", meta["layout"], f"one of {', '.join(LAYOUTS)}")
    for key in ("inputs", "outputs"):
        if key in meta and not (isinstance(meta[key], list) and len(meta[key]) <= 16
                                and all(_printable(v, 100) for v in meta[key])):
            raise _field(key, meta[key], "a list of at most 16 names")
    if "target" in meta:
        _validate_target(meta["target"], meta.get("inputs"))
    if "metrics" in meta:
        _validate_metrics(meta["metrics"], meta.get("target"), meta.get("outputs"))
    shape = meta.get("input_shape")
    if shape is not None:
        if not (isinstance(shape, list) and 1 <= len(shape) <= 4 and all(_int(s) and 1 <= s <= 1 << 20 for s in shape)):
            raise _field("input_shape", shape, "a list of 1-4 positive ints (the graph's input shape without the batch)")
        if input_shape is not None and len(input_shape) == len(shape) + 1:
            for got, expected in zip(shape, input_shape[1:]):
                if _int(expected) and got != expected:
                    raise _field("input_shape", shape, f"the graph's input shape {_shape(input_shape)} without the batch")
    if meta.get("preprocessing") is not None:
        _validate_preprocessing(meta["preprocessing"], shape, input_shape)
    names = meta.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _field("class_names", names, "a list of strings, one per class, or null")
        if len(names) > MAX_CLASSES or any(len(n) > MAX_CLASS_NAME_CHARS for n in names):
            raise _field("class_names", f"{len(names)} names", f"at most {MAX_CLASSES} names of at most "
                                                               f"{MAX_CLASS_NAME_CHARS} characters")
        if num_classes is not None and len(names) != num_classes:
            raise InputError(f"metadata field 'class_names' holds {len(names)} names but the graph scores "
                             f"{num_classes} classes: give one name per class")
    return meta


TARGET_INPUTS = {"class": (), "segmentation": ("region",), "similarity": ("reference",)}
"""The run-time inputs, after ``images`` and ``target``, of the target kinds pyattr knows."""

DETECTION_INPUTS = ["images", "boxes", "box_classes"]
"""The inputs of a detection graph (no ``target``: every box is explained)."""
MAX_DETECTION_BOXES = 4096  # B, boxes per run of a detection graph


def _validate_target(target: Any, inputs: Any) -> None:
    if not (isinstance(target, dict) and isinstance(target.get("kind"), str) and SAFE_NAME.match(target["kind"])):
        raise _field("target", target, "a JSON object with a 'kind' name (class, segmentation, similarity, ...)")
    if len(target) > 32 or not all(isinstance(k, str) and (v is None or isinstance(v, (str, bool)) or _number(v))
                                   and (not isinstance(v, str) or _printable(v, 200)) for k, v in target.items()):
        raise _field("target", target, "a flat JSON object of at most 32 names, numbers, booleans or strings")
    if target["kind"] == "detection":
        if isinstance(inputs, list) and inputs != DETECTION_INPUTS:
            raise _field("inputs", inputs, f"{', '.join(DETECTION_INPUTS)} for a detection target")
        boxes = target.get("boxes")
        if boxes is not None and not (_int(boxes) and 1 <= boxes <= MAX_DETECTION_BOXES):
            raise _field("target.boxes", boxes, f"an int from 1 to {MAX_DETECTION_BOXES} (the graph's boxes per run)")
        k = target.get("num_classes")
        if k is not None and not (_int(k) and k >= 1):
            raise _field("target.num_classes", k, "a positive int (the detector's number of classes)")
        return
    known = TARGET_INPUTS.get(target["kind"])
    if known is not None and isinstance(inputs, list) and inputs[2:] != list(known):
        raise _field("inputs", inputs, f"images, target{''.join(', ' + n for n in known)} for a "
                                       f"{target['kind']} target")


METRIC_SCORES = ("softmax", "sigmoid", "logit")
"""What the metrics of a method-with-metrics graph measure (:class:`pyattr.metrics.graph.MethodWithMetrics`)."""
GRAPH_OUTPUTS = ("scores", "explained_class", "raw", "maps")  # every attribution graph's first outputs


def _validate_metrics(metrics: Any, target: Any, outputs: Any) -> None:
    """The ``metrics`` entry of a method-with-metrics graph: ``outputs`` (the metric outputs, after the method's
    four), and the ``steps``, ``baseline`` and ``score`` they were computed with."""
    if not isinstance(metrics, dict):
        raise _field("metrics", metrics, "a JSON object (steps, baseline, score, outputs)")
    names = metrics.get("outputs")
    if not (isinstance(names, list) and 1 <= len(names) <= 12 and all(
            isinstance(n, str) and SAFE_NAME.match(n) and n not in GRAPH_OUTPUTS for n in names)
            and len(set(names)) == len(names)):
        raise _field("metrics.outputs", names, "a list of 1-12 distinct output names (other than "
                                               f"{', '.join(GRAPH_OUTPUTS)})")
    steps = metrics.get("steps")
    if steps is not None and not (_int(steps) and 1 <= steps <= MAX_INPUT_PIXELS):
        raise _field("metrics.steps", steps, "a positive int (the curves' intervals)")
    if "baseline" in metrics and not _number(metrics["baseline"]):
        raise _field("metrics.baseline", metrics["baseline"], "a finite number")
    if "score" in metrics and metrics["score"] not in METRIC_SCORES:
        raise _field("metrics.score", metrics["score"], f"one of {', '.join(METRIC_SCORES)}")
    kind = target.get("kind") if isinstance(target, dict) else "class"
    if kind != "class":
        raise _field("metrics", "...", f"absent from a {kind} graph (the metrics graphs score class targets only)")
    if isinstance(outputs, list) and outputs != [*GRAPH_OUTPUTS, *names]:
        raise _field("outputs", outputs, f"{', '.join(GRAPH_OUTPUTS)} then the metric outputs "
                                         f"{', '.join(names)}")


def _validate_preprocessing(p: Any, shape: list | None, input_shape: Sequence[Any] | None) -> None:
    if not isinstance(p, dict):
        raise _field("preprocessing", p, "a JSON object")
    unknown = sorted(set(p) - set(PREPROCESSING_KEYS))
    if unknown:
        raise InputError(f"metadata field 'preprocessing' has unknown keys {unknown}; known: "
                         f"{', '.join(PREPROCESSING_KEYS)}")
    if "color" in p and p["color"] not in ("RGB", "BGR"):
        raise _field("preprocessing.color", p["color"], "'RGB' or 'BGR'")
    if "layout" in p and p["layout"] not in ("NCHW", "NHWC"):
        raise _field("preprocessing.layout", p["layout"], "'NCHW' or 'NHWC'")
    if "resize" in p and p["resize"] not in RESIZE_FILTERS:
        raise _field("preprocessing.resize", p["resize"], f"one of {', '.join(RESIZE_FILTERS)}")
    if "scale" in p and not (_number(p["scale"]) and 0 < abs(p["scale"]) <= 1e6):
        raise _field("preprocessing.scale", p["scale"], "a finite non-zero number (1/255 for images in [0, 1])")
    for key in ("mean", "std"):
        if key in p:
            v = p[key]
            if not (isinstance(v, list) and 1 <= len(v) <= 4 and all(_number(e) and abs(e) <= 1e6 for e in v)):
                raise _field(f"preprocessing.{key}", v, "a list of one finite number per channel")
            if key == "std" and not all(v):
                raise _field("preprocessing.std", v, "non-zero numbers")
    if "size" in p:
        size = p["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(_int(s) and 1 <= s <= MAX_INPUT_SIDE for s in size)):
            raise _field("preprocessing.size", size, f"[H, W], two ints from 1 to {MAX_INPUT_SIDE}")
        if size[0] * size[1] > MAX_INPUT_PIXELS:
            raise _field("preprocessing.size", size, f"at most {MAX_INPUT_PIXELS} pixels (H * W)")
        graph_hw = list(input_shape[-2:]) if input_shape is not None and len(input_shape) == 4 else None
        if graph_hw is not None and all(_int(s) for s in graph_hw) and size != graph_hw:
            raise _field("preprocessing.size", size, f"the graph's input size {graph_hw} (its input has shape "
                                                     f"{_shape(input_shape)})")
        if shape is not None and len(shape) == 3 and size != shape[1:]:
            raise _field("preprocessing.size", size, f"the input_shape's size {shape[1:]}")


def _field(name: str, value: Any, expected: str) -> InputError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return InputError(f"metadata field '{name}' must be {expected}; got {shown}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _printable(v: Any, limit: int) -> bool:
    return isinstance(v, str) and len(v) <= limit and v.isprintable()


def _shape(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"
