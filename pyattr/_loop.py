"""One loop over equal passes: a Python loop in eager calls, one ``scan`` node in a traced graph.

A multi-pass method (Score-CAM's C / chunk_size masked forward passes, ...) computes the same function of
one slice of its inputs again and again. Unrolled in a traced graph, the body is copied once per pass
(Score-CAM on ResNet-50's ``layer4``: 64 copies of the forward pass; no export finished in 420 s).
:func:`batched_loop` traces the body once: while pyattr traces a method for export, it is one
``torch.ops.higher_order.scan`` node whose body is a subgraph (``scan_combine_graph_<i>``), which
torch.export keeps, torch.onnx writes as one ONNX ``Scan`` and pyattr's TorchScript route turns into a
scripted ``for`` loop (:mod:`pyattr.exporting.loops`).

torch's scan traces its body as a pure function of its inputs: a tensor the body merely closes over (the
model's weights, the call's images, a target's inputs) would be frozen into the subgraph as a constant, a
fake one while tracing. So, right after tracing, every constant of the body becomes an input of it: a
tensor of the enclosing trace is passed from it, a weight becomes a constant of the enclosing graph (one
tensor, stored once) passed in; the body is left with no constant of its own.

Gradients in the body: it is traced below autograd, so ``torch.autograd.grad`` inside it fails while tracing
("element 0 of tensors does not require grad"); ``torch.func.vjp`` traces (the backward made of forward ops by
pyattr's decompositions). :func:`vjp_columns` takes a gradient with ``autograd.grad`` outside a loop body (eager
calls, unrolled traces: unchanged) and with ``torch.func.vjp`` inside one (:func:`in_loop_body`); the autograd
Functions of modified backward rules (Guided Backprop / DeconvNet's ReLU, DeepLIFT's rules against references) are
written in ``setup_context`` form so that ``torch.func`` accepts them, and a CAM takes a layer's gradient as the
gradient with respect to a zero tensor added to the layer's output (``_capture.add_to_outputs``). So the gradient
multi-pass methods are one loop too: Integrated Gradients and SmoothGrad with an int ``chunk_size`` (their default
exports all points as one batched pass, no loop), GradientSHAP, DeepLIFT-SHAP and Smooth Grad-CAM++ (their passes
of ``chunk_size``), the chunks made equal and the last one padded with points of weight 0 (:func:`loop_passes`:
eager calls keep their Python loop of uneven chunks, bit for bit). A loop inside a loop's body (SmoothGrad over an
Integrated Gradients with a ``chunk_size``) is unrolled in that body.

Costs: torch traces a scan's body several times (pyattr's trace, then torch.export's and the ONNX exporter's
decompositions), so a loop of few passes exports in more CPU time than the unrolled passes (Integrated Gradients on
resnet18, 64 px: 4 passes 9.3 s against 7.2 s, 8 passes 9.2-10.1 s against 13.1-13.6 s; the loop's file 51 MB against
199 / 351 MB: ``benchmarks/results/loop_export_ig_resnet18*.md``). Ops of the body that depend on constants only (a
convolution's flipped weight in a backward pass) are not hoisted out of the loop: they run once per pass.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch import fx

from ._callview import is_tracing
from .errors import ExportError

_local = threading.local()


@contextlib.contextmanager
def unrolled_loops() -> Iterator[None]:
    """Within this context (in this thread), :func:`batched_loop` runs its Python loop while tracing too: a traced
    graph holds one copy of the body per pass, as before loops existed (for comparisons: ``benchmarks/loop_export.py``)."""
    previous = getattr(_local, "unrolled", False)
    _local.unrolled = True
    try:
        yield
    finally:
        _local.unrolled = previous


def in_loop_body() -> bool:
    """Whether the calling thread is tracing the body of a :func:`batched_loop` as one ``scan`` node: the body is
    traced below autograd there, so a gradient inside it is taken with ``torch.func.vjp`` (:func:`vjp_columns`)."""
    return getattr(_local, "body", 0) > 0


def vjp_columns(fn: Callable[[torch.Tensor], tuple[torch.Tensor, object]], x: torch.Tensor
                ) -> tuple[torch.Tensor, object]:
    """``(grads, aux)`` for ``selected, aux = fn(x)`` with ``selected`` of shape (M, T): ``grads`` (M, T, *x.shape[1:])
    holds the gradient of ``selected[:, j].sum()`` with respect to ``x`` for every column j.

    ``torch.autograd.grad`` (one backward per column, the graph retained between them) outside a loop body, so that
    eager calls and unrolled traces are what they were; ``torch.func.vjp`` inside one (:func:`in_loop_body`), where
    autograd does not trace. ``aux``: tensors (a tuple / list of them, as ``torch.func.vjp`` wants); it comes back
    detached from ``x``'s graph only in the ``vjp`` case (detach what you keep)."""
    if in_loop_body():
        selected, pullback, aux = torch.func.vjp(fn, x, has_aux=True)
        columns = selected.shape[1]
        eye = torch.eye(columns, dtype=selected.dtype, device=selected.device)
        grads = [pullback(eye[j].expand_as(selected))[0] for j in range(columns)]
        return torch.stack(grads, 1), aux
    x = x.detach().requires_grad_(True)
    selected, aux = fn(x)
    columns = selected.shape[1]
    grads = [torch.autograd.grad(selected[:, j].sum(), x, retain_graph=j + 1 < columns)[0] for j in range(columns)]
    return torch.stack(grads, 1), aux


def loops_unrolled() -> bool:
    """Whether :func:`batched_loop` runs its Python loop while tracing too (within :func:`unrolled_loops`)."""
    return getattr(_local, "unrolled", False)


def loop_passes(passes: int) -> bool:
    """Whether a method's ``passes`` passes should be one :func:`batched_loop` with equal passes (the last one
    padded): while tracing for export, when there are several, outside a loop's body (a loop inside a body is
    unrolled there) and outside :func:`unrolled_loops`. Eager calls keep their own Python loop of uneven chunks
    (their results unchanged)."""
    return is_tracing() and passes > 1 and not in_loop_body() and not loops_unrolled()


def batched_loop(body: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], *xs: torch.Tensor
                 ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``body(xs[0][i], xs[1][i], ...)`` for i in ``range(len(xs[0]))``, its outputs stacked along a new first
    dimension (a tuple of stacked outputs when ``body`` returns a tuple). ``body`` may close over any tensor;
    its outputs must be new tensors (not views of its inputs), of one shape in every pass.

    Eager: a Python loop. While pyattr traces a method for export: one ``scan`` node (see the module's text).

    Example:
        >>> batched_loop(lambda a, b: a * b, torch.ones(3, 2), torch.arange(3.)[:, None]).shape
        torch.Size([3, 2])
    """
    if not xs or any(x.shape[0] != xs[0].shape[0] for x in xs):
        raise ValueError("batched_loop needs tensors of one length along their first dimension")
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if is_tracing() and get_proxy_mode() is not None and not getattr(_local, "unrolled", False):
        return _traced_loop(body, xs)
    outs = [body(*(x[i] for x in xs)) for i in range(int(xs[0].shape[0]))]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(column) for column in zip(*outs))
    return torch.stack(outs)


def _traced_loop(body, xs):
    from torch._higher_order_ops.scan import scan_op
    from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot

    single = []

    def combine(carry, *rest):
        _local.body = getattr(_local, "body", 0) + 1
        try:
            out = body(*rest[:len(xs)])
        finally:
            _local.body -= 1
        single.append(not isinstance(out, tuple))
        return [carry.clone(), *((out,) if single[-1] else out)]

    init = torch.zeros((), device=xs[0].device)  # scan needs a carry; this one is unused
    tracer = get_proxy_mode().tracer
    # the trace's symbolic sizes (the batch) go in as the sizes of (unused, one-column) inputs of the body, which
    # its own trace then knows: the symbolic size of a tensor it closes over would be unknown to it (one column,
    # not zero: no empty tensor for a runtime to trip over)
    sizes = [[d for d in t.shape if isinstance(d, torch.SymInt)] for t, slot in list(tracer.tensor_tracker.items())
             if slot.proxy.node.op == "placeholder"]
    anchors = tuple(torch.zeros((*s, 1), device=xs[0].device) for s in sizes if s)
    outs = scan_op(combine, [init], list(xs), anchors)
    scan = get_proxy_slot(outs[1], tracer).proxy.node.args[0]
    lift_constants(tracer, scan, getattr(xs[0], "fake_mode", None))
    ys = tuple(outs[1:])
    return ys[0] if single[0] else ys


def lift_constants(tracer, scan: fx.Node, fake_mode=None) -> int:
    """Make every tensor constant of the body of ``scan`` (a ``higher_order.scan`` node being traced by
    ``tracer``) an input of the body: a fake tensor of the enclosing trace is passed from its node there, a real
    tensor (a weight) from a constant of the enclosing graph. Raises :class:`ExportError` for a fake tensor the
    enclosing trace does not know. Returns how many constants were lifted."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, get_proxy_slot

    graph_attr, init, xs, extra = scan.args[:4]
    body: fx.GraphModule = getattr(tracer.root, graph_attr.target)
    constants: list[tuple[fx.Node, torch.Tensor]] = []
    for node in body.graph.nodes:
        if node.op == "get_attr":
            value = body
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                constants.append((node, value))
    if not constants:
        return 0
    # the body's tensors go first: the tracer looks weights up among the root's parameters, the body's included
    for name in {node.target.split(".")[0] for node, _ in constants}:
        delattr(body, name)
    last = [n for n in body.graph.nodes if n.op == "placeholder"][-1]
    storages = {_storage(n.meta["val"]) for n in (*init, *xs, *extra) if isinstance(n.meta.get("val"), torch.Tensor)}
    lifted: dict[int, fx.Node] = {}  # id(tensor) -> the body's new input
    outer: list[fx.Node] = []
    for node, value in constants:
        if id(value) not in lifted:
            if isinstance(value, FakeTensor):
                proxy = get_proxy_slot(value, tracer, None)
                if proxy is None:
                    raise ExportError("a loop body (pyattr._loop.batched_loop) closes over a tensor that the trace "
                                      "does not know; pass it through the loop's inputs")
                source, fake = proxy.proxy.node, value
                if _storage(value) in storages:  # the scan's inputs may not alias each other: pass a copy
                    with tracer.graph.inserting_before(scan):
                        source = tracer.graph.call_function(torch.ops.aten.clone.default, (source,))
                    with disable_proxy_modes_tracing():
                        source.meta["val"] = value.clone()
                storages.add(_storage(value))
            else:
                source = tracer.create_arg(value)  # a get_attr of the enclosing graph, one per tensor
                scan.prepend(source)  # created at the graph's end, after the scan node
                with disable_proxy_modes_tracing():  # a view's fake copy is made with ops: not of the graph
                    fake = fake_mode.from_tensor(value, static_shapes=True) if fake_mode is not None else value
            with body.graph.inserting_after(last):
                last = body.graph.placeholder(f"lifted_{len(lifted)}")
            last.meta["val"] = fake
            lifted[id(value)] = last
            outer.append(source)
        node.replace_all_uses_with(lifted[id(value)])
        body.graph.erase_node(node)
    body.recompile()
    scan.args = (graph_attr, init, xs, (*extra, *outer), *scan.args[4:])
    return len(outer)


def _storage(tensor: torch.Tensor):
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(tensor.untyped_storage())
