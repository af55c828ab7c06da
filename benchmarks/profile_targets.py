"""Where the segmentation rows of the suite lose time: pyattr eager vs the bound, and the exported graph.

The suite (``run.py --models deeplabv3_mobilenet_v3_large``) measures pyattr eager at ~1.2x the bound on
deeplabv3_mobilenet_v3_large at 256x256 (goal 1.05x) and its TorchScript / .pt2 graphs at ~1.25x eager
(goal 1.2x). This script isolates the causes, interleaved as the suite times (``_bench.timing.measure``):

1. eager: the bound, pyattr eager with ``SegmentationTarget(classes, region)``, and pyattr eager with
   :class:`RegionOnly`, the same objective without the predicted-region branch (a given region is used as is;
   ``SegmentationTarget`` computes the per-pixel arg-max and a one-hot of every class on every call, given
   region or not, and selects with ``torch.where``: traceable, no branch on values). Then the pieces of
   ``SegmentationTarget.scores`` alone on the model's output (no autograd), and a cheaper form of the
   predicted region (``out == out.amax(1)``: the same mask except at exact ties).
2. exported: the op-level profile (torch.profiler, self CPU time) of one call of the .pt2 graph vs eager:
   the bilinear upsamplings (the head's 16x16 -> 256x256 and the ASPP pooling branch's) are traced as
   ``_unsafe_index`` gathers, and their backward as ``_unsafe_index_put(accumulate=True)``.

    python benchmarks/profile_targets.py --threads 1 --out benchmarks/results/cpu/profile_targets.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import cases, env
from _bench.timing import Contender, measure, paired_ratio

import pyattr
from pyattr.targets import SegmentationTarget, Target
from pyattr.targets.segmentation import segmentation_logits

MODEL = "deeplabv3_mobilenet_v3_large"


class RegionOnly(Target):
    """The segmentation objective for a given region only: ``sum_p region[n, p] * out[n, k, p]`` (no
    predicted-region branch). A diagnostic, not a replacement: it cannot fall back to the predicted region."""

    kind = "region-only"
    inputs = ("region",)

    def __init__(self, classes, region):
        super().__init__(classes)
        self.region = region

    def scores(self, output, inputs):
        return (segmentation_logits(output) * inputs["region"][:, None]).sum((2, 3))

    def run_time_inputs(self, x):
        return {"region": self.region}


def timed(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def op_profile(fn) -> dict[str, tuple[int, float]]:
    from torch.profiler import profile

    fn()
    with profile() as p:
        fn()
    return {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in p.key_averages()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cpu" / "profile_targets.md")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pyattr-bench")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model = cases.make_model(MODEL, 256, device)
    s = cases.make_setup(MODEL, model, args.batch, 256, device)
    region = s.feeds[0]
    lines = [f"# Segmentation rows: where the time goes — {env.describe(device, args.threads)['device_name']}", "",
             (f"`python benchmarks/profile_targets.py {' '.join(sys.argv[1:] if argv is None else argv)}` · "
             f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} · torch {torch.__version__} · threads {args.threads}"
             f" · {MODEL} 256x256 batch {args.batch}, region = a 128x128 box, class = the largest summed score in it"
             f" · load average at start {env.load_average()}"), ""]

    # 1. eager vs the bound, interleaved
    lines += ["## pyattr eager vs the bound, with and without the predicted-region branch", "",
              "Medians over interleaved rounds; ratios are medians of per-round ratios to the bound.", ""]
    for method in ("saliency", "gradcam"):
        m = cases.build_pyattr(method, s)
        region_only = RegionOnly(s.target, region)
        contenders = [
            Contender("bound", "reference", "eager", "bound", cases.bound_fn(method, s)),
            Contender("pyattr eager, SegmentationTarget(classes, region)", "pyattr", "eager", "pyattr",
                      lambda m=m: m(s.x, s.eager_target)),
            Contender("pyattr eager, RegionOnly(classes, region) (diagnostic)", "pyattr", "eager", "pyattr",
                      lambda m=m, t=region_only: m(s.x, t)),
        ]
        measured = measure(contenders, device, warmup=2, min_rounds=args.rounds, max_rounds=args.rounds,
                           budget_s=0, log=lambda _m: None)
        bound = measured[0].times
        lines += [f"### {cases.METHOD_LABELS[method]}", "", "| contender | median ms | × bound |", "|---|---:|---:|"]
        for r in measured:
            ratio = paired_ratio(r.times, bound)
            lines.append(f"| {r.contender.name} | {statistics.median(r.times) * 1e3:.1f} | {ratio:.3f}x |")
        a = pyattr.Saliency(model)(s.x, s.eager_target) if method == "saliency" else None
        if a is not None:
            b = pyattr.Saliency(model)(s.x, region_only)
            lines.append("")
            lines.append(f"(same maps: max |difference| of the raw maps {float((a.raw - b.raw).abs().max()):.1e})")
        lines.append("")

    # 2. the pieces of SegmentationTarget.scores on the model's output
    with torch.no_grad():
        out = model(s.x)["out"]
    k = out.shape[1]
    target = SegmentationTarget(s.target, region)
    inputs = {"region": region}
    arange = torch.arange(k)[None, :, None, None]
    n = 30
    pieces = [
        ("SegmentationTarget.scores (whole)", lambda: target.scores(out, inputs)),
        ("  out.argmax(1)", lambda: out.argmax(1)),
        ("  out.argmax(1)[:, None] == arange(K)", lambda: out.argmax(1)[:, None] == arange),
        ("  region-only: (out * region).sum((2, 3))", lambda: (out * region[:, None]).sum((2, 3))),
        ("the bound's objective: out[n, t_n] * region, summed", lambda: s.objective(out)),
        ("cheaper predicted mask: out == out.amax(1, keepdim=True)", lambda: out == out.amax(1, keepdim=True)),
    ]
    lines += [f"## The target's scores on the model's output ({tuple(out.shape)}), no autograd", "",
              f"Median of {n} calls each.", "", "| computation | ms |", "|---|---:|"]
    for name, fn in pieces:
        lines.append(f"| {name} | {timed(fn, n):.2f} |")
    same = bool(((out.argmax(1)[:, None] == arange) == (out == out.amax(1, keepdim=True))).all())
    lines += ["", f"(the two predicted masks are identical on this output: {same})", ""]

    # 3. the exported .pt2 graph vs eager, op by op
    m = cases.build_pyattr("gradcam", s)
    from _bench.cases import export_all, export_key

    files = export_all(m, export_key("gradcam", m, s), s, ["pt2"], args.cache, print)
    pt2 = torch.export.load(str(files["pt2"][0])).module()
    eager_ops = op_profile(lambda: m(s.x, s.eager_target))
    pt2_ops = op_profile(lambda: pt2(s.x, s.target, *s.feeds))
    rows = sorted(set(eager_ops) | set(pt2_ops),
                  key=lambda key: -(pt2_ops.get(key, (0, 0.0))[1] - eager_ops.get(key, (0, 0.0))[1]))
    total_e = sum(v[1] for v in eager_ops.values())
    total_p = sum(v[1] for v in pt2_ops.values())
    lines += ["## Grad-CAM: the exported .pt2 graph vs eager, op by op (one call each, self CPU ms)", "",
              f"Total self CPU: eager {total_e:.1f} ms, .pt2 {total_p:.1f} ms. The ops with the largest increase:", "",
              "| op | eager calls | eager ms | .pt2 calls | .pt2 ms |", "|---|---:|---:|---:|---:|"]
    for key in rows[:8]:
        e, q = eager_ops.get(key, (0, 0.0)), pt2_ops.get(key, (0, 0.0))
        lines.append(f"| `{key}` | {e[0]} | {e[1]:.1f} | {q[0]} | {q[1]:.1f} |")
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
