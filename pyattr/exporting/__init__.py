"""One export path for every method: trace -> backward made of forward ops -> .pt / .pt2 / .onnx."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._files import publish, temp_beside
from ..errors import ExportError, InputError, PyattrError
from ..methods.base import AttributionMethod, in_inference_mode, normal_copies
from .diagnose import check_exportable, export_failure, first_line
from .trace import INPUT_NAMES, OUTPUT_NAMES, GraphModule, scriptable, trace_graph

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
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata stored in every exported file (a JSON object)."""
    meta: dict[str, Any] = {
        "pyattr_version": __version__,
        **method.metadata(),
        "input_shape": [int(s) for s in example.shape[1:]],
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "target_convention": "target is an int64 (N,) tensor of class ids; -1 explains the arg-max class",
        "preprocessing": preprocessing or {},
        "class_names": list(class_names) if class_names is not None else None,
    }
    if extra:
        meta.update(extra)
    return meta


def _dynamic_shapes():
    batch = torch.export.Dim("batch", min=1, max=4096)
    return {"images": {0: batch}, "target": {0: batch}}


def _export_program(gm, x, t) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(GraphModule(gm).eval(), (x, t), dynamic_shapes=_dynamic_shapes(), strict=False)
    except Exception as err:
        raise ExportError(f"torch.export could not capture the traced attribution graph: "
                          f"{str(err).strip().splitlines()[0]}") from err


def _write_onnx(gm, x, t, tmp: Path, meta: dict) -> None:
    import onnx

    ep = _export_program(gm, x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ep, (x, t), str(tmp), dynamo=True, input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), verbose=False, optimize=True,
                          external_data=False)
    model = onnx.load(str(tmp))
    forbidden = sorted({n.op_type for n in model.graph.node
                        if n.op_type == "Gradient" or n.domain not in ("", "ai.onnx")})
    if forbidden:
        raise ExportError(f"the ONNX graph holds non-standard ops: {', '.join(forbidden)}")
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.save(model, str(tmp))


def _write_torchscript(gm, tmp: Path, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(scriptable(gm))
        torch.jit.save(scripted, str(tmp), _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})


def _write_pt2(gm, x, t, tmp: Path, meta: dict) -> None:
    ep = _export_program(gm, x, t)
    torch.export.save(ep, str(tmp), extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})


def export(method: AttributionMethod, example_input: torch.Tensor, path: str | os.PathLike, *,
           format: str | None = None, class_names=None, preprocessing: dict | None = None,
           metadata: dict | None = None) -> Path:
    """Write ``method`` as ONE graph (forward and backward fused, the backward made of forward ops).

    Args:
        method: an attribution method bound to its model, e.g. ``pyattr.GradCAM(model, "layer4")``.
        example_input: an (N, C, H, W) input; the graph has a dynamic batch and this (C, H, W).
        path: ``.onnx`` (ONNX), ``.pt`` (TorchScript) or ``.pt2`` (torch.export); written atomically.
        format: overrides the format told by the suffix.
        class_names, preprocessing, metadata: stored in the file's metadata (JSON).

    The graph takes ``images`` (N, C, H, W) float and ``target`` (N,) int64 (-1 = arg-max) and
    returns ``scores`` (N, K), ``explained_class`` (N,), ``raw`` (the method's raw map) and
    ``maps`` (N, H, W) normalized to [0, 1].

    Example:
        >>> import torch, pyattr
        >>> model = pyattr.zoo.load_builtin()
        >>> pyattr.export(pyattr.GradCAM(model, "layer3"), torch.rand(1, 3, 64, 64), "gradcam.onnx")
        PosixPath('gradcam.onnx')
    """
    if in_inference_mode(example_input):  # tracing needs autograd
        with torch.inference_mode(False):
            return export(method, *normal_copies(example_input), path, format=format, class_names=class_names,
                          preprocessing=preprocessing, metadata=metadata)
    path = Path(path)
    fmt = _format_of(path, format)
    if not isinstance(method, AttributionMethod):
        raise InputError(f"method must be a pyattr attribution method, got {type(method).__name__}")
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
    meta = build_metadata(method, example, class_names, preprocessing, metadata)
    gm = trace_graph(method, example)
    check_exportable(gm, method, fmt)  # fail fast, before minutes in an exporter
    from .trace import example_batch

    x, t = example_batch(example)
    tmp = temp_beside(path, f".tmp{path.suffix}")
    try:
        try:
            if fmt == "onnx":
                _write_onnx(gm, x, t, tmp, meta)
            elif fmt == "torchscript":
                _write_torchscript(gm, tmp, meta)
            else:
                _write_pt2(gm, x, t, tmp, meta)
        except (InputError, OSError):  # the caller's input, the disk: not the exporter's
            raise
        except ExportError as err:
            if getattr(err, "diagnosed", False):
                raise
            raise export_failure(err, method, fmt, _STAGES[fmt], gm) from err
        except Exception as err:  # no raw torch/onnx exception leaves export()
            raise export_failure(err, method, fmt, _STAGES[fmt], gm) from err
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The pyattr metadata of an exported file (any of the three formats)."""
    path = Path(path)
    fmt = _format_of(path, None)
    if fmt == "onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        for entry in model.metadata_props:
            if entry.key == METADATA_KEY:
                return json.loads(entry.value)
        raise InputError(f"{path} holds no pyattr metadata (was it written by pyattr.export?)")
    files = {f"{METADATA_KEY}.json": ""}
    if fmt == "torchscript":
        torch.jit.load(str(path), _extra_files=files, map_location="cpu")
    else:
        torch.export.load(str(path), extra_files=files)
    return json.loads(files[f"{METADATA_KEY}.json"])


__all__ = ["FORMATS", "build_metadata", "export", "read_metadata"]
