"""Multi-pass methods export their passes as ONE loop (pyattr._loop.batched_loop), not as unrolled copies.

The ONNX graph holds one ``Scan`` whose body is one forward pass (its Conv nodes are one forward's), the .pt2 one
``higher_order.scan`` node, the TorchScript module one scripted loop (:class:`~pyattr.exporting.loops.ScanLoop`) around its body; and every format agrees
with eager at batches 1 and 3.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import make_shapes
from contract import assert_export_contract
from torch import nn

import pyattr
from pyattr._callview import set_tracing
from pyattr._loop import batched_loop
from pyattr.methods import ScoreCAM, build_method


def count_ops(graph: onnx.GraphProto, op_type: str) -> int:
    """Nodes of ``op_type`` in ``graph`` and in every subgraph (a Scan's or Loop's body)."""
    total = 0
    for node in graph.node:
        total += node.op_type == op_type
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += count_ops(attr.g, op_type)
    return total


def test_scorecam_exports_one_loop(builtin_model, tmp_path):
    # layer2: 64 channels; chunk_size 24 -> 3 passes of 22 channels (the last padded by 2): 3 unrolled forwards before
    method = ScoreCAM(builtin_model, "layer2", chunk_size=24)
    assert_export_contract(method, make_shapes(3, seed=12), tmp_path, num_classes=6, batches=(1, 3))
    convs = sum(isinstance(m, nn.Conv2d) for m in builtin_model.modules())
    graph = onnx.load(str(tmp_path / "scorecam.onnx")).graph
    assert count_ops(graph, "Scan") == 1 and count_ops(graph, "Loop") == 0
    # the forward pass that scores the images, and the loop's body: one masked forward pass
    assert count_ops(graph, "Conv") == 2 * convs
    program = torch.export.load(str(tmp_path / "scorecam.pt2"))
    scans = [n for n in program.graph.nodes if n.op == "call_function" and "scan" in str(n.target)]
    assert len(scans) == 1
    scripted = torch.jit.load(str(tmp_path / "scorecam.pt"))
    loops = [m for name, m in scripted.named_modules() if name.startswith("_scripted_loop") and "." not in name]  # ScanLoop: one for loop
    assert len(loops) == 1
    code = "".join(m.code for _, m in scripted.named_modules())
    assert code.count("torch.convolution(") == 2 * convs


def test_batched_loop_lifts_what_its_body_closes_over():
    """Traced, the body's weights and the tensors of the trace it closes over become inputs of the scan node;
    eager and traced agree, at another batch size too."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()

    def f(x, t):
        scales = torch.arange(1.0, 4.0)[:, None]  # 3 passes
        bias = t.float()[:, None]  # a tensor of the trace, closed over
        return batched_loop(lambda s: model(x * s).gather(1, t[:, None]) + bias, scales)

    x, t = torch.rand(2, 3, 8, 8), torch.tensor([1, 4])
    set_tracing(True)
    try:
        gm = make_fx(f, tracing_mode="symbolic", _allow_non_fake_inputs=True)(x, t)
    finally:
        set_tracing(False)
    scans = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.scan]
    assert len(scans) == 1
    body = getattr(gm, scans[0].args[0].target)
    assert not [n for n in body.graph.nodes if n.op == "get_attr"]  # no constant of its own
    with torch.no_grad():
        for xb, tb in ((x, t), (torch.rand(3, 3, 8, 8), torch.tensor([0, 2, 4]))):
            want = torch.stack([model(xb * s).gather(1, tb[:, None]) + tb.float()[:, None] for s in (1.0, 2.0, 3.0)])
            assert torch.allclose(gm(xb, tb), want, atol=1e-5)
            assert torch.equal(f(xb, tb), want)


def test_batched_loop_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="one length"):
        batched_loop(lambda a, b: a + b, torch.ones(2), torch.ones(3))



@pytest.mark.parametrize("name, options", [("ablationcam", {"chunk_size": 48}), ("rise", {"masks": 10, "chunk_size": 4})])
def test_other_multi_pass_methods_export_one_loop(builtin_model, name, options, tmp_path):
    """Ablation-CAM (the layer's output replaced in each pass; layer3's 128 channels in 3 passes) and RISE (masked
    inputs; 10 masks in 3 passes of 4, the last padded) hold one Scan too; their values: test_cam_perturbation.py,
    test_perturbation.py."""
    method = build_method(name, builtin_model, "layer3", **options)
    pyattr.export(method, make_shapes(1, seed=13), tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert count_ops(graph, "Scan") == 1 and count_ops(graph, "Loop") == 0


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5)).eval()


GRADIENT_LOOPS = [  # 5 or 7 points in chunks of 2 or 3: 3 passes each, the last padded; the convolutions (the tiny
    # model has 2) of the graph: the clean forward pass outside the loop, one pass's inside (3 passes unrolled: 3x that)
    ("integratedgradients", {"steps": 7, "chunk_size": 3, "rule": "gausslegendre"}, 2 + 2 * 2),
    ("smoothgrad", {"method": "guidedbackprop", "samples": 5, "chunk_size": 2, "variant": "vargrad"}, 2 + 2 * 2),
    ("gradientshap", {"samples": 5, "chunk_size": 2, "stdevs": 0.1, "baselines": 3}, 2 + 2 * 2),
    ("smoothgradcampp", {"samples": 5, "chunk_size": 2}, 2 + 2 * 2),
    # the references' forward pass, the inputs' forward pass and its backward pass (the DeepLIFT rules of the
    # in-place ReLU and the max pool: functorch-ready autograd Functions; the pool's rule places its shares with
    # one transposed convolution)
    ("deepliftshap", {"baselines": 5, "chunk_size": 2}, 2 + 3 * 2 + 1),
]


@pytest.mark.parametrize("name, options, convs", GRADIENT_LOOPS, ids=[name for name, *_ in GRADIENT_LOOPS])
def test_gradient_multi_pass_methods_export_one_loop(name, options, convs, tmp_path):
    """The gradient methods' passes (a forward and a backward pass each, the gradient taken with torch.func.vjp in
    the loop's body) are one Scan / scan node / scripted loop, and every format agrees with eager at batches 1 and 3
    (eager runs its own Python loop of uneven chunks: the exported graph pads the last chunk with weight 0)."""
    model = tiny_cnn()
    method = build_method(name, model, "4", **options)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    assert_export_contract(method, x, tmp_path, num_classes=5, batches=(1, 3))
    graph = onnx.load(str(tmp_path / f"{method.name}.onnx")).graph
    assert count_ops(graph, "Scan") == 1 and count_ops(graph, "Loop") == 0
    assert count_ops(graph, "Conv") + count_ops(graph, "ConvTranspose") <= convs
    program = torch.export.load(str(tmp_path / f"{method.name}.pt2"))
    assert len([n for n in program.graph.nodes if n.op == "call_function" and "scan" in str(n.target)]) == 1
    scripted = torch.jit.load(str(tmp_path / f"{method.name}.pt"))
    assert len([m for n, m in scripted.named_modules() if n.startswith("_scripted_loop") and "." not in n]) == 1


def test_vjp_columns_agrees_with_autograd_inside_a_loop_body():
    """pyattr._loop.vjp_columns: autograd outside a loop's body, torch.func.vjp inside it; the same gradients of an
    (M, T) selection, column by column, for a linear model (the gradient of column j is the weight row)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from pyattr._loop import vjp_columns

    w = torch.randn(4, 6)

    def grads(x):
        return vjp_columns(lambda v: ((v @ w.T)[:, [1, 3]], v.sum()), x)[0]

    x = torch.rand(2, 6)
    want = w[[1, 3]].expand(2, 2, 6)
    assert torch.equal(grads(x), want)
    set_tracing(True)
    try:
        gm = make_fx(lambda xs: batched_loop(grads, xs), tracing_mode="symbolic", _allow_non_fake_inputs=True)(
            x[None].expand(3, 2, 6).clone())
    finally:
        set_tracing(False)
    assert len([n for n in gm.graph.nodes if n.target is torch.ops.higher_order.scan]) == 1
    assert torch.allclose(gm(torch.rand(2, 5, 6)), w[[1, 3]].expand(2, 5, 2, 6))


@pytest.mark.parametrize("name, kind", [("integratedgradients", "similarity"), ("deepliftshap", "segmentation"),
                                        ("smoothgradcampp", "similarity")])
def test_gradient_loops_with_run_time_target_inputs(name, kind, tmp_path):
    """A target's run-time inputs (a reference embedding, a region) reach the loop's body, and a target's extra
    outputs (the embedding) are recorded by the forward pass before the loop, not from inside its body; ONNX."""
    from target_models import tiny_embedder, tiny_segmenter
    from test_targets import K, images, layer_for, seg_inputs, sim_inputs_for

    from pyattr.targets import SegmentationTarget, SimilarityTarget

    model = tiny_embedder() if kind == "similarity" else tiny_segmenter()
    options = {"integratedgradients": {"steps": 5, "chunk_size": 2}, "deepliftshap": {"baselines": 5, "chunk_size": 2},
               "smoothgradcampp": {"samples": 5, "chunk_size": 2}}[name]
    method = build_method(name, model, layer_for(name, model), **options)
    if kind == "similarity":
        assert_export_contract(method, images(2), tmp_path, num_classes=1, formats=("onnx",), batches=(1, 3),
                               target=SimilarityTarget(), target_inputs=sim_inputs_for(model))
    else:
        assert_export_contract(method, images(2), tmp_path, num_classes=K, formats=("onnx",), batches=(1, 3),
                               target=SegmentationTarget(), target_inputs=seg_inputs)
    assert count_ops(onnx.load(str(tmp_path / f"{method.name}.onnx")).graph, "Scan") == 1
