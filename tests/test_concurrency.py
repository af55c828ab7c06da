"""Many threads, one model: every method gives exactly its sequential result and leaves the model as it was.

The model is a small random ShapesNet with BatchNorm (random running statistics) and Dropout, and two
:class:`SyncPoint` layers that make the threads meet inside the forward pass: one before the CAM layer
(``layer3``) and one after it. Every thread has then registered its hooks and entered its call before
any thread runs the layer, and every thread has run the layer before any goes on to the head, so
calls that shared state (hooks on the user's modules, eval mode set on the model, LRP's canonical
forwards) would interfere on every run, not by chance.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import pyattr
from pyattr.errors import InputError
from pyattr.methods import METHODS, build_method
from pyattr.zoo.model import ShapesNet

THREADS = 8
SIZE = 32
OPTIONS = {  # small settings: the stress is on concurrency, not on the methods' cost
    "integratedgradients": {"steps": 8, "chunk_size": 8},
    "smoothgrad": {"samples": 4, "chunk_size": 4},
    "scorecam": {"chunk_size": 16},
    "occlusion": {"patch": 16, "stride": 16, "chunk_size": 2},
    "featureablation": {"cell": 16, "chunk_size": 2},
    "rise": {"masks": 4, "chunk_size": 2},
    "sscam": {"samples": 1, "chunk_size": 16},
    "iscam": {"samples": 1, "chunk_size": 16},
    "ablationcam": {"chunk_size": 16},
    "smoothgradcampp": {"samples": 2, "chunk_size": 2},
    "deepliftshap": {"baselines": 3, "chunk_size": 2},
    "gradientshap": {"baselines": 3, "samples": 4, "stdevs": 0.1, "chunk_size": 2},
}
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class SyncPoint(nn.Identity):
    """Identity; while ``barrier`` is set, every forward pass waits there for the other threads, and
    while ``probe`` is set it records what the user's model looks like in the middle of a call."""

    def __init__(self):
        super().__init__()
        self.barrier: threading.Barrier | None = None
        self.probe: Callable[[], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.probe is not None:
            self.probe()
        if self.barrier is not None:
            try:
                self.barrier.wait(timeout=10)
            except threading.BrokenBarrierError:  # calls with unequal forward counts: stop syncing
                pass
        return x


def stress_model() -> ShapesNet:
    """A small random ShapesNet with non-trivial BatchNorm statistics, Dropout before the head and
    sync points around ``layer3`` (the CAM layer). Same weights on every call."""
    torch.manual_seed(3)
    model = ShapesNet(widths=(8, 8, 16, 16))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.layer2 = nn.Sequential(model.layer2, SyncPoint())
    model.avgpool = nn.Sequential(SyncPoint(), nn.AdaptiveAvgPool2d(1))
    model.fc = nn.Sequential(nn.Dropout(0.5), model.fc)
    return model.eval()


def sync_points(model: nn.Module) -> list[SyncPoint]:
    return [m for m in model.modules() if isinstance(m, SyncPoint)]


def make_method(name: str, model: nn.Module):
    return build_method(name, model, "layer3", **OPTIONS.get(name, {}))


def inputs(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Thread ``i``'s batch (2 images) and targets (one explicit class, one arg-max)."""
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(100 + i))
    return x, torch.tensor([i % 6, -1])


def fields(result) -> dict[str, torch.Tensor]:
    out = {k: getattr(result, k) for k in ("maps", "raw", "scores", "target")}
    if result.completeness_error is not None:
        out["completeness_error"] = result.completeness_error
    return out


_REFERENCES: dict[str, list[dict[str, torch.Tensor]]] = {}


def reference(name: str) -> list[dict[str, torch.Tensor]]:
    """The sequential results of method ``name`` for every thread's inputs, on the model in eval mode."""
    if name not in _REFERENCES:
        model = stress_model()
        method = make_method(name, model)
        _REFERENCES[name] = [fields(method(*inputs(i))) for i in range(THREADS)]
    return _REFERENCES[name]


# -- what the user's model looks like -------------------------------------------------------------
def snapshot(model: nn.Module) -> dict:
    """Everything a call could change: every module's attributes (by identity), hooks, flags, tensors."""
    modules = {}
    for name, m in model.named_modules():
        attrs = {}
        for key, value in m.__dict__.items():
            if isinstance(value, dict):
                attrs[key] = {k: id(v) for k, v in value.items()}
            elif isinstance(value, set):
                attrs[key] = set(value)
            else:
                attrs[key] = value if isinstance(value, (bool, int, float, str, type(None))) else id(value)
        modules[name] = attrs
    return {
        "modules": modules,
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for name, attrs in before["modules"].items():
        assert after["modules"][name] == attrs, f"module {name!r} changed (attributes, hooks or training flag)"
    assert after["modules"].keys() == before["modules"].keys()
    assert after["requires_grad"] == before["requires_grad"]
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{k} changed"
    assert all(p.grad is None for p in model.parameters()), "a parameter received .grad"
    for hooks in (torch.nn.modules.module._global_forward_hooks, torch.nn.modules.module._global_forward_pre_hooks):
        assert len(hooks) == 0


def run_threads(jobs: list[Callable[[], object]], model: nn.Module, sync: bool = True) -> list[object]:
    """Run the jobs in parallel threads that meet at the model's sync points (``sync``); exceptions
    are returned."""
    barrier = threading.Barrier(len(jobs))
    for point in sync_points(model) if sync else ():
        point.barrier = barrier

    def guarded(job):
        try:
            return job()
        except Exception as err:  # noqa: BLE001 - reported by the test
            return err

    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(guarded, jobs))
    finally:
        for point in sync_points(model):
            point.barrier = None


def assert_equal_results(got: list[object], expected: list[dict[str, torch.Tensor]], label: str) -> None:
    errors = [f"thread {i}: {type(r).__name__}: {r}" for i, r in enumerate(got) if isinstance(r, Exception)]
    assert not errors, f"{label}: " + "; ".join(errors)
    for i, (result, want) in enumerate(zip(got, expected)):
        have = fields(result)
        assert have.keys() == want.keys()
        for key in want:
            assert torch.equal(have[key], want[key]), f"{label}: thread {i}'s {key} differs from the sequential call"


# -- the stress test --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("sharing", ["shared", "per_thread"])
@pytest.mark.parametrize("name", list(METHODS))
def test_threads_give_the_sequential_results_and_leave_the_model_untouched(name, sharing, mode):
    expected = reference(name)
    model = stress_model().train(mode == "train")
    before = snapshot(model)
    shared = make_method(name, model)
    methods = [shared if sharing == "shared" else make_method(name, model) for _ in range(THREADS)]
    jobs = [lambda m=m, i=i: m(*inputs(i)) for i, m in enumerate(methods)]
    got = run_threads(jobs, model)
    assert_equal_results(got, expected, f"{name} ({sharing}, {mode} mode)")
    assert_untouched(model, before)


SINGLE_PASS = ("lrp", "lrp_epsilon_gamma_box", "gradcam", "fullgrad", "saliency", "cam", "layercam", "guidedbackprop")


def test_lrp_and_cams_together_on_a_training_mode_model():
    """Different methods at once (LRP's canonical blocks and rule hooks, CAM hooks, FullGrad's output
    capture, the guided ReLU rule) on a model in training mode: each thread gets its sequential result,
    and the model keeps its training flags (two overlapping calls used to leave it in eval mode)."""
    model = stress_model().train()
    before = snapshot(model)
    methods = [make_method(name, model) for name in SINGLE_PASS]
    jobs = [lambda m=m, i=i: m(*inputs(i)) for i, m in enumerate(methods)]
    got = run_threads(jobs, model)
    expected = [reference(name)[i] for i, name in enumerate(SINGLE_PASS)]
    assert_equal_results(got, expected, "mixed methods")
    assert_untouched(model, before)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("name", ["gradcam", "scorecam", "layercam"])
def test_shared_method_chooses_its_layer_once_under_threads(name):
    """layer=None: the first calls race to choose the layer; every thread gets the same choice. (No sync
    points: the choice is made under a lock, by one thread's probe forward pass.)"""
    model = stress_model()
    method = build_method(name, model, None, **OPTIONS.get(name, {}))
    got = run_threads([lambda i=i: method(*inputs(i)) for i in range(THREADS)], model, sync=False)
    fresh = build_method(name, stress_model(), None, **OPTIONS.get(name, {}))
    expected = [fields(fresh(*inputs(i))) for i in range(THREADS)]
    # the last (N, C, h, w) output that is not an Identity (the sync points are Identity subclasses)
    assert method.layer_name == fresh.layer_name == "layer3"
    assert_equal_results(got, expected, name)


# -- nothing changes, not even during a call --------------------------------------------------------
def modules_state(model: nn.Module) -> list[tuple]:
    """What other threads would see of the model: flags, instance forwards, in-place flags, hooks."""
    return [(name, m.training, "forward" in m.__dict__, getattr(m, "inplace", None),
             sum(len(getattr(m, d)) for d in HOOK_DICTS)) for name, m in model.named_modules()]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(METHODS))
def test_the_model_is_untouched_in_the_middle_of_a_call(name, mode):
    """Seen from inside the forward pass (what another thread sees meanwhile), the user's model is as
    it was: no eval switch, no swapped block forward, no in-place flag turned off, no hook added."""
    model = stress_model().train(mode == "train")
    model.layer1.relu1.inplace = True  # LRP's canonizer would turn it off
    holder = types.SimpleNamespace(model=model)  # not a module attribute: the view keeps the original
    expected = modules_state(model)
    seen = []
    point = sync_points(model)[0]
    point.probe = lambda: seen.append(modules_state(holder.model))
    make_method(name, model)(*inputs(0))
    assert seen, "the probe did not run"
    for state in seen:
        assert state == expected


# -- the view itself --------------------------------------------------------------------------------
class Twice(nn.Module):
    """One block reached under two names, and a plain list that refers to modules of the tree."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5))
        self.again = self.block
        self.head = nn.Linear(4, 2)
        self.order = [self.block, self.head]  # not registered: a plain attribute

    def forward(self, x):
        for m in self.order[:1]:
            x = m(x)
        return self.head(x.mean((2, 3)))


def test_view_shares_tensors_copies_hooks_and_maps_each_module_once():
    from pyattr._callview import CallView, is_view

    model = Twice().train()
    calls = []
    model.block[0].register_forward_hook(lambda *_: calls.append("user"))
    view = CallView(model)
    root = view.root
    assert type(root) is Twice and root is not model and is_view(root) and not is_view(model)
    assert root.block is root.again is view.of(model.block)  # memoized
    assert root.order[0] is root.block and root.order[1] is root.head  # plain attribute redirected
    assert all(not m.training for m in root.modules()) and all(m.training for m in model.modules())
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), root.named_parameters()):
        assert n1 == n2 and p1 is p2  # the same tensors: no copy of the weights
    for (n1, b1), (n2, b2) in zip(model.named_buffers(), root.named_buffers()):
        assert n1 == n2 and b1 is b2
    mine = root.block[0].register_forward_hook(lambda *_: calls.append("view"))
    assert len(model.block[0]._forward_hooks) == 1  # the view's hook is not on the model
    x = torch.rand(2, 3, 8, 8)
    running = model.block[1].running_mean.clone()
    out = root(x)
    assert calls == ["user", "view"]
    assert torch.equal(model.block[1].running_mean, running)  # eval BatchNorm: no update
    assert torch.equal(out, root(x))  # dropout off
    model.eval()
    assert torch.equal(out, model(x))  # the view computes what the model computes in eval mode
    mine.remove()


def test_nested_call_views_of_one_model_share_one_view_per_thread():
    from pyattr._callview import CallView, call_view

    model = Twice()
    with call_view(model) as outer, call_view(model) as inner:
        assert inner is outer
        other = []
        t = threading.Thread(target=lambda: other.append(CallView(model).root))
        t.start()
        t.join()
        assert other[0] is not outer.root


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_submodules_are_shared_in_eval_mode_and_refused_in_training_mode():
    model = nn.Sequential(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), nn.Flatten(),
                          nn.LazyLinear(3))
    x = torch.rand(2, 3, 8, 8)
    model(x)  # materialize the lazy layer
    model.eval()
    expected = pyattr.Saliency(model)(x)
    assert torch.equal(pyattr.Saliency(model)(x).maps, expected.maps)
    model[0].train()
    with pytest.raises(InputError, match="TorchScript module in training mode"):
        pyattr.Saliency(model)(x)
    assert model[0].training  # left as it was
    model.eval()
    with pytest.raises(InputError, match="TorchScript module"):
        pyattr.GradCAM(model, "0")(x)  # pyattr cannot hook a shared TorchScript module
