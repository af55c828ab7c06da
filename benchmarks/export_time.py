"""How long ``pyattr.export`` takes, against a plain ``torch.onnx.export`` of the model, in one run.

    python benchmarks/export_time.py                                 # resnet50 + vit_b_16 at 224, every case
    python benchmarks/export_time.py --size 64 --models resnet50 --methods saliency --formats onnx
    python benchmarks/export_time.py --ort                           # also time each ONNX graph in onnxruntime

For each model (random init; torchvision's ViT zero-initialises its head, so it is re-initialised) the
reference is ``torch.onnx.export(model, x, dynamo=True)`` of the model's forward (default options),
timed before the method exports (twice: the first call is a warm-up that pays for loading onnxscript
and building its op registry) and again after them. Then every method is exported to each format and
timed, with the time split into stages by wrapping the functions that do the work:

- ``trace``: pyattr's ``make_fx`` trace of forward + backward into one aten graph (sympy included);
- ``fold``: pyattr's constant folding of the traced graph;
- ``capture``: ``torch.export.export`` (re-capturing the graph as an ExportedProgram);
- ``decomp``: ``ExportedProgram.run_decompositions`` (torch.onnx runs it on every program);
- ``onnx``: translating the program into ONNX (``_exported_program_to_onnx_program``; with pyattr's direct
  route, ``pyattr.exporting._onnx.translate`` and the graph preparation in it);
- ``optimize``: onnxscript's optimizer (``torch.onnx.export(..., optimize=True)``), or the direct route's
  clean-up passes (``_onnx.clean_up``);
- ``script``: ``torch.jit.script``;
- ``save``: serialising (``onnx.save`` / ``ir.save`` / ``torch.jit.save`` / ``torch.export.save``);
- ``other``: what is left (checks, metadata, loading the ONNX file back, ...).

Stages are exclusive (a stage nested in another is subtracted from it). ``ratio`` is the export's wall time
over the mean of the reference's timed runs. Times are wall-clock; ``cpu`` is the process's CPU time
(steadier when the machine is shared). Results go to ``--out`` (.md and .json).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyattr
from pyattr.methods import TokensToGrid
from pyattr.methods.lrp import NoRuleError

SINGLE_PASS = ["saliency", "gradcam", "guided_backprop", "lrp", "fullgrad"]
MULTI_PASS = ["integrated_gradients", "smoothgrad", "scorecam"]
FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
STAGES = ["trace", "fold", "capture", "decomp", "onnx", "optimize", "script", "save", "other"]
VIT_LAYER = "encoder.layers.encoder_layer_11.ln_1"  # as in tests/test_cam_family.py


# ---------------------------------------------------------------------------------------------- timing
class Stages:
    """Exclusive wall/CPU time per stage, from functions wrapped with :meth:`wrap`."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start wall, start cpu, child wall, child cpu]

    def reset(self):
        self.wall, self.cpu, self._stack = {}, {}, []

    @contextlib.contextmanager
    def stage(self, name: str):
        if any(frame[0] == name for frame in self._stack):  # re-entrant call: count it once
            yield
            return
        frame = [name, time.perf_counter(), time.process_time(), 0.0, 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            wall, cpu = time.perf_counter() - frame[1], time.process_time() - frame[2]
            self.wall[name] = self.wall.get(name, 0.0) + wall - frame[3]
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu - frame[4]
            if self._stack:
                self._stack[-1][3] += wall
                self._stack[-1][4] += cpu

    def wrap(self, owner, attr: str, name: str):
        original = getattr(owner, attr)
        if getattr(original, "_export_time_stage", None):
            return

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            with self.stage(name):
                return original(*args, **kwargs)

        wrapper._export_time_stage = name
        setattr(owner, attr, wrapper)


STAGE = Stages()


def instrument() -> None:
    """Wrap the functions each stage is made of (in torch, onnx, onnxscript and pyattr)."""
    import onnx
    from torch.onnx._internal.exporter import _core, _onnx_program

    from pyattr.exporting import trace

    original_make_fx = trace.make_fx

    def make_fx(*args, **kwargs):  # time the traced call, not the wrapper's construction
        traced = original_make_fx(*args, **kwargs)

        def call(*a, **k):
            with STAGE.stage("trace"):
                return traced(*a, **k)
        return call

    if not getattr(original_make_fx, "_export_time_stage", None):
        make_fx._export_time_stage = "trace"
        trace.make_fx = make_fx
    STAGE.wrap(trace, "fold_constants", "fold")
    STAGE.wrap(torch.export, "export", "capture")
    STAGE.wrap(torch.export.ExportedProgram, "run_decompositions", "decomp")
    STAGE.wrap(_core, "_exported_program_to_onnx_program", "onnx")
    STAGE.wrap(_onnx_program.ONNXProgram, "optimize", "optimize")
    STAGE.wrap(_onnx_program.ONNXProgram, "save", "save")
    STAGE.wrap(onnx, "save", "save")
    STAGE.wrap(onnx, "save_model", "save")
    STAGE.wrap(torch.jit, "script", "script")
    STAGE.wrap(torch.jit, "save", "save")
    STAGE.wrap(torch.export, "save", "save")
    import onnx_ir

    STAGE.wrap(onnx_ir, "save", "save")
    try:  # the optimizer pyattr may call directly
        import onnxscript

        STAGE.wrap(onnxscript.optimizer, "optimize", "optimize")
    except (ImportError, AttributeError):
        pass
    # pyattr's direct ONNX route (pyattr/exporting/_onnx.py), where it exists: its graph preparation
    # (lifting constants, type promotion, ...) counts as translation, its clean-up passes as the optimizer
    try:
        from pyattr.exporting import _onnx
    except ImportError:
        return
    STAGE.wrap(_onnx, "translate", "onnx")
    STAGE.wrap(_onnx, "clean_up", "optimize")


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def handler(signum, frame):
        raise Timeout(f"timed out after {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def timed(fn) -> dict:
    STAGE.reset()
    load0 = os.getloadavg()[0]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with STAGE.stage("other"):
        fn()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"wall": wall, "cpu": cpu, "load": load0, "stages": dict(STAGE.wall), "stages_cpu": dict(STAGE.cpu)}


# ---------------------------------------------------------------------------------------------- cases
def make_model(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("vit"):
        model = torchvision.models.get_model(name, weights=None, image_size=size)
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised by torchvision
    else:
        model = torchvision.models.get_model(name, weights=None)
    return model.eval()


def make_method(name: str, model_name: str, model: torch.nn.Module):
    vit = model_name.startswith("vit")
    layer = VIT_LAYER if vit else "layer4"
    cam_options = {"reshape_transform": TokensToGrid(prefix_tokens=1)} if vit else {}
    if name == "saliency":
        return pyattr.Saliency(model)
    if name == "gradcam":
        return pyattr.GradCAM(model, layer, **cam_options)
    if name == "guided_backprop":
        return pyattr.GuidedBackprop(model)
    if name == "lrp":
        return pyattr.LRP(model, "epsilon_plus")
    if name == "fullgrad":
        return pyattr.FullGrad(model)
    if name == "integrated_gradients":
        return pyattr.IntegratedGradients(model)
    if name == "smoothgrad":
        return pyattr.SmoothGrad(model)
    if name == "scorecam":
        return pyattr.ScoreCAM(model, layer, **cam_options)
    raise SystemExit(f"unknown method {name!r}; use {', '.join(SINGLE_PASS + MULTI_PASS)}")


def ort_time(path: Path, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one onnxruntime run of the exported graph (CPU, 1 intra-op thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = {names[0]: x.numpy()}
    if "target" in names:
        feeds["target"] = torch.full((x.shape[0],), -1, dtype=torch.long).numpy()
    sess.run(None, feeds)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def reference(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(None):  # torch.onnx prints its steps
            torch.onnx.export(model, (x,), str(path), dynamo=True)


def run_model(model_name: str, args, tmp: Path) -> dict:
    model = make_model(model_name, args.size)
    x = torch.rand(1, 3, args.size, args.size)
    out: dict = {"model": model_name, "reference": [], "cases": []}
    ref_path = tmp / f"{model_name}_plain.onnx"

    def run_reference(label: str):
        row = timed(lambda: reference(model, x, ref_path))
        row["label"] = label
        if args.ort:
            row["ort_s"] = ort_time(ref_path, x, args.ort_repeats)
        out["reference"].append(row)
        print(f"  reference torch.onnx.export ({label}): {row['wall']:.1f} s wall, {row['cpu']:.1f} s cpu, "
              f"load {row['load']:.1f}", flush=True)

    run_reference("warm-up")
    run_reference("before")
    for method_name in args.methods:
        for fmt in args.formats:
            row: dict = {"model": model_name, "method": method_name, "format": fmt,
                         "kind": "single" if method_name in SINGLE_PASS else "multi"}
            path = tmp / f"{model_name}_{method_name}{FORMATS[fmt]}"
            start = time.perf_counter()
            try:
                method = make_method(method_name, model_name, model)
                with time_limit(args.timeout):
                    row.update(timed(functools.partial(pyattr.export, method, x, path)))
                row["status"] = "ok"
                row["bytes"] = path.stat().st_size
                if fmt == "onnx" and args.ort:
                    row["ort_s"] = ort_time(path, x, args.ort_repeats)
            except NoRuleError as err:
                row.update(status="no_rule", error=str(err).splitlines()[0][:200])
            except Timeout as err:
                row.update(status="timeout", error=str(err), wall=float(args.timeout))
            except Exception as err:  # noqa: BLE001 - a benchmark records every failure
                if isinstance(err.__cause__, NoRuleError):  # raised while tracing, wrapped in an ExportError
                    row.update(status="no_rule", error=str(err.__cause__).splitlines()[0][:200])
                elif time.perf_counter() - start >= args.timeout - 1:  # the alarm, wrapped by torch in its own error
                    row.update(status="timeout", error=f"timed out after {args.timeout} s", wall=float(args.timeout))
                else:
                    row.update(status="error", error=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
                if args.verbose:
                    traceback.print_exc()
            finally:
                path.unlink(missing_ok=True)
            out["cases"].append(row)
            stages = " ".join(f"{k}={v:.1f}" for k, v in row.get("stages", {}).items() if v >= 0.05)
            print(f"  {method_name:22s} {fmt:11s} {row['status']:8s} {row.get('wall', 0):7.1f} s  {stages}"
                  + (f"  {row.get('error', '')}" if row["status"] != "ok" else ""), flush=True)
    run_reference("after")
    return out


# ---------------------------------------------------------------------------------------------- report
def environment(args) -> dict:
    import onnx
    import onnxruntime
    import onnxscript

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__, "torch_threads": torch.get_num_threads(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "size": args.size,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(env: dict, results: list[dict]) -> str:
    lines = ["# Export time: pyattr.export against torch.onnx.export of the plain model", "",
             f"- command: `{env['command']}`",
             (f"- machine: {env['cpu']}, {env['cores']} cores (shared: load average in the table), "
              f"torch threads {env['torch_threads']}"),
             (f"- torch {env['torch']}, torchvision {env['torchvision']}, onnx {env['onnx']}, "
              f"onnxscript {env['onnxscript']}, onnxruntime {env['onnxruntime']}, Python {env['python']}"),
             f"- input 1x3x{env['size']}x{env['size']}, random-init weights; {env['date']}",
             ("- `ratio` = export wall time / mean wall time of the timed reference runs (before and after), "
              "`cpu ratio` the same with process CPU time (the steadier one on a shared machine); stages in "
              "CPU seconds, exclusive (see the script's docstring); `ort ms`: one onnxruntime run of "
              "the exported graph, batch 1, 1 thread, median"), ""]
    for res in results:
        timed_refs = [r for r in res["reference"] if r["label"] != "warm-up"]
        ref = statistics.mean(r["wall"] for r in timed_refs)
        ref_cpu = statistics.mean(r["cpu"] for r in timed_refs)
        lines.append(f"## {res['model']}")
        lines.append("")
        refs = ", ".join(f"{r['label']} {r['wall']:.1f} s (cpu {r['cpu']:.1f}, load {r['load']:.1f}"
                         + (f", ort {1000 * r['ort_s']:.0f} ms" if "ort_s" in r else "") + ")"
                         for r in res["reference"])
        lines.append(f"Reference `torch.onnx.export(model, x, dynamo=True)`: {refs}; mean of timed runs "
                     f"{ref:.1f} s wall, {ref_cpu:.1f} s cpu.")
        lines.append("")
        header = ["method", "kind", "format", "status", "wall s", "cpu s", "ratio", "cpu ratio", "load", *STAGES, "MB",
                  "ort ms"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in res["cases"]:
            stages = row.get("stages_cpu", {})
            cells = [row["method"], row["kind"], row["format"], row["status"]]
            if row["status"] == "ok":
                cells += [f"{row['wall']:.1f}", f"{row['cpu']:.1f}", f"{row['wall'] / ref:.2f}",
                          f"{row['cpu'] / ref_cpu:.2f}", f"{row['load']:.1f}"]
                cells += [f"{stages.get(s, 0.0):.1f}" for s in STAGES]
                cells += [f"{row['bytes'] / 1e6:.0f}", f"{1000 * row['ort_s']:.0f}" if "ort_s" in row else ""]
            else:
                wall = f">{row['wall']:.0f}" if row["status"] == "timeout" else ""
                cells += [wall, "", "", "", ""] + [""] * len(STAGES) + ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
        errors = [r for r in res["cases"] if r["status"] not in ("ok", "timeout")]
        if errors:
            lines.append("")
            for row in errors:
                lines.append(f"- {row['method']} {row['format']}: {row['status']}: {row.get('error', '')}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,vit_b_16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--methods", default=",".join(SINGLE_PASS + MULTI_PASS))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per export before it is counted a timeout")
    parser.add_argument("--ort", action="store_true", help="time each ONNX graph in onnxruntime (1 thread, batch 1)")
    parser.add_argument("--ort-repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export_time"),
                        help="output path without suffix (.md and .json are written)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="write --out's .md (and a merged .json) from the .json files of earlier runs; export nothing")
    args = parser.parse_args(argv)
    if args.report:
        runs = [json.loads(Path(p).read_text()) for p in args.report]
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=1))
        out.with_suffix(".md").write_text("\n".join(markdown(run["environment"], run["results"]) for run in runs))
        return 0
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    args.formats = [f for f in args.formats.split(",") if f]
    for fmt in args.formats:
        if fmt not in FORMATS:
            parser.error(f"unknown format {fmt!r}; use {', '.join(FORMATS)}")
    for name in args.methods:
        if name not in SINGLE_PASS + MULTI_PASS:
            parser.error(f"unknown method {name!r}; use {', '.join(SINGLE_PASS + MULTI_PASS)}")
    instrument()
    env = environment(args)
    print(f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, load {os.getloadavg()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            print(model_name, flush=True)
            results.append(run_model(model_name, args, Path(tmp)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(env, results))
    print(markdown(env, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
