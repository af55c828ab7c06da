"""Where an exported graph spends its time in onnxruntime, before and after pyattr's fast backward rules.

    python benchmarks/profile_onnx.py                                   # resnet50 saliency, batch 2, 224
    python benchmarks/profile_onnx.py --model vgg16 --batch 1 --threads 1 --out benchmarks/results/cpu/onnx_profile.md

For each rule set the method is traced and exported to ONNX, then, interleaved round after round:
eager pyattr, the plain forward + backward (the bound), and each ONNX graph in onnxruntime
(CPU provider, ``--threads`` intra-op threads, all graph optimizations). Then one more session per
graph with ``SessionOptions.enable_profiling`` gives the kernel time per op type.

Rule sets:

- ``current``: pyattr as it is (stride-1 convolution input gradients as convolutions with folded
  flipped weights; ReLU's backward as a multiplication by a float mask);
- ``previous``: the rules before them, patched in for the run: every convolution input gradient a
  ``ConvTranspose``, ReLU's backward torch's ``where(out <= 0, 0, grad)``, no constant folding.

Times are wall-clock medians and the process's CPU time (``time.process_time``) medians: on a
loaded machine the CPU time of a 1-thread run is the steadier number.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

import pyattr
from pyattr.exporting import _write_onnx, build_metadata
from pyattr.exporting import decompositions as D
from pyattr.exporting import trace as T

aten = torch.ops.aten


@contextlib.contextmanager
def previous_rules():
    """The backward rules as they were before the fast ones (for a before/after comparison)."""
    from torch._decomp import decomposition_table as torch_table

    original = D.convolution_backward

    def transposed_only(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask):
        if output_mask[0] and not transposed:
            op = D._conv_input_grad_output_padding(input, grad_output, weight, stride, padding, dilation)
            grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, op, groups)
            grad_bias = grad_output.sum([0, *range(2, grad_output.dim())]) if output_mask[2] else None
            return grad_input, None, grad_bias
        return original(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask)

    saved = (D.convolution_backward, D.threshold_backward, T.fold_constants)
    D.convolution_backward = transposed_only
    D.threshold_backward = torch_table[aten.threshold_backward.default]
    T.fold_constants = lambda gm: 0
    try:
        yield
    finally:
        D.convolution_backward, D.threshold_backward, T.fold_constants = saved


def export_onnx(method, example: torch.Tensor, path: Path, rules: str) -> None:
    from pyattr.exporting.trace import example_inputs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context = previous_rules() if rules == "previous" else contextlib.nullcontext()
        with context:
            gm = T.trace_graph(method, example)
        _write_onnx(gm, example_inputs(method, example), path, build_metadata(method, example))


def session(path: Path, threads: int, profile: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(path.with_suffix(""))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_profile(path: Path, feeds: dict, threads: int, runs: int = 5) -> dict[str, dict]:
    sess = session(path, threads, profile=True)
    for _ in range(2):
        sess.run(None, feeds)
    for _ in range(runs):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    total: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    runs_seen = runs + 2
    grand = sum(total.values())
    return {op: {"ms_per_run": round(d / runs_seen / 1e3, 2), "share": round(d / grand, 4),
                 "nodes": count[op] // runs_seen}
            for op, d in sorted(total.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--method", default="saliency", choices=["saliency", "gradcam"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, help="also write the report (Markdown) and a .json next to it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    from pyattr.models import find_default_layer

    example = torch.rand(1, 3, args.size, args.size)
    method = (pyattr.Saliency(model) if args.method == "saliency"
              else pyattr.GradCAM(model, find_default_layer(model, example)))
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t = model(x).argmax(1)
    feeds = {"images": x.numpy(), "target": t.numpy()}
    ref = method(x, t)
    tmp = Path(tempfile.mkdtemp(prefix="pyattr-profile-"))
    paths = {}
    for rules in ("previous", "current"):
        paths[rules] = tmp / f"{rules}.onnx"
        t0 = time.perf_counter()
        export_onnx(method, example, paths[rules], rules)
        print(f"exported {rules} rules in {time.perf_counter() - t0:.1f} s", flush=True)

    def bound():
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xi).gather(1, t[:, None]).sum(), xi)

    def forward():
        with torch.no_grad():
            model(x)

    runs = {"bound (fwd + bwd, torch)": bound, "forward (torch)": forward, "pyattr eager": lambda: method(x, t)}
    agreement = {}
    for rules, path in paths.items():
        sess = session(path, args.threads)
        out = sess.run(None, feeds)
        agreement[rules] = float(np.abs(out[3] - ref.maps.numpy()).max())
        runs[f"onnxruntime, {rules} rules"] = lambda sess=sess: sess.run(None, feeds)
    for fn in runs.values():
        fn()
        fn()
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for r in range(args.rounds):
        keys = list(runs)
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            c0, t0 = time.process_time(), time.perf_counter()
            runs[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    profiles = {rules: op_profile(path, feeds, args.threads) for rules, path in paths.items()}
    eager_wall, eager_cpu = wall["pyattr eager"], statistics.median(cpu["pyattr eager"])
    lines = [(f"# onnxruntime profile: {args.model} {args.method}, batch {args.batch}, {args.size}x{args.size}, "
             f"{args.threads} thread(s)"), "",
             (f"`python benchmarks/profile_onnx.py {' '.join(argv if argv is not None else sys.argv[1:])}` · torch "
             f"{torch.__version__} · onnxruntime {__import__('onnxruntime').__version__} · load average "
             f"{[round(v, 2) for v in os.getloadavg()]}"), "",
             "| run | wall ms | × eager (paired) | CPU ms | CPU × eager |", "|---|---:|---:|---:|---:|"]
    for k in runs:
        ratio = statistics.median(a / b for a, b in zip(wall[k], eager_wall))
        c = statistics.median(cpu[k])
        lines.append(f"| {k} | {statistics.median(wall[k]) * 1e3:.1f} | {ratio:.2f}x | {c * 1e3:.1f} "
                     f"| {c / eager_cpu:.2f}x |")
    lines += ["", "Max |maps - eager maps|: " + ", ".join(f"{k} rules {v:.2e}" for k, v in agreement.items()), ""]
    ops = list(dict.fromkeys(op for prof in profiles.values() for op in list(prof)[:12]))
    lines += ["| op type | " + " | ".join(f"{r}: ms (share, nodes)" for r in profiles) + " |",
              "|---|" + "---:|" * len(profiles)]
    for op in ops:
        cells = []
        for prof in profiles.values():
            e = prof.get(op)
            cells.append("—" if e is None else f"{e['ms_per_run']:.1f} ({100 * e['share']:.1f}%, {e['nodes']})")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"args": vars(args) | {"out": str(args.out)}, "wall_ms": {k: [round(v * 1e3, 2) for v in w] for k, w in
                                                                       wall.items()},
             "cpu_ms": {k: [round(v * 1e3, 2) for v in c] for k, c in cpu.items()}, "agreement": agreement,
             "profiles": profiles, "load": os.getloadavg()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
