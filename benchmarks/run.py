"""The benchmark suite: pyattr vs captum / pytorch-grad-cam / torchcam / zennit vs the bound.

One command runs it and writes ``benchmarks/results/<device>/<mode>.{json,md,png}``::

    python benchmarks/run.py --quick                  # < 5 min on a quiet 2-core CPU
    python benchmarks/run.py                          # --full: the default matrix for the device
    python benchmarks/run.py --device cuda            # GPU: batches 1, 8, 64, torch.compile too
    python benchmarks/run.py --models resnet50 --methods gradcam --batches 8 --backends eager onnx

For every configuration (model x method x batch) the contenders -- the bound (the plain forward +
backward the method needs, written with torch.autograd), the forward pass alone, pyattr's backends
(eager, exported TorchScript, .pt2, ONNX in onnxruntime, torch.compile of the traced graph) and the
peers that have the method -- run interleaved, round after round, on the same inputs and targets
(see ``benchmarks/_bench/timing.py``); the tables give medians, IQRs, images/s, ratios to the bound,
to the forward pass and to pyattr eager, and peak memory. Then the end-to-end job: a folder of
JPEG/PNG images in, overlay PNGs out (``benchmarks/_bench/e2e.py``). benchmarks/README.md explains
the method and the choices.

The machine should be quiet: the suite first waits (``--wait-load``, ``--wait-max``) for the
1-minute load average to drop below a threshold, and records the load average either way.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import cases, e2e, env, report
from _bench.peers import PEER_LIBRARIES, peer_contenders
from _bench.timing import Contender, measure, paired_ratio, quartiles, rss_peak_supported

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("eager", "torchscript", "pt2", "onnx", "compile")


def full_plan(device: str) -> tuple[list[tuple[str, str, int]], list[str]]:
    """The default matrix: (model, method, batch) configurations, and what is left out and why."""
    plan: list[tuple[str, str, int]] = []
    skipped: list[str] = []
    if device == "cuda":
        for model in cases.ALL_MODELS:
            for method in cases.ALL_METHODS:
                for batch in (1, 8, 64):
                    if method in ("scorecam", "sscam", "iscam", "ablationcam") and batch > 8:
                        continue
                    if method in ("ablationcam", "reciprocam") and not model.startswith("resnet"):
                        continue  # their bound's head after the layer is written for ResNets (cases.head_fn)
                    plan.append((model, method, batch))
        plan += [(m, meth, b) for m in cases.TASK_MODELS for meth in cases.TASK_METHODS for b in (1, 8, 64)]
        skipped.append("Score-CAM at batch 64: C x 64 masked forwards a call (131072 for resnet50's 2048 channels)")
        return plan, skipped
    # CPU (2 cores here): every method where it costs at most ~ a minute a round of contenders
    for model in cases.ALL_MODELS:
        small = model in ("resnet50", "mobilenet_v3_large")
        for method in ("saliency", "gradcam"):
            plan += [(model, method, 1)] + ([(model, method, 8)] if small else [])
        for method in ("gradcampp", "fullgrad", "lrp"):
            plan.append((model, method, 1))
    for model in ("resnet50", "mobilenet_v3_large"):
        plan += [(model, "integratedgradients", 1), (model, "smoothgrad", 1)]
    plan += [("resnet50", "deeplift", 1), ("resnet50", "deeplift", 8), ("resnet50", "deepliftshap", 1),
             ("resnet50", "gradientshap", 1)]
    plan.append(("mobilenet_v3_large", "scorecam", 1))
    plan += [("resnet50", method, 1) for method in ("reciprocam", "smoothgradcampp", "eigencam", "eigengradcam")]
    plan += [("resnet50", method, 1) for method in cases.PERTURBATION_METHODS]  # 1 + 16 forwards per image
    plan += task_plan()
    skipped += [
        ("vgg16, vit_b_16 at batch 8 on CPU: 8-15 s per call and ~10 contenders a round (run them with "
        "--models vgg16 vit_b_16 --batches 8)"),
        ("Ablation-CAM on CPU: its peer (pytorch-grad-cam) runs the whole model once per channel (2048 resnet50 "
         "forwards a call); SS-CAM / IS-CAM on CPU: S x C forwards a call; run them with --models resnet18 --methods "
         "ablationcam sscam iscam --size 112 (results/cpu/cams16.md)"),
        "Grad-CAM++, FullGrad at batch 8 on CPU: same costs as Grad-CAM / Saliency at batch 8 (measured at batch 1)",
        ("Integrated Gradients / SmoothGrad on vgg16, vit_b_16 on CPU: 16-32 forward+backward passes per image at "
        "15-17 GFLOPs each"),
        ("Score-CAM on resnet50 (2048 channels), vgg16 (512), vit_b_16 (768) on CPU: 500-2000 forward passes per "
        "image; measured on mobilenet_v3_large only"),
    ]
    return plan, skipped


def task_plan() -> list[tuple[str, str, int]]:
    """Targets beyond class logits (cases.TASK_MODELS): segmentation and similarity, Saliency and Grad-CAM,
    batches 1 and 8 (``--models deeplabv3_mobilenet_v3_large resnet50_embedding`` runs only these)."""
    return [(model, method, batch) for model in cases.TASK_MODELS for method in cases.TASK_METHODS
            for batch in (1, 8)]


def quick_plan(device: str) -> list[tuple[str, str, int]]:
    batch = 64 if device == "cuda" else 8
    return [("resnet50", "saliency", batch), ("resnet50", "gradcam", batch)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="resnet50, Saliency + Grad-CAM, batch 8 (CPU) / 64 (GPU), "
                      "no torch.compile, 16-image end-to-end folder: under 5 minutes on a quiet 2-core CPU")
    mode.add_argument("--full", action="store_true", help="the default matrix (see full_plan); this is the default")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--models", nargs="+", help=f"filter the plan (any of {', '.join(cases.ALL_MODELS)}, or any "
                   "torchvision classifier when --batches is given too)")
    p.add_argument("--methods", nargs="+", help=f"filter the plan ({', '.join(cases.ALL_METHODS)})")
    p.add_argument("--batches", nargs="+", type=int, help="batch sizes (replaces the plan's)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS,
                   help="pyattr backends (default: eager torchscript pt2 onnx, + compile on CUDA in --full)")
    p.add_argument("--peers", nargs="*", choices=PEER_LIBRARIES, default=list(PEER_LIBRARIES),
                   help="peer libraries (none: --peers with no name)")
    p.add_argument("--size", type=int, default=224, help="input side (default 224)")
    p.add_argument("--threads", type=int, default=0, help="torch and onnxruntime threads (0: all cores)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per contender (1 when a call > 10 s)")
    p.add_argument("--min-rounds", type=int, help="fewest timed rounds (default 5; --quick 9; 3 in --full on CPU)")
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument("--budget", type=float, help="seconds of timed rounds per configuration (quick 20, full 60)")
    p.add_argument("--e2e-images", type=int, help="images in the end-to-end folder (quick 16, full 48; 0: skip)")
    p.add_argument("--e2e-batch", type=int, help="end-to-end batch size (default 8 on CPU, 32 on GPU)")
    p.add_argument("--wait-load", type=float, default=1.5, help="wait for a 1-minute load average below this")
    p.add_argument("--wait-max", type=float, default=0.0, help="seconds to wait for it at most (default 0)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--name", help="results file stem (default: quick, full or custom)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "pyattr-bench", help="exported graphs are cached here (keyed by pyattr's sources)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    return p.parse_args(argv)


def build_plan(args) -> tuple[list[tuple[str, str, int]], list[str], str]:
    device = torch.device(args.device).type
    if args.quick:
        plan, skipped, mode = quick_plan(device), [], "quick"
    else:
        plan, skipped = full_plan(device)
        mode = "full"
    custom = bool(args.models or args.methods or args.batches)
    if args.models:
        known = {m for m, _, _ in plan}
        extra = [m for m in args.models if m not in known]
        plan = [c for c in plan if c[0] in args.models]
        if extra:  # models outside the plan: every method of the plan at the given batches
            methods = sorted({m for _, m, _ in full_plan(device)[0]}, key=cases.ALL_METHODS.index)
            plan += [(m, meth, 1) for m in extra for meth in methods]
    if args.methods:
        plan = [c for c in plan if c[1] in args.methods]
    if args.models and args.methods:  # named models x named methods run even where the default plan leaves them out
        plan += [(m, meth, 1) for m in args.models for meth in args.methods
                 if not any(c[0] == m and c[1] == meth for c in plan)]
    if args.batches:
        plan = list(dict.fromkeys((m, meth, b) for m, meth, _ in plan for b in args.batches))
    skipped_methods = sorted({meth for _, meth, _ in plan if not cases.pyattr_has(meth)})
    if skipped_methods:
        skipped.append(f"{', '.join(skipped_methods)}: not in pyattr yet (pyattr.METHODS); not timed")
        plan = [c for c in plan if cases.pyattr_has(c[1])]
    if custom:
        mode = "custom"
    order = {m: i for i, m in enumerate(dict.fromkeys(m for m, _, _ in plan))}
    plan.sort(key=lambda c: (order[c[0]], c[2], cases.ALL_METHODS.index(c[1]) if c[1] in cases.ALL_METHODS else 99))
    return plan, skipped, mode


def default_backends(args, device: str) -> list[str]:
    if args.backends:
        return list(args.backends)
    backends = ["eager", "torchscript", "pt2", "onnx"]
    if device == "cuda" and not args.quick:
        backends.append("compile")
    return backends


def run_config(model_name: str, model, method: str, batch: int, args, device, backends, threads, log) -> dict:
    s = cases.make_setup(model_name, model, batch, args.size, device)
    cfg = {"model": model_name, "method": method, "batch": batch, "size": int(s.x.shape[-1]), "layer": s.layer_name,
           "load": [env.load_average()]}
    if s.task != "class":
        cfg.update(task=s.task, objective=s.objective_label)
    contenders: list[Contender] = cases.reference_contenders(method, s)
    with cases.quiet():
        ours, notes = cases.pyattr_contenders(method, s, backends, args.cache, threads, log)
        contenders += ours
        contenders += peer_contenders(method, s, args.peers, log)
    cfg.update(notes)
    budget = args.budget if args.budget is not None else (20.0 if args.quick else 60.0)
    # --quick: 9 rounds of few configurations (its ratios decide goals); --full on CPU: at least 3 of many
    min_rounds = args.min_rounds or (9 if args.quick else (3 if device.type == "cpu" else 5))
    with cases.quiet():
        measured = measure(contenders, device, warmup=args.warmup, min_rounds=min_rounds, max_rounds=args.max_rounds,
                           budget_s=budget, log=log)
    cfg["rows"] = report.rows_of(measured, batch)
    cfg["load"].append(env.load_average())
    for r in cfg["rows"]:
        if r.get("median_ms") is not None:
            extra = f"  e2e {r['e2e_median_ms']:.1f} ms" if r.get("e2e_median_ms") and r["role"] == "peer" else ""
            ratio = f"  x bound {r['x_bound']:.2f}" if r.get("x_bound") else ""
            log(f"    {r['name']:<44} {r['median_ms']:10.1f} ms{extra}{ratio}")
    return cfg


def run_e2e(args, device, threads, log) -> dict:
    n = args.e2e_images if args.e2e_images is not None else (16 if args.quick else 48)
    if n <= 0:
        return {}
    batch = args.e2e_batch or (32 if device.type == "cuda" else 8)
    model_name = "resnet50"
    log(f"\n== end to end: {n} images, {model_name} Grad-CAM, batch {batch}")
    model = cases.make_model(model_name, args.size, device)
    s = cases.make_setup(model_name, model, 1, args.size, device)
    tmp = Path(tempfile.mkdtemp(prefix="pyattr-bench-e2e-"))
    paths = e2e.make_folder(tmp / "images", n)
    contenders = [Contender("pyattr eager + C++ overlay", "pyattr", "eager", "pyattr",
                            e2e.folder_runner(e2e.pyattr_eager(model, s.layer_name, device, batch, args.size), paths,
                                              tmp / "out_pyattr"))]
    with cases.quiet():
        method_obj = cases.build_pyattr("gradcam", s)
        files = cases.export_all(method_obj, cases.export_key("gradcam", method_obj, s), s, ["onnx"], args.cache, log)
    if device.type == "cpu" or "onnx" in (args.backends or ["onnx"]):
        try:
            sess = cases.ort_session(files["onnx"][0], device, threads)
            contenders.append(Contender("pyattr ONNX (onnxruntime) + C++ overlay", "pyattr", "onnxruntime", "pyattr",
                                        e2e.folder_runner(e2e.pyattr_onnx(sess, batch, args.size), paths, tmp / "out_onnx")))
        except Exception as err:  # noqa: BLE001
            log(f"    ! onnxruntime: {err}")
    contenders.append(Contender("pytorch-grad-cam GradCAM + show_cam_on_image", "pytorch-grad-cam", "eager", "peer",
                                e2e.folder_runner(e2e.pytorch_grad_cam(model, s.layer, device, batch, args.size), paths,
                                                  tmp / "out_pgc")))
    with cases.quiet():
        measured = measure(contenders, device, warmup=1, min_rounds=3, max_rounds=10,
                           budget_s=args.budget if args.budget is not None else 30.0, log=log)
    eager = measured[0].times
    rows = []
    for m in measured:
        row = {"name": m.contender.name, "library": m.contender.library, "error": m.error,
               "peak_mib": None if m.peak_mib is None else round(m.peak_mib, 1), "rounds": len(m.times)}
        if m.times:
            q1, med, q3 = quartiles(m.times)
            row.update(median_ms=round(med * 1e3, 1), iqr_ms=round((q3 - q1) * 1e3, 1),
                       images_per_s=round(n / med, 2), x_pyattr_eager=paired_ratio(m.times, eager),
                       cpu_median_ms=round(sorted(m.cpu_times)[len(m.cpu_times) // 2] * 1e3, 1),
                       times_ms=[round(v * 1e3, 1) for v in m.times])
            log(f"    {row['name']:<50} {med:8.2f} s  {n / med:6.1f} img/s")
        rows.append(row)
    return {"images": n, "batch": batch, "model": model_name, "formats": "JPEG + PNG, mixed sizes", "rows": rows}


def save(results: dict, out: Path, name: str, with_chart: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{name}.md").write_text(report.markdown(results) + "\n")
    if with_chart:
        report.chart(results, out / f"{name}.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    faulthandler.enable()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("run.py: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    plan, skipped, mode = build_plan(args)
    name = args.name or mode
    out = args.out or RESULTS / device.type
    backends = default_backends(args, device.type)
    if args.list:
        for c in plan:
            print(*c)
        print("skipped:", *skipped, sep="\n  ")
        return 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    load = env.wait_for_quiet(args.wait_load, args.wait_max, 60.0, log)
    meta = env.describe(device, threads)
    meta.update(command="python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                mode=mode, size=args.size, backends=backends, peers=args.peers, load=load, skipped=skipped,
                plan=[list(c) for c in plan], rss_peak_method="malloc_trim(0); echo 5 > /proc/self/clear_refs; VmHWM"
                if device.type == "cpu" and rss_peak_supported() else "torch.cuda.max_memory_allocated")
    log(f"{len(plan)} configurations on {meta['device_name']}, backends {backends}, peers {args.peers}, "
        f"load {load['load_at_start']}")
    results = {"metadata": meta, "configs": [], "e2e": {}}
    started = time.time()
    model_name, model = None, None
    for model_key, method, batch in plan:
        if model_key != model_name:
            model_name, model = model_key, None
            gc.collect()
            model = cases.make_model(model_key, args.size, device)
        log(f"\n== {model_key} {method} batch {batch}")
        try:
            cfg = run_config(model_key, model, method, batch, args, device, backends, threads, log)
        except Exception as err:  # noqa: BLE001 -- one broken configuration must not lose the others
            cfg = {"model": model_key, "method": method, "batch": batch,
                   "size": cases.model_size(model_key, args.size), "rows": [],
                   "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
            log(f"    ! {cfg['error']}")
        results["configs"].append(cfg)
        meta["elapsed_s"] = round(time.time() - started)
        save(results, out, name, with_chart=False)
        gc.collect()
    model = None
    try:
        results["e2e"] = run_e2e(args, device, threads, log)
    except Exception as err:  # noqa: BLE001
        results["e2e"] = {"error": f"{type(err).__name__}: {err}"}
        log(f"    ! end to end: {err}")
    meta["elapsed_s"] = round(time.time() - started)
    meta["load_at_end"] = env.load_average()
    save(results, out, name)
    log(f"\nwrote {out / name}.{{json,md,png}} in {meta['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=UserWarning)
    raise SystemExit(main())
