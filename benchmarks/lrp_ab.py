"""LRP against its bound in one process: the bound (forward + backward to the input), pyattr's LRP of this
checkout eager, optionally its exported graphs (TorchScript, .pt2, ONNX in onnxruntime) and pyattr's LRP
of another checkout (its ``pyattr/methods/lrp`` package loaded next to this one), timed call by call in
interleaved rounds, wall and process CPU time, with the convolutions each eager call runs counted.

    git archive <old commit> pyattr | tar -x -C /tmp/old
    python benchmarks/lrp_ab.py --old /tmp/old --model resnet50 --batch 1 --size 224 --rounds 5 \\
        --name lrp_after_ab_resnet50_b1
    python benchmarks/lrp_ab.py --model vgg16 --batch 8 --backends eager torchscript pt2 onnx \\
        --export-dir /tmp/lrp_exports --threads 1 --rounds 5 --name lrp_vgg16_b8
    python benchmarks/lrp_ab.py --summarize lrp_vgg16_b1 lrp_vgg16_b8 --name lrp_summary   # one table vs the goals

Exported graphs have a dynamic batch: one export per model and size, kept in ``--export-dir`` under a
hash of pyattr's sources and reused. Writes benchmarks/results/cpu/<name>.{md,json}. Ratios are medians
of per-round ratios to the bound (wall: ``time.perf_counter``; CPU: ``time.process_time``, the steadier
one on a loaded machine).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
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
    parser.add_argument("--old", type=Path, default=None, help="a checkout (or git archive) of the old pyattr")
    parser.add_argument("--backends", nargs="+", default=["eager"], choices=("eager", "torchscript", "pt2", "onnx"))
    parser.add_argument("--export-dir", type=Path, default=Path("/tmp/pyattr_lrp_exports"))
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None)
    parser.add_argument("--summarize", nargs="+", metavar="NAME", default=None,
                        help="no timing: one table (--name) of the results NAME.json written before, against the goals")
    args = parser.parse_args(argv)
    if args.summarize:
        summarize(args.summarize, args.name or "lrp_summary", argv)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    x = torch.rand(args.batch, 3, args.size, args.size)
    target = torch.arange(args.batch) % 10
    new = pyattr.LRP(model)

    def bound():
        xx = x.detach().requires_grad_(True)
        torch.autograd.grad(model(xx).gather(1, target[:, None]).sum(), xx)

    calls = {"bound": bound}
    if "eager" in args.backends:
        calls["pyattr LRP eager"] = lambda: new(x, target)
    notes = {}
    if args.old is not None:
        old = load_old_lrp(args.old).LRP(model)
        calls["pyattr LRP (old)"] = lambda: old(x, target)
        notes["max relative difference of the raw maps, this checkout vs old"] = float(
            (new(x, target).raw - old(x, target).raw).abs().max() / old(x, target).raw.abs().max())
    formats = [b for b in args.backends if b != "eager"]
    if formats:
        files, seconds = export_graphs(new, x, args.model, args.size, formats, args.export_dir)
        notes["export seconds (trace + write; 0 = reused)"] = seconds
        reference = new(x, target).raw
        if "torchscript" in files:
            ts = torch.jit.load(str(files["torchscript"]))
            calls["pyattr LRP TorchScript"] = lambda: ts(x, target)
        if "pt2" in files:
            pt2 = torch.export.load(str(files["pt2"])).module()
            calls["pyattr LRP .pt2"] = lambda: pt2(x, target)
        if "onnx" in files:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            sess = ort.InferenceSession(str(files["onnx"]), options, providers=["CPUExecutionProvider"])
            feeds = {"images": x.numpy(), "target": target.numpy()}
            calls["pyattr LRP ONNX (onnxruntime)"] = lambda: sess.run(None, feeds)
        for label in [k for k in calls if k.startswith("pyattr LRP ") and "eager" not in k and "old" not in k]:
            out = calls[label]()
            raw = torch.as_tensor(out[2]) if isinstance(out, (list, tuple)) else out["raw"]
            notes[f"max relative difference of the raw maps, {label} vs eager"] = float(
                (raw - reference).abs().max() / reference.abs().max())
    counts = {}
    for label, call in calls.items():
        if label == "bound" or "eager" in label or "old" in label:
            with CountConvolutions() as counted:
                call()
            counts[label] = (counted.forward, counted.backward)
        else:
            call()  # warm-up
    times: dict[str, list[float]] = {label: [] for label in calls}
    cpu: dict[str, list[float]] = {label: [] for label in calls}
    load_before = list(os.getloadavg())
    for r in range(args.rounds):
        for label, call in calls.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            cpu[label].append(time.process_time() - start_cpu)
            times[label].append(time.perf_counter() - start)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()), flush=True)
    load_after = list(os.getloadavg())
    rows = []
    for label in calls:
        rows.append({"contender": label, "median_ms": statistics.median(times[label]) * 1e3,
                     "cpu_median_ms": statistics.median(cpu[label]) * 1e3,
                     "x_bound": statistics.median(t / b for t, b in zip(times[label], times["bound"])),
                     "cpu_x_bound": statistics.median(t / b for t, b in zip(cpu[label], cpu["bound"])),
                     "convolutions": counts.get(label, (None, None))[0],
                     "transposed": counts.get(label, (None, None))[1]})
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    if "onnx" in args.backends:
        import onnxruntime

        versions += f", onnxruntime {onnxruntime.__version__}"
    header = (f"`python benchmarks/lrp_ab.py {' '.join(sys.argv[1:] if argv is None else argv)}` · {versions}"
              f" · {args.model} batch {args.batch} {args.size}x{args.size} · threads {args.threads} · {args.rounds} "
              f"interleaved rounds · load average before/after {[round(v, 2) for v in load_before]} / "
              f"{[round(v, 2) for v in load_after]} · {os.cpu_count()} CPUs")
    lines = [f"# LRP (epsilon_plus) vs its bound: {args.model} batch {args.batch}", "", header, ""]
    lines += [f"- {k}: {v}" for k, v in notes.items()] + [""]
    lines += [("| contender | median ms (wall) | median ms (CPU) | × bound, wall | × bound, CPU | convolutions "
              "| transposed convolutions |"), "|---|---:|---:|---:|---:|---:|---:|"]

    def count(v):
        return "" if v is None else str(v)

    lines += [f"| {r['contender']} | {r['median_ms']:.0f} | {r['cpu_median_ms']:.0f} | {r['x_bound']:.2f}x | "
              f"{r['cpu_x_bound']:.2f}x | {count(r['convolutions'])} | {count(r['transposed'])} |" for r in rows]
    print("\n".join(lines))
    if args.name:
        out = ROOT / "benchmarks" / "results" / "cpu"
        (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
        (out / f"{args.name}.json").write_text(json.dumps(
            {"header": header, "notes": notes, "rows": rows, "times_s": times, "cpu_times_s": cpu,
             "load_before": load_before, "load_after": load_after, "versions": versions,
             "args": {k: str(v) for k, v in vars(args).items()}}, indent=1) + "\n")


GOALS = {"eager": 1.6, "exported": 1.3}  # issue 19: LRP eager <= 1.6x, exported <= 1.3x the bound


def summarize(names: list[str], name: str, argv: list[str] | None) -> None:
    """One table of earlier results (benchmarks/results/cpu/<NAME>.json), each backend against its goal: printed,
    and written with the sources' headers to <name>.json."""
    folder = ROOT / "benchmarks" / "results" / "cpu"
    rows, sources = [], []
    for source in names:
        data = json.loads((folder / f"{source}.json").read_text())
        a = data["args"]
        sources.append({"name": source, "header": data["header"], "notes": data.get("notes", {})})
        for r in data["rows"]:
            if r["contender"] == "bound":
                continue
            backend = r["contender"].replace("pyattr LRP ", "")
            goal = None if "old" in backend else GOALS["eager" if backend == "eager" else "exported"]
            rows.append({"model": a["model"], "batch": int(a["batch"]), "size": int(a["size"]), "backend": backend,
                         "wall_x_bound": round(r["x_bound"], 3), "cpu_x_bound": round(r["cpu_x_bound"], 3),
                         "goal": goal, "met_cpu": None if goal is None else r["cpu_x_bound"] <= goal,
                         "met_wall": None if goal is None else r["x_bound"] <= goal,
                         "load": [round(data["load_before"][0], 1), round(data["load_after"][0], 1)],
                         "source": source})
    lines = [("| model | batch | size | backend | × bound, wall | × bound, CPU | goal | met (CPU / wall) "
             "| load (1-min, before/after) | source |"), "|---|---:|---:|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        met = "" if r["goal"] is None else (f"{'yes' if r['met_cpu'] else 'no'} / {'yes' if r['met_wall'] else 'no'}")
        goal = "" if r["goal"] is None else f"<= {r['goal']}x"
        lines.append(f"| {r['model']} | {r['batch']} | {r['size']} | {r['backend']} | {r['wall_x_bound']:.2f}x | "
                     f"{r['cpu_x_bound']:.2f}x | {goal} | {met} | {r['load'][0]} / {r['load'][1]} | {r['source']} |")
    command = f"python benchmarks/lrp_ab.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    (folder / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows, "sources": sources},
                                                    indent=1) + "\n")
    print("\n".join(lines))


def export_graphs(method, x: torch.Tensor, model_name: str, size: int, formats: list[str], folder: Path):
    """``method`` exported once per format (traced once, as ``pyattr.export`` does), reused from ``folder``
    while pyattr's sources and torch are unchanged. Returns ({format: path}, {format: seconds})."""
    from pyattr.exporting import build_metadata, write_graph
    from pyattr.exporting.trace import example_inputs, trace_graph

    h = hashlib.sha1(torch.__version__.encode())
    for path in sorted((ROOT / "pyattr").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    folder.mkdir(parents=True, exist_ok=True)
    suffix = {"torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx"}
    paths = {fmt: folder / f"{model_name}-{size}-lrp-{h.hexdigest()[:12]}{suffix[fmt]}" for fmt in formats}
    seconds = {fmt: 0.0 for fmt in formats}
    todo = [fmt for fmt in formats if not paths[fmt].exists()]
    if todo:
        example = method._check_input(x[:1])
        start = time.perf_counter()
        gm = trace_graph(method, example)
        trace_s = time.perf_counter() - start
        inputs = example_inputs(method, example)
        meta = build_metadata(method, example)
        for fmt in todo:
            start = time.perf_counter()
            tmp = paths[fmt].with_name("." + paths[fmt].name)
            write_graph(gm, fmt, inputs, tmp, meta)
            os.replace(tmp, paths[fmt])
            seconds[fmt] = round(trace_s + time.perf_counter() - start, 1)
            print(f"exported {fmt} in {seconds[fmt]} s", flush=True)
    return paths, seconds


if __name__ == "__main__":
    main()
