"""Trace an attribution method into one aten graph made of forward ops only."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import fx
from torch.fx import traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._callview import CallView, is_view
from .._capture import eval_mode
from ..errors import ExportError, PyattrError
from ..methods.base import AttributionMethod, select_output
from ..targets.base import CLASS_TARGET, Target
from .decompositions import decomposition_table
from .diagnose import describe_layers, export_failure, what_to_try
from .loops import scripted_loops
from .rewrites import ExportRewrites
from .serial import serialized_export

aten = torch.ops.aten
INPUT_NAMES = ("images", "target")
OUTPUT_NAMES = ("scores", "explained_class", "raw", "maps")


def input_names(kind: Target | None = None) -> tuple[str, ...]:
    """The graph's inputs: ``images``, ``target``, then the target's run-time inputs (e.g. ``region``); a kind
    that derives its ids from its inputs takes no ``target`` (detection: ``images, boxes, box_classes``)."""
    if kind is None:
        return INPUT_NAMES
    return (INPUT_NAMES if kind.target_input else INPUT_NAMES[:1]) + tuple(kind.inputs)


def output_names(kind: Target | None = None) -> tuple[str, ...]:
    """The graph's outputs: ``scores``, ``explained_class``, ``raw``, ``maps``, then the target's (``embedding``)."""
    return OUTPUT_NAMES + (() if kind is None else tuple(kind.outputs))


def example_batch(example: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A tracing batch whose size is >= 2 (sizes 0/1 get specialized) and differs from every
    other input dimension (equal sizes would be merged into one symbol)."""
    b = next(k for k in range(2, 64) if k not in tuple(example.shape[1:]))
    idx = torch.arange(b, device=example.device) % example.shape[0]
    x = example.detach()[idx].contiguous()  # channels-last examples export as NCHW-contiguous
    return x, torch.full((b,), -1, dtype=torch.long, device=example.device)


def example_inputs(method: AttributionMethod, example: torch.Tensor, kind: Target | None = None
                   ) -> tuple[torch.Tensor, ...]:
    """The tracing batch of :func:`example_batch` plus the target's run-time inputs for it (a class
    target has none): the graph's inputs in :func:`input_names` order."""
    x, t = example_batch(example)
    if kind is None or not kind.inputs:
        return x, t
    head = (x, t) if kind.target_input else (x,)
    from .._callview import call_view

    with torch.no_grad(), call_view(method.model) as view:
        output = select_output(view.root(x), method.output)
    extra = kind.example_inputs(x, output)
    missing = [name for name in kind.inputs if name not in extra]
    if missing:
        raise ExportError(f"the {kind.kind} target gave no example for its input(s) {', '.join(missing)}")
    return (*head, *(extra[name].detach().contiguous() for name in kind.inputs))


def batch_symbolic(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Fake copies of ``tensors`` whose first dimension is one symbol (their common batch size) and
    every other dimension static. Tracing these keeps the graph's batch dynamic without sending every
    spatial reshape (Swin's windows, MaxViT's grids, MobileViT's patches) through sympy: with all
    dimensions symbolic, those traces took minutes, with static ones they take seconds."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = []
    for i, tensor in enumerate(tensors):
        dims = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (tensor.dim() - 1)
        context = StatelessSymbolicContext(dynamic_sizes=dims)
        # equal batch sizes share one symbol (the shape environment's duck sizing)
        fakes.append(mode.from_tensor(tensor, symbolic_context=context, source=ConstantSource(f"input{i}")))
    return tuple(fakes)


def backward_ops_left(gm: fx.GraphModule) -> list[str]:
    """Names of ops in the graph that still compute a gradient (none should be left)."""
    return sorted({n.target.name() for n in gm.graph.nodes if n.op == "call_function" and _is_backward_op(n.target)})


def _is_backward_op(target) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return False
    name = target.name()
    return "backward" in name or name.startswith("aten::_backward")


def _current_graph() -> fx.Graph | None:
    """The graph that make_fx is recording in this thread (its proxy mode is per thread), or None."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    tracer = getattr(mode, "tracer", None)
    return getattr(tracer, "graph", None)


def _annotate(graph: fx.Graph, after: fx.Node, key: str, path: str, cls: str) -> None:
    """Put (path, cls) outermost in the ``nn_module_stack`` of every node recorded after ``after``: a module's
    call ends after those of the modules it calls, so the stack is built from the inside out."""
    node = after.next
    while node is not graph._root:
        if node.op not in ("placeholder", "output"):
            node.meta["nn_module_stack"] = {key: (path, cls), **(node.meta.get("nn_module_stack") or {})}
        node = node.next


def _recording_forward(forward, path: str, cls: str, calls: dict[str, int]):
    def recording(*args, **kwargs):
        graph = _current_graph()
        if graph is None:
            return forward(*args, **kwargs)
        count = calls[path] = calls.get(path, -1) + 1
        key = f"{path}@{count}" if count else path
        after = graph._root.prev
        out = forward(*args, **kwargs)
        if _current_graph() is graph:
            _annotate(graph, after, key, path, cls)
        return out

    return recording


@contextmanager
def recording_layers(view: CallView) -> Iterator[None]:
    """Within the body, the nodes that make_fx records in this thread while a module of ``view`` runs carry its
    layer in ``node.meta["nn_module_stack"]`` ({key: (name in the user's model, "module.Class")}, outermost first,
    as torch's ``record_module_stack`` writes it). Done by an instance ``forward`` on each module of the view (the
    call's own objects: the user's modules and other threads are not touched), removed on exit."""
    from .._capture import _NO_FORWARD

    calls: dict[str, int] = {}
    installed = []
    try:
        for path, module in view.root.named_modules():
            if not is_view(module):  # a shared TorchScript module: left alone
                continue
            cls = f"{type(module).__module__}.{type(module).__qualname__}"
            installed.append((module, module.__dict__.get("forward", _NO_FORWARD)))
            module.__dict__["forward"] = _recording_forward(module.forward, path, cls, calls)
        yield
    finally:
        for module, previous in reversed(installed):
            if previous is _NO_FORWARD:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous


def trace_graph(method: AttributionMethod, example: torch.Tensor, kind: Target | None = None,
                inputs: tuple[torch.Tensor, ...] | None = None) -> fx.GraphModule:
    """Trace ``method.graph(images, target, *target inputs)`` (forward + backward + post-processing) into
    a GraphModule of forward aten ops with a symbolic batch dimension. ``kind``: the target (default: a
    class logit); ``inputs``: the tracing inputs (default: :func:`example_inputs`). Parameters become
    buffers (detached views of the model's own tensors; nothing of the model is changed)."""
    kind = CLASS_TARGET if kind is None else kind
    if inputs is None:
        inputs = example_inputs(method, example, kind)

    def attribution_graph(images, *rest):
        target, extra = (rest[0], rest[1:]) if kind.target_input else (None, rest)
        with ExportRewrites():
            return method.graph(images, target, *extra, kind=kind)

    with serialized_export():  # torch's tracing state is process-wide: one export at a time (see .serial)
        method._tracing = True
        try:
            # attention in its math form: the fused kernels' backward ops have no export rule (every method,
            # not only those that ask for it, e.g. Saliency on a ViT); node meta preserved: the backward ops'
            # seq_nr (see .rewrites)
            with eval_mode(method.model) as view, warnings.catch_warnings(), sdpa_kernel([SDPBackend.MATH]), \
                    fx_traceback.preserve_node_meta(), recording_layers(view):
                warnings.simplefilter("ignore")
                # no record_module_stack: its tracer took the module calls of every thread (see .serial); the
                # layers are recorded on this call's view instead (recording_layers)
                gm = make_fx(attribution_graph, decomposition_table=decomposition_table(),
                             tracing_mode="symbolic", _allow_non_fake_inputs=True)(*batch_symbolic(*inputs))
        except Exception as err:  # torch's tracing errors are long: name the op, the layer and what to try
            if isinstance(err, PyattrError) and not isinstance(err, ExportError):
                raise
            raise export_failure(err, method, None, "tracing") from err
        finally:
            method._tracing = False

    left = [n for n in gm.graph.nodes if n.op == "call_function" and _is_backward_op(n.target)]
    if left:
        names = sorted({n.target.name() for n in left})
        layers = describe_layers(left)
        err = ExportError(
            f"could not export {type(method).__name__}: the model uses ops whose backward pyattr cannot yet "
            f"write as forward ops: {', '.join(names)}" + (f" (from {layers})" if layers else "") + ". "
            + what_to_try(None, type(method).__name__, names[0])
            + " A rule goes in pyattr.exporting.decompositions.")
        err.op, err.diagnosed = names[0], True
        raise err
    for name, param in list(gm.named_parameters(recurse=False)):
        delattr(gm, name)
        gm.register_buffer(name, param.detach())
    fold_constants(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


# layout ops computed at export time when all their inputs are constants; only the results of
# ``flip`` (the spatially flipped, channel-swapped weights of a convolution's input gradient, see
# decompositions.convolution_backward) become new constants, the ops before them are folded into them
_LAYOUT_OPS = frozenset({aten.transpose.int, aten.permute.default, aten.t.default, aten.view.default,
                         aten._unsafe_view.default, aten.reshape.default, aten.clone.default, aten.flip.default})


def fold_constants(gm: fx.GraphModule) -> int:
    """Replace every ``flip`` whose input is a chain of layout ops on a constant of ``gm`` by a new
    buffer holding its result; returns how many were folded. Ops left without users are removed,
    and so are buffers no node uses any more. (The forward pass keeps using the original weight,
    so a folded convolution weight is held twice.)"""
    values: dict[fx.Node, torch.Tensor] = {}
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part, None)
            if isinstance(value, torch.Tensor):
                values[node] = value
        elif node.op == "call_function" and node.target in _LAYOUT_OPS:
            inputs = node.all_input_nodes
            if not inputs or not all(n in values for n in inputs):
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            with torch.no_grad():
                values[node] = node.target(*args, **kwargs)
            if node.target != aten.flip.default:
                continue
            name = f"_folded_constant{folded}"
            while hasattr(gm, name):
                name += "_"
            gm.register_buffer(name, values[node].contiguous())
            with gm.graph.inserting_before(node):
                constant = gm.graph.get_attr(name)
            constant.meta = dict(node.meta)
            node.replace_all_uses_with(constant)
            gm.graph.erase_node(node)
            values[constant] = getattr(gm, name)
            folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name, _ in list(gm.named_buffers(recurse=False)):
            if name not in used:
                delattr(gm, name)
    return folded


class GraphModule(torch.nn.Module):
    """A thin module with named inputs around the traced graph (for torch.export / ONNX)."""

    def __init__(self, gm: fx.GraphModule, dense_inputs: bool = False):
        super().__init__()
        self.graph_module = gm
        self.dense_inputs = dense_inputs

    def forward(self, images: torch.Tensor, *inputs: torch.Tensor):
        if self.dense_inputs:  # the graph may view its inputs as traced (contiguous); a caller's may be strided
            images = images.clone(memory_format=torch.contiguous_format)
            inputs = tuple(t.clone(memory_format=torch.contiguous_format) for t in inputs)
        return self.graph_module(images, *inputs)


def scriptable(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` that ``torch.jit.script`` accepts: op overloads become op packets,
    ``sym_size`` becomes ``size`` and device constants follow the input's device."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first = placeholders[0]
    # the trace saw contiguous inputs and may view them; a caller's tensor may be strided (a permuted image
    # batch): make every input contiguous first (free when it already is)
    for node in placeholders:
        with graph.inserting_after(placeholders[-1]):
            dense = graph.call_method("contiguous", (node,))
        node.replace_all_uses_with(dense, delete_user_cb=lambda user, dense=dense: user is not dense)
    with graph.inserting_after(first):
        device = graph.call_function(getattr, (first, "device"))
    _script_ops(graph, device)
    scripted_loops(gm, _scriptable_body)
    gm.recompile()
    return gm


def _scriptable_body(body: fx.GraphModule) -> fx.GraphModule:
    """:func:`scriptable` for a loop body that takes its inputs as one list (:func:`loops.list_input_body`): the
    same op conversion, device constants following its first input."""
    first = next(n for n in body.graph.nodes if n.op == "call_function")  # args[0]
    with body.graph.inserting_after(first):
        device = body.graph.call_function(getattr, (first, "device"))
    _script_ops(body.graph, device)
    scripted_loops(body, _scriptable_body)
    body.recompile()
    return body


def _script_ops(graph: fx.Graph, device: fx.Node) -> None:
    """Op overloads -> op packets, ``sym_size`` -> ``size``, ``device=`` arguments -> ``device``'s value."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node is device:
            continue
        if isinstance(node.target, torch._ops.OpOverload):
            target = aten.size.int if node.target == aten.sym_size.int else node.target
            node.target = target.overloadpacket
        if "device" in node.kwargs:
            kwargs = dict(node.kwargs)
            kwargs["device"] = device
            kwargs.pop("pin_memory", None)
            node.kwargs = kwargs
