"""LRP before/after in one process: the bound (forward + backward to the input), pyattr's LRP of this
checkout and pyattr's LRP of another checkout (its ``pyattr/methods/lrp`` package loaded next to this
one), timed in interleaved rounds, with the convolutions each call runs counted.

    git archive <old commit> pyattr | tar -x -C /tmp/old
    python benchmarks/lrp_ab.py --old /tmp/old --model resnet50 --batch 1 --size 224 --rounds 5 \\
        --name lrp_after_ab_resnet50_b1

Writes benchmarks/results/cpu/<name>.{md,json}. Ratios are medians of per-round ratios to the bound.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyattr


class CountConvolutions(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.forward = self.backward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.forward += 1
        elif func is torch.ops.aten.convolution_backward.default:
            self.backward += 1
        return func(*args, **(kwargs or {}))


def load_old_lrp(old_root: Path):
    package = old_root / "pyattr" / "methods" / "lrp"
    spec = importlib.util.spec_from_file_location(
        "pyattr.methods.lrp_old", package / "__init__.py", submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="a checkout (or git archive) of the old pyattr")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    x = torch.rand(args.batch, 3, args.size, args.size)
    target = torch.arange(args.batch) % 10
    old, new = load_old_lrp(args.old).LRP(model), pyattr.LRP(model)

    def bound():
        xx = x.detach().requires_grad_(True)
        torch.autograd.grad(model(xx).gather(1, target[:, None]).sum(), xx)

    calls = {"bound": bound, "pyattr LRP (this checkout)": lambda: new(x, target),
             "pyattr LRP (old)": lambda: old(x, target)}
    difference = float((new(x, target).raw - old(x, target).raw).abs().max() / old(x, target).raw.abs().max())
    counts = {}
    for label, call in calls.items():
        with CountConvolutions() as counted:
            call()
        counts[label] = (counted.forward, counted.backward)
    times: dict[str, list[float]] = {label: [] for label in calls}
    load_before = list(__import__("os").getloadavg())
    for r in range(args.rounds):
        for label, call in calls.items():
            start = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - start)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()), flush=True)
    load_after = list(__import__("os").getloadavg())
    rows = []
    for label in calls:
        ratio = statistics.median(t / b for t, b in zip(times[label], times["bound"]))
        rows.append({"contender": label, "median_ms": statistics.median(times[label]) * 1e3,
                     "x_bound": ratio, "convolutions": counts[label][0], "transposed": counts[label][1]})
    header = (f"`python benchmarks/lrp_ab.py {' '.join(sys.argv[1:] if argv is None else argv)}` · torch {torch.__version__}"
              f" · {args.model} batch {args.batch} {args.size}x{args.size} · threads {args.threads} · {args.rounds} "
              f"interleaved rounds · load average before/after {load_before} / {load_after} · max relative "
              f"difference of the raw maps, this checkout vs old: {difference:.1e}")
    lines = [f"# LRP (epsilon_plus) before/after: {args.model} batch {args.batch}", "", header, "",
             "| contender | median ms | × bound (median of per-round ratios) | convolutions | transposed convolutions |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['contender']} | {r['median_ms']:.0f} | {r['x_bound']:.2f}x | {r['convolutions']} | {r['transposed']} |"
              for r in rows]
    print("\n".join(lines))
    if args.name:
        out = ROOT / "benchmarks" / "results" / "cpu"
        (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
        (out / f"{args.name}.json").write_text(json.dumps(
            {"header": header, "rows": rows, "times_s": times, "args": {k: str(v) for k, v in vars(args).items()}},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
