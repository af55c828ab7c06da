"""The export coverage matrix: every method x model x format, exported once and checked against eager.

The cells of one (model, method) run in one subprocess (a *group*): the model, the method and the eager
references are built once, then each format is exported with the public ``pyattr.export`` and checked, and
its row is recorded as soon as it is ready. Each cell has a timeout (counted from the end of the previous
cell of its group); a cell past it is killed with its group, and the group's unfinished cells are recorded
as ``timeout``, so that one hang or crash does not stop the run. In a cell the method is exported (ONNX,
TorchScript ``.pt`` or torch.export ``.pt2``) from a batch-1 example; the file is loaded once, run at
batches 1 and 3 with mixed targets (-1 = arg-max and explicit class ids) and compared with eager pyattr on the same inputs. Recorded per cell: status
(``ok`` / ``mismatch`` / ``no_rule`` (LRP's NoRuleError, counted separately) / ``error`` with its type
and stage / ``timeout``), the error's first line, the max abs error of the normalized maps, the max
error of the raw map relative to its largest value, the export seconds, and the input size.
A mismatch also records how far eager fp32 itself is from an fp64 eager run on the same inputs
(``eager_vs_fp64``) and how far the export is (``export_vs_fp64``): the fp32 conditioning of the map.

Models: ``builtin`` (pyattr's ShapesNet), every torchvision classification builder
(``torchvision.models.list_models(module=torchvision.models)``, random init, 10 classes) and a
representative timm set (``timm/<name>``, random init). Inputs are 64x64, or the smallest size from
``SIZES`` at which the model's forward runs (e.g. MaxViT: 224), uniform noise; the built-in model's are rendered
images of its shapes data set and its explicit targets classes they show (:class:`ShapesStream`).
Zero-initialised weight matrices (torchvision ViT's head) are re-drawn, otherwise every attribution is exactly 0
and the check compares nothing.

The run is resumable: cells already in the results JSON are skipped (``--redo timeout,error`` runs
those statuses again); the JSON is rewritten after every cell and the markdown after every group.
``--order params`` runs the torchvision builders by parameter count, smallest first.
Results: ``benchmarks/results/export_matrix_<name>.{json,md}``.

    # the full matrix (thousands of cells; many hours on 2 cores), a few methods at a time:
    python benchmarks/export_matrix.py --models all --name full --order params --methods saliency,gradcam \\
        --timeout 900 --jobs 1 --threads 1
    python benchmarks/export_matrix.py --models builtin --name builtin
    python benchmarks/export_matrix.py --models resnet18,timm/vit_tiny_patch16_224 --methods saliency,gradcam \\
        --formats onnx --name try --timeout 300
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
BATCHES = (1, 3)
TOLERANCE = 1e-4  # max abs error of the normalized maps ([0, 1])
SIZES = (64, 80, 96, 112, 128, 160, 192, 224)  # input sizes tried in turn until the model's forward runs
NUM_CLASSES = 10
TIMM_MODELS = {  # family -> a small variant (random init)
    "timm/resnet18": "CNN (ResNet)",
    "timm/regnetx_002": "RegNet",
    "timm/efficientnet_b0": "EfficientNet",
    "timm/mobilenetv3_small_050": "MobileNet-V3",
    "timm/convnext_atto": "ConvNeXt",
    "timm/vit_tiny_patch16_224": "ViT",
    "timm/deit_tiny_patch16_224": "DeiT",
    "timm/swin_tiny_patch4_window7_224": "Swin",
    "timm/mobilevit_xxs": "MobileViT",
    "timm/levit_128s": "LeViT",
}
RESULT_TAG = "EXPORT_MATRIX_CELL "
FULL_COMMAND = "python benchmarks/export_matrix.py --models all --name full --order params --timeout 900 --jobs 1"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere without installing pyattr
    sys.path.insert(0, str(ROOT))


# -- the models --------------------------------------------------------------------------------------
def torchvision_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def expand_models(spec: str) -> list[str]:
    """``torchvision`` / ``timm`` / ``all`` groups and single names, comma-separated, in order, no repeats."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "torchvision":
            names += torchvision_models()
        elif part == "timm":
            names += list(TIMM_MODELS)
        elif part == "all":
            names += ["builtin", *torchvision_models(), *TIMM_MODELS]
        else:
            names.append(part)
    return list(dict.fromkeys(names))


def parameter_count(name: str) -> int:
    """A torchvision builder's parameter count from its weights' metadata (no model built); 0 for the others."""
    if family(name) != "torchvision":
        return 0
    import torchvision

    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except (ValueError, KeyError, AttributeError):
        return 0


def family(name: str) -> str:
    if name == "builtin":
        return "builtin"
    return "timm" if name.startswith("timm/") else "torchvision"


def _build(name: str, size: int):
    import torch

    torch.manual_seed(0)
    if name == "builtin":
        import pyattr

        return pyattr.zoo.load_builtin()
    if name.startswith("timm/"):
        import timm

        try:
            return timm.create_model(name[5:], pretrained=False, num_classes=NUM_CLASSES, img_size=size)
        except TypeError:  # models without an img_size argument take any size
            torch.manual_seed(0)
            return timm.create_model(name[5:], pretrained=False, num_classes=NUM_CLASSES)
    import torchvision

    kwargs: dict[str, Any] = {}
    if name.startswith("vit_"):
        kwargs["image_size"] = size
    elif name.startswith("maxvit"):
        kwargs["input_size"] = (size, size)
    return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs)


def _redraw_zero_weights(model) -> None:
    """Re-draw weight matrices that are all zero (torchvision ViT's head): with them every attribution
    is exactly 0. Done once on the freshly built model, before any method sees it."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not bool(module.weight.any()):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)


def make_model(name: str):
    """(model in eval mode, input size): the first size of ``SIZES`` whose forward runs (64 for builtin)."""
    import torch

    last: Exception | None = None
    for size in (64,) if name == "builtin" else SIZES:
        try:
            model = _build(name, size).eval()
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
        except Exception as err:  # noqa: BLE001 - try the next size
            last = err
            continue
        _redraw_zero_weights(model)
        return model, size
    raise RuntimeError(f"no input size in {SIZES} runs the model's forward: {last}")


# -- one cell (runs in a subprocess) -----------------------------------------------------------------
def first_line(err: BaseException) -> str:
    text = _ANSI.sub("", str(err)).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def error_detail(err: BaseException) -> str:
    """What the first line often does not say (torch.onnx's first line is "Failed to convert the exported
    program..."): the first line of the cause, else the first later line that names an error."""
    cause = err.__cause__ or err.__context__
    if cause is not None and first_line(cause) != first_line(err):
        return f"{type(cause).__name__}: {first_line(cause)}"
    for line in _ANSI.sub("", str(err)).strip().splitlines()[1:]:
        if re.search(r"Error|No ONNX function|not supported|Unsupported", line):
            return line.strip()[:300]
    return ""


def load_backend(fmt: str, path: Path):
    """The exported file, loaded once, as a function (images, target) -> its outputs as tensors."""
    import torch

    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x, t: [torch.from_numpy(o) for o in sess.run(None, {"images": x.numpy(), "target": t.numpy()})]
    module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    return lambda x, t: list(module(x, t))


_TOKEN_HINT = re.compile(r"TokensToGrid\(prefix_tokens=(\d+)\), e\.g\. layer='([^']+)'")
"""The layer and prefix tokens that a CAM's InputError on a token model (ViT, DeiT) suggests."""
_NHWC_HINT = re.compile(r"reshape_transform=lambda t: t\.permute\(0, 3, 1, 2\), e\.g\. layer='([^']+)'")
"""The layer that a CAM's InputError on a channels-last model (timm's Swin) suggests, with :func:`nhwc_to_nchw`."""


def nhwc_to_nchw(t):
    """A channels-last (N, h, w, C) layer output as the (N, C, h, w) map a CAM takes."""
    return t.permute(0, 3, 1, 2)


def _fp64_errors(model, method_name: str, layer, x, t, ref_maps, out_maps, **options) -> dict[str, float]:
    """How far eager fp32 and the export are from an fp64 eager run on the same inputs."""

    from pyattr.methods import build_method

    m64 = build_method(method_name, copy.deepcopy(model).double(), layer, **options)
    maps64 = m64(x.double(), t).maps
    return {"eager_vs_fp64": float((ref_maps.double() - maps64).abs().max()),
            "export_vs_fp64": float((out_maps.double() - maps64).abs().max())}


class ShapesStream:
    """The built-in model's inputs: consecutive rendered images of its shapes data set (seed 1) and their multi-hot
    labels. On uniform noise the trained ShapesNet sees none of its classes, and the Grad-CAM-type maps of a class
    it does not see can be constant (the ReLU of a weighted sum that is < 0 everywhere), which compares nothing."""

    def __init__(self, size: int):
        self.size, self.start = size, 0

    def take(self, n: int):
        import torch

        from pyattr.zoo.shapes import generate

        batch = generate(n, seed=1, size=self.size, start=self.start)
        self.start += n
        return torch.from_numpy(batch.images).permute(0, 3, 1, 2).float().div(255), torch.from_numpy(batch.labels)


def _unoptimized_error(path: Path, x, t, ref_maps, out_maps) -> float:
    """The max abs error of the maps when onnxruntime runs the file with its graph optimizations off: a mismatch
    that goes away there comes from them (e.g. Conv+BatchNorm fusion rounding a ReLU's input across 0 and
    flipping its gradient mask), not from the exported graph."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    maps = torch.from_numpy(session.run(None, {"images": x.numpy(), "target": t.numpy()})[3])
    return float((maps - ref_maps).abs().max())


class _Lazy:
    """A value computed on first use, its exception kept and raised again on every later use."""

    def __init__(self, compute):
        self.compute, self.done, self.value, self.error = compute, False, None, None

    def get(self):
        if not self.done:
            self.done = True
            try:
                self.value = self.compute()
            except Exception as err:  # noqa: BLE001 - raised again below, to every format that needs it
                self.error = err
        if self.error is not None:
            raise self.error
        return self.value


def _error_row(row: dict[str, Any], err: BaseException, stage: str) -> dict[str, Any]:
    from pyattr.methods.lrp.method import NoRuleError

    row["status"] = "no_rule" if isinstance(err, NoRuleError) else "error"
    row.update(stage=stage, error_type=type(err).__name__, error=first_line(err), detail=error_detail(err),
               trace="".join(traceback.format_exception(err, limit=4))[-800:])
    return row


def run_group(model_name: str, method_name: str, formats: list[str], tmp: Path,
              batches: tuple[int, ...] = BATCHES, emit=None) -> list[dict[str, Any]]:
    """Export one (model, method) to each of ``formats`` and check every file against eager: one row per format.

    The model, the method and the eager references (batches ``batches``, mixed targets) are built once for the
    group; each format is then exported with the public ``pyattr.export`` and checked as a single cell would
    be. ``emit(row)`` is called as soon as a format's row is ready. A failure before the export (the model,
    the method, its eager run) is every format's row, with that stage."""
    import torch

    import pyattr
    from pyattr.methods import build_method

    rows: list[dict[str, Any]] = []
    base: dict[str, Any] = {"model": model_name, "method": method_name, "family": family(model_name)}

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        if emit is not None:
            emit(row)

    stage = "model"
    try:
        model, size = make_model(model_name)
        base["size"] = size
        stage = "build"
        layer = "layer3" if model_name == "builtin" and pyattr.methods.needs_layer(method_name) else None
        options: dict[str, Any] = {}
        method = build_method(method_name, model, layer)
        gen = torch.Generator().manual_seed(1)
        stage = "eager"
        stream = ShapesStream(size) if model_name == "builtin" else None
        example = torch.rand(1, 3, size, size, generator=gen) if stream is None else stream.take(1)[0]
        try:
            method(example)  # resolves an automatic CAM layer; eager errors are told apart from export errors
        except pyattr.InputError as err:  # a token or channels-last model: the CAM's variant the error names
            token, nhwc = _TOKEN_HINT.search(str(err)), _NHWC_HINT.search(str(err))
            if token is not None:
                layer = token.group(2)
                options = {"reshape_transform": pyattr.TokensToGrid(prefix_tokens=int(token.group(1)))}
                variant = f"token layer {layer!r}, TokensToGrid(prefix_tokens={token.group(1)})"
            elif nhwc is not None:
                layer = nhwc.group(1)
                options = {"reshape_transform": nhwc_to_nchw}
                variant = f"channels-last layer {layer!r}, reshape_transform=permute(0, 3, 1, 2)"
            else:
                raise
            method = build_method(method_name, model, layer, **options)
            method(example)
            base["variant"] = variant
        layer = getattr(method, "layer_name", None)
        base["layer"] = layer
    except Exception as err:  # noqa: BLE001 - the matrix records every failure and goes on
        for fmt in formats:
            done(_error_row({**base, "format": fmt}, err, stage))
        return rows

    def eager_references():  # per batch: (x, t, eager result); the same draws as a cell run alone
        refs = []
        for b in batches:
            if stream is None:
                x = torch.rand(b, 3, size, size, generator=gen)
                ref = method(x)  # arg-max classes, to draw explicit ids of the model's own range
                t = torch.randint(0, ref.scores.shape[1], (b,), generator=gen)
            else:  # a class each image shows: an absent one can have a constant map (Grad-CAM's ReLU of all < 0)
                x, labels = stream.take(b)
                t = torch.multinomial(labels, 1, generator=gen)[:, 0]
            t[::2] = -1
            refs.append((x, t, method(x, t)))
        return refs

    references = _Lazy(eager_references)  # after the first export, as a cell run alone computes them
    for fmt in formats:
        row: dict[str, Any] = {**base, "format": fmt}
        stage = "export"
        try:
            path = tmp / f"cell{FORMATS[fmt]}"
            t0 = time.perf_counter()
            pyattr.export(method, example, path)
            row["export_s"] = round(time.perf_counter() - t0, 1)
            stage = "run"
            worst_maps = worst_raw = 0.0
            worst = None
            exported = load_backend(fmt, path)  # once for every batch
            for x, t, ref in references.get():
                b = x.shape[0]
                out = exported(x, t)
                if not torch.equal(out[1], ref.target):
                    raise AssertionError(f"explained classes differ at batch {b}: {out[1].tolist()} vs "
                                         f"{ref.target.tolist()}")
                flat = ref.raw.flatten(1)
                if bool((flat.amax(1) == flat.amin(1)).any()):  # a constant raw map: the check compares nothing
                    row["constant_maps"] = True
                err_maps = float((out[3] - ref.maps).abs().max())
                err_raw = float((out[2] - ref.raw).abs().max() / ref.raw.abs().max().clamp_min(1e-30))
                if worst is None or err_maps > worst_maps:
                    worst = (x, t, ref.maps, out[3])
                worst_maps, worst_raw = max(worst_maps, err_maps), max(worst_raw, err_raw)
            row.update(max_abs_maps=worst_maps, max_rel_raw=worst_raw)
            row["status"] = "ok" if worst_maps <= TOLERANCE else "mismatch"
            if row["status"] == "mismatch":
                stage = "fp64"
                if fmt == "onnx":  # onnxruntime's graph optimizations (Conv+BN fusion) round differently
                    row["onnx_unoptimized_maps"] = _unoptimized_error(path, *worst)
                row.update(_fp64_errors(model, method_name, layer, *worst, **options))
        except Exception as err:  # noqa: BLE001 - the matrix records every failure and goes on
            if stage == "fp64":
                row["fp64_error"] = first_line(err)
            else:
                _error_row(row, err, stage)
        finally:
            path.unlink(missing_ok=True)
        done(row)
    return rows


def run_cell(model_name: str, method_name: str, fmt: str, tmp: Path,
             batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    """Export one (model, method) to ``fmt`` and check it against eager; returns the cell's row."""
    return run_group(model_name, method_name, [fmt], tmp, batches)[0]


def group_main(spec: str, threads: int, batches: tuple[int, ...]) -> None:
    """Child process entry: run one (model, method) group, print each format's row as one tagged JSON line
    as soon as it is ready (the driver records it at once)."""
    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    model_name, method_name, formats = json.loads(spec)
    with tempfile.TemporaryDirectory() as tmp:
        run_group(model_name, method_name, formats, Path(tmp), batches,
                  emit=lambda row: print(RESULT_TAG + json.dumps(row), flush=True))


# -- the driver --------------------------------------------------------------------------------------
def key(row: dict) -> tuple[str, str, str]:
    return row["model"], row["method"], row["format"]


def run_group_in_subprocess(model_name: str, method_name: str, formats: list[str], timeout: float, threads: int,
                            batches: tuple[int, ...] = BATCHES, on_row=None) -> list[dict[str, Any]]:
    """Run one (model, method) group in a fresh Python; ``on_row(row)`` gets each format's row as it arrives.

    Each cell has ``timeout`` s from the end of the previous one (the first: from the start, so that it pays
    for the process start, the imports, the model and the eager references as a cell run alone did). A cell
    past it is recorded as ``timeout`` and the group is killed (with its process group); the formats it did
    not reach are recorded as ``timeout`` too ("not reached"), to run again with ``--redo timeout``. A child
    that dies records its unfinished cells as ``error`` (stage ``process``) with the last line of its stderr.
    ``cell_s``: the seconds from the previous cell's end (or the start) to this cell's."""
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    fam = family(model_name)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--group", json.dumps([model_name, method_name, formats]),
           "--threads", str(threads), "--batches", ",".join(map(str, batches))]
    pending = list(formats)
    with tempfile.TemporaryFile(mode="w+") as errfile:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errfile, text=True, env=env,
                                start_new_session=True)
        lines: queue.Queue = queue.Queue()

        def read() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        last = time.perf_counter()
        try:
            while pending:
                try:
                    line = lines.get(timeout=max(0.0, timeout - (time.perf_counter() - last)))
                except queue.Empty:
                    now = time.perf_counter()
                    os.killpg(proc.pid, signal.SIGKILL)
                    record({"model": model_name, "method": method_name, "format": pending[0], "family": fam,
                            "status": "timeout", "error": f"no result within {timeout:g} s",
                            "cell_s": round(now - last, 1)})
                    for fmt in pending[1:]:
                        record({"model": model_name, "method": method_name, "format": fmt, "family": fam,
                                "status": "timeout", "cell_s": 0.0,
                                "error": f"not reached: the group was killed when {pending[0]} ran past {timeout:g} s"})
                    pending = []
                    break
                if line is None:  # the child ended without a row for every format
                    proc.wait()
                    errfile.seek(0)
                    tail = [ln for ln in errfile.read().strip().splitlines() if ln.strip()]
                    now = time.perf_counter()
                    for fmt in pending:
                        record({"model": model_name, "method": method_name, "format": fmt, "family": fam,
                                "status": "error", "stage": "process", "error_type": f"exit {proc.returncode}",
                                "error": (tail[-1] if tail else "the cell printed no result")[:300],
                                "cell_s": round(now - last, 1)})
                        last = now
                    pending = []
                    break
                if line.startswith(RESULT_TAG):
                    now = time.perf_counter()
                    row = {"model": model_name, "method": method_name, "family": fam,
                           **json.loads(line[len(RESULT_TAG):]), "cell_s": round(now - last, 1)}
                    last = now
                    if row["format"] in pending:
                        pending.remove(row["format"])
                    record(row)
        finally:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=60)  # the child ends after its last row
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    return rows


def run_in_subprocess(cell: tuple[str, str, str], timeout: float, threads: int,
                      batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    """Run one cell in a fresh Python (a group of one format); killed past ``timeout`` s."""
    model_name, method_name, fmt = cell
    return run_group_in_subprocess(model_name, method_name, [fmt], timeout, threads, batches)[0]


class Results:
    """The results JSON, rewritten (atomically) after every cell so that a run can be resumed."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path = path
        self.lock = threading.Lock()
        self.rows: dict[tuple[str, str, str], dict] = {}
        self.meta = meta
        if path.exists():
            data = json.loads(path.read_text())
            self.rows = {key(r): r for r in data.get("results", [])}

    def add(self, row: dict) -> None:
        with self.lock:
            self.rows[key(row)] = row
            self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "results": list(self.rows.values())}, indent=1) + "\n")
        tmp.replace(self.path)


def cell_text(row: dict | None) -> str:
    if row is None:
        return "·"
    status = row["status"]
    if status == "ok":
        flag = " (constant map!)" if row.get("constant_maps") else ""
        return f"ok {row['max_abs_maps']:.0e} ({row['export_s']:.0f}s){flag}"
    if status == "mismatch":
        return f"**mismatch {row['max_abs_maps']:.1e}** ({row['export_s']:.0f}s)"
    if status == "no_rule":
        return "NoRuleError"
    if status == "timeout":
        return "timeout"
    return f"{row.get('error_type', 'error')} ({row.get('stage', '?')})"


def _rate(rows: list[dict]) -> str:
    ok = sum(r["status"] == "ok" for r in rows)
    return f"{ok}/{len(rows)} ({100 * ok / len(rows):.1f}%)" if rows else "0/0"


def markdown(rows: list[dict], meta: dict, formats: list[str]) -> str:
    """The readable report: pass-rate summary, per-model grid, mismatches and distinct errors."""
    from collections import Counter

    lines = [f"# Export matrix: {meta.get('label') or meta['name']}", "",
             (f"pyattr {meta['pyattr']}, torch {meta['torch']}, onnxruntime {meta.get('onnxruntime')}, "
             f"timm {meta.get('timm')}, CPU ({meta['threads']} thread(s) per cell, {meta['jobs']} job(s) at once), "
             f"per-cell timeout {meta['timeout']} s. Exported at batch 1, checked against eager at batches "
             f"{meta['batches']} with mixed targets; `ok`: normalized maps within {TOLERANCE:g} (max abs) and the same "
             "explained classes. Grid cells: status, max abs error of the maps, export seconds. Inputs: uniform noise; "
             "the built-in model's: rendered images of its shapes data set, explicit targets a class each shows."), "",
             f"Command: `{meta['command']}`", "",
             f"The full matrix (resumable; thousands of cells, many hours on 2 cores): `{FULL_COMMAND}`", ""]
    statuses = ("ok", "mismatch", "no_rule", "error", "timeout")
    lines += ["## Summary", "", "| models | cells | ok | ok, NoRuleError cells left out | " + " | ".join(statuses[1:]) + " |",
              "|---|---|---|---|" + "---|" * (len(statuses) - 1)]
    for fam in ("builtin", "torchvision", "timm"):
        fam_rows = [r for r in rows if r["family"] == fam]
        if not fam_rows:
            continue
        count = Counter(r["status"] for r in fam_rows)
        models = len({r["model"] for r in fam_rows})
        lines.append(f"| {fam} ({models} models) | {len(fam_rows)} | {_rate(fam_rows)} | "
                     f"{_rate([r for r in fam_rows if r['status'] != 'no_rule'])} | "
                     + " | ".join(str(count.get(s, 0)) for s in statuses[1:]) + " |")
    timm_rows = [r for r in rows if r["family"] == "timm"]
    if timm_rows:
        lines += ["", "timm, per method (all formats; NoRuleError counted apart):", "",
                  "| method | ok | NoRuleError | models passing every format |", "|---|---|---|---|"]
        for method in dict.fromkeys(r["method"] for r in timm_rows):
            mrows = [r for r in timm_rows if r["method"] == method]
            by_model: dict[str, list[dict]] = {}
            for r in mrows:
                by_model.setdefault(r["model"], []).append(r)
            passing = sum(all(r["status"] == "ok" for r in rs) for rs in by_model.values())
            lines.append(f"| {method} | {_rate(mrows)} | {sum(r['status'] == 'no_rule' for r in mrows)} | "
                         f"{passing}/{len(by_model)} |")
    by_cell = {key(r): r for r in rows}
    lines += ["", "## Cells", "", "| model | size | method | " + " | ".join(formats) + " |",
              "|---|---|---|" + "---|" * len(formats)]
    for model in dict.fromkeys(r["model"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model):
            size = next((r.get("size") for r in rows if r["model"] == model and r.get("size")), "")
            lines.append(f"| {model} | {size} | {method} | "
                         + " | ".join(cell_text(by_cell.get((model, method, f))) for f in formats) + " |")
    mismatches = [r for r in rows if r["status"] == "mismatch"]
    if mismatches:
        lines += ["", "## Mismatches", "",
                  ("`eager_vs_fp64` / `export_vs_fp64`: max abs error of eager fp32 / of the export against an fp64 "
                  "eager run on the same inputs (the worst batch); `onnxruntime unoptimized`: the ONNX file's error "
                  "against eager with onnxruntime's graph optimizations off (small: the optimizations cause it)."), "",
                  ("| model | method | format | max abs (maps) | max rel (raw) | eager_vs_fp64 | export_vs_fp64 "
                   "| onnxruntime unoptimized |"),
                  "|---|---|---|---|---|---|---|---|"]
        for r in mismatches:
            unopt = r.get("onnx_unoptimized_maps")
            lines.append(f"| {r['model']} | {r['method']} | {r['format']} | {r['max_abs_maps']:.1e} | "
                         f"{r['max_rel_raw']:.1e} | {r.get('eager_vs_fp64', float('nan')):.1e} | "
                         f"{r.get('export_vs_fp64', float('nan')):.1e} | {'' if unopt is None else f'{unopt:.1e}'} |")
    errors = Counter((r["status"], r.get("error_type", ""), r.get("stage", ""),
                      r.get("error", "") + (f" [{r['detail'][:110]}]" if r.get("detail") else ""))
                     for r in rows if r["status"] in ("error", "no_rule", "timeout"))
    if errors:
        lines += ["", "## Errors (distinct first lines)", "", "| cells | status | type (stage) | first line |",
                  "|---|---|---|---|"]
        for (status, etype, stage, msg), n in errors.most_common():
            msg = msg.replace("|", "\\|").replace("\n", " ")[:240]
            lines.append(f"| {n} | {status} | {etype} ({stage}) | {msg} |")
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    import torch

    import pyattr

    meta: dict[str, Any] = {"pyattr": pyattr.__version__, "torch": torch.__version__, "batches": list(BATCHES),
                            "tolerance": TOLERANCE, "device": "cpu"}
    for mod in ("onnxruntime", "timm", "torchvision"):
        try:
            meta[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="builtin",
                        help="comma-separated names, torchvision builders, timm/<name>, or the groups "
                             "torchvision, timm, all (default builtin)")
    parser.add_argument("--methods", default="all", help="comma-separated method names (default: every registered one)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, from onnx,torchscript,pt2")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per cell (from the end of the previous cell of its (model, "
                             "method) group) before the group is killed (default 900)")
    parser.add_argument("--jobs", type=int, default=1, help="(model, method) groups run at once (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch/onnxruntime threads per cell (default 1)")
    parser.add_argument("--name", default=None, help="results go to export_matrix_<name>.{json,md} (default: --models)")
    parser.add_argument("--label", default="", help="a title for the report (e.g. 'partial slice')")
    parser.add_argument("--redo", default="", help="statuses to run again although recorded (e.g. timeout,error)")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the results (default benchmarks/results)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)),
                        help="batch sizes the exported file is checked at (default 1,3)")
    parser.add_argument("--report-only", action="store_true",
                        help="run no cell: rewrite the .md from the cells recorded in the .json")
    parser.add_argument("--order", choices=("given", "params"), default="given",
                        help="model order: as given, or torchvision builders by parameter count, smallest first "
                             "(the others, whose count is not known before building them, first)")
    parser.add_argument("--group", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(","))
    if args.group:
        group_main(args.group, args.threads, batches)
        return 0

    from pyattr.methods import METHODS

    models = expand_models(args.models)
    if args.order == "params":
        models.sort(key=parameter_count)
    methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for name, known, what in ((methods, METHODS, "method"), (formats, FORMATS, "format")):
        unknown = [n for n in name if n not in known]
        if unknown:
            parser.error(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    name = args.name or re.sub(r"[^A-Za-z0-9_.-]+", "_", args.models)
    out = Path(args.results) / f"export_matrix_{name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**environment(), "batches": list(batches), "name": name, "label": args.label, "timeout": args.timeout, "jobs": args.jobs,
            "threads": args.threads, "command": "python benchmarks/export_matrix.py " + " ".join(
                a if a and not re.search(r"[\s'\"]", a) else json.dumps(a) for a in (argv or sys.argv[1:]))}
    results = Results(out.with_suffix(".json"), meta)
    redo = {s for s in args.redo.split(",") if s}
    cells = [(m, me, f) for m in models for me in methods for f in formats]
    todo = [c for c in cells if c not in results.rows or results.rows[c]["status"] in redo]
    if args.report_only:  # keep the recorded run's description (its command, timeout, jobs)
        todo = []
        if results.path.exists():
            results.meta = {**meta, **json.loads(results.path.read_text()).get("meta", {})}
    recorded = sum(c in results.rows for c in cells)
    groups = list(dict.fromkeys((m, me) for m, me, _ in todo))  # one subprocess per (model, method)
    print(f"{len(cells)} cells, {recorded} already recorded, {len(todo)} to run in {len(groups)} groups", flush=True)

    def write_report() -> None:
        with results.lock:
            rows = list(results.rows.values())  # the whole file: also cells of earlier runs with other options
            shown = [f for f in FORMATS if any(r["format"] == f for r in rows)]
            out.with_suffix(".md").write_text(markdown(rows, results.meta, shown))

    def on_row(row: dict) -> None:
        results.add(row)
        detail = row.get("max_abs_maps", row.get("error", ""))
        print(f"{row['model']:28s} {row['method']:24s} {row['format']:11s} {row['status']:8s} "
              f"{row.get('export_s', '')!s:>6} {row.get('cell_s', '')!s:>6} {detail}", flush=True)

    def work(group: tuple[str, str]) -> None:
        fmts = [f for f in formats if group + (f,) in todo]
        run_group_in_subprocess(*group, fmts, args.timeout, args.threads, batches, on_row)
        write_report()  # the .md follows the .json group by group

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(work, groups))
    write_report()
    rows = list(results.rows.values())
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{ok}/{len(rows)} ok; wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
