"""Exports running while other threads explain the same model (and while another export runs).

torch's tracing patches ``nn.Module.__call__``/``__getattr__`` and other globals for the whole process
(:mod:`pyattr.exporting.serial`). A :class:`Pause` layer in the model makes the phases overlap on every run: when
it runs inside an export's trace, it waits there until the other thread has made its calls (or, for two exports,
until the other export has had the time to enter its own trace), so the assertions never depend on timing.

Not tested here, because torch makes it unavoidable (documented in :mod:`pyattr.exporting.serial`): while
torch.export runs (.pt2, ONNX's fallback route), mkldnn/cuDNN are off for the whole process and other threads'
convolutions differ from their usual results by rounding.
"""

from __future__ import annotations

import builtins
import math
import threading
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.fx import _symbolic_trace
from torch.fx import traceback as fx_traceback

import pyattr
from pyattr._callview import is_tracing, outside_trace
from pyattr.exporting import diagnose
from pyattr.exporting.trace import trace_graph

WAIT = 10.0  # seconds; only a broken test waits that long
_ORIGINALS = (builtins.max, builtins.min, math.pow)  # what torch.export patches while it runs


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class Pause(nn.Identity):
    """Identity. Inside an export's trace (a thread where pyattr is tracing), it counts the tracing threads,
    sets ``entered`` and waits for ``resume`` (at most ``wait`` seconds). In another thread, when ``hold`` is set,
    it lets the trace go on (sets ``resume``) and waits for ``release``: that eager call is then in the middle
    of its forward pass, inside this module, while the trace runs on."""

    def __init__(self):
        super().__init__()
        self.entered, self.resume = threading.Event(), threading.Event()
        self.hold, self.release = threading.Event(), threading.Event()
        self.wait = WAIT
        self.lock = threading.Lock()
        # counters in an object of their own: a call's view of the module copies its ints, dicts and lists
        self.count = types.SimpleNamespace(tracing=0, most=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_tracing():
            with self.lock:
                self.count.tracing += 1
                self.count.most = max(self.count.most, self.count.tracing)
            self.entered.set()
            self.resume.wait(self.wait)
            with self.lock:
                self.count.tracing -= 1
        elif self.hold.is_set():
            self.hold.clear()
            self.resume.set()
            self.release.wait(self.wait)
        return x


class SharedActivation(nn.Module):
    """A small CNN that registers one ReLU under two names (``act`` and ``act2``) and reaches its layers as
    attributes: the case in which torch's module-stack tracer handed other threads its proxies."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.act2 = self.act
        self.pause = Pause()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pause(self.act(self.conv1(x)))
        x = self.act2(self.bn(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def shared_model() -> SharedActivation:
    torch.manual_seed(0)
    model = SharedActivation()
    model.bn.running_mean.normal_(0, 0.2)
    model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def torch_globals() -> dict:
    """What torch's tracing changes for the process and must have put back."""
    return {"Module.__call__": nn.Module.__call__ is _symbolic_trace._orig_module_call,
            "Module.__getattr__": nn.Module.__getattr__ is _symbolic_trace._orig_module_getattr,
            "builtins.max": builtins.max is _ORIGINALS[0], "builtins.min": builtins.min is _ORIGINALS[1],
            "math.pow": math.pow is _ORIGINALS[2], "patcher": _symbolic_trace.CURRENT_PATCHER is None,
            "preserve_node_meta": not fx_traceback.has_preserved_node_meta()}


def run_exported(path, x: torch.Tensor) -> list[torch.Tensor]:
    target = torch.full((x.shape[0],), -1, dtype=torch.long)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(np.asarray(o)) for o in session.run(None, {"images": x.numpy(),
                                                                           "target": target.numpy()})]
    runner = torch.jit.load(str(path)) if path.suffix == ".pt" else torch.export.load(str(path)).module()
    with torch.no_grad():
        return [o.detach() for o in runner(x, target)]


def assert_matches_eager(path, x: torch.Tensor, ref: pyattr.Attribution) -> None:
    scores, explained, raw, maps = run_exported(path, x)[:4]
    assert torch.equal(explained, ref.target), path.name
    torch.testing.assert_close(scores, ref.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw, ref.raw, rtol=1e-4, atol=1e-4 * float(ref.raw.abs().max()))
    torch.testing.assert_close(maps, ref.maps, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("suffix", [".pt", ".onnx", ".pt2"])
def test_eager_calls_during_an_export_give_their_single_threaded_results(tmp_path, suffix):
    """Thread A exports twice; each time its trace waits in ``pause`` while thread B runs the same method object
    and the plain model on the same model object, five times each, then B holds one call in ``pause`` while A's
    trace goes on (the interleaving that broke torch's module-stack tracer). B's results equal the single-threaded
    ones exactly, neither thread raises, the files match eager, and torch's globals are put back."""
    model = shared_model()
    pause = model.pause
    method = pyattr.Saliency(model)
    x = images()
    ref = method(x)
    with torch.no_grad():
        ref_forward = model(x)
    errors, mismatches, calls = [], [], [0]
    done = threading.Event()

    def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        calls[0] += 1
        if not torch.equal(got, want):
            mismatches.append(name)

    def eager():
        held = 0
        while not done.is_set():
            if not pause.entered.wait(0.05):
                continue
            pause.entered.clear()
            try:
                for _ in range(5):  # while the trace waits in pause, with torch's patches in place
                    check("method", method(x).raw, ref.raw)
                    with torch.no_grad():
                        check("forward", model(x), ref_forward)
                # one call held inside pause while the trace goes on (a method call, then a plain forward)
                pause.hold.set()
                if held % 2 == 0:
                    result = method(x)
                    check("held method", result.raw, ref.raw)
                    check("held method maps", result.maps, ref.maps)
                else:
                    with torch.no_grad():
                        check("held forward", model(x), ref_forward)
                held += 1
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(f"eager: {type(err).__name__}: {err}")
            finally:
                pause.resume.set()

    thread = threading.Thread(target=eager)
    thread.start()
    paths = []
    try:
        for i in range(2):
            pause.resume.clear()
            pause.release.clear()
            path = tmp_path / f"export{i}{suffix}"
            try:
                pyattr.export(method, x[:1], path)
                paths.append(path)
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(f"export {i}: {type(err).__name__}: {err}")
            finally:
                pause.release.set()
    finally:
        done.set()
        pause.resume.set()
        pause.release.set()
        thread.join(WAIT)
    assert not errors, errors
    assert calls[0] == 2 * (10 + 1) + 1, "the eager thread did not run inside both traces"
    assert not mismatches, f"{len(mismatches)} eager results differ from the single-threaded ones: {mismatches[:5]}"
    for path in paths:
        assert_matches_eager(path, x, ref)
    assert all(torch_globals().values()), torch_globals()
    assert "forward" not in model.pause.__dict__ and "forward" not in model.conv1.__dict__  # the user's modules


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_two_exports_at_once_run_one_after_the_other(tmp_path, suffix):
    """Two threads export one method at once. The first to trace waits (1 s) in ``pause`` for the second to
    enter its trace too: pyattr's export lock keeps it out until the first export is written. Both files are
    written and give the same numbers, torch's globals are put back, and the layers are still recorded."""
    model = shared_model()
    pause = model.pause
    pause.wait = 1.0
    method = pyattr.Saliency(model)
    x = images(1)
    start = threading.Barrier(2)
    errors = []

    def job(i: int) -> None:
        try:
            start.wait(WAIT)
            pyattr.export(method, x, tmp_path / f"export{i}{suffix}")
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"export {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(4 * WAIT)
    assert not errors, errors
    assert pause.count.most == 1, "two exports traced at once"
    first, second = (run_exported(tmp_path / f"export{i}{suffix}", images()) for i in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert_matches_eager(tmp_path / f"export0{suffix}", images(), method(images()))
    assert all(torch_globals().values()), torch_globals()


def test_layers_are_recorded_on_the_call_view():
    """Without torch's module-stack tracer, the traced nodes still name their layer (the user's names, a
    shared module under its first name), the backward ops the layer they differentiate, and nothing is left on
    the user's modules."""
    model = shared_model()
    model.pause.resume.set()
    gm = trace_graph(pyattr.Saliency(model), images(1))
    layers = {diagnose.layer_of_node(n) for n in gm.graph.nodes if n.op == "call_function"}
    for name, cls in (("conv1", "Conv2d"), ("conv2", "Conv2d"), ("bn", "BatchNorm2d"), ("act", "ReLU"),
                      ("fc", "Linear"), ("", "SharedActivation")):
        assert (name, cls, True) in layers, (name, layers)
    conv = [n for n in gm.graph.nodes if n.target == torch.ops.aten.convolution.default]
    assert [diagnose.module_of(n)[0] for n in conv[:2]] == ["conv1", "conv2"]
    stack = list(conv[0].meta["nn_module_stack"].values())
    assert stack == [("", f"{__name__}.SharedActivation"), ("conv1", "torch.nn.modules.conv.Conv2d")]
    relu_backward = [n for n in gm.graph.nodes if n.op == "call_function" and diagnose.module_of(n) is None
                     and diagnose.layer_of_node(n) is not None and diagnose.layer_of_node(n)[:2] == ("act", "ReLU")]
    assert relu_backward, "no backward op is placed at the ReLU it differentiates"
    assert all("forward" not in m.__dict__ for m in model.modules())


class WaitingLinear(nn.Linear):
    """A Linear whose forward signals ``entered`` and waits for ``go_on`` (torch.export / torch.onnx trace it
    meanwhile)."""

    def __init__(self):
        super().__init__(4, 2)
        self.entered, self.go_on = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.go_on.wait(WAIT)
        return super().forward(x)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_other_threads_prints_are_kept_while_torch_onnx_exports(capsys):
    """pyattr drops torch.onnx's progress lines; another thread's prints meanwhile still reach stdout."""
    from pyattr.exporting import quiet_onnx_export

    model = WaitingLinear().eval()
    errors = []

    def other():
        try:
            assert model.entered.wait(WAIT)
            print("printed by another thread")
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
        finally:
            model.go_on.set()

    thread = threading.Thread(target=other)
    thread.start()
    try:
        quiet_onnx_export(model, (torch.rand(2, 4),), ["x"], ["y"])
    finally:
        model.go_on.set()
        thread.join(WAIT)
    assert not errors, errors
    out = capsys.readouterr().out
    assert "printed by another thread" in out
    assert "torch.onnx" not in out  # the exporter's own progress lines are still dropped


@pytest.mark.parametrize("name", ["saliency", "smoothgrad", "deeplift"])
def test_eager_calls_leave_a_torch_export_in_another_thread_alone(name):
    """torch.export keeps its pre-dispatch proxy mode on a process-wide stack. pyattr's eager methods make their
    constants outside any trace in progress; they used to set that mode aside from the eager thread too, taking it
    from the exporting thread ('Trying to pop empty mode stack', 'fake tensor in the exported program constant's
    list'). Now only a thread that traces sets its modes aside: the export is whole, and the eager results are
    the single-threaded ones (up to rounding: torch.export turns mkldnn off for the process meanwhile)."""
    from pyattr.methods import build_method

    waiting = WaitingLinear().eval()
    model = shared_model()
    model.pause.resume.set()
    method = build_method(name, model, None, **({"samples": 2} if name == "smoothgrad" else {}))
    x = images()
    ref = method(x)
    results, errors = [], []
    exported = threading.Event()

    def other():
        try:
            assert waiting.entered.wait(WAIT)
            results.extend(method(x) for _ in range(3))
            # what those calls do to make their constants, held while the export goes on and ends
            with outside_trace():
                waiting.go_on.set()
                exported.wait(WAIT)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"eager: {type(err).__name__}: {err}")
        finally:
            waiting.go_on.set()

    thread = threading.Thread(target=other)
    thread.start()
    example = torch.rand(3, 4, generator=torch.Generator().manual_seed(2))
    try:
        program = torch.export.export(waiting, (example,), strict=False)
    except Exception as err:  # noqa: BLE001 - reported below
        errors.append(f"torch.export: {type(err).__name__}: {err}")
    finally:
        exported.set()
        waiting.go_on.set()
        thread.join(WAIT)
    assert not errors, errors
    assert not program.constants, f"constants leaked into the program: {list(program.constants)}"
    torch.testing.assert_close(program.module()(example), waiting(example), rtol=0, atol=0)
    assert len(results) == 3
    for result in results:
        torch.testing.assert_close(result.raw, ref.raw, rtol=1e-5, atol=1e-5 * float(ref.raw.abs().max()))
        assert torch.equal(result.target, ref.target)
    assert not torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.PreDispatch)


class TracePause(nn.Identity):
    """Identity; inside any torch trace of this thread (torch.export's fake / proxy modes) it sets ``entered`` and
    waits for ``resume``: the export is then mid-trace while another thread runs."""

    def __init__(self):
        super().__init__()
        self.entered, self.resume = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pyattr._callview import this_thread_traces

        if this_thread_traces():
            self.entered.set()
            self.resume.wait(WAIT)
        return x


class TinyDetector(nn.Module):
    """A dense detector: (N, 3, H, W) -> boxes (N, M, 4), scores (N, M, 3), M = H W / 16."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.pause = TracePause()
        self.boxes = nn.Conv2d(8, 4, 1)
        self.scores = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.pause(torch.relu(self.conv(x)))
        return self.boxes(f).flatten(2).transpose(1, 2), self.scores(f).flatten(2).transpose(1, 2).sigmoid()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_export_detector_leaves_other_threads_running_the_model_alone(tmp_path):
    """export_detector traces the detector with torch.export, which swaps the traced module's parameters for fake
    tensors while it traces. While the trace waits (TracePause), another thread runs the user's detector three
    times: its outputs are the single-threaded ones (before the export traced a per-call view, that thread ran on
    fake parameters: DataDependentOutputException, proxies of the other thread's trace), its parameters stay the
    same real tensors, and the file gives the model's outputs in onnxruntime."""
    import onnxruntime as ort

    from pyattr.exporting.detector import export_detector

    torch.manual_seed(0)
    model = TinyDetector().eval()
    params = {name: p for name, p in model.named_parameters()}
    x = images()
    with torch.no_grad():
        ref = model(x)
    errors, results = [], []

    def other():
        if not model.pause.entered.wait(WAIT):
            errors.append("the export never entered its trace")
            return
        try:
            for _ in range(3):
                with torch.no_grad():
                    results.append(model(x))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"{type(err).__name__}: {err}")
        finally:
            model.pause.resume.set()

    thread = threading.Thread(target=other)
    thread.start()
    path = tmp_path / "detector.onnx"
    try:
        export_detector(model, x[:1], path)
    finally:
        model.pause.resume.set()
        thread.join(WAIT)
    assert not errors, errors
    assert len(results) == 3
    for boxes, scores in results:  # rounding only: torch.export turns mkldnn off process-wide while it runs
        torch.testing.assert_close(boxes, ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scores, ref[1], rtol=1e-5, atol=1e-6)
    assert {name: p for name, p in model.named_parameters()} == params
    assert all(type(p) is nn.Parameter and not p.is_meta for p in model.parameters())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores = session.run(None, {"images": x.numpy()})
    np.testing.assert_allclose(boxes, ref[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores, ref[1].numpy(), rtol=1e-4, atol=1e-5)
