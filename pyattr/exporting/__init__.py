"""One export path for every method: trace -> backward made of forward ops -> .pt / .pt2 / .onnx."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._files import written_atomically
from ..errors import ExportError, InputError, PyattrError
from ..methods.base import AttributionMethod, in_inference_mode, normal_copies
from ..runtime.metadata import read_metadata as _read_metadata
from ..runtime.metadata import validate_metadata
from ..targets.base import CLASS_TARGET, Target, as_target
from .diagnose import check_exportable, export_failure, first_line
from .serial import quiet_stdout, serialized_export
from .trace import GraphModule, example_inputs, input_names, output_names, scriptable, trace_graph

FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".pt2": "pt2"}
_STAGES = {"onnx": "the ONNX export (torch.export, then the ONNX translation)", "torchscript": "TorchScript scripting",
           "pt2": "torch.export"}
METADATA_KEY = "pyattr"


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS.values():
            raise InputError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS.values())}")
        return fmt
    if path.suffix not in FORMATS:
        raise InputError(
            f"cannot tell the export format from {path.name!r}: name the file .onnx, .pt (TorchScript) "
            "or .pt2 (torch.export), or pass format=..."
        )
    return FORMATS[path.suffix]


def build_metadata(method: AttributionMethod, example: torch.Tensor, class_names=None, preprocessing=None,
                   extra: dict[str, Any] | None = None, kind: Target | None = None) -> dict[str, Any]:
    """The metadata stored in every exported file (a JSON object), checked before anything is traced.

    Raises :class:`InputError` for a float64 example (onnxruntime could not run the graph), class
    names that are not a list of strings (e.g. one string), ``extra`` that is not a JSON object of
    JSON values or that overrides pyattr's own keys, and metadata that fails
    :func:`pyattr.runtime.metadata.validate_metadata` (e.g. a preprocessing size other than the example's).
    """
    if example.dtype == torch.float64:
        raise InputError("the example input is float64: exported graphs are float32 (onnxruntime cannot run a "
                         "graph that mixes float64 inputs with float32 weights); pass example.float()")
    if class_names is not None:
        if isinstance(class_names, (str, bytes)) or not hasattr(class_names, "__iter__"):
            raise InputError(f"class_names must be a list of strings, one per class; got {type(class_names).__name__}"
                             + (f" {class_names[:40]!r}" if isinstance(class_names, str) else ""))
        class_names = list(class_names)
        bad = next((n for n in class_names if not isinstance(n, str)), None)
        if bad is not None:
            raise InputError(f"class_names must be a list of strings, one per class; it holds {bad!r} "
                             f"({type(bad).__name__})")
    if preprocessing is not None and not isinstance(preprocessing, dict):
        raise InputError(f"preprocessing must be a dict (color, scale, mean, std, size, resize, layout); "
                         f"got {type(preprocessing).__name__}")
    meta: dict[str, Any] = {
        "pyattr_version": __version__,
        **method.metadata(),
        "input_shape": [int(s) for s in example.shape[1:]],
        "inputs": list(input_names(kind)),
        "outputs": list(output_names(kind)) + list(method.graph_outputs),
        "target": (kind or CLASS_TARGET).metadata(),
        "target_convention": (kind or CLASS_TARGET).convention,
        "preprocessing": dict(preprocessing) if preprocessing else {},
        "class_names": class_names,
    }
    if extra:
        if not isinstance(extra, dict):
            raise InputError(f"metadata must be a dict of JSON values; got {type(extra).__name__}")
        taken = sorted(k for k in extra if k in meta)
        if taken:
            raise InputError(f"metadata keys {taken} are pyattr's own; name yours differently")
        meta.update(extra)
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as err:
        bad = next((k for k in meta if not _json_ok(meta[k])), "?")
        raise InputError(f"the metadata is not JSON: field {bad!r} ({err}); export stores it as JSON, so give "
                         "str, int, float, bool, None, lists and dicts only") from err
    validate_metadata(meta, input_shape=[None, *meta["input_shape"]] if example.dim() == 4 else None)
    return meta


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def check_class_names(meta: dict[str, Any], gm) -> None:
    """After the trace: ``class_names`` must hold one name per score of the traced graph (targets whose scores
    are not classes, a similarity or one score per box, are not checked: a detector's names are its classes)."""
    names = meta.get("class_names")
    recorded = meta.get("target", {}).get("num_classes")  # a detector's K (Target.output_metadata)
    if names is not None and recorded is not None and len(names) != recorded:
        raise InputError(f"class_names holds {len(names)} names but the detector scores {recorded} classes: "
                         "give one name per class")
    if names is None or meta.get("target", {}).get("kind") in ("similarity", "detection"):
        return
    scores = gm.graph.output_node().args[0][0]
    shape = getattr(scores, "meta", {}).get("val")
    k = shape.shape[-1] if shape is not None else None
    if isinstance(k, int) and len(names) != k:
        raise InputError(f"class_names holds {len(names)} names but the model scores {k} classes: "
                         "give one name per class")


def _dynamic_shapes(count: int):
    batch = torch.export.Dim("batch", min=1, max=4096)
    # images, then the target ids (when the kind takes them) and the target's inputs: GraphModule's *inputs
    return {"images": {0: batch}, "inputs": tuple({0: batch} for _ in range(count - 1))}


def _export_program(gm, inputs: tuple[torch.Tensor, ...], dense_inputs: bool = False) -> torch.export.ExportedProgram:
    try:
        with serialized_export():
            return torch.export.export(GraphModule(gm, dense_inputs).eval(), tuple(inputs),
                                       dynamic_shapes=_dynamic_shapes(len(inputs)), strict=False)
    except Exception as err:
        raise ExportError(f"torch.export could not capture the traced attribution graph: "
                          f"{str(err).strip().splitlines()[0]}") from err


def _onnx_via_torch(gm, inputs, names):
    """The public route: torch.export capture, then torch.onnx (which decomposes what has no ONNX function).
    Slower (two more traces of the graph); taken only when the direct translation cannot be."""
    from . import _onnx

    ep = _export_program(gm, inputs)
    model = quiet_onnx_export(ep, inputs, names[0], names[1], optimize=False)
    _onnx.name_dims(model, inputs[0].shape)
    _onnx.clean_up(model)
    model.graph.metadata_props.clear()
    return model


def quiet_onnx_export(program_or_module, inputs, input_names, output_names, **options: Any):
    """``torch.onnx.export(..., dynamo=True)`` without its warnings and printed progress: the ONNX IR model."""
    with serialized_export(), warnings.catch_warnings(), quiet_stdout():  # this thread's prints only
        warnings.simplefilter("ignore")
        return torch.onnx.export(program_or_module, tuple(inputs), None, dynamo=True, input_names=list(input_names),
                                 output_names=list(output_names), verbose=False, **options).model


def save_onnx(model, path: Path, key: str, text: str, what: str = "the ONNX graph") -> None:
    """Save an ONNX IR model with ``text`` as its only metadata entry ``key``, after checking that it holds
    standard ops only (no ``Gradient``, no custom domain: the runtimes pyattr targets run nothing else)."""
    import onnx_ir as ir

    forbidden = sorted({node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)
                        if node.op_type == "Gradient" or node.domain not in ("", "ai.onnx")})
    if forbidden:
        raise ExportError(f"{what} holds non-standard ops: {', '.join(forbidden)}")
    model.metadata_props.clear()
    model.metadata_props[key] = text
    size = _constant_bytes(model)
    if size > ONNX_FILE_LIMIT:
        raise _too_large(what, size)
    try:
        ir.save(model, str(path))
    except Exception as err:  # protobuf's EncodeError: the serialized graph is over its 2 GiB
        if type(err).__name__ != "EncodeError":
            raise
        raise _too_large(what, size) from err


ONNX_FILE_LIMIT = 2**31 - 2**26
"""Bytes of constants above which a single .onnx file cannot be written: protobuf serializes at most 2 GiB (the
graph's nodes take the rest; 64 MiB are left for them)."""


def _constant_bytes(model) -> int:
    """Bytes of the graph's constants: initializers and ``Constant`` nodes' tensors, loop bodies included."""
    import onnx_ir as ir

    total = sum(getattr(v.const_value, "nbytes", 0) for v in model.graph.initializers.values()
                if v.const_value is not None)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and "value" in node.attributes:
            total += getattr(node.attributes["value"].as_tensor(), "nbytes", 0)
    return total


def _too_large(what: str, size: int) -> ExportError:
    err = ExportError(f"{what} holds {size / 2**30:.2f} GiB of weights and constants, over the 2 GiB that one .onnx "
                      "file can hold (protobuf's limit; pyattr writes no external-data files): export this model to "
                      "TorchScript (.pt) or torch.export (.pt2), which have no such limit")
    err.diagnosed = True  # export() passes it on as it is
    return err


ONNX_PACKAGES = ("onnx", "onnxscript", "onnx_ir")
"""What torch.onnx's exporter (and pyattr's save) imports; installed by ``pip install "pyattr[torch]"``."""


def require_onnx_packages() -> None:
    """An :class:`ExportError` saying what to install when the ONNX exporter's packages are missing (e.g. pyattr
    installed as the torch-free runtime, with torch added by hand), before any tracing."""
    import importlib.util

    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"exporting .onnx needs the packages {', '.join(missing)}, which are not installed: "
                          "pip install onnx onnxscript (pyattr's own install pulls them); .pt and .pt2 need torch only")


def _write_onnx(gm, inputs, tmp: Path, meta: dict) -> None:
    from . import _onnx

    names = (meta.get("inputs", input_names()), meta.get("outputs", output_names()))
    model = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _onnx.translate(gm, inputs[0].shape, *names)
    except Exception as err:  # noqa: BLE001 - it uses torch.onnx internals: any failure takes the public route
        logging.getLogger(__name__).debug("direct ONNX translation failed (%s); using torch.onnx.export", err)
    if model is None:
        model = _onnx_via_torch(gm, inputs, names)
    save_onnx(model, tmp, METADATA_KEY, json.dumps(meta))


def _write_torchscript(gm, tmp: Path, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(scriptable(gm))
        torch.jit.save(scripted, str(tmp), _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})


def _write_pt2(gm, inputs, tmp: Path, meta: dict) -> None:
    ep = _export_program(gm, inputs, dense_inputs=True)  # a .pt2 is called with torch tensors of any strides
    torch.export.save(ep, str(tmp), extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})


def write_graph(gm, fmt: str, inputs: tuple[torch.Tensor, ...], tmp: Path, meta: dict) -> None:
    """Write the traced graph ``gm`` as ``fmt`` (``"onnx"``, ``"torchscript"`` or ``"pt2"``) to ``tmp``, with the
    tracing inputs ``inputs`` (:func:`~pyattr.exporting.trace.example_inputs`: images, target, the target's
    inputs) and the metadata ``meta`` (whose ``inputs``/``outputs`` name the graph's). Raw exporter errors
    pass through (:func:`export` turns them into :class:`ExportError`)."""
    if fmt == "onnx":
        _write_onnx(gm, inputs, tmp, meta)
    elif fmt == "torchscript":
        _write_torchscript(gm, tmp, meta)
    else:
        _write_pt2(gm, inputs, tmp, meta)


def export(method: AttributionMethod, example_input: torch.Tensor, path: str | os.PathLike, *,
           format: str | None = None, class_names=None, preprocessing: dict | None = None,
           metadata: dict | None = None, target: Target | None = None,
           targets_per_input: int | None = None) -> Path:
    """Write ``method`` as ONE graph (forward and backward fused, the backward made of forward ops).

    Args:
        method: an attribution method bound to its model, e.g. ``pyattr.GradCAM(model, "layer4")``.
        example_input: an (N, C, H, W) input; the graph has a dynamic batch and this (C, H, W).
        path: ``.onnx`` (ONNX), ``.pt`` (TorchScript) or ``.pt2`` (torch.export); written atomically.
        format: overrides the format told by the suffix.
        class_names, preprocessing, metadata: stored in the file's metadata (JSON).
        target: what the graph explains: ``None`` (class logits) or a :class:`~pyattr.targets.Target`
            such as ``SegmentationTarget()`` or ``SimilarityTarget()`` (its class ids and values, if
            any, serve only as tracing examples: the graph takes them as inputs).
        targets_per_input: T, to explain T targets of every input in one run: the graph's ``target`` input is
            then (N, T) int64 (T fixed by the export, N dynamic) and ``explained_class`` (N, T), ``raw`` and
            ``maps`` (N, T, ...). Methods that explain several targets from one forward pass (the gradient and
            CAM families, the perturbation methods) keep doing so in the graph. The metadata records T
            (``targets_per_input``). ``None`` (default): ``target`` is (N,).

    The graph takes ``images`` (N, C, H, W) float and ``target`` (N,) int64 (-1 = arg-max), then the
    target's inputs (segmentation: ``region`` (N, H, W) float; similarity: ``reference`` (N, D) float),
    and returns ``scores`` (N, K) (the target's scores: logits, region-summed class scores, the (N, 1)
    similarity), ``explained_class`` (N,), ``raw`` (the method's raw map) and ``maps`` (N, H, W)
    normalized to [0, 1], then the target's outputs (similarity: ``embedding`` (N, D)). The metadata
    records the names (``inputs``, ``outputs``) and the target (``target``: its kind and options).

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.export(pyattr.GradCAM(model, "layer3"), torch.rand(1, 3, 64, 64), "gradcam.onnx")
        PosixPath('gradcam.onnx')
    """
    if in_inference_mode(example_input):  # tracing needs autograd
        with torch.inference_mode(False):
            return export(method, *normal_copies(example_input), path, format=format, class_names=class_names,
                          preprocessing=preprocessing, metadata=metadata, target=target)
    path = Path(path)
    fmt = _format_of(path, format)
    if fmt == "onnx":
        require_onnx_packages()
    if not isinstance(method, AttributionMethod):
        raise InputError(f"method must be a pyattr attribution method, got {type(method).__name__}")
    kind, _ = as_target(target)
    if target is not None and not isinstance(target, Target):
        raise InputError(f"export's target= is a target kind (e.g. pyattr.targets.SegmentationTarget()), not class "
                         f"ids ({type(target).__name__}): the exported graph takes the class ids as its input")
    method.check_target_kind(kind)
    kind.check_export(method)
    per_input = _check_targets_per_input(targets_per_input, kind)
    try:
        example = method._check_input(example_input)  # CAM methods run the model here to find their layer
    except PyattrError:
        raise
    except Exception as err:
        shape = tuple(example_input.shape[1:]) if isinstance(example_input, torch.Tensor) else None
        raise InputError(f"the model fails on the example input of shape {shape}: {type(err).__name__}: "
                         f"{first_line(err)}; give an example the model accepts") from err
    if not path.parent.exists():
        raise InputError(f"the folder {str(path.parent)!r} does not exist; create it first")
    meta = build_metadata(method, example, class_names, preprocessing, metadata, kind)
    if per_input is not None:
        meta["targets_per_input"] = per_input
    inputs = checked_example_inputs(method, example, kind, meta)
    if per_input is not None:  # the traced target: (N, T) arg-max ids, T static (only the batch is dynamic)
        inputs = (inputs[0], inputs[1][:, None].expand(-1, per_input).contiguous(), *inputs[2:])
    # one pyattr export at a time (torch's tracing state is process-wide, see .serial); eager calls never wait
    with serialized_export():
        gm = trace_graph(method, example, kind, inputs)
        check_class_names(meta, gm)
        check_exportable(gm, method, fmt)  # fail fast, before minutes in an exporter
        with written_atomically(path, f".tmp{path.suffix}") as tmp:
            try:
                write_graph(gm, fmt, inputs, tmp, meta)
            except (InputError, OSError):  # the caller's input, the disk: not the exporter's
                raise
            except ExportError as err:
                if getattr(err, "diagnosed", False):
                    raise
                raise export_failure(err, method, fmt, _STAGES[fmt], gm) from err
            except Exception as err:  # no raw torch/onnx exception leaves export()
                raise export_failure(err, method, fmt, _STAGES[fmt], gm) from err
    return path


def _check_targets_per_input(value: Any, kind: Target) -> int | None:
    """``targets_per_input`` checked: None or an int in 1..1024, for a kind whose graph takes class ids."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
        raise InputError(f"targets_per_input must be an int from 1 to 1024 (the targets explained per input), got "
                         f"{value!r}; None exports a graph that takes one target per input")
    if not kind.target_input:
        raise InputError(f"targets_per_input is for graphs that take class ids; a {kind.kind} target derives its "
                         "targets from its own inputs (its boxes): leave targets_per_input out")
    return value


def checked_example_inputs(method: AttributionMethod, example: torch.Tensor, kind: Target,
                           meta: dict[str, Any] | None = None) -> tuple[torch.Tensor, ...]:
    """The tracing inputs, after an eager run of the method on the example with the target's example
    inputs: what the target does not accept (a segmentation target on a classifier, a reference of another
    dimension) is an :class:`InputError` here, not a tracing failure. ``meta["target"]`` gets the target's
    :meth:`~pyattr.targets.base.Target.output_metadata` of that run."""
    inputs = example_inputs(method, example, kind)
    if kind is CLASS_TARGET:
        return inputs
    from .._callview import call_view
    from ..methods.base import select_output
    from ..targets.base import bound_target

    x = inputs[0][:1]
    extra = {name: value[:1] for name, value in zip(kind.inputs, inputs[len(inputs) - len(kind.inputs):])}
    with torch.no_grad(), call_view(method.model) as view, bound_target(kind, extra, 1) as bound:
        output = select_output(view.root(x), method.output)
        bound.scores(output, x, checks=True)
        if meta is not None:
            meta["target"].update(kind.output_metadata(output))
    return inputs


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The pyattr metadata of an exported file (any of the three formats), read as data: nothing in
    the file is unpickled or run (see :func:`pyattr.runtime.metadata.read_metadata`).

    Raises :class:`InputError` for a missing or corrupt file, one without pyattr metadata, or metadata
    that fails the schema.

    Example:
        >>> pyattr.read_metadata("gradcam.pt2")["method"]           # doctest: +SKIP
        'gradcam'
    """
    return _read_metadata(path)


__all__ = ["FORMATS", "build_metadata", "export", "read_metadata"]
