"""onnxruntime vs OpenVINO (CPU) on the same exported graphs: resnet50 Grad-CAM and Saliency, batch 1 and 8.

    python benchmarks/runtime_backends.py [--threads 1] [--repeats 5] [--size 224]

torchvision's resnet50 (random init, 1000 classes) is exported once per method as ONNX (batch-1 example, dynamic
batch); each file is loaded with ``AttributionRuntime(path, backend=...)`` for both backends, with the same
thread count. Per (method, batch): one warm-up run per backend, then ``--repeats`` timed ``runtime.run(x)``
calls, the two backends interleaved (ort, ov, ort, ov, ...) so that load from other jobs on the machine falls
on both alike. Reported: median and IQR seconds per call, images per second, the ratio ort / ov (> 1: OpenVINO
faster), the load (+ compile) seconds, and max |maps ov - ort|. Results:
``benchmarks/results/runtime_backends.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import pyattr
from pyattr.runtime import AttributionRuntime

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("onnxruntime", "openvino")
METHODS = {"gradcam": lambda m: pyattr.GradCAM(m, "layer4"), "saliency": lambda m: pyattr.Saliency(m)}
PREPROCESSING = {"color": "RGB", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "resize": "bilinear", "layout": "NCHW"}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return float(q1), float(q2), float(q3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--name", default="runtime_backends")
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    import onnxruntime
    import openvino
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, build in METHODS.items():
            path = Path(folder) / f"resnet50_{name}.onnx"
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pyattr.export(build(model), torch.rand(1, 3, args.size, args.size), path,
                              preprocessing={**PREPROCESSING, "size": [args.size, args.size]})
            print(f"{name}: exported in {time.perf_counter() - start:.0f} s", flush=True)
            runtimes, load_s = {}, {}
            for backend in BACKENDS:
                start = time.perf_counter()
                runtimes[backend] = AttributionRuntime(path, backend=backend, num_threads=args.threads)
                load_s[backend] = time.perf_counter() - start
            for batch in map(int, args.batches.split(",")):
                x = np.random.default_rng(batch).normal(size=(batch, 3, args.size, args.size)).astype(np.float32)
                maps = {b: runtimes[b].run(x).maps for b in BACKENDS}  # warm-up (and OpenVINO's first-shape work)
                times: dict[str, list[float]] = {b: [] for b in BACKENDS}
                for _ in range(args.repeats):
                    for b in BACKENDS:
                        start = time.perf_counter()
                        runtimes[b].run(x)
                        times[b].append(time.perf_counter() - start)
                row = {"method": name, "batch": batch, "max_abs_maps": float(np.abs(maps["openvino"] -
                                                                                    maps["onnxruntime"]).max())}
                for b in BACKENDS:
                    q1, q2, q3 = quartiles(times[b])
                    row[b] = {"median_s": q2, "iqr_s": q3 - q1, "images_per_s": batch / q2, "load_s": load_s[b]}
                row["ratio_ort_over_ov"] = row["onnxruntime"]["median_s"] / row["openvino"]["median_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    env = {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__.split("-")[0],
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": args.threads,
           "input": f"{args.size}x{args.size}", "repeats": args.repeats, "cores": os.cpu_count()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    lines = ["# onnxruntime vs OpenVINO (CPU): resnet50 attribution graphs", "",
             (f"`python benchmarks/runtime_backends.py`: {', '.join(f'{k} {v}' for k, v in env.items())}; random "
             "weights; median (IQR) seconds per `runtime.run(x)` call, backends interleaved."), "",
             ("| method | batch | onnxruntime s | OpenVINO s | onnxruntime img/s | OpenVINO img/s | ratio ort/ov | "
             "load s ort / ov | max abs maps |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ort, ov = r["onnxruntime"], r["openvino"]
        lines.append(f"| {r['method']} | {r['batch']} | {ort['median_s']:.3f} ({ort['iqr_s']:.3f}) | "
                     f"{ov['median_s']:.3f} ({ov['iqr_s']:.3f}) | {ort['images_per_s']:.2f} | {ov['images_per_s']:.2f} | "
                     f"{r['ratio_ort_over_ov']:.2f} | {ort['load_s']:.1f} / {ov['load_s']:.1f} | "
                     f"{r['max_abs_maps']:.1e} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
