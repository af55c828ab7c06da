"""pyattr.metrics against Quantus: the same metrics on the same maps, model and batch; agreement and time.

Quantus (https://github.com/understandable-machine-intelligence-lab/Quantus) cannot share pyattr's development
environment (it pulls ``opencv-python``, which conflicts with pytorch-grad-cam's ``opencv-python-headless``), so
this script runs in a venv of its own, with pyattr from the source tree on ``PYTHONPATH``::

    python3.11 -m venv /work/venv-quantus        # the interpreter of pyattr's venv
    /work/venv-quantus/bin/pip install torch==2.14.1 torchvision==0.29.1 quantus numpy pillow tqdm scipy
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD /work/venv-quantus/bin/python benchmarks/quantus_comparison.py
    -> benchmarks/results/quantus_comparison.{md,json}

Models: the built-in model (64x64) and a seeded random-init torchvision resnet18 (10 classes, 64x64). Maps:
pyattr's Saliency maps of the batch (computed once, fed to both libraries as (N, 1, H, W) NumPy arrays). For the
metrics that rank pixels the maps are replaced by their ranks (:func:`pyattr.metrics.pixel_ranks`, a monotone
transform without ties): Quantus sorts with ``np.argsort`` (not stable), so tied pixels would be taken in another
order. Each pair runs with the same batch (Quantus ``batch_size`` = N) on one thread, the rounds interleaved;
pyattr with ``chunk_size`` (model inputs per forward, which bounds memory) recorded.

Pairs, each configured so that both compute the same numbers (asserted, then timed):

* ``deletion`` vs ``PixelFlipping``: pixels set to the constant 0.0 in the map's order, the softmax score after
  each step. Quantus perturbs the C*H*W input values but checks that ``features_in_step`` divides H*W, so its steps
  cannot be whole pixels on RGB images: both run C*S steps (the same number of forward passes; Quantus
  ``features_in_step = H*W/S``, ``perturb_baseline=0.0``, the map repeated over the channels with the C values of
  a pixel one after the other), timed; the S points where Quantus has removed whole pixels are compared with
  pyattr's curve of S steps (Quantus's curve lacks pyattr's point 0, the unperturbed input).
* ``infidelity`` vs ``Infidelity``: Quantus's perturbation is deterministic: square patches (``patch``) set to 0.0
  one after the other in row-major order, *cumulatively* (perturbation p has patches 0..p removed), the loss the
  mean squared difference between ``sum(map * (x - x_p))`` and ``f(x) - f(x_p)``. pyattr's ``infidelity``
  (captum's definition: Gaussian perturbations by default) takes the same perturbations through its
  ``perturbation=`` argument, ``n_perturb`` = the number of patches, ``normalize=False``, softmax scores. Quantus
  ``n_perturb_samples=1``: its default 10 repeats the same deterministic perturbations 10 times (10x the time for
  the same number).
* ``sensitivity_max`` vs ``MaxSensitivity``: uniform noise in [-r, r] on every input value, the map recomputed on
  each noisy copy, max over draws of ||map(x + d) - map(x)||_F / ||map(x)||_F (both libraries' definition).
  Quantus's noise comes from ``np.random``: here its ``perturb_func`` hands out pyattr's draws (pyattr's own
  seeded generator, the same order), and its ``explain_func`` is the same pyattr Saliency, so both explain the
  same noisy copies.
* ``road`` vs ``ROAD``: Quantus 0.6.0's ROAD cannot run on RGB images with per-pixel maps: it ranks the C*H*W
  broadcast values but imputes H*W pixels (``IndexError: index 6378 is out of bounds for axis 0 with size 4096``).
  Timed here as a subclass whose one change is to rank pixels (the (N, H*W) map). Quantus returns whether the
  class is still the arg-max (0/1 per share), pyattr the score change: the agreement is checked on what both
  compute, the imputed images (pyattr's ``linear_imputation`` vs Quantus's ``noisy_linear_imputation`` with
  noise 0), and on the share of images still classified as their class on pyattr's imputed images vs Quantus's
  (its result: that share per percentage, over the batch).
* ``insertion``: no Quantus twin (its RegionPerturbation and Selectivity remove patches, they insert nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import pyattr
from pyattr import metrics
from pyattr.metrics.imputation import linear_imputation, removal_masks

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parent / "results"


# -- inputs ----------------------------------------------------------------------------------------------------------


def load_case(name: str, n: int, size: int):
    """(model, x (N, 3, H, W) float32, targets (N,), saliency maps (N, H, W)) for a model name."""
    if name == "builtin":
        model = pyattr.zoo.load_builtin().eval()
        data = pyattr.zoo.generate(n, seed=7, size=size)
        x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    elif name == "resnet18":
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10).eval()
        x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    else:
        raise SystemExit(f"unknown model {name!r}")
    result = pyattr.Saliency(model)(x)
    return model, x.contiguous(), result.target, result.maps.detach()


def rank_maps(maps: torch.Tensor) -> torch.Tensor:
    """The maps replaced by their ranks, highest first: (H*W - rank) / (H*W), no ties, pyattr's order."""
    hw = maps[0].numel()
    return ((hw - metrics.pixel_ranks(maps).float()) / hw).view_as(maps)


def timed(fn, rounds: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(rounds):
        began = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), out


def interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds of each callable, rounds interleaved (one warm-up call each first); and its last output."""
    outs = {k: f() for k, f in fns.items()}  # warm-up
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            began = time.perf_counter()
            outs[k] = f()
            times[k].append(time.perf_counter() - began)
    return {k: (statistics.median(v), outs[k]) for k, v in times.items()}


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# -- the pairs -------------------------------------------------------------------------------------------------------


def pair_deletion(model, x, y, maps, args) -> dict:
    import quantus

    n, c, h, w = x.shape
    ranked = rank_maps(maps)
    steps = c * args.steps  # Quantus steps over the C*H*W values; every C-th of its points is a whole-pixel one
    q = quantus.PixelFlipping(features_in_step=c * h * w // steps, perturb_baseline=0.0, normalise=False, abs=False,
                              disable_warnings=True, display_progressbar=False, return_auc_per_sample=False)
    # the map over the channels, the C values of a pixel one after the other (float64: no ties): Quantus checks that
    # features_in_step divides H*W but removes C*H*W values, so its steps cut pixels; pyattr removes whole pixels
    order = (h * w - metrics.pixel_ranks(maps).double().view(n, 1, h, w)) * c
    a = (order - torch.arange(c, dtype=torch.float64).view(1, c, 1, 1)).numpy()
    runs = interleaved({  # timed: the same C*S forward passes of N images each
        "pyattr": lambda: metrics.deletion(model, x, ranked, y, steps=steps, baseline=0.0, score="softmax",
                                           chunk_size=args.chunk),
        "quantus": lambda: np.asarray(q(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a, device="cpu",
                                        batch_size=n, softmax=True)),
    }, args.rounds)
    # compared: pyattr's S steps of H*W/S pixels (its steps are ceil(H*W / steps) pixels, torchcam's rule, so C*S
    # steps are not a third of S's) with Quantus's points where it has removed whole pixels
    ours = metrics.deletion(model, x, ranked, y, steps=args.steps, baseline=0.0, score="softmax",
                            chunk_size=args.chunk).scores.numpy()
    theirs = runs["quantus"][1]
    assert ours.shape == (n, args.steps + 1) and theirs.shape == (n, steps), (ours.shape, theirs.shape)
    diff = float(np.abs(ours[:, 1:] - theirs[:, c - 1::c]).max())
    assert diff < 1e-5, diff
    return {"pyattr": "metrics.deletion(baseline=0.0, steps=C*S, score='softmax')",
            "quantus": "PixelFlipping(features_in_step=H*W/S, perturb_baseline=0.0), softmax=True",
            "settings": {"steps": steps, "whole_pixel_points": args.steps}, "agreement": {"max_abs_diff_curve": diff},
            "pyattr_s": runs["pyattr"][0], "quantus_s": runs["quantus"][0]}


class CumulativePatches:
    """pyattr ``infidelity`` perturbation = Quantus Infidelity's: row j of a sample (rows come sample-major, n_perturb
    per sample, in order) is ``x`` on patches 0..j (row-major patches of ``patch`` pixels), 0 elsewhere, so that
    ``x - I`` has those patches set to 0.0."""

    def __init__(self, h: int, w: int, patch: int):
        bh, bw = h // patch, w // patch
        index = torch.arange(bh * bw).view(bh, bw).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        self.masks = (index[None] <= torch.arange(bh * bw)[:, None, None]).float()  # (P, H, W)
        self.count = len(self.masks)
        self.seen = 0

    def __call__(self, xs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        positions = (self.seen + torch.arange(len(xs))) % self.count
        self.seen += len(xs)
        return xs * self.masks[positions][:, None]


def pair_infidelity(model, x, y, maps, args) -> dict:
    import quantus

    n, _c, h, w = x.shape
    patch = args.patch
    patches = (h // patch) * (w // patch)
    q = quantus.Infidelity(perturb_baseline=0.0, perturb_patch_sizes=[patch], n_perturb_samples=1, normalise=False,
                           abs=False, disable_warnings=True, display_progressbar=False)
    a = maps.numpy()[:, None]

    def ours():
        return metrics.infidelity(model, x, maps, y, n_perturb=patches, perturbation=CumulativePatches(h, w, patch),
                                  normalize=False, score="softmax", chunk_size=args.chunk)

    runs = interleaved({
        "pyattr": ours,
        "quantus": lambda: np.asarray(q(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a, device="cpu",
                                        batch_size=n, softmax=True)),
    }, args.rounds)
    diff = rel_diff(runs["pyattr"][1].numpy(), runs["quantus"][1])
    assert diff < 1e-3, diff
    return {"pyattr": "metrics.infidelity(perturbation=cumulative patches, n_perturb=P, normalize=False, "
                      "score='softmax')",
            "quantus": f"Infidelity(perturb_baseline=0.0, perturb_patch_sizes=[{patch}], n_perturb_samples=1), "
                       "softmax=True",
            "settings": {"patch": patch, "perturbations": patches},
            "agreement": {"max_rel_diff": diff},
            "pyattr_s": runs["pyattr"][0], "quantus_s": runs["quantus"][0]}


def pair_sensitivity(model, x, y, maps, args) -> dict:
    import quantus

    n = x.shape[0]
    radius, draws, seed = 0.02, args.draws, 0
    method = pyattr.Saliency(model)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.stack([torch.empty(x.shape[1:]).uniform_(-radius, radius, generator=generator)
                         for _ in range(n * draws)]).view(n, draws, *x.shape[1:]).numpy()
    state = {"step": 0}

    def pyattr_noise(arr, indices, **kwargs):  # Quantus's perturb_func: pyattr's draw for this step
        k = state["step"] % draws
        state["step"] += 1
        return arr + noise[:, k].reshape(arr.shape)

    def explain(model, inputs, targets, **kwargs):
        out = method(torch.as_tensor(inputs), torch.as_tensor(targets)).maps
        return out.detach().numpy()[:, None]

    q = quantus.MaxSensitivity(nr_samples=draws, lower_bound=radius, perturb_func=pyattr_noise, normalise=False,
                               abs=False, disable_warnings=True, display_progressbar=False)
    a = maps.numpy()[:, None]
    runs = interleaved({
        "pyattr": lambda: metrics.sensitivity_max(model, x, method, y, radius=radius, n_perturb=draws, seed=seed,
                                                  which="maps", chunk_size=args.chunk),
        "quantus": lambda: np.asarray(q(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a, device="cpu",
                                        batch_size=n, explain_func=explain)),
    }, args.rounds)
    diff = rel_diff(runs["pyattr"][1].numpy(), runs["quantus"][1])
    assert diff < 1e-3, diff
    return {"pyattr": "metrics.sensitivity_max(Saliency, radius=0.02, which='maps')",
            "quantus": "MaxSensitivity(lower_bound=0.02, perturb_func=pyattr's draws, explain_func=pyattr Saliency)",
            "settings": {"radius": radius, "draws": draws},
            "agreement": {"max_rel_diff": diff},
            "pyattr_s": runs["pyattr"][0], "quantus_s": runs["quantus"][0]}


def quantus_road_by_pixel():
    """Quantus's ROAD with one change: the pixels are ranked on the (N, H*W) map (Quantus ranks the C*H*W values of
    the map broadcast over the channels, then imputes H*W pixels: an IndexError on RGB images)."""
    import quantus

    class ROADByPixel(quantus.ROAD):
        def evaluate_batch(self, model, x_batch, y_batch, a_batch, **kwargs):
            batch_size = a_batch.shape[0]
            ordered_indices = np.argsort(-a_batch.reshape(batch_size, -1), axis=1)
            results = []
            for p in self.percentages:
                top_k_indices = ordered_indices[:, : int(self.a_size * p / 100)]
                x_perturbed = np.stack([self.perturb_func(arr=x_element, indices=top_k_index)
                                        for x_element, top_k_index in zip(x_batch, top_k_indices)])
                x_input = model.shape_input(x_perturbed, x_batch.shape, channel_first=True, batched=True)
                results.append(y_batch == np.argmax(model.predict(x_input), axis=-1))
            return [np.stack(results, axis=1).astype(int)]

    return ROADByPixel


def pair_road(model, x, y, maps, args) -> dict:
    from quantus.functions.perturb_func import noisy_linear_imputation

    n, _c, h, w = x.shape
    ranked = rank_maps(maps)
    percentages = [25, 50, 75]
    q = quantus_road_by_pixel()(percentages=percentages, noise=0.0, disable_warnings=True, display_progressbar=False)
    a = ranked.numpy()[:, None]
    fractions = [p / 100 for p in percentages]
    runs = interleaved({
        "pyattr": lambda: metrics.road(model, x, ranked, y, order="morf", fractions=fractions, noise=0.0,
                                       score="softmax", chunk_size=args.chunk),
        "quantus": lambda: q(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a, device="cpu",
                             batch_size=n),  # {percentage: share of the batch still classified as y}
    }, args.rounds)
    # what both compute: the imputed images, and whether the class is still the arg-max on them
    worst, kept = 0.0, []
    for f, p in zip(fractions, percentages):
        keep = removal_masks(ranked, f, "morf")  # (N, H, W) True where pixels stay
        ours = torch.stack([linear_imputation(x[i], keep[i]) for i in range(n)])
        order = np.argsort(-ranked.numpy().reshape(n, -1), axis=1)[:, : int(h * w * p / 100)]
        removed = np.stack([np.flatnonzero(~k) for k in keep.numpy().reshape(n, -1)])
        assert np.array_equal(np.sort(order, 1), removed)  # the same pixels removed
        theirs = np.stack([noisy_linear_imputation(arr=x[i].numpy(), indices=order[i], noise=0.0) for i in range(n)])
        worst = max(worst, float(np.abs(ours.numpy() - theirs).max()))
        with torch.no_grad():
            kept.append((model(ours).argmax(1) == y).int().numpy())
    quantus_out = np.asarray([runs["quantus"][1][p] for p in percentages])
    same_argmax = bool(np.array_equal(np.stack(kept, 1).mean(0), quantus_out))
    assert worst < 1e-4 and same_argmax, (worst, same_argmax)
    return {"pyattr": "metrics.road(order='morf', fractions=[0.25, 0.5, 0.75], noise=0.0)",
            "quantus": "ROAD(percentages=[25, 50, 75], noise=0.0), pixels ranked per pixel (see the notes)",
            "settings": {"percentages": percentages},
            "agreement": {"max_abs_diff_imputed": worst, "same_argmax_kept": same_argmax},
            "pyattr_s": runs["pyattr"][0], "quantus_s": runs["quantus"][0]}


PAIRS = {"deletion": pair_deletion, "infidelity": pair_infidelity, "sensitivity_max": pair_sensitivity,
         "road": pair_road}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="builtin,resnet18")
    parser.add_argument("--n", type=int, default=8, help="images per batch (both libraries)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="deletion steps")
    parser.add_argument("--patch", type=int, default=8, help="infidelity patch side")
    parser.add_argument("--draws", type=int, default=10, help="sensitivity-max draws")
    parser.add_argument("--chunk", type=int, default=64, help="pyattr chunk_size: model inputs per forward")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "quantus_comparison")
    parser.add_argument("--append", action="store_true", help="keep the rows of the other models in --out's JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import quantus

    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    models = args.models.split(",")
    rows = []
    if args.append and json_path.exists():  # keep the rows of other models from an earlier run
        rows = [r for r in json.loads(json_path.read_text())["rows"] if r["model"] not in models]
    settings = {"n": args.n, "size": args.size, "chunk_size": args.chunk, "threads": args.threads,
                "rounds": args.rounds, "steps": args.steps, "patch": args.patch, "draws": args.draws}
    for name in models:
        model, x, y, maps = load_case(name, args.n, args.size)
        for pair in args.pairs.split(","):
            began = time.perf_counter()
            row = {"model": name, "metric": pair, "batch": args.n, "rounds": args.rounds,
                   **PAIRS[pair](model, x, y, maps, args)}
            row["ratio"] = row["quantus_s"] / row["pyattr_s"]
            rows.append(row)
            print(f"{name:9s} {pair:16s} pyattr {row['pyattr_s']:.3f} s  quantus {row['quantus_s']:.3f} s  "
                  f"ratio {row['ratio']:.1f}x  agreement {row['agreement']}  ({time.perf_counter() - began:.0f} s)",
                  flush=True)
            doc = {"command": " ".join(sys.argv), **settings, "quantus": quantus.__version__,
                   "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                   "load_average": list(os.getloadavg()), "rows": rows}
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(doc, indent=1))  # after every row: a long run keeps what it measured
            md_path.write_text(markdown(doc))
    print(md_path.read_text())
    return 0


def markdown(doc: dict) -> str:
    lines = ["# pyattr.metrics vs Quantus: the same metrics on the same maps", "",
             (f"`{doc['command']}` (the last run; batch and rounds per row): {doc['size']}x{doc['size']} inputs, "
             f"{doc['threads']} thread, median of the interleaved rounds after a warm-up call of each; pyattr "
             f"`chunk_size={doc['chunk_size']}`; load average at the end {[round(v, 1) for v in doc['load_average']]}; "
             f"Quantus {doc['quantus']}, torch {doc['torch']}, NumPy {doc['numpy']}. Settings and why they match: the "
             "docstring of `benchmarks/quantus_comparison.py`."), "",
             "| model | batch, rounds | pyattr | Quantus | agreement | pyattr s | Quantus s | Quantus / pyattr |",
             "|---|---|---|---|---|---:|---:|---:|"]
    for r in doc["rows"]:
        agreement = ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in r["agreement"].items())
        lines.append(f"| {r['model']} | {r['batch']}, {r['rounds']} | `{r['pyattr']}` | `{r['quantus']}` | {agreement} | {r['pyattr_s']:.3f} | "
                     f"{r['quantus_s']:.3f} | **{r['ratio']:.1f}x** |")
    lines += ["", ("Insertion has no Quantus twin (its RegionPerturbation and Selectivity remove patches, they insert "
              "nothing). Quantus 0.6.0's ROAD raises an IndexError on RGB images with per-pixel maps; its row is "
              "Quantus's ROAD with the pixels ranked per pixel (a subclass, the one change).")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
