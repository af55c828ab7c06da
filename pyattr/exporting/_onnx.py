"""ONNX straight from pyattr's traced aten graph, without re-capturing it.

``torch.onnx.export`` takes a module or an ``ExportedProgram``. Given pyattr's traced graph it would
capture it again with ``torch.export.export`` (a second symbolic trace of the whole graph), decompose it
again with ``ExportedProgram.run_decompositions`` (a third), translate it, run onnxscript's optimizer
(minutes on some graphs) and serialise it; pyattr then loaded the file back to add its metadata and saved
it a second time. The traced graph is already a flat graph of aten ops with a symbolic batch, so here it
goes to torch.onnx's FX-to-ONNX translator directly:

1. copy the graph; every ``get_attr`` tensor (weights, folded constants) becomes one initializer
   (``get_attr`` nodes of one tensor are merged, so no weight is stored twice);
2. check that torch.onnx has an ONNX function for every op (when one has none, :func:`translate` returns
   ``None`` and the caller takes torch.onnx's own path, which decomposes it);
3. torch.onnx's explicit type promotion pass, then its FX-to-ONNX translation;
4. light clean-up instead of onnxscript's optimizer: remove unused nodes, fold nothing (onnxruntime
   folds constants and fuses at session creation, so the run time does not change; see
   ``benchmarks/results/export_time.md``);
5. the batch dimension is named ``batch`` in every value of the graph (torch calls it ``s<N>``).

This uses torch.onnx's private exporter modules (``torch.onnx._internal.exporter``); any failure here
falls back to the public path.
"""

from __future__ import annotations

import functools
import logging
import operator
import re
from types import SimpleNamespace
from typing import Any

import torch
from torch import fx

from .loops import copied_graph, loop_bodies, scan_nodes

BATCH_DIM = "batch"


def _lifted_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """A copy of ``gm`` whose ``get_attr`` tensors are lifted to placeholders after the inputs, one per
    tensor (``get_attr`` nodes of one tensor are merged); returns it and {placeholder name: tensor}."""
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, mapping)
    graph.output(out)
    copy = fx.GraphModule(gm, graph)
    _copy_loop_bodies(copy)  # the passes below change them: not the caller's
    # after the inputs, in order (not "before the first op": that may be a get_attr node erased below, as in a
    # graph that starts with the model's first weight, e.g. a method that takes no gradient)
    last_input = [n for n in copy.graph.nodes if n.op == "placeholder"][-1]
    seen: dict[tuple, fx.Node] = {}
    constants: dict[str, torch.Tensor] = {}
    for node in list(copy.graph.nodes):
        if node.op != "get_attr":
            continue
        value = copy
        for part in node.target.split("."):
            value = getattr(value, part)
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach()
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()),
               value.dtype) if value.numel() else (node.target,)
        if key not in seen:
            with copy.graph.inserting_after(last_input):
                lifted = copy.graph.placeholder(node.name)
            last_input = lifted
            lifted.meta = dict(node.meta)
            lifted.meta["val"] = value if value.is_contiguous() else value.contiguous()
            constants[lifted.name] = lifted.meta["val"]
            seen[key] = lifted
        node.replace_all_uses_with(seen[key])
        copy.graph.erase_node(node)
    copy.recompile()
    return copy, constants


def _static_symbols(gm: fx.GraphModule, example_shape) -> dict:
    """{symbol: size} for the symbols of the images' (C, H, W) in ``gm`` (the traced graph), at the example's."""
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    known = {}
    for i, dim in enumerate(first.meta["val"].shape):
        if i > 0 and isinstance(dim, torch.SymInt) and getattr(dim.node.expr, "is_Symbol", False):
            known[dim.node.expr] = int(example_shape[i])
    return known


def _copy_loop_bodies(gm: fx.GraphModule) -> None:
    """Give ``gm`` its own copies of its loop bodies (which it shares with the graph it was copied from)."""
    for node in scan_nodes(gm.graph):
        name = node.args[0].target
        body = getattr(gm, name)
        body = fx.GraphModule(body, copied_graph(body.graph))
        _copy_loop_bodies(body)
        setattr(gm, name, body)


def _specialize(gm: fx.GraphModule, example_shape, known: dict | None = None) -> int:
    """Replace every symbolic size of ``gm`` that does not depend on the batch (``sym_size`` of a spatial
    dimension, arithmetic on it) by its value at the example's (C, H, W). make_fx keeps every input size
    symbolic; left so, the ONNX graph computes static sizes at run time (``Shape`` ops), and an extra
    consumer of a convolution's output is enough to stop onnxruntime from fusing the BatchNorm after it.
    ``known``: the symbols' sizes (default: read from ``gm``'s images; a loop body's come from its graph's).
    Returns how many nodes were replaced."""
    if known is None:
        known = _static_symbols(gm, example_shape)
    if not known:
        return 0
    replaced = 0
    for node in list(gm.graph.nodes):
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, torch.SymInt):
            continue
        expr = val.node.expr
        expr = expr.xreplace(known) if hasattr(expr, "xreplace") else expr
        if isinstance(expr, int) or getattr(expr, "is_Integer", False):
            node.replace_all_uses_with(int(expr))
            gm.graph.erase_node(node)
            replaced += 1
    return replaced


def _aliases(target) -> bool:
    """Whether an op's first output is a view of (or the same tensor as) one of its inputs."""
    returns = target._schema.returns
    return bool(returns) and returns[0].alias_info is not None


def _fresh(node) -> bool:
    """Whether ``node`` is a tensor an op created (not a view, an input or a constant)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is operator.getitem:  # an output of a multi-output op, e.g. native_batch_norm's
        source, index = node.args
        if not (isinstance(source, fx.Node) and isinstance(source.target, torch._ops.OpOverload)):
            return False
        returns = source.target._schema.returns
        return isinstance(index, int) and index < len(returns) and returns[index].alias_info is None
    return isinstance(node.target, torch._ops.OpOverload) and not _aliases(node.target)


def _functionalize(gm: fx.GraphModule) -> bool:
    """Replace in-place aten ops (``relu_``, ``add_``, ... as make_fx records them) by their out-of-place
    form, later users of the mutated tensor reading the result instead. Returns False (graph untouched
    or partly rewritten: the caller discards it) when a mutated tensor may be aliased: a view, a view's
    base, a graph input or a constant."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if not schema.is_mutable:
            continue
        mutated = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        packet = node.target.overloadpacket
        name = packet.__name__
        if mutated != [0] or not name.endswith("_") or name.startswith("_"):
            return False
        functional = getattr(getattr(torch.ops.aten, name[:-1], None), node.target._overloadname or "default", None)
        if functional is None:
            return False
        base = node.args[0]
        if not _fresh(base):
            return False
        if any(isinstance(u.target, torch._ops.OpOverload) and _aliases(u.target)
                                        and u is not node for u in base.users):
            return False
        node.target = functional
        for user in list(base.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(base, node)
    gm.recompile()
    return True


_FILLED_LIKE = frozenset({torch.ops.aten.new_zeros.default, torch.ops.aten.new_ones.default,
                          torch.ops.aten.new_full.default, torch.ops.aten.zeros_like.default,
                          torch.ops.aten.ones_like.default, torch.ops.aten.full_like.default})
"""Ops whose first argument gives only a dtype and device (and for ``*_like`` a shape), never values."""


def _static(val) -> bool:
    """Whether a node's value has no symbolic size (a tensor of static shape, a number, a tuple of them)."""
    if isinstance(val, torch.Tensor):
        return all(isinstance(d, int) for d in val.shape)
    if isinstance(val, (tuple, list)):
        return all(_static(v) for v in val)
    return isinstance(val, (int, float, bool)) or val is None


def _constant_nodes(gm: fx.GraphModule, constants: dict[str, torch.Tensor]) -> set[fx.Node]:
    """The nodes of ``gm`` whose value depends on no graph input: the lifted ``constants``, and ops of static
    shape whose inputs are all such nodes (the first input of a ``new_zeros``-like op does not count)."""
    const = {n for n in gm.graph.nodes if n.op == "placeholder" and n.name in constants}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not _static(node.meta.get("val")):
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            if torch.Tag.nondeterministic_seeded in target.tags:
                continue
            deps = node.all_input_nodes
            if target in _FILLED_LIKE and node.args and isinstance(node.args[0], fx.Node):
                deps = [d for d in deps if d is not node.args[0]]
        elif target is operator.getitem:
            deps = node.all_input_nodes
        else:
            continue
        if all(d in const for d in deps):
            const.add(node)
    return const


def _mutates(node: fx.Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target._schema.is_mutable)


def _closure(start, within: set[fx.Node], upward: bool) -> set[fx.Node]:
    """``start`` and every node of ``within`` that it reads (``upward``) or that reads it, transitively."""
    seen, todo = set(start), list(start)
    while todo:
        node = todo.pop()
        for other in (node.all_input_nodes if upward else node.users):
            if other in within and other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def fold_mutated_constants(gm: fx.GraphModule, constants: dict[str, torch.Tensor]) -> int:
    """Compute the constants that the graph builds by writing in place (Swin's shifted-window attention mask:
    ``new_zeros``, then ``fill_`` on slices of it) at export time: each use of such a tensor by the rest of the
    graph reads a new constant (lifted as a placeholder, added to ``constants``) holding its value at that
    point, and the ops that built it are removed. The in-place ops on views that :func:`_functionalize`
    refuses are then gone, and the graph can take the direct translation. Returns how many constants were
    made; 0 (graph untouched) when no constant is written in place, or when a write would reach a model
    tensor or depend on a graph input."""
    const = _constant_nodes(gm, constants)
    mutations = [n for n in gm.graph.nodes if _mutates(n)]
    if not any(n in const for n in mutations):
        return 0
    if any(n not in const and isinstance(n.args[0], fx.Node) and n.args[0] in const for n in mutations):
        return 0  # a constant written with a value computed from the inputs
    model_storages = {t.untyped_storage().data_ptr() for t in constants.values() if t.numel()}
    # the constants to compute: what the writes read, what reads those, and what that reads (not every weight op)
    region = _closure([n for n in mutations if n in const], const, upward=True)
    region = _closure(_closure(region, const, upward=False), const, upward=True)

    def evaluate(visit=None) -> dict[fx.Node, Any] | None:
        """The constant nodes' values, computed in graph order (None: an in-place write would reach a model
        tensor). ``visit(consumer, node, value, writes)`` sees each tainted input of the other nodes at the
        point the graph reads it (``writes``: the in-place ops run so far)."""
        env: dict[fx.Node, Any] = {}
        writes = 0
        for node in gm.graph.nodes:
            if node in region:
                if node.op == "placeholder":
                    env[node] = constants[node.name]
                    continue
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env.get(n, n))
                if node.target in _FILLED_LIKE and isinstance(args[0], fx.Node):  # only its dtype (and shape)
                    like = args[0].meta["val"]
                    shape = tuple(like.shape) if node.target._schema.name.endswith("_like") else ()
                    args = (torch.empty(shape, dtype=like.dtype, device=like.device), *args[1:])
                if _mutates(node):
                    if args[0].untyped_storage().data_ptr() in model_storages:
                        return None
                    writes += 1
                with torch.no_grad():
                    env[node] = node.target(*args, **kwargs)
            elif visit is not None and node not in const:
                for source in node.all_input_nodes:
                    if source in tainted:
                        visit(node, source, env[source], writes)
        return env

    tainted: set[fx.Node] = set()
    aliasing: set[fx.Node] = set()
    env = evaluate()
    if env is None:
        return 0
    written = {env[n.args[0]].untyped_storage().data_ptr() for n in mutations if n in const}
    for node in gm.graph.nodes:  # what is (a view of) a tensor written in place, or computed from one
        if node in region and node.op == "call_function":
            value = env[node]
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in written:
                aliasing.add(node)  # its value changes with each write: read it per write
            if _mutates(node) or node in aliasing or any(n in tainted for n in node.all_input_nodes):
                tainted.add(node)
    del env
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    made: dict[tuple[fx.Node, int], fx.Node] = {}

    def snapshot(consumer: fx.Node, source: fx.Node, value, writes: int) -> None:
        nonlocal last_input
        writes = writes if source in aliasing else -1
        if (source, writes) not in made:
            with gm.graph.inserting_after(last_input):
                lifted = gm.graph.placeholder(f"{source.name}_folded{len(made)}")
            last_input = lifted
            lifted.meta = {k: v for k, v in source.meta.items() if k != "val"}
            lifted.meta["val"] = constants[lifted.name] = value.detach().clone(memory_format=torch.contiguous_format)
            made[source, writes] = lifted
        consumer.replace_input_with(source, made[source, writes])

    evaluate(snapshot)
    for node in reversed(list(gm.graph.nodes)):
        if node in tainted and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return len(made)


def _spell_safe_softmax(gm: fx.GraphModule, node: fx.Node) -> None:
    """``_safe_softmax(x, dim, dtype)`` (attention's softmax, as ``scaled_dot_product_attention``'s math route
    records it: a row of all ``-inf`` scores gives zeros, not NaN) as torch's own decomposition of it (what
    ``run_decompositions`` writes on the public route): ``softmax(x)`` with the rows where ``x`` is all ``-inf``
    filled with 0."""
    aten = torch.ops.aten
    x, dim = node.args[0], node.args[1]
    dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    softmax, extra = (aten._softmax.default, (False,)) if dtype is None else (aten.softmax.int, (dtype,))
    with gm.graph.inserting_before(node):
        out = gm.graph.call_function(softmax, (x, dim, *extra))
        masked = gm.graph.call_function(aten.eq.Scalar, (x, float("-inf")))
        rows = gm.graph.call_function(aten.all.dim, (masked, dim, True))
        result = gm.graph.call_function(aten.masked_fill.Scalar, (out, rows, 0.0))
    if val is not None:  # fake values, as make_fx gave every other node (the translation reads their types)
        out.meta["val"] = softmax(val, dim, *extra)
        masked.meta["val"] = aten.eq.Scalar(val, float("-inf"))
        rows.meta["val"] = aten.all.dim(masked.meta["val"], dim, True)
    for new in (out, masked, rows):
        new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
    result.meta = dict(node.meta)
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)


def _spell_unregistered(gm: fx.GraphModule) -> None:
    """Write ops torch.onnx has no function for with ops it has: ``rsub.Scalar(x, c, alpha)`` (the backward
    of ``sigmoid``, ``1 - y``) as ``c + x * -alpha``, ``sym_numel(x)`` (the size arithmetic of a gather's
    backward) as the product of ``x``'s sizes, and ``_safe_softmax`` (attention's softmax) as
    :func:`_spell_safe_softmax` writes it. Same values; without it such graphs take torch.onnx.export's
    slower route (a detection graph on the built-in detector: 60 s instead of 15 s; a ViT-B/16 Saliency at
    224 px: two more traces of the graph, ``capture`` and ``decomp``, 25 s of its 46 s)."""
    import operator

    aten = torch.ops.aten
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten._safe_softmax.default:
            _spell_safe_softmax(gm, node)
            changed = True
        elif node.target == aten.rsub.Scalar:
            x, other = node.args[0], node.args[1]
            alpha = node.args[2] if len(node.args) > 2 else node.kwargs.get("alpha", 1)
            with gm.graph.inserting_before(node):
                scaled = gm.graph.call_function(aten.mul.Scalar, (x, -alpha))
                total = gm.graph.call_function(aten.add.Scalar, (scaled, other))
            total.meta = dict(node.meta)
            scaled.meta = {k: v for k, v in node.meta.items() if k != "val"}
            if "val" in node.meta:
                scaled.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(total)
            gm.graph.erase_node(node)
            changed = True
        elif node.target == aten.sym_numel.default:
            x = node.args[0]
            shape = x.meta["val"].shape if "val" in x.meta else None
            if shape is None:
                continue
            with gm.graph.inserting_before(node):
                product = None
                for i in range(len(shape)):
                    size = gm.graph.call_function(aten.sym_size.int, (x, i))
                    size.meta["val"] = shape[i]
                    if product is None:
                        product = size
                    else:
                        value = product.meta["val"] * shape[i]
                        product = gm.graph.call_function(operator.mul, (product, size))
                        product.meta["val"] = value
            if product is None:
                continue
            node.replace_all_uses_with(product)
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()


def _missing_ops(gm: fx.GraphModule, registry) -> list[str]:
    missing = set()
    for node in gm.graph.nodes:
        if (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                and not registry.is_registered(node.target)):
            missing.add(node.target.name())
    return sorted(missing)


def _substituted(expr: str, known: dict[str, int]) -> int | str:
    """A shape expression such as ``(s7 - 1)//2 + 1`` with the ``known`` symbols substituted: an int when
    nothing else is left, else the simplified expression (``s34*s7`` -> ``20*s34``)."""
    import sympy

    try:
        value = sympy.sympify(expr, locals={name: sympy.Symbol(name, integer=True, positive=True) for name in known})
        value = value.subs({sympy.Symbol(n, integer=True, positive=True): v for n, v in known.items()})
    except (sympy.SympifyError, TypeError, SyntaxError, ValueError):
        return expr
    return int(value) if getattr(value, "is_Integer", False) else str(value).replace(" ", "")


def name_dims(model, example_shape) -> None:
    """Name the batch dimension ``batch`` in every value of an ``onnx_ir`` model (torch calls it ``s<N>``),
    expressions of it included (``2*s34`` becomes ``2*batch``), and make the other dimensions static:
    symbols torch kept for the example's (C, H, W) become those sizes, in expressions too."""
    import onnx_ir as ir

    images = model.graph.inputs[0]
    batch, known = None, {}
    for i, dim in enumerate(images.shape):
        if isinstance(dim, ir.SymbolicDim) and isinstance(dim.value, str):
            if i == 0:
                batch = dim.value
            elif dim.value.isidentifier():
                known[dim.value] = int(example_shape[i])
    pattern = re.compile(rf"(?<!\w){re.escape(batch)}(?!\w)") if batch else None
    values = list(model.graph.inputs) + list(model.graph.initializers.values())
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        values.extend(node.outputs)
    for function in model.functions.values():
        values.extend(function.inputs)
        for node in ir.traversal.RecursiveGraphIterator(function):
            values.extend(node.outputs)
    cache: dict[str, int | str] = {}
    for value in values:
        if value.shape is None:
            continue
        dims, changed = [], False
        for dim in value.shape:
            if not (isinstance(dim, ir.SymbolicDim) and isinstance(dim.value, str)):
                dims.append(dim)
                continue
            text = dim.value
            if text not in cache:
                new: int | str = text
                if text.isdigit():  # a size torch kept as a symbol but knows
                    new = int(text)
                elif text in known:
                    new = known[text]
                elif known and any(re.search(rf"(?<!\w){re.escape(k)}(?!\w)", text) for k in known):
                    new = _substituted(text, known)
                if isinstance(new, str) and pattern is not None:
                    new = pattern.sub(BATCH_DIM, new)
                cache[text] = new
            dims.append(cache[text])
            changed = changed or cache[text] != text
        if changed:
            value.shape = ir.Shape(dims)


def _insert_type_promotion(gm: fx.GraphModule) -> None:
    """torch.onnx's explicit type promotion pass (casts where ONNX needs equal input types), without
    re-running every node on fake tensors: a node keeps the ``meta["val"]`` make_fx gave it; only the
    nodes that get new inputs, and the casts, are run (torch.onnx's pass re-runs all of them)."""
    from torch.onnx._internal.fx.passes import type_promotion

    class Interpreter(type_promotion._TypePromotionInterpreter):
        def run_node(self, n):
            val = n.meta.get("val")
            if n.op != "call_function" or val is None:
                return super().run_node(n)
            rule = type_promotion.get_type_promotion_rule(n, self.type_promotion_table)
            if rule is not None:
                with self._set_current_node(n):
                    self._maybe_promote_node(n, rule)  # re-runs the node and sets meta["val"] when it changed
            return n.meta["val"]

    promote = type_promotion.InsertTypePromotion(gm)
    promote.interpreter = Interpreter(gm, type_promotion.TypePromotionTable())
    promote.run()


@functools.cache
def _registry():
    from torch.onnx._internal.exporter import _registration

    return _registration.ONNXRegistry.from_torchlib()


def translate(gm: fx.GraphModule, example_shape, input_names, output_names):
    """``gm`` (a traced attribution graph) as an ``onnx_ir.Model``, or None when torch.onnx has no ONNX
    function for one of its ops (the caller then decomposes it through ``torch.onnx.export``)."""
    from torch.export import graph_signature as gs
    from torch.onnx._internal.exporter import _core, _fx_passes, _ir_passes

    registry = _registry()
    lifted, constants = _lifted_graph(gm)
    # the graph, then its loop bodies (pyattr._loop: each a subgraph of a scan node, an ONNX Scan's body)
    graphs = [lifted, *loop_bodies(lifted)]
    known = _static_symbols(lifted, example_shape)
    for graph in graphs:
        _spell_unregistered(graph)
        _specialize(graph, example_shape, known)
    fold_mutated_constants(lifted, constants)
    if not all(_functionalize(graph) for graph in graphs) or any(_missing_ops(graph, registry) for graph in graphs):
        return None
    for graph in graphs:
        _insert_type_promotion(graph)
    lifted = _fx_passes.remove_assertion_nodes(lifted)
    inputs = [n.name for n in lifted.graph.nodes if n.op == "placeholder" and n.name not in constants]
    output = next(n for n in lifted.graph.nodes if n.op == "output")
    outputs = output.args[0] if isinstance(output.args[0], (list, tuple)) else (output.args[0],)
    signature = SimpleNamespace(
        input_specs=[gs.InputSpec(gs.InputKind.USER_INPUT, gs.TensorArgument(n), None) for n in inputs]
        + [gs.InputSpec(gs.InputKind.BUFFER, gs.TensorArgument(n), n, True) for n in constants],
        output_specs=[gs.OutputSpec(gs.OutputKind.USER_OUTPUT, gs.TensorArgument(n.name), None) for n in outputs],
        inputs_to_parameters={}, inputs_to_buffers={n: n for n in constants}, inputs_to_lifted_tensor_constants={},
    )
    program = SimpleNamespace(graph_module=lifted, graph_signature=signature, range_constraints={},
                              named_parameters=lambda: iter(()), named_buffers=lambda: iter(constants.items()), constants={})
    logger = logging.getLogger(_core.__name__)  # one "nn_module_stack not found" warning per backward node
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model = _core._exported_program_to_onnx_program(program, registry=registry).model
    finally:
        logger.setLevel(level)
    _ir_passes.rename_inputs(model, list(input_names))
    _ir_passes.rename_outputs(model, list(output_names))
    name_dims(model, example_shape)
    clean_up(model)
    model.graph.metadata_props.clear()  # torch.onnx's signature/range strings describe no ExportedProgram here
    return model


def _cast_like_to_cast(model) -> int:
    """``CastLike(x, like)`` -> ``Cast(x, to=dtype of like)`` where that dtype is known (torchlib emits
    CastLike; onnxruntime has no CPU kernel to fold it and warns once per node). Returns how many."""
    import onnx_ir as ir

    replaced = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):  # loop bodies too
        if node.op_type != "CastLike" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        like = node.inputs[1]
        if like is None or like.dtype is None:
            continue
        cast = ir.Node("", "Cast", [node.inputs[0]], attributes=[ir.AttrInt64("to", like.dtype.value)],
                       name=node.name)
        cast.outputs[0].dtype = like.dtype
        cast.outputs[0].shape = node.outputs[0].shape
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], [cast], node.outputs, cast.outputs)
        replaced += 1
    return replaced


def _empty_constant(value) -> bool:
    """Whether ``value`` is a constant with no elements (an initializer, a ``Constant``, or a ``Cast`` of one)."""
    for _ in range(4):
        if value is None:
            return False
        if value.const_value is not None:
            return value.const_value.size == 0
        node = value.producer()
        if node is None:
            return False
        if node.op_type == "Constant" and "value" in node.attributes:
            return node.attributes["value"].as_tensor().size == 0
        if node.op_type != "Cast":
            return False
        value = node.inputs[0]
    return False


def _empty_expand_to_identity(model) -> int:
    """``Expand(x, shape)`` with an empty ``shape`` (0 elements: ``torch.full((), v)``'s spelling) -> ``Identity(x)``
    (broadcasting to no dimension leaves ``x`` as it is). OpenVINO 2024 reads the empty shape as rank 0 and refuses
    the graph ("Broadcast shape rank must be 1, but has 0"). Returns how many."""
    import onnx_ir as ir

    replaced = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):  # loop bodies too
        if node.op_type != "Expand" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        if not _empty_constant(node.inputs[1]):
            continue
        identity = ir.Node("", "Identity", [node.inputs[0]], name=node.name)
        identity.outputs[0].dtype = node.outputs[0].dtype
        identity.outputs[0].shape = node.outputs[0].shape
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], [identity], node.outputs, identity.outputs)
        replaced += 1
    return replaced


def _within(graph, root) -> bool:
    """Whether ``graph`` is ``root`` or a subgraph (at any depth) of one of its nodes."""
    while graph is not None:
        if graph is root:
            return True
        owner = getattr(graph, "parent", None)  # onnx_ir: a subgraph's node, or None
        graph = owner.graph if owner is not None else None
    return False


def _outer_values_as_states(model) -> int:
    """Every value a ``Scan`` body reads from outside it that is not an initializer (the images, a value computed
    before the loop) becomes a state variable of the Scan, passed through the body unchanged: ONNX lets a body read
    outer values, but OpenVINO's ONNX reader (2026.4) takes a body's outer reads for missing inputs ("Number of
    Scan node inputs (2) is less than required (3)", and a segmentation fault on larger graphs). Initializers (the
    weights) stay outer reads, which OpenVINO reads. Returns how many values were passed."""
    import onnx_ir as ir

    passed = 0
    for scan in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if scan.op_type != "Scan" or scan.domain not in ("", "ai.onnx"):
            continue
        body = scan.attributes["body"].as_graph()
        outer: list = []
        for node in ir.traversal.RecursiveGraphIterator(body):
            for value in node.inputs:
                if (value is not None and value not in outer and not _within(value.graph, body)
                        and not value.is_initializer()):
                    outer.append(value)
        if not outer:
            continue
        states = len(scan.inputs) - scan.attributes["num_scan_inputs"].as_int()
        carried_in, carried_out = [], []
        for value in outer:
            inner = ir.Value(name=f"{value.name}__carried", type=value.type, shape=value.shape)
            for user, index in list(value.uses()):
                if _within(user.graph, body):
                    user.replace_input_with(index, inner)
            identity = ir.Node("", "Identity", [inner], name=f"{value.name}__carried_identity")
            identity.outputs[0].name = f"{value.name}__carried_out"
            identity.outputs[0].type, identity.outputs[0].shape = value.type, value.shape
            body.append(identity)
            carried_in.append(inner)
            carried_out.append(identity.outputs[0])
        for k, (inner, out) in enumerate(zip(carried_in, carried_out)):
            body.inputs.insert(states + k, inner)
            body.outputs.insert(states + k, out)
        inputs = [*scan.inputs[:states], *outer, *scan.inputs[states:]]
        new = ir.Node(scan.domain, "Scan", inputs, attributes=list(scan.attributes.values()),
                      num_outputs=len(scan.outputs) + len(outer), name=scan.name, version=scan.version)
        kept = [*new.outputs[:states], *new.outputs[states + len(outer):]]
        for old, out in zip(scan.outputs, kept):
            out.name, out.type, out.shape = old.name, old.type, old.shape
        ir.convenience.replace_nodes_and_values(scan.graph, scan, [scan], [new], scan.outputs, kept)
        passed += len(outer)
    return passed


def clean_up(model) -> None:
    """Cheap passes in place of onnxscript's optimizer: inline torchlib's functions (``aten_amax``, ...: a
    runtime knows only standard ops), drop identities, unused nodes, initializers, functions and opsets."""
    from onnx_ir.passes import common

    common.InlinePass()(model)
    _cast_like_to_cast(model)
    _empty_expand_to_identity(model)
    common.IdentityEliminationPass()(model)
    _outer_values_as_states(model)  # after the identity pass, which would fold the pass-through back
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    common.RemoveUnusedOpsetsPass()(model)
