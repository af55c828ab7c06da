"""Integrated Gradients exported as one batched pass against unrolled passes: export time, file size and
onnxruntime's peak memory.

    python benchmarks/ig_pass_memory.py                          # resnet50 and vit_b_16 at 224, batch 1
    python benchmarks/ig_pass_memory.py --models resnet50 --batches 1,2

``IntegratedGradients(model)`` (32 steps) is exported twice: with ``chunk_size=None`` (the default: all 32
points of an input in one pass of the graph) and with ``chunk_size=16`` (two unrolled passes, what the
default was). Each graph then runs once in a fresh process (onnxruntime, CPU, 1 intra-op thread) on the same
input; ``peak MB`` is that process's peak resident set size (``VmHWM``) after the run, ``load MB`` after creating
the session (the weights, the graph, onnxruntime's optimisations), so ``run MB`` = peak - load is what the run
added. ``max diff`` is the
largest difference of the graph's ``raw`` map from eager pyattr's (default chunking: 16 points per pass),
relative to its largest value. Random-init weights (torchvision's ViT head is re-initialised).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyattr

RUN = r"""
import json, sys, numpy as np, onnxruntime as ort

def hwm():  # this process's peak RSS (VmHWM: per address space, so not the parent's, unlike ru_maxrss after fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

path, images = sys.argv[1], np.load(sys.argv[2])
options = ort.SessionOptions(); options.intra_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
load = hwm()
raw = session.run(["raw"], {"images": images, "target": np.full((len(images),), -1, np.int64)})[0]
np.save(sys.argv[3], raw)
print(json.dumps({"load_mb": load, "peak_mb": hwm()}))
"""


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    if name.startswith("vit"):
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised by torchvision
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,vit_b_16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="1")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ig_pass_memory"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = build(name)
            x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
            for chunk in (None, 16):
                method = pyattr.IntegratedGradients(model, chunk_size=chunk)
                path = Path(tmp) / f"{name}_{chunk}.onnx"
                load = os.getloadavg()[0]
                start, cpu = time.perf_counter(), time.process_time()
                pyattr.export(method, x, path)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                for batch in [int(b) for b in args.batches.split(",")]:
                    images = torch.rand(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(batch))
                    np_in, np_out = Path(tmp) / "in.npy", Path(tmp) / "out.npy"
                    import numpy as np

                    np.save(np_in, images.numpy())
                    done = subprocess.run([sys.executable, "-c", RUN, str(path), str(np_in), str(np_out)],
                                          capture_output=True, text=True, check=True)
                    mem = json.loads(done.stdout.strip().splitlines()[-1])
                    expected = pyattr.IntegratedGradients(model)(images).raw
                    got = torch.from_numpy(np.load(np_out))
                    diff = float((got - expected).abs().max() / expected.abs().max())
                    row = {"model": name, "chunk_size": chunk, "passes": 1 if chunk is None else 32 // chunk,
                           "batch": batch, "export_wall_s": wall, "export_cpu_s": cpu, "load": load,
                           "file_mb": path.stat().st_size / 2**20, **mem, "run_mb": mem["peak_mb"] - mem["load_mb"],
                           "max_diff": diff}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    env = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores", "torch": torch.__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "torch_threads": torch.get_num_threads()}
    import onnxruntime

    env["onnxruntime"] = onnxruntime.__version__
    Path(args.out + ".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    machine = (f"- machine: {env['machine']} (shared: load in the table), torch threads {env['torch_threads']}; "
               f"torch {env['torch']}, torchvision {env['torchvision']}, onnxruntime {env['onnxruntime']}, "
               f"Python {env['python']}; {env['date']}")
    setup = (f"- input {args.size}x{args.size}, random-init weights, IntegratedGradients(model) (32 steps); "
             "chunk_size None = one pass in the graph (the default), 16 = two unrolled passes")
    legend = ("- `peak MB`: onnxruntime process peak RSS (VmHWM) after one run (1 thread); `run MB` = peak - after "
              "session creation; `max diff`: |raw - eager| / max |eager|")
    header = ("| model | chunk_size | passes | batch | export wall s | export cpu s | load | file MB | load MB | "
              "peak MB | run MB | max diff |")
    lines = ["# Integrated Gradients: one batched pass against two unrolled passes in the exported graph", "",
             f"- command: `{env['command']}`", machine, setup, legend, "", header,
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['chunk_size']} | {r['passes']} | {r['batch']} | {r['export_wall_s']:.1f} | "
                     f"{r['export_cpu_s']:.1f} | {r['load']:.1f} | {r['file_mb']:.0f} | {r['load_mb']:.0f} | "
                     f"{r['peak_mb']:.0f} | {r['run_mb']:.0f} | {r['max_diff']:.1e} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
