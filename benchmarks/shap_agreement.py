"""Agreement of pyattr's DeepLIFT-SHAP and GradientSHAP with the ``shap`` package (issue 16, item 5).

Models: the built-in ShapesNet (64x64), seeded random-init torchvision resnet18 and vgg11 (10 classes, 32x32).
Inputs and backgrounds: seeded U[0, 1) images (no flat regions, so no max-pool ties); the built-in model also
on its shapes images (flat regions: max-pool ties). Every explained class of every model is compared.

(a) ``shap.DeepExplainer(model, background).shap_values(x)`` against ``pyattr.DeepLiftShap(model, background)``:
    as shipped, with ``tie_rtol=0`` (a max-pool window's difference to its arg-max, as shap does; pyattr
    shares it among near-ties) and with ``maxpool="gradient"``. shap gets a copy of torchvision's models with
    out-of-place ReLUs (its full backward hooks raise on in-place ones), and, for resnet18, an out-of-place
    residual sum (they raise on ``out += identity`` too) and one ReLU module per use (shap keeps each module's
    last input on the module, so a reused ReLU gets the wrong one); pyattr runs on the unmodified models.
    resnet18 also with shap's max-pool hook made a scatter-add (its ``max_unpool`` keeps one of the shares an
    input gets from overlapping windows). Also measured: what in-place ReLUs, ``+=`` and a reused ReLU module
    do to shap, and a ``F.relu`` / an ``nn.ReLU`` subclass, which shap does not hook.
(b) ``shap.GradientExplainer(model, background, local_smoothing=s).shap_values(x, nsamples=S)`` against
    ``pyattr.GradientShap(model, background, samples=S, stdevs=s)`` on the same draws: shap's
    ``np.random.choice`` / ``np.random.uniform`` (baseline index, alpha) are handed pyattr's draws and torch's
    global generator is seeded as pyattr's noise generator (``seed + 1``; the same stream when an input has a
    multiple of 16 elements), one input and one class per shap call (shap continues its streams across the
    inputs of a batch and, for the noise, across classes).
(c) The same expectation on independent draws (shap's own RNG, many samples): |shap - pyattr| against the
    Monte-Carlo floor |pyattr(seed 0) - pyattr(seed 1)|.

Needs shap (and torchvision) next to pyattr; the repository's venv does not carry shap, so run it from a venv
that does::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/shap_agreement.py   # writes results/shap_agreement.*
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
import types
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np
import shap
import shap.explainers._deep.deep_pytorch as shap_deep_pytorch
import torch
import torchvision
from torch import nn

import pyattr
from pyattr.methods import DeepLiftShap, GradientShap
from pyattr.methods import deeplift as deeplift_module

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10


# -- models, inputs -------------------------------------------------------------------------------------
def seeded(seed: int, build) -> nn.Module:
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build().eval()
    finally:
        torch.random.set_rng_state(state)


def images(n: int, seed: int, size: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def shapes(n: int, seed: int) -> torch.Tensor:
    batch = pyattr.zoo.generate(n, seed=seed)
    return (torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255.0).contiguous()


def _block_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu_out(self.bn2(self.conv2(out)) + identity)


def for_shap(model: nn.Module, out_of_place: bool = True, one_per_use: bool = True) -> nn.Module:
    """A copy shap can hook: every ``nn.ReLU`` out of place; in torchvision's BasicBlocks the residual sum out of
    place (``out_of_place``; shap's hooks refuse torchvision's ``out += identity`` on the hooked BN's output)
    and a second ReLU module for the block's second use (``one_per_use``; else the block's ``relu`` again).
    The user's model is not touched."""
    from torchvision.models.resnet import BasicBlock

    copied = copy.deepcopy(model)
    for parent in list(copied.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.ReLU(inplace=False))
    if out_of_place:
        for block in copied.modules():
            if isinstance(block, BasicBlock):
                block.relu_out = nn.ReLU(inplace=False) if one_per_use else block.relu
                block.forward = types.MethodType(_block_forward, block)
    return copied


def _maxpool_scatter_add(module, grad_input, grad_output):
    """shap's max-pool hook (``shap.explainers._deep.deep_pytorch.maxpool``) with its ``max_unpool`` replaced by a
    scatter-add (where windows overlap, an input that is the arg-max of several windows gets all their shares)."""
    x = module.x
    half = x.shape[0] // 2
    delta_in = x[:half] - x[half:]
    y, ref_output = torch.chunk(module.y, 2)
    cross_max = torch.max(y, ref_output)
    diffs = torch.cat([cross_max - ref_output, y - cross_max], 0)
    with torch.no_grad():
        _, indices = torch.nn.functional.max_pool2d(x, module.kernel_size, module.stride, module.padding,
                                                    module.dilation, module.ceil_mode, True)
        values = (grad_output[0] * diffs).flatten(2)
        placed = torch.zeros(*x.shape[:2], x.shape[2] * x.shape[3], dtype=x.dtype)
        placed = placed.scatter_add_(2, indices.flatten(2), values).view_as(x)
    xmax_pos, rmax_pos = torch.chunk(placed, 2)
    grad = torch.where(delta_in.abs() < 1e-7, torch.zeros_like(delta_in), (xmax_pos + rmax_pos) / delta_in)
    return (grad.repeat(2, *[1] * (x.dim() - 1)),) + (None,) * (len(grad_input) - 1)


_maxpool_scatter_add.__name__ = "maxpool"  # shap saves a module's tensors only for handlers of this name


@contextmanager
def shap_scatter_add(active: bool):
    handlers = shap_deep_pytorch.op_handler
    saved = handlers["MaxPool2d"]
    if active:
        handlers["MaxPool2d"] = _maxpool_scatter_add
    try:
        yield
    finally:
        handlers["MaxPool2d"] = saved


def cases(quick: bool) -> list[dict]:
    builtin = pyattr.zoo.load_builtin()
    resnet18 = seeded(0, lambda: torchvision.models.resnet18(num_classes=NUM_CLASSES))
    out = [
        {"name": "builtin", "model": builtin, "x": images(2, 11, 64), "background": images(4, 12, 64), "k": 6},
        {"name": "builtin (shapes images)", "model": builtin, "x": shapes(2, 11), "background": images(4, 12, 64),
         "k": 6},
        {"name": "vgg11", "model": seeded(1, lambda: torchvision.models.vgg11(num_classes=NUM_CLASSES)),
         "x": images(2, 11, 32), "background": images(4, 12, 32), "k": NUM_CLASSES},
        {"name": "resnet18", "model": resnet18, "x": images(2, 11, 32), "background": images(4, 12, 32),
         "k": NUM_CLASSES},
        {"name": "resnet18 (shap's max-pool hook scatter-adds)", "model": resnet18, "x": images(2, 11, 32),
         "background": images(4, 12, 32), "k": NUM_CLASSES, "scatter_add": True},
    ]
    return out[:1] if quick else out


# -- comparison -----------------------------------------------------------------------------------------
def differences(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """max |ours - theirs|; max over samples of max |ours - theirs| / max |theirs| (the tests' definition); max
    over samples of ||ours - theirs|| / ||theirs|| (L2)."""
    ours, theirs = ours.detach().double().flatten(1), theirs.detach().double().flatten(1)
    diff = (ours - theirs).abs().amax(1)
    l2 = (ours - theirs).norm(dim=1) / theirs.norm(dim=1)
    return {"max_abs": float(diff.max()), "max_rel": float((diff / theirs.abs().amax(1)).max()),
            "rel_l2": float(l2.max())}


def score_gap(model, x, background, k: int) -> torch.Tensor:
    """(N, K): S_c(x) - mean_b S_c(b)."""
    with torch.no_grad():
        return model(x)[:, :k].double() - model(background)[:, :k].double().mean(0)


class Column(nn.Module):
    """The model's score of class ``c`` as an (N, 1) output (a wrapper; the model is not changed)."""

    def __init__(self, model: nn.Module, c: int):
        super().__init__()
        self.model, self.c = model, c

    def forward(self, x):
        return self.model(x)[:, self.c:self.c + 1]


@contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def shap_deep(model, x, background) -> tuple[torch.Tensor, float]:
    """shap.DeepExplainer on every class: (N, K, C, H, W) and the seconds it took."""
    start = time.perf_counter()
    with quiet():
        values = shap.DeepExplainer(model, background).shap_values(x, check_additivity=False)
    return torch.from_numpy(np.moveaxis(np.asarray(values), -1, 1)), time.perf_counter() - start


VARIANTS = (  # (label, maxpool rule, tie_rtol)
    ("default", "deeplift", deeplift_module.TIE_RTOL),
    ("tie_rtol=0", "deeplift", 0.0),
    ("maxpool=gradient", "gradient", deeplift_module.TIE_RTOL),
)
"""pyattr's DeepLIFT-SHAP as it ships (max-pool rule, near-ties within ``tie_rtol`` of a window's maximum share its
difference), the same with ``tie_rtol=0`` (only exactly equal values share; otherwise a window's difference goes to
its arg-max, as in shap, captum and torch's max-pool gradient), and with torch's plain max-pool gradient. (Results
before 2026-12-02 set the module's ``TIE_RTOL`` to 0 instead, labelled ``TIE_RTOL=0``: the same computation.)"""


def deep_case(case: dict) -> dict:
    model, x, background, k = case["model"], case["x"], case["background"], case["k"]
    with shap_scatter_add(case.get("scatter_add", False)):
        theirs, seconds = shap_deep(for_shap(model), x, background)
    theirs = theirs[:, :k]
    targets = torch.arange(k).expand(x.shape[0], k)
    gap = score_gap(model, x, background, k)
    out = {"shap_seconds": round(seconds, 2), "completeness_error": {
        "shap": float((theirs.flatten(2).sum(2) - gap).abs().max())}}
    for label, rule, tie in VARIANTS:
        start = time.perf_counter()
        ours = DeepLiftShap(model, background, chunk_size=background.shape[0], reduction="none",
                            maxpool=rule, tie_rtol=tie)(x, targets).raw
        out.setdefault("pyattr_seconds", round(time.perf_counter() - start, 2))
        out["completeness_error"][label] = float((ours.double().flatten(2).sum(2) - gap).abs().max())
        out[label] = {
            "all classes": differences(ours.flatten(0, 1), theirs.flatten(0, 1)),
            "per class": [differences(ours[:, c], theirs[:, c]) for c in range(k)],
        }
    return out


def shap_misuse(case: dict) -> dict:
    """What shap makes of torchvision's resnet18 as it is (in-place ReLUs), with out-of-place ReLUs (torchvision's
    ``out += identity`` remains), and with an out-of-place sum but the block's ReLU module called twice, against
    pyattr on the unmodified model (``tie_rtol=0``, as shap)."""
    model, x, background, k = case["model"], case["x"], case["background"], case["k"]
    out = {}
    # on copies: an exception inside shap_values leaves shap's hooks (and its saved tensors) on the model
    for label, oracle in (("as built", copy.deepcopy(model)),
                          ("ReLUs out of place", for_shap(model, out_of_place=False))):
        try:
            shap_deep(oracle, x, background)
            out[label] = "ran"
        except RuntimeError as error:
            out[label] = f"RuntimeError: {str(error).splitlines()[0][:100]}"
    targets = torch.arange(k).expand(x.shape[0], k)
    gap = score_gap(model, x, background, k)
    ours = DeepLiftShap(model, background, chunk_size=background.shape[0], reduction="none",
                        tie_rtol=0.0)(x, targets).raw
    for label, one_per_use in (("reused ReLU module", False), ("one ReLU module per use", True)):
        with shap_scatter_add(True):
            theirs, _ = shap_deep(for_shap(model, one_per_use=one_per_use), x, background)
        out[label] = {**differences(ours.flatten(0, 1), theirs[:, :k].flatten(0, 1)),
                      "completeness_error": float((theirs[:, :k].flatten(2).sum(2) - gap).abs().max())}
    return out


def functional_relu() -> dict:
    """A forward that calls ``F.relu`` (no module for shap to hook) and a ReLU subclass (shap matches class
    names): shap passes the plain gradient there; pyattr applies the rule."""

    class MyReLU(nn.ReLU):
        pass

    class Net(nn.Module):
        def __init__(self, act: nn.Module | None):
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(3, 8, 3), act, nn.Linear(8 * 6 * 6, 3)

        def forward(self, x):
            h = self.conv(x)
            h = torch.nn.functional.relu(h) if self.act is None else self.act(h)
            return self.fc(h.flatten(1))

    x, background = images(2, 21, 8), images(3, 22, 8)
    out = {}
    for name, act in (("F.relu", None), ("nn.ReLU subclass", MyReLU()), ("nn.ReLU", nn.ReLU())):
        net = seeded(5, lambda act=act: Net(act))
        theirs, _ = shap_deep(net, x, background)
        ours = DeepLiftShap(net, background, reduction="none")(x, torch.arange(3).expand(2, 3)).raw
        gap = score_gap(net, x, background, 3)
        out[name] = {**differences(ours.flatten(0, 1), theirs.flatten(0, 1)),
                     "shap completeness_error": float((theirs.flatten(2).sum(2) - gap).abs().max()),
                     "pyattr completeness_error": float((ours.double().flatten(2).sum(2) - gap).abs().max())}
    return out


@contextmanager
def replayed(index: list[int], alpha: list[float]):
    """shap's ``np.random.choice(B)`` / ``np.random.uniform()`` return pyattr's draws in order, restarting at
    ``np.random.seed`` (shap reseeds NumPy per explained class)."""
    state = {"i": 0, "a": 0}
    saved = np.random.choice, np.random.uniform, np.random.seed

    def choice(*args, **kwargs):
        state["i"] += 1
        return index[state["i"] - 1]

    def uniform(*args, **kwargs):
        state["a"] += 1
        return alpha[state["a"] - 1]

    def seed(*args, **kwargs):
        state["i"] = state["a"] = 0

    np.random.choice, np.random.uniform, np.random.seed = choice, uniform, seed
    try:
        yield
    finally:
        np.random.choice, np.random.uniform, np.random.seed = saved


def shap_gradient_on(model, x1, background, c: int, samples: int, stdevs: float, noise_seed: int | None,
                     rseed: int = 0) -> np.ndarray:
    """shap.GradientExplainer on one input (1, ...) and one class; torch's global generator seeded with
    ``noise_seed`` (then restored) when given."""
    state = torch.random.get_rng_state()
    try:
        explainer = shap.GradientExplainer(Column(model, c), background, batch_size=min(samples, 64),
                                           local_smoothing=stdevs)
        if noise_seed is not None:
            torch.manual_seed(noise_seed)
        with quiet():
            return np.asarray(explainer.shap_values(x1, nsamples=samples, rseed=rseed))[..., 0]
    finally:
        torch.random.set_rng_state(state)


def gradient_case(case: dict, samples: int, stdevs: float, seed: int = 3) -> dict:
    """shap fed pyattr's draws: the alphas as pyattr applies them to float32 inputs (rounded to float32), and
    as drawn (float64: shap's ``t * x + (1 - t) * b`` then rounds differently, by an ulp, from pyattr's)."""
    model, x, background, k = case["model"], case["x"], case["background"], case["k"]
    method = GradientShap(model, background, samples=samples, stdevs=stdevs, chunk_size=samples,
                          reduction="none", seed=seed)
    targets = torch.arange(k).expand(x.shape[0], k)
    start = time.perf_counter()
    ours = method(x, targets).raw
    out = {"samples": samples, "stdevs": stdevs, "pyattr_seconds": round(time.perf_counter() - start, 2)}
    index, alpha, _ = method.draws(x)
    for label, alphas in (("float32 alphas", [float(np.float32(a)) for a in alpha]), ("float64 alphas", alpha)):
        theirs = torch.zeros_like(ours, dtype=torch.float64)
        start = time.perf_counter()
        with replayed(index, alphas):
            for j in range(x.shape[0]):
                for c in range(k):
                    theirs[j, c] = torch.from_numpy(
                        shap_gradient_on(model, x[j:j + 1], background, c, samples, stdevs, seed + 1))[0]
        out.setdefault("shap_seconds", round(time.perf_counter() - start, 2))
        out[label] = {"all classes": differences(ours.flatten(0, 1), theirs.flatten(0, 1)),
                      "per class": [differences(ours[:, c], theirs[:, c]) for c in range(k)]}
    return out


def expectation_case(case: dict, samples: int, stdevs: float) -> dict:
    """Independent draws, one input, its top class: shap (own RNG) vs pyattr seed 0, and pyattr seeds 0 vs 1."""
    model, x, background = case["model"], case["x"][:1], case["background"]
    with torch.no_grad():
        c = int(model(x).argmax(1))
    runs = [GradientShap(model, background, samples=samples, stdevs=stdevs, chunk_size=64, reduction="none",
                         seed=s)(x, c).raw for s in (0, 1)]
    torch.manual_seed(1234)
    theirs = torch.from_numpy(shap_gradient_on(model, x, background, c, samples, stdevs, None, rseed=1234))
    return {"samples": samples, "stdevs": stdevs, "class": c,
            "shap vs pyattr seed 0": differences(runs[0], theirs),
            "pyattr seed 1 vs pyattr seed 0 (floor)": differences(runs[1], runs[0])}


# -- report -----------------------------------------------------------------------------------------------
def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "numpy", "shap", "captum"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def markdown(report: dict) -> str:
    def e(v: float) -> str:
        return f"{v:.1e}"

    lines = [f"# pyattr vs shap {report['versions']['shap']}", "",
             f"`{report['command']}`", "",
             f"{report['date']}, {report['machine']}, load average {report['load_average']}, "
             f"{report['threads']} thread(s); " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             "", "Max relative error: max over samples of max |pyattr - shap| / max |shap|. Every class explained.",
             "", "## DeepExplainer vs DeepLiftShap (4 baselines, 2 inputs, every class)", "",
             "pyattr variants: " + "; ".join(f"`{label}`: maxpool={rule}, tie_rtol={tie}"
                                            for label, rule, tie in VARIANTS) + ".", "",
             "| model | " + " | ".join(f"{label} rel / abs" for label, _, _ in VARIANTS) +
             " | sum error: shap | " + " | ".join(label for label, _, _ in VARIANTS) + " | shap s | pyattr s |",
             "|---|" + "---|" * (2 * len(VARIANTS) + 3)]
    for name, r in report["deep"].items():
        cells = [f"{e(r[label]['all classes']['max_rel'])} / {e(r[label]['all classes']['max_abs'])}"
                 for label, _, _ in VARIANTS]
        sums = [e(r["completeness_error"][label]) for label, _, _ in VARIANTS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {e(r['completeness_error']['shap'])} | "
                     + " | ".join(sums) + f" | {r['shap_seconds']} | {r['pyattr_seconds']} |")
    for label, _, _ in VARIANTS:
        lines += ["", f"Per class, `{label}`, max relative error:", ""]
        for name, r in report["deep"].items():
            lines.append(f"- {name}: " + ", ".join(e(c["max_rel"]) for c in r[label]["per class"]))
    if "misuse" in report:
        m = report["misuse"]
        lines += ["", "## shap on torchvision's resnet18", "",
                  f"- as torchvision builds it (in-place ReLUs): {m['as built']}",
                  f"- ReLUs out of place, torchvision's `out += identity` kept: {m['ReLUs out of place']}"]
        for label in ("reused ReLU module", "one ReLU module per use"):
            lines.append(f"- out-of-place sum, {label} (shap's max-pool hook scatter-adds): max rel "
                         f"{e(m[label]['max_rel'])} from pyattr (tie_rtol=0), shap's sum error "
                         f"{e(m[label]['completeness_error'])}")
    if "functional" in report:
        lines += ["", "## Non-linearities shap does not hook (conv -> act -> linear, 8x8)", "",
                  "| activation | rel | sum error shap | sum error pyattr |", "|---|---|---|---|"]
        for name, r in report["functional"].items():
            lines.append(f"| {name} | {e(r['max_rel'])} | {e(r['shap completeness_error'])} | "
                         f"{e(r['pyattr completeness_error'])} |")
    lines += ["", "## GradientExplainer vs GradientShap, same draws (2 inputs, every class)", "",
              ("shap fed pyattr's baseline indices, alphas and noise; the alphas rounded to float32 (as pyattr "
               "applies them) or as drawn (float64)."), "",
              "| model | samples | stdevs | float32 alphas rel / abs | float64 alphas rel / abs | shap s | pyattr s |",
              "|---|---|---|---|---|---|---|"]
    for name, r in report["gradient"].items():
        a, b = r["float32 alphas"]["all classes"], r["float64 alphas"]["all classes"]
        lines.append(f"| {name} | {r['samples']} | {r['stdevs']} | {e(a['max_rel'])} / {e(a['max_abs'])} | "
                     f"{e(b['max_rel'])} / {e(b['max_abs'])} | {r['shap_seconds']} | {r['pyattr_seconds']} |")
    lines += ["", "## GradientExplainer vs GradientShap, independent draws (one input, its top class)", "",
              "max relative / relative L2 difference; the floor is two pyattr runs with different seeds.", "",
              "| model | samples | stdevs | shap vs pyattr seed 0 | pyattr seed 1 vs seed 0 (floor) |",
              "|---|---|---|---|---|"]
    for name, r in report["expectation"].items():
        a, f = r["shap vs pyattr seed 0"], r["pyattr seed 1 vs pyattr seed 0 (floor)"]
        lines.append(f"| {name} | {r['samples']} | {r['stdevs']} | {e(a['max_rel'])} / {e(a['rel_l2'])} | "
                     f"{e(f['max_rel'])} / {e(f['rel_l2'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=8, help="GradientSHAP samples, same-draw comparison")
    parser.add_argument("--stdevs", type=float, default=0.1)
    parser.add_argument("--expectation-samples", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="the built-in model only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shap_agreement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc)
              .isoformat(timespec="seconds"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
              "threads": args.threads, "versions": versions(), "deep": {}, "gradient": {}, "expectation": {}}
    all_cases = cases(args.quick)
    for case in all_cases:
        report["deep"][case["name"]] = deep_case(case)
        print(case["name"], "deep", json.dumps({label: report["deep"][case["name"]][label]["all classes"]
                                                for label, _, _ in VARIANTS}), flush=True)
        if "shapes" in case["name"] or case.get("scatter_add"):
            continue
        report["gradient"][case["name"]] = gradient_case(case, args.samples, args.stdevs)
        print(case["name"], "gradient", json.dumps({label: report["gradient"][case["name"]][label]["all classes"]
                                                    for label in ("float32 alphas", "float64 alphas")}), flush=True)
    for case in all_cases:
        if case["name"] in ("builtin", "resnet18"):
            report["expectation"][case["name"]] = expectation_case(case, args.expectation_samples, args.stdevs)
            print(case["name"], "expectation", json.dumps(report["expectation"][case["name"]]), flush=True)
    if not args.quick:
        report["misuse"] = shap_misuse(all_cases[3])
        report["functional"] = functional_relu()
    report["load_average"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
