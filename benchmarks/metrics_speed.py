"""Speed (and agreement) of pyattr.metrics against the reference implementations on the same maps and inputs.

The built-in model (ShapesNet, 64x64), a batch of generated images, Saliency maps (without ties); each metric is
timed for pyattr and for its reference (torchcam, pytorch-grad-cam, captum), the rounds interleaved, and the
values compared (max relative difference of the per-sample values or of the batch means the reference returns).

    OMP_NUM_THREADS=1 python benchmarks/metrics_speed.py          # -> benchmarks/results/metrics_speed.{md,json}
    python benchmarks/metrics_speed.py --n 16 --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

import pyattr
from pyattr import metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench.env import describe, load_average


class FixedCAM:
    """A torchcam CAM extractor that hands torchcam's metrics the given maps."""

    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def rel(ours, ref) -> float:
    a = torch.as_tensor(np.asarray(ours, dtype=np.float64))
    b = torch.as_tensor(np.asarray(ref, dtype=np.float64))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def cases(model, x, maps, target, steps: int, n_perturb: int, fractions: list[float]):
    """(name, {contender: callable returning values}, how the values are compared)."""
    from captum.metrics import infidelity as captum_infidelity
    from captum.metrics import sensitivity_max as captum_sensitivity_max
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric

    softmax = partial(torch.softmax, dim=-1)
    ids = target.tolist()
    grad_cam_targets = [ClassifierOutputSoftmaxTarget(t) for t in ids]
    out = []

    def ours_curves():
        d, i = metrics.deletion_insertion(model, x, maps, target, steps=steps, baseline=0.0)
        return [float(d.auc.mean()), float(i.auc.mean())]

    def torchcam_curves():
        m = DeletionInsertionMetric(FixedCAM(model, maps), softmax, steps=steps, batch_size=64)
        m.update(x, class_idx=ids)
        s = m.summary()
        return [s["deletion_auc"], s["insertion_auc"]]

    out.append((f"deletion + insertion AUC ({steps} steps, zero baseline)",
                {"pyattr": ours_curves, "torchcam": torchcam_curves}, "batch means"))

    def ours_conf():
        c = metrics.confidence_change(model, x, maps, target)
        return [c.average_drop, c.increase_in_confidence]

    def torchcam_conf():
        m = ClassificationMetric(FixedCAM(model, maps), softmax)
        m.update(x, class_idx=ids)
        s = m.summary()
        return [s["avg_drop"], s["conf_increase"]]

    def ours_conf_abs():
        c = metrics.confidence_change(model, x, maps, target)
        return np.concatenate([c.absolute_drop.numpy(), c.increase.float().numpy()])

    def grad_cam_conf():
        drop = DropInConfidence()(x, maps.numpy(), grad_cam_targets, model)
        inc = IncreaseInConfidence()(x, maps.numpy(), grad_cam_targets, model)
        return np.concatenate([drop, inc])

    out.append(("Average Drop + Increase in Confidence", {"pyattr": ours_conf, "torchcam": torchcam_conf},
                "batch means"))
    out.append(("absolute drop + increase (pytorch-grad-cam's)", {"pyattr": ours_conf_abs,
                                                                  "pytorch-grad-cam": grad_cam_conf}, "per sample"))

    percentiles = [round(100 * (1 - f)) for f in fractions]

    def ours_road():
        return metrics.road(model, x, maps, target, fractions=fractions, seed=0).mean_change.numpy()

    def grad_cam_road():
        torch.manual_seed(0)
        return ROADMostRelevantFirstAverage(percentiles)(x, maps.numpy(), grad_cam_targets, model)

    out.append((f"ROAD MoRF average ({len(fractions)} fractions, noise 0.01)",
                {"pyattr": ours_road, "pytorch-grad-cam": grad_cam_road}, "per sample"))

    attributions = maps[:, None].expand_as(x)

    def ours_infid():
        return metrics.infidelity(model, x, maps, target, n_perturb=n_perturb, std=0.05, seed=0).numpy()

    def captum_infid():
        generator = torch.Generator().manual_seed(0)

        def perturb(inputs):
            noise = 0.05 * torch.stack([torch.randn(inputs.shape[1:], generator=generator)
                                        for _ in range(len(inputs))])
            return noise, inputs - noise

        return captum_infidelity(model, perturb, x, attributions, target=target, n_perturb_samples=n_perturb).numpy()

    out.append((f"infidelity ({n_perturb} perturbations)", {"pyattr": ours_infid, "captum": captum_infid},
                "per sample"))

    saliency = pyattr.Saliency(model)

    def ours_sens():
        return metrics.sensitivity_max(model, x, saliency, target, n_perturb=n_perturb, seed=0).numpy()

    def captum_sens():
        generator = torch.Generator().manual_seed(0)

        def perturb(inputs, radius):
            return inputs + torch.stack([torch.empty(inputs.shape[1:]).uniform_(-radius, radius, generator=generator)
                                         for _ in range(len(inputs))])

        def explain(inputs, target):
            if isinstance(inputs, tuple):
                return (saliency(inputs[0], target).raw,)
            return saliency(inputs, target).raw

        return captum_sensitivity_max(explain, x, perturb, n_perturb_samples=n_perturb, target=target).numpy()

    out.append((f"sensitivity-max (Saliency, {n_perturb} perturbations)",
                {"pyattr": ours_sens, "captum": captum_sens}, "per sample"))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="images (default 8)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-perturb", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "metrics_speed"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model = pyattr.zoo.load_builtin()
    batch = pyattr.zoo.generate(args.n, seed=70_000)
    x = (torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255).contiguous()
    result = pyattr.Saliency(model)(x)  # continuous maps: the reference ROAD fails on maps with many ties
    maps, target = result.maps, result.target
    fractions = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    meta = describe(torch.device("cpu"), args.threads)
    meta["command"] = " ".join(["python", "benchmarks/metrics_speed.py", *(argv or sys.argv[1:])])
    meta["load_start"] = load_average()
    rows = []
    for name, contenders, compared in cases(model, x, maps, target, args.steps, args.n_perturb, fractions):
        times: dict[str, list[float]] = {k: [] for k in contenders}
        values = {k: f() for k, f in contenders.items()}  # warm-up, and the values compared
        for _ in range(args.rounds):
            for k, f in contenders.items():
                start = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - start)
        (_ours_name, ours), (ref_name, ref) = list(values.items())
        row = {"metric": name, "reference": ref_name, "compared": compared,
               "pyattr_s": statistics.median(times["pyattr"]), "reference_s": statistics.median(times[ref_name]),
               "times": times, "max_rel_diff": rel(ours, ref)}
        row["speedup"] = row["reference_s"] / row["pyattr_s"]
        rows.append(row)
        print(f"{name:55s} pyattr {row['pyattr_s'] * 1e3:8.1f} ms  {ref_name} {row['reference_s'] * 1e3:8.1f} ms  "
              f"x{row['speedup']:.2f}  rel diff {row['max_rel_diff']:.1e}", flush=True)
    meta["load_end"] = load_average()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# pyattr.metrics vs the reference implementations",
        "",
        (f"Built-in model (ShapesNet), {args.n} generated 64x64 images (seed 70,000), Saliency maps of the "
        f"arg-max class, CPU, {args.threads} thread(s); median of {args.rounds} interleaved rounds after one warm-up. "
        "speedup = reference time / pyattr time. rel diff: max |pyattr - reference| / max |reference| over the "
        "values the reference returns."),
        "",
        (f"`{meta['command']}` — {meta['date']}, {meta['cpu']}, torch {meta['torch']}, peers {meta['peers']}, "
        f"pyattr {meta['pyattr_commit']}, load average {meta['load_start']} -> {meta['load_end']}"),
        "",
        "| metric | reference | pyattr (ms) | reference (ms) | speedup | rel diff | compared |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['reference']} | {r['pyattr_s'] * 1e3:.1f} | {r['reference_s'] * 1e3:.1f} "
                     f"| {r['speedup']:.2f} | {r['max_rel_diff']:.1e} | {r['compared']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
