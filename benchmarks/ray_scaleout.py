"""The Ray Data batch pipeline's scale-out: images/s of ``pyattr.runtime.batch`` with 1 and 2 actors against the
single-process runtime on the same images, and Ray's overhead per image.

    python benchmarks/ray_scaleout.py [--images 400] [--size 64] [--model builtin|resnet18] [--batch 16]

The graph: Grad-CAM of the built-in model (64 px input; ``--model resnet18``: torchvision's resnet18, random init,
at ``--size``), exported once to ONNX. The images: generated PNGs at the input size. Every configuration writes
into a fresh output folder and does the same work per image (decode the PNG, preprocess, run the graph, render the
overlay with the C++ core, write the overlay PNG and the map into a Parquet part):

* ``single process, AttributionRuntime.explain``: the `pyattr run` path, batches of ``--batch``, no file written
  (what the runtime alone costs);
* ``single process, ExplainBatch``: the pipeline's per-batch function called in a loop in this process (reads,
  explains, writes overlays and part files; no Ray): the work each actor does;
* ``Ray, N actors``: ``run_batch(..., actors=N)`` on a local Ray cluster already started (``ray.init`` time reported
  on its own), end to end (actor start-up and the table's assembly included), and the actors' steady pace (images
  after the first part file over the time from the first part file written to the last; the driver receives
  results in bursts, so its own timestamps would not do).

Every single-process configuration uses 1 thread (as each actor does). Ray overhead per image =
(Ray 1 actor end-to-end time - single process ExplainBatch time) / images. The machine's 1-minute load average is
recorded before and after each configuration: the development machine has 2 cores shared with other jobs, so the
numbers are only comparable within one run. Results: ``benchmarks/results/ray_scaleout.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pyattr
from pyattr import zoo

RESULTS = Path(__file__).resolve().parent / "results"
PREPROCESSING = {"color": "RGB", "scale": 1 / 255, "mean": [0.45, 0.5, 0.55], "std": [0.25, 0.2, 0.3],
                 "resize": "bilinear", "layout": "NCHW"}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def export_graph(model_name: str, size: int, folder: Path) -> Path:
    torch.manual_seed(0)
    if model_name == "builtin":
        model, layer, size, names = zoo.load_builtin(), zoo.SHAPESNET_LAYER, 64, zoo.SHAPE_CLASSES
    else:
        import torchvision

        model, layer, names = torchvision.models.resnet18(num_classes=10).eval(), "layer4", None
    return pyattr.export(pyattr.GradCAM(model, layer), torch.rand(1, 3, size, size), folder / "gradcam.onnx",
                         class_names=names, preprocessing={**PREPROCESSING, "size": [size, size]})


def make_images(n: int, size: int, folder: Path) -> list[Path]:
    folder.mkdir()
    shapes = zoo.generate(n, seed=50_000).images
    files = []
    for i, array in enumerate(shapes):
        files.append(folder / f"img{i:04d}.png")
        image = Image.fromarray(array)
        (image if size == 64 else image.resize((size, size), Image.BILINEAR)).save(files[-1])
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", choices=["builtin", "resnet18"], default="builtin")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--name", default="ray_scaleout")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import onnxruntime
    import ray

    from pyattr.runtime import AttributionRuntime
    from pyattr.runtime.batch import ExplainBatch, collect_inputs, run_batch

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        graph = export_graph(args.model, args.size, root)
        files = make_images(args.images, args.size, root / "images")
        n = len(files)

        def record(config: str, seconds: float, before: float, **extra) -> None:
            rows.append({"config": config, "images": n, "seconds": round(seconds, 3),
                         "images_per_s": round(n / seconds, 1), "load_before": before, "load_after": load(), **extra})
            print(json.dumps(rows[-1]), flush=True)

        # single process, the runtime alone
        runtime = AttributionRuntime(graph, num_threads=1)
        runtime.explain(files[: args.batch], batch_size=args.batch)  # warm-up
        before, start = load(), time.perf_counter()
        for i in range(0, n, args.batch):
            runtime.explain(files[i:i + args.batch], batch_size=args.batch)
        record("single process, AttributionRuntime.explain (1 thread)", time.perf_counter() - start, before)

        # single process, the pipeline's per-batch function (the same writes as an actor)
        items = collect_inputs([str(f) for f in files])
        out = root / "single"
        (out / "parts").mkdir(parents=True)
        (out / "overlays").mkdir()
        worker = ExplainBatch(str(graph), "", str(out), {"num_threads": 1})

        def call(chunk):
            worker({"key": np.array([x.key for x in chunk], object), "input": np.array([x.input for x in chunk], object),
                    "name": np.array([x.name for x in chunk], object)})

        call(items[: args.batch])  # warm-up (its files are rewritten below)
        before, start = load(), time.perf_counter()
        for i in range(0, n, args.batch):
            call(items[i:i + args.batch])
        single = time.perf_counter() - start
        record("single process, ExplainBatch (1 thread; reads, overlays and parts written)", single, before)

        before, start = load(), time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 << 20, logging_level="warning",
                 configure_logging=False)
        init_seconds = time.perf_counter() - start
        print(f"ray.init: {init_seconds:.1f} s (load {before})", flush=True)
        ray_one = None
        for actors in (1, 2):
            before, wall, start = load(), time.time(), time.perf_counter()
            summary = run_batch(graph, [str(f) for f in files], root / f"ray{actors}", actors=actors,
                                batch_size=args.batch, progress=False)
            seconds = time.perf_counter() - start
            assert summary.processed == n and summary.failed == 0, summary
            # the actors' pace, from the part files' times (the driver receives results in bursts): images after
            # the first part over the time from the first part to the last
            written = sorted(p.stat().st_mtime for p in (root / f"ray{actors}" / "parts").glob("part-*.parquet"))
            steady = round((n - args.batch) / (written[-1] - written[0]), 1) if written[-1] > written[0] else None
            record(f"Ray Data, {actors} actor{'s' if actors > 1 else ''} (1 thread each)", seconds, before,
                   steady_images_per_s=steady, first_batch_s=round(written[0] - wall, 2))
            if actors == 1:
                ray_one = seconds
        ray.shutdown()
    one = next(r for r in rows if r["config"].startswith("Ray Data, 1 "))
    overhead = {"end_to_end_ms_per_image": round(1000 * (ray_one - single) / n, 2),
                "start_up_s": one["first_batch_s"]}
    if one["steady_images_per_s"]:
        overhead["steady_state_ms_per_image"] = round(1000 * (1 / one["steady_images_per_s"] - single / n), 2)
    meta = {"command": "python benchmarks/ray_scaleout.py " + " ".join(
                f"--{k} {v}" for k, v in vars(args).items() if k != "name"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
            "onnxruntime": onnxruntime.__version__, "pyattr": pyattr.__version__, "model": args.model,
            "input_size": 64 if args.model == "builtin" else args.size, "batch": args.batch,
            "ray_init_seconds": round(init_seconds, 2)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "ray_overhead": overhead},
                                                          indent=1) + "\n")
    lines = [f"# Ray Data scale-out: `{meta['command']}`", "",
             f"{meta['date']}; {meta['cpus']} CPUs ({meta['machine']}), shared with other jobs (load averages "
             "below); Python {python}, Ray {ray}, onnxruntime {onnxruntime}; Grad-CAM of the {model} model at "
             "{input_size} px, {n} PNG images, batches of {batch}; `ray.init` took {init} s (not in the rows)."
             .format(**meta, n=n, init=meta["ray_init_seconds"]), "",
             "| configuration | s | images/s | steady images/s (actors' pace) | first part file after s | load before / after |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['seconds']} | {r['images_per_s']} | {r.get('steady_images_per_s', '')} | "
                     f"{r.get('first_batch_s', '')} | {r['load_before']} / {r['load_after']} |")
    lines += ["", f"Ray overhead per image (Ray 1 actor - single-process ExplainBatch, over {n} images): "
                  f"{overhead['end_to_end_ms_per_image']} ms end to end, of which most is the fixed start-up (the "
                  f"first part file is written {overhead['start_up_s']} s after the call: starting the actor, "
                  "importing the runtime, shipping the graph, the first batch)"
              + (f"; {overhead['steady_state_ms_per_image']} ms per image once the actor runs (negative: the actor "
                 "ran faster per image than the single process)" if "steady_state_ms_per_image" in overhead else "")
              + "."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
