"""Loops in a traced graph (``torch.ops.higher_order.scan`` nodes, from :func:`pyattr._loop.batched_loop`), for
the formats whose exporter does not take them as they are.

torch.export keeps a scan node and torch.onnx writes it as one ONNX ``Scan``; ``torch.jit.script`` knows no
higher-order op, so for TorchScript each scan node becomes a call of :class:`ScanLoop`, a scripted ``for`` loop
over its body (the body's inputs passed as one list).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
from torch import fx, nn

from ..errors import ExportError

SCAN = torch.ops.higher_order.scan


def scan_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The scan nodes of ``graph`` (not of its bodies)."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target is SCAN]


def loop_bodies(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """The bodies of the scan nodes of ``gm``, bodies of bodies included (innermost last)."""
    for node in scan_nodes(gm.graph):
        body = getattr(gm, node.args[0].target)
        yield body
        yield from loop_bodies(body)


class ScanLoop(nn.Module):
    """``scan(body, init, xs, extra)`` as a scriptable loop: ``carry = init``; for each i,
    ``carry, y_i = body(carry + [x[i] for x in xs] + extra)``; returns ``carry + [stack(y_i) for each output]``.
    ``body`` takes its inputs as one list and returns a list: ``carries`` carried values, then ``outputs``."""

    def __init__(self, body: nn.Module, carries: int, outputs: int):
        super().__init__()
        self.body = body
        self.carries = carries
        self.outputs = outputs

    def forward(self, init: list[torch.Tensor], xs: list[torch.Tensor], extra: list[torch.Tensor]
                ) -> list[torch.Tensor]:
        carry = init
        ys: list[list[torch.Tensor]] = []
        for i in range(xs[0].size(0)):
            out = self.body(carry + [x[i] for x in xs] + extra)
            carry = out[:self.carries]
            ys.append(out[self.carries:])
        stacked: list[torch.Tensor] = []
        for j in range(self.outputs):
            stacked.append(torch.stack([y[j] for y in ys]))
        return carry + stacked


def list_input_body(body: fx.GraphModule) -> fx.GraphModule:
    """A copy of a scan body whose inputs come as one ``List[Tensor]`` argument (its placeholders become items of
    it) and whose output is a list, as :class:`ScanLoop` calls it."""
    body = fx.GraphModule(body, copied_graph(body.graph))
    graph = body.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(placeholders[0]):
        args = graph.placeholder("args", type_expr=list[torch.Tensor])
    anchor = placeholders[-1].next
    for i, node in enumerate(placeholders):
        with graph.inserting_before(anchor):
            item = graph.call_function(operator.getitem, (args, i))
        item.meta = dict(node.meta)
        node.replace_all_uses_with(item)
        graph.erase_node(node)
    output = graph.output_node()
    if not isinstance(output.args[0], (list, tuple)):
        output.args = ([output.args[0]],)
    else:
        output.args = (list(output.args[0]),)
    body.recompile()
    return body


def copied_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` (its nodes' ``meta`` copied shallowly)."""
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def scripted_loops(gm: fx.GraphModule, convert_body) -> int:
    """Replace every scan node of ``gm`` (in place) by a call of a :class:`ScanLoop` submodule whose body is
    ``convert_body(list_input_body(body))`` (the caller's TorchScript preparation). Returns how many."""
    count = 0
    for node in scan_nodes(gm.graph):
        body_attr, init, xs, extra = node.args[:4]
        if node.args[4:] or node.kwargs:
            raise ExportError(f"a loop of the traced graph has options TorchScript's loop does not take: "
                              f"{node.args[4:]} {node.kwargs}")
        if any(not isinstance(a, fx.Node) for a in (*init, *xs, *extra)):
            raise ExportError("a loop of the traced graph takes a non-tensor input; TorchScript's loop takes tensors")
        body = getattr(gm, body_attr.target)
        outputs = body.graph.output_node().args[0]
        outputs = len(outputs) if isinstance(outputs, (list, tuple)) else 1
        name = f"_scripted_loop{count}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, ScanLoop(convert_body(list_input_body(body)), len(init), outputs - len(init)))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (list(init), list(xs), list(extra)))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        if not body_attr.users:
            gm.graph.erase_node(body_attr)
            delattr(gm, body_attr.target)
        count += 1
    if count:
        gm.recompile()
    return count
