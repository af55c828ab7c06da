"""No raw torch/onnx exception leaves ``pyattr.export``: every failure is an ``ExportError`` that names
the op, the method, the model layer it came from and what to try, without terminal colour codes.

The models here hold ops pyattr has no rule for: a custom autograd Function that branches on a
tensor's value, a custom op that no ONNX function translates, a grouped transposed convolution (no
input-gradient rule), a differentiable op with no backward rule (grid_sample); and failures injected
at every writer stage (TorchScript scripting, torch.export, the ONNX translation).
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import pyattr
from pyattr.exporting import diagnose
from pyattr.exporting.trace import trace_graph

ANSI_RED = "\x1b[1;31m"


def _images(n: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_helpful(err: pyattr.ExportError, *, op: str | None, method: str, layer: str | None) -> str:
    text = str(err)
    assert "\x1b" not in text, text
    assert "\n" not in text.strip(), text  # one readable paragraph, not torch's report
    assert method in text, text
    if op is not None:
        assert op in text, text
    if layer is not None:
        assert f"'{layer}'" in text, text
    assert "What to try" in text and "another method" in text and "report" in text, text
    return text


class _SignGate(torch.autograd.Function):
    """A custom Function whose forward branches on a tensor's value."""

    @staticmethod
    def forward(ctx, x):
        if x.sum() > 0:
            return x * 2
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class _Gate(nn.Module):
    def forward(self, x):
        return _SignGate.apply(x)


class DataDependentNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = _Gate()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("suffix", [".onnx", ".pt", ".pt2"])
def test_data_dependent_control_flow_names_the_layer_and_the_line(tmp_path, suffix):
    torch.manual_seed(0)
    method = pyattr.Saliency(DataDependentNet().eval())
    method(_images(2))  # eager works
    with pytest.raises(pyattr.ExportError) as info:
        pyattr.export(method, _images(), tmp_path / f"m{suffix}")
    text = _assert_helpful(info.value, op=None, method="Saliency", layer="gate")
    assert "tracing failed" in text
    assert "if x.sum() > 0" in text  # the line of the model's code
    assert "branches on a tensor's value" in text
    assert "export to" not in text  # tracing fails the same way for every format: no format advice
    assert list(tmp_path.iterdir()) == []


class GroupedDeconvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.up(self.conv(x))).mean((2, 3)))


def test_grouped_transposed_convolution_names_the_rule_and_the_layer(tmp_path):
    torch.manual_seed(1)
    method = pyattr.Saliency(GroupedDeconvNet().eval())
    with pytest.raises(pyattr.ExportError) as info:
        pyattr.export(method, _images(), tmp_path / "m.pt2")
    text = _assert_helpful(info.value, op="convolution_backward", method="Saliency", layer="up")
    assert "grouped transposed convolution" in text and "ConvTranspose2d" in text


@torch.library.custom_op("pyattr_test::scaled", mutates_args=())
def _scaled(x: torch.Tensor) -> torch.Tensor:
    return x * 3.0


@_scaled.register_fake
def _(x):
    return torch.empty_like(x)


def _scaled_backward(ctx, grad):
    return _scaled(grad)  # the backward is the op itself: a forward op, traced as is


_scaled.register_autograd(_scaled_backward)


class _Scale(nn.Module):
    def forward(self, x):
        return _scaled(x)


class CustomOpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = _Scale()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.scale(torch.tanh(self.conv(x))).mean((2, 3)))


def test_op_without_onnx_translation_names_the_op_and_the_layer(tmp_path):
    torch.manual_seed(2)
    method = pyattr.Saliency(CustomOpNet().eval())
    with pytest.raises(pyattr.ExportError) as info:
        pyattr.export(method, _images(), tmp_path / "m.onnx")
    text = _assert_helpful(info.value, op="pyattr_test", method="Saliency", layer="scale")
    assert "ONNX" in text and "torch.export (.pt2)" in text  # names the failing format and the others
    assert list(tmp_path.iterdir()) == []
    # the same graph exports to .pt2, and agrees with eager there
    path = pyattr.export(method, _images(), tmp_path / "m.pt2")
    x, target = _images(3, seed=5), torch.tensor([0, -1, 2])
    _, explained, raw, _ = torch.export.load(str(path)).module()(x, target)
    ref = method(x, target)
    assert torch.equal(explained, ref.target)
    torch.testing.assert_close(raw, ref.raw, rtol=1e-5, atol=1e-6 * float(ref.raw.abs().max()))


class GridNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4, 3)

    def forward(self, x):
        f = self.conv(x)
        grid = torch.zeros(x.shape[0], 2, 2, 2, device=x.device) + 0.25
        return self.fc(torch.nn.functional.grid_sample(f, grid, align_corners=False).flatten(1))


def test_op_without_backward_rule_names_the_op_and_what_to_try(tmp_path):
    torch.manual_seed(3)
    method = pyattr.GradCAM(GridNet().eval(), "conv")
    with pytest.raises(pyattr.ExportError) as info:
        pyattr.export(method, _images(), tmp_path / "m.onnx")
    text = _assert_helpful(info.value, op="grid_sampler_2d_backward", method="GradCAM", layer=None)
    assert "decompositions" in text
    assert "the backward of the model's own forward (GridNet.forward)" in text  # grid_sample is called there


_RAW_ERRORS = {
    "onnx": ("_write_onnx", "ConversionError",
             f"{ANSI_RED}DispatchError{ANSI_RED}: No ONNX function found for aten.tanh.default. Failure..."),
    "torchscript": ("_write_torchscript", "RuntimeError", "\nUnknown builtin op: aten::tanh.\nHere are..."),
    "pt2": ("_write_pt2", "RuntimeError", "aten.tanh.default: something torch.export did not like"),
}


@pytest.mark.parametrize("fmt", sorted(_RAW_ERRORS))
def test_raw_errors_of_every_writer_become_export_errors(tmp_path, monkeypatch, fmt):
    """A raw exception (any type) from a writer becomes an ExportError naming the op it mentions, the
    layer that op came from in the traced graph, and the format; colour codes are stripped."""
    from pyattr import exporting

    writer, kind, message = _RAW_ERRORS[fmt]
    error_type = type(kind, (Exception,), {})

    def failing(*args, **kwargs):
        raise error_type(message)

    monkeypatch.setattr(exporting, writer, failing)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}[fmt]
    with pytest.raises(pyattr.ExportError) as info:
        pyattr.export(pyattr.GradCAM(model, "0"), _images(), tmp_path / f"m{suffix}")
    text = _assert_helpful(info.value, op="tanh", method="GradCAM", layer="1")  # nn.Tanh is layer '1'
    assert "(Tanh)" in text and diagnose.FORMAT_NAMES[fmt] in text and kind in text
    others = [name for key, name in diagnose.FORMAT_NAMES.items() if key != fmt]
    assert f"export to {others[0]} or {others[1]} instead" in text
    assert isinstance(info.value.__cause__, error_type)  # the original is kept as the cause
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("over", ["estimate", "protobuf"])
def test_an_onnx_graph_over_protobufs_2gib_names_the_limit_and_the_formats_without_it(tmp_path, monkeypatch, over):
    """vit_h_14 and regnet_y_128gf (the zoo matrix) failed with 'EncodeError: Failed to serialize proto'. A graph
    whose constants exceed the limit (here: the limit lowered to the test model's size) is refused before writing;
    one that protobuf itself refuses gets the same message. No file is left either way."""
    import google.protobuf.message
    import onnx_ir

    from pyattr import exporting

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # 944 bytes
    if over == "estimate":  # the graph's constants hold at least the weights
        monkeypatch.setattr(exporting, "ONNX_FILE_LIMIT", weights - 1)
    else:
        def refuse(*args, **kwargs):
            raise google.protobuf.message.EncodeError("Failed to serialize proto")

        monkeypatch.setattr(onnx_ir, "save", refuse)
    with pytest.raises(pyattr.ExportError) as info:
        pyattr.export(pyattr.Saliency(model), _images(), tmp_path / "big.onnx")
    text = str(info.value)
    assert "over the 2 GiB that one .onnx file can hold" in text and "(.pt)" in text and "(.pt2)" in text
    assert f"holds {weights / 2**30:.2f} GiB of weights" in text
    assert list(tmp_path.iterdir()) == []


def test_a_writers_own_export_error_is_diagnosed_from_its_cause(tmp_path, monkeypatch):
    from pyattr import exporting

    def failing(*args, **kwargs):
        try:
            raise RuntimeError("Unknown builtin op: aten::sym_max")
        except RuntimeError as err:
            raise pyattr.ExportError("torch.export could not capture the traced attribution graph") from err

    monkeypatch.setattr(exporting, "_write_pt2", failing)
    method = pyattr.Saliency(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(72, 2)).eval())
    with pytest.raises(pyattr.ExportError) as info:
        pyattr.export(method, _images(), tmp_path / "m.pt2")
    _assert_helpful(info.value, op="aten::sym_max", method="Saliency", layer=None)


def test_ops_a_format_cannot_take_are_found_right_after_tracing():
    graph = fx.Graph()
    x = graph.placeholder("x")
    size = graph.call_function(torch.ops.aten.sym_size.int, (x, 0))
    biggest = graph.call_function(torch.sym_max, (size, 2))
    view = graph.call_function(torch.ops.aten.as_strided.default, (x, [2], [1]))
    write = graph.call_function(torch.ops.aten.copy_.default, (view, x))
    graph.output((biggest, write))
    gm = fx.GraphModule(nn.Module(), graph)
    assert diagnose.unexportable_nodes(gm, "torchscript") == [biggest]
    assert diagnose.unexportable_nodes(gm, "onnx") == [write]
    assert diagnose.unexportable_nodes(gm, "pt2") == []
    with pytest.raises(pyattr.ExportError, match=r"torch\.sym_max.*TorchScript"):
        diagnose.check_exportable(gm, pyattr.Saliency(nn.Linear(2, 2)), "torchscript")


@pytest.mark.parametrize("message, op", [
    ("\x1b[1mDispatchError\x1b[0m: No ONNX function found for prims.as_strided_scatter. Failure", "prims.as_strided_scatter"),
    ("Unknown builtin op: aten::sym_max.\nHere are some suggestions", "aten::sym_max"),
    ("failed on aten.gelu_backward.default while", "aten.gelu_backward.default"),
    ("nothing about any op", None),
])
def test_op_in_message(message, op):
    assert diagnose.op_in_message(message) == op
    assert "\x1b" not in diagnose.strip_ansi(message)


def test_traced_nodes_record_their_layer():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    gm = trace_graph(pyattr.Saliency(model), _images())
    gelu = [n for n in gm.graph.nodes if n.target == torch.ops.aten.gelu.default]
    assert gelu and diagnose.layer_of_node(gelu[0]) == ("1", "GELU", True)
    # a backward op runs outside every module: it is placed near the forward node it reads
    erf = [n for n in gm.graph.nodes if n.target == torch.ops.aten.erf.default]
    assert diagnose.describe_layers(erf) is not None and "'1' (GELU)" in diagnose.describe_layers(erf)


class _Picky(nn.Module):
    """Accepts 16x16 inputs only (as torchvision's ViT checks its image size)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        torch._assert(x.shape[-1] == 16, f"Wrong image width! Expected 16 but got {x.shape[-1]}!")
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("kind", ["gradcam", "saliency"])
def test_a_model_that_rejects_the_example_gives_a_pyattr_error(tmp_path, kind):
    model = _Picky().eval()
    method = pyattr.GradCAM(model) if kind == "gradcam" else pyattr.Saliency(model)
    error = pyattr.InputError if kind == "gradcam" else pyattr.ExportError  # Grad-CAM runs it to find its layer
    with pytest.raises(error, match="Wrong image width! Expected 16 but got 8"):
        pyattr.export(method, _images(1, size=8), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
