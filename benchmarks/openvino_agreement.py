"""OpenVINO vs onnxruntime on the same exported graphs: every registered method on the built-in model and on
torchvision's resnet18 (random init, 10 classes, 64x64 input).

    python benchmarks/openvino_agreement.py                      # the full matrix (~10 min on 2 cores)
    python benchmarks/openvino_agreement.py --models builtin --methods gradcam,saliency   # reruns these cells

Each cell exports the method as ONNX once (batch-1 example), loads the file with
``AttributionRuntime(path, backend="onnxruntime")`` and ``backend="openvino"`` (CPU, float32), runs both on the
same batch of 3 random inputs with mixed targets (-1 = arg-max, 2, 4), and records: max |maps ov - ort| (maps
in [0, 1]; the agreement asked for is <= 1e-4), max |raw ov - ort| / max |raw ort|, max |scores ov - ort|,
whether the explained classes are equal, the OpenVINO load+compile seconds, and each backend's max |maps -
eager pyattr| on the same inputs and classes: where OpenVINO misses 1e-4, this tells whether onnxruntime is
as far from eager (an fp32-conditioned map, e.g. a max-pool near-tie that float rounding flips) or not. A method that does not export,
or a graph OpenVINO cannot compile (the runtime's InputError, naming the operations), is recorded with its
first line. Results: ``benchmarks/results/openvino_agreement.{json,md}``.
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
from pyattr.methods import build_method, needs_layer
from pyattr.runtime import AttributionRuntime

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 1e-4
TARGETS = np.array([-1, 2, 4], np.int64)
MODELS = {"builtin": "layer3", "resnet18": "layer4"}
# multi-pass methods at modest settings (their graphs hold every pass): the agreement is per pass, not per count
OPTIONS = {"rise": {"masks": 64, "chunk_size": 32}, "sscam": {"samples": 2, "chunk_size": 64},
           "iscam": {"samples": 2, "chunk_size": 64}, "smoothgradcampp": {"samples": 4, "chunk_size": 4},
           "deepliftshap": {"baselines": 4, "chunk_size": 4}, "gradientshap": {"baselines": 4, "samples": 8,
                                                                               "chunk_size": 8}}
BOUND = 6.0  # |x| bound given to LRP's z^B rule on resnet18 (the inputs are standard normal: max |x| < 5 here)


def load_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "builtin":
        return pyattr.zoo.ShapesNet().eval()
    import torchvision

    return getattr(torchvision.models, name)(num_classes=10).eval()


def cell(model_name: str, model: torch.nn.Module, layer: str, method_name: str, folder: str) -> dict:
    row: dict = {"model": model_name, "method": method_name}
    try:
        options = dict(OPTIONS.get(method_name, {}))
        if method_name == "lrp_epsilon_gamma_box" and model_name != "builtin":  # z^B needs the input's bounds
            options = {"low": torch.full((3,), -BOUND), "high": torch.full((3,), BOUND)}
        method = build_method(method_name, model, layer if needs_layer(method_name) else None, **options)
        path = Path(folder) / f"{model_name}_{method_name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pyattr.export(method, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)), path)
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        return {**row, "status": "export_failed", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    ort = AttributionRuntime(path, backend="onnxruntime", num_threads=1).run(x, TARGETS)
    eager = method(torch.from_numpy(x), torch.from_numpy(ort.explained_class))
    row["ort_vs_eager_maps"] = float(np.abs(ort.maps - eager.maps.detach().numpy()).max())
    try:
        start = time.perf_counter()
        runtime = AttributionRuntime(path, backend="openvino", num_threads=1)
        row["openvino_load_s"] = round(time.perf_counter() - start, 3)
        ov = runtime.run(x, TARGETS)
    except Exception as err:  # noqa: BLE001
        return {**row, "status": "openvino_failed", "error": f"{type(err).__name__}: {str(err)[:300]}"}
    raw_scale = float(np.abs(ort.raw).max()) or 1.0
    row.update(
        maps=float(np.abs(ov.maps - ort.maps).max()),
        ov_vs_eager_maps=float(np.abs(ov.maps - eager.maps.detach().numpy()).max()),
        raw_rel=float(np.abs(ov.raw - ort.raw).max() / raw_scale),
        scores=float(np.abs(ov.scores - ort.scores).max()),
        classes_equal=bool(np.array_equal(ov.explained_class, ort.explained_class)),
    )
    row["status"] = "ok" if row["maps"] <= TOLERANCE and row["classes_equal"] else "mismatch"
    return row


def write(rows: list[dict], name: str) -> None:
    import onnxruntime
    import openvino

    RESULTS.mkdir(exist_ok=True)
    env = {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__.split("-")[0],
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": 1}
    (RESULTS / f"{name}.json").write_text(json.dumps({"environment": env, "tolerance": TOLERANCE, "cells": rows},
                                                     indent=1) + "\n")
    ok = sum(r["status"] == "ok" for r in rows)
    title = f"# OpenVINO vs onnxruntime on the same exported graphs ({ok}/{len(rows)} cells agree within {TOLERANCE:g})"
    setting = (f"`python benchmarks/openvino_agreement.py`: {', '.join(f'{k} {v}' for k, v in env.items())}. "
               "Batch 3, targets (-1, 2, 4), 64x64 inputs, random weights (seed 0).")
    header = ("| model | method | status | maps ov vs ort | raw ov vs ort / max raw | scores ov vs ort | classes equal | "
              "maps ort vs eager | maps ov vs eager | OpenVINO load s | note |")
    lines = [title, "", setting, "", header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        num = {key: f"{r[key]:.1e}" if key in r else ""
               for key in ("maps", "raw_rel", "scores", "ort_vs_eager_maps", "ov_vs_eager_maps")}
        lines.append(f"| {r['model']} | {r['method']} | {r['status']} | {num['maps']} | {num['raw_rel']} | "
                     f"{num['scores']} | {r.get('classes_equal', '')} | {num['ort_vs_eager_maps']} | "
                     f"{num['ov_vs_eager_maps']} | {r.get('openvino_load_s', '')} | {r.get('error', '').replace('|', '/')} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(sorted(pyattr.METHODS)))
    parser.add_argument("--name", default="openvino_agreement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    previous = RESULTS / f"{args.name}.json"  # cells of an earlier run stay, those run again are replaced
    rows = json.loads(previous.read_text())["cells"] if previous.is_file() else []
    with tempfile.TemporaryDirectory() as folder:
        for model_name in args.models.split(","):
            model = load_model(model_name)
            for method_name in args.methods.split(","):
                start = time.perf_counter()
                row = cell(model_name, model, MODELS[model_name], method_name, folder)
                old = [i for i, r in enumerate(rows) if (r["model"], r["method"]) == (model_name, method_name)]
                if old:
                    rows[old[0]] = row
                else:
                    rows.append(row)
                print(json.dumps(row), f"({time.perf_counter() - start:.1f} s)", flush=True)
                for file in Path(folder).iterdir():
                    file.unlink()
                write(rows, args.name)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
