"""Export failures as one :class:`~pyattr.errors.ExportError` that says what failed, where, and what to try.

Every stage of :func:`pyattr.export` (tracing, the check of the traced graph, torch.export, the ONNX
translation, TorchScript scripting) can fail inside torch or onnx with long messages (ONNX's carry ANSI
colour codes). :func:`export_failure` turns any of them into an ``ExportError`` naming

- the op (parsed from the message, e.g. ``prims.as_strided_scatter`` or ``aten::sym_max``),
- the method and the format,
- the model layer the op came from: the FX node's ``nn_module_stack`` in the traced graph (for a
  backward op, the nearest forward node it reads), or the innermost module whose ``forward`` was on
  the stack when tracing failed, with the line of the model's code,
- what to try: another format, another method, or filing the op.

:func:`unexportable_nodes` checks a traced graph right after tracing for ops that a format is known
not to take, so that such an export fails in seconds instead of after minutes in the exporter.
"""

from __future__ import annotations

import collections
import linecache
import re
from collections.abc import Iterable
from types import TracebackType

import torch
from torch import fx, nn

from ..errors import ExportError, PyattrError

aten = torch.ops.aten
FORMAT_NAMES = {"onnx": "ONNX", "torchscript": "TorchScript (.pt)", "pt2": "torch.export (.pt2)"}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_OP_PATTERNS = (
    re.compile(r"No ONNX function found for ([\w.:]+)"),
    re.compile(r"Unknown builtin op: ([\w:.]+)"),
    re.compile(r"\b((?:aten|prims|torch\.ops\.\w+)[.:]{1,2}\w+(?:\.\w+)?)"),
)
_TORCH_FILES = re.compile(r"[/\\](torch|onnx|onnxscript|onnxruntime|pyattr|functorch|sympy)[/\\]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes."""
    return _ANSI.sub("", text)


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (colour codes removed), or its type name."""
    for line in strip_ansi(str(err)).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


def op_in_message(message: str) -> str | None:
    """The op an exporter's message is about, e.g. 'prims.as_strided_scatter', or None."""
    message = strip_ansi(message)
    for pattern in _OP_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1).rstrip(".:")
    return None


def _base_name(op: str) -> str:
    """'aten::sym_max' / 'prims.as_strided_scatter.default' / 'aten.gelu_backward' -> the op's bare name."""
    op = op.replace("::", ".").replace("torch.ops.", "")
    parts = [p for p in op.split(".") if p]
    if len(parts) >= 2 and parts[0] in ("aten", "prims") or len(parts) >= 3:
        parts = parts[1:]
    if len(parts) >= 2:  # an overload name follows the op
        parts = parts[:1]
    return parts[0] if parts else op


def _node_op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target.name().split("::")[-1].split(".")[0]
    return getattr(target, "__name__", str(target))


def module_of(node: fx.Node) -> tuple[str, str] | None:
    """(layer name, module class) of the innermost module a traced node ran in, or None. Code in the
    model's own ``forward`` (no submodule) gives ('', class of the model)."""
    stack = [(path, cls) for path, cls in (node.meta.get("nn_module_stack") or {}).values()]
    if not stack:
        return None
    path, cls = stack[-1]
    name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return path, name.rsplit(".", 1)[-1]


def _layer_text(name: str, cls: str, exact: bool = True) -> str:
    where = f"layer {name!r} ({cls})" if name else f"the model's own forward ({cls}.forward)"
    return where if exact else f"the backward of {where}"


def layer_of_node(node: fx.Node, max_hops: int = 64) -> tuple[str, str, bool] | None:
    """The layer a traced node came from: (name, class, exact). ``exact`` is True for a node that ran
    inside the module; a backward op runs outside every module and gets the layer of the forward op it
    differentiates (the same autograd ``seq_nr``, recorded while tracing), else of the nearest forward
    node it reads (``exact`` False for both)."""
    own = module_of(node)
    if own:
        return own[0], own[1], True
    seq = node.meta.get("seq_nr")
    if seq is not None:
        for other in node.graph.nodes:
            if other.meta.get("seq_nr") == seq and module_of(other):
                found = module_of(other)
                return found[0], found[1], False
    seen, queue = {node}, collections.deque((n, 1) for n in node.all_input_nodes)
    while queue:
        current, hops = queue.popleft()
        if current in seen or hops > max_hops:
            continue
        seen.add(current)
        found = module_of(current)
        if found:
            return found[0], found[1], False
        queue.extend((n, hops + 1) for n in current.all_input_nodes)
    return None


def nodes_for_op(gm: fx.GraphModule | None, op: str | None) -> list[fx.Node]:
    """The traced graph's nodes of ``op`` (by bare name); if none, those whose name begins ``op``'s
    (an exporter's ``as_strided_scatter`` comes from the graph's ``as_strided``)."""
    if gm is None or not op:
        return []
    base = _base_name(op)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    exact = [n for n in calls if _node_op_name(n) == base]
    if exact:
        return exact
    return [n for n in calls if len(_node_op_name(n)) >= 4 and base.startswith(_node_op_name(n))]


def describe_layers(nodes: Iterable[fx.Node], limit: int = 3) -> str | None:
    """"layer 'a.b' (Linear), the backward of layer 'c' (CNBlock)" for the layers of ``nodes`` (first ``limit``)."""
    found: dict[str, str] = {}
    for node in nodes:
        layer = layer_of_node(node)
        if layer is None:
            continue
        key = _layer_text(*layer)
        found.setdefault(key, key)
        if len(found) >= limit:
            break
    return ", ".join(found) if found else None


def _frames(err: BaseException) -> list[tuple[object, int]]:
    """(frame, line) pairs of ``err``'s traceback and those of its causes, outermost first."""
    frames, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb: TracebackType | None = err.__traceback__
        chain = []
        while tb is not None:
            chain.append((tb.tb_frame, tb.tb_lineno))
            tb = tb.tb_next
        frames = chain + frames if frames else chain
        err = err.__cause__ or err.__context__
    return frames


def original_of(module: nn.Module) -> nn.Module:
    """The user's module behind a per-call view (:mod:`pyattr._callview`), or ``module`` itself."""
    from .._callview import _VIEW_MARK

    return module.__dict__.get(_VIEW_MARK, module)


def layer_from_traceback(err: BaseException, model: nn.Module) -> tuple[str, str] | None:
    """(layer name, class) of the innermost module of ``model`` whose forward was running when ``err``
    was raised, or None."""
    names = {id(m): name for name, m in model.named_modules()}
    found = None
    for frame, _ in _frames(err):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            owner = original_of(owner)  # methods run on a per-call view of the model
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = (names[id(owner)], type(owner).__name__)
    return found


def user_code_line(err: BaseException) -> str | None:
    """'file.py:42: if x.sum() > 0:' for the innermost frame outside torch/pyattr, or None."""
    found = None
    for frame, line in _frames(err):
        filename = frame.f_code.co_filename
        if _TORCH_FILES.search(filename) or filename.startswith("<"):
            continue
        source = linecache.getline(filename, line).strip()
        found = f"{filename.rsplit('/', 1)[-1]}:{line}" + (f": {source}" if source else "")
    return found


def what_to_try(fmt: str | None, method_name: str, op: str | None) -> str:
    """The advice ending every export error. ``fmt`` None: the failure is before any format (tracing),
    so another format would fail the same way."""
    filed = f"the op {op}" if op else "the failing op"
    if fmt is None:
        first = (f"use another method than {method_name} (a CAM method on a later layer needs no gradient "
                 "through earlier ones), or replace the layer")
    else:
        others = " or ".join(name for key, name in FORMAT_NAMES.items() if key != fmt)
        first = f"export to {others} instead, or use another method than {method_name}"
    return f"What to try: {first}; or report {filed} with this message to pyattr's issue tracker so that a rule can be added."


def _what(method, fmt: str | None) -> str:
    name = type(method).__name__
    layer = getattr(method, "layer_name", None)
    target = f" to {FORMAT_NAMES.get(fmt, fmt)}" if fmt else ""
    return f"{name}" + (f" (layer {layer!r})" if layer else "") + target


def export_failure(err: BaseException, method, fmt: str | None, stage: str,
                   gm: fx.GraphModule | None = None) -> ExportError:
    """An :class:`ExportError` for ``err`` raised at ``stage`` ('trace', 'torch.export', 'ONNX
    translation', 'TorchScript scripting', ...) of exporting ``method`` to ``fmt``."""
    cause = err
    if isinstance(err, ExportError) and err.__cause__ is not None and not isinstance(err.__cause__, PyattrError):
        cause = err.__cause__  # a writer's own ExportError around torch's exception: diagnose torch's
    message = strip_ansi(str(cause))
    op = getattr(err, "op", None) or op_in_message(message)
    parts = [f"could not export {_what(method, fmt)}: {stage} failed"]
    if op:
        parts[0] += f" on the op {op}"
    layers = describe_layers(nodes_for_op(gm, op)) if gm is not None else None
    layer_filter = getattr(cause, "layer_filter", None)
    if layers is None and layer_filter is not None:  # a rule that knows which kind of layer it fails on
        named = [f"layer {n!r} ({type(m).__name__})" for n, m in method.model.named_modules() if layer_filter(m)]
        layers = ", ".join(named[:3]) or None
    if layers is None and stage == "tracing":
        found = layer_from_traceback(cause, method.model)
        layers = _layer_text(*found) if found else None
    where = []
    if layers:
        where.append(f"it comes from {layers}")
    code = user_code_line(cause) if stage == "tracing" else None
    if code:
        where.append(f"at {code}")
    text = (parts[0] + (" (" + ", ".join(where) + ")" if where else "")
            + f". {type(cause).__name__}: {_summary(message, op) or first_line(cause)}")
    if _is_data_dependent(message):
        text += (". The model branches on a tensor's value (Python control flow such as `if x.sum() > 0`), "
                 "which one exported graph cannot hold")
    failure = ExportError(f"{text}. {what_to_try(fmt, type(method).__name__, op)}")
    failure.op = op
    failure.diagnosed = True
    return failure


def _summary(message: str, op: str | None) -> str | None:
    """The line of ``message`` that names ``op`` (an exporter's first line is often generic)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if op:
        for line in lines:
            if op in line:
                return line[:400]
    return lines[0][:400] if lines else None


def _is_data_dependent(message: str) -> bool:
    return any(key in message for key in ("data-dependent", "data dependent", "GuardOnDataDependent",
                                          "Could not guard on", "item()", "nonzero"))


# --------------------------------------------------------------------------------------------------
# Checking a traced graph right after tracing
# --------------------------------------------------------------------------------------------------

def _symbolic_python_function(target) -> bool:
    """torch.sym_max / sym_min / sym_float / sym_ite / sym_not / sym_sum / _sym_sqrt ...: size arithmetic
    that make_fx records as Python calls and torch.jit.script has no builtin for."""
    name = getattr(target, "__name__", "")
    return (getattr(target, "__module__", None) in ("torch", "torch.fx.experimental.sym_node")
            and name.startswith(("sym_", "_sym_")))


# ops that the ONNX translation has no function for (the view-scatters that in-place writes into
# ``as_strided`` views become once torch.export functionalizes the graph)
_NOT_ONNX = frozenset({aten.as_strided_.default, aten.as_strided_scatter.default})


def unexportable_nodes(gm: fx.GraphModule, fmt: str) -> list[fx.Node]:
    """Nodes of a traced graph that ``fmt`` is known not to take: for TorchScript, symbolic-size Python
    functions (``torch.sym_max``, ``sym_min``, ...); for ONNX, writes into ``as_strided`` views."""
    bad = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if fmt == "torchscript" and _symbolic_python_function(target):
            bad.append(node)
        elif fmt == "onnx" and isinstance(target, torch._ops.OpOverload):
            writes_a_view = (target._schema.is_mutable and node.args and isinstance(node.args[0], fx.Node)
                             and node.args[0].target == aten.as_strided.default)
            if target in _NOT_ONNX or writes_a_view:
                bad.append(node)
    return bad


def check_exportable(gm: fx.GraphModule, method, fmt: str) -> None:
    """Raise an :class:`ExportError` naming the op and layer when ``gm`` holds ops ``fmt`` cannot take."""
    bad = unexportable_nodes(gm, fmt)
    if not bad:
        return
    ops = sorted({_display_op(n) for n in bad})
    layers = describe_layers(bad)
    where = f" (it comes from {layers})" if layers else ""
    err = ExportError(
        f"could not export {_what(method, fmt)}: the traced graph holds {', '.join(ops)}, which "
        f"{FORMAT_NAMES[fmt]} cannot take{where}. {what_to_try(fmt, type(method).__name__, ops[0])}")
    err.op = ops[0]
    err.diagnosed = True
    raise err


def _display_op(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.name().replace("::", ".")
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", str(target))
    return f"{module}.{name}" if module and module != "builtins" else name

