"""Speed of explaining detections (issue 15 item 7): the top 10 boxes of one image, Grad-CAM.

Configurations: the built-in detector (:class:`pyattr.zoo.detmodel.ShapesDetNet`, shipped weights) on a shapes
image at 64x64 and 256x256, and torchvision's ``retinanet_resnet50_fpn`` (random init, seeded, through
:class:`pyattr.detection.DenseCandidates`, the CAM layers :func:`pyattr.detection.feature_levels`, fused) at
320x320. Boxes: the image's 10 highest-scoring candidates (score = a candidate's best class score; label =
that class); each is explained separately (10 maps). Contenders, timed side by side in one run (interleaved
rounds, ``benchmarks/_bench/timing.py``; median of the rounds):

- ``forward``: the detector's own forward (raw output / candidates) under ``no_grad``;
- ``forward + backward to the input``: the bound of the brief: one forward with autograd and one backward of
  the 10 boxes' summed matched scores to the input;
- ``forward + backward to the CAM layer(s)``: the same, the backward only to the CAM layers' outputs (what one
  Grad-CAM backward needs);
- ``forward + 10 backward to the CAM layer(s), 1 per box``: what 10 separate maps need at least (one forward,
  one backward per box to the layers' outputs, the graph retained): Grad-CAM's own bound for 10 boxes;
- ``pyattr Grad-CAM eager``: ``GradCAM(model, layer)(x, DetectionTarget(boxes, labels))``, the 10 boxes in
  one call (one forward, one backward per box to the layers, maps normalized at input size);
- ``pyattr Grad-CAM ONNX``: the same graph exported once (``pyattr.export``, B = 10) and run in onnxruntime
  (CPU provider, 1 intra-op thread);
- ``pytorch-grad-cam GradCAM, 1 call per box``: ``pytorch_grad_cam.GradCAM`` on the same layers, one call per
  box with :class:`BoxScoreTarget` (a benchmark-only target written the way its ``FasterRCNNBoxScoreTarget``
  is: ``box_iou`` of the box with every candidate, the arg-max, the matched class score when IoU > 0.5;
  the score alone, as pyattr's default objective, not score + IoU), the model wrapped to return one
  (N, M, 4 + K) tensor (grad-cam iterates over the batch of the output);
- ``pytorch-grad-cam GradCAM, 10 copies in 1 call``: its batching of targets: the image repeated 10 times,
  one target per copy (built-in detector only; 10 x RetinaNet's activations is the memory of a batch of 10).

The grad-cam maps are checked against pyattr's (Pearson correlation per box) so that both do the same work.

    OMP_NUM_THREADS=1 python benchmarks/detection_speed.py            # all three configurations
    python benchmarks/detection_speed.py --configs builtin64 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _bench.env import describe, load_average
from _bench.timing import Contender, measure, quartiles

import pyattr
from pyattr.detection import DenseCandidates, feature_levels
from pyattr.targets import DetectionTarget
from pyattr.zoo.detmodel import DETMODEL_LAYER, decode_detections, load_builtin_detector
from pyattr.zoo.shapes import generate

BOXES = 10
CONFIGS = {"builtin64": ("builtin", 64), "builtin256": ("builtin", 256), "retinanet320": ("retinanet", 320)}


NOTES = [
    ("- The machine was shared with 3-8 other jobs (load averages above) on 2 cores: absolute times are inflated and "
    "noisy (RetinaNet's forward median came out above forward + backward to the layers), the ratios of one round are "
    "the steadier numbers."),
    ("- Where pyattr's time goes (profile, built-in detector at 256 px, 10 boxes): the forward (~65%), the 10 backward "
    "passes to the layer (~15%), post-processing of 10 maps at 256x256 with the validity checks (~10%: "
    "normalize_minmax's where/isfinite). On RetinaNet pyattr eager is at its bound (forward + 10 backward passes "
    "to the FPN levels, 1.02x of it)."),
    ("- Before commit 280122b Grad-CAM explained B boxes (any (N, T) target) on the batch repeated B times: 10 "
    "forward passes. Built-in detector, 64 px, the same shared machine: 483.6 ms = 6.6x the forward then, "
    "2.42x now (and 384 -> 129 ms in a quieter side-by-side check). These runs used that change (uncommitted in "
    "the recorded pyattr commit b1f11ca, committed as 280122b)."),
    ("- Export cost of that change: the graph holds one backward pass per box. Built-in detector, B = 10, ONNX: "
    "pyattr.export CPU seconds 32.1-32.9 (one backward per box) vs 20.2-21.8 (batch repeated), "
    "2 runs each, interleaved."),
    ("- pytorch-grad-cam calls backward() on the summed target (parameter gradients too) and post-processes in NumPy/"
    "OpenCV per call; one call per box is what its API gives for separate maps of one image (its batch of 10 "
    "copies does the same work in one call)."),
]


class Candidates(nn.Module):
    """The detector as pytorch-grad-cam needs it: one tensor (N, M, 4 + K), candidates' boxes then scores
    (grad-cam zips its targets with the output's first dimension). Holds the detector by reference."""

    def __init__(self, model: nn.Module, decode=None):
        super().__init__()
        self.model = model
        self.decode = decode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        boxes, scores = self.decode(out) if self.decode is not None else out
        return torch.cat([boxes, scores], -1)


class BoxScoreTarget:
    """Benchmark-only pytorch-grad-cam target: pyattr's matched score, computed the way grad-cam's
    ``FasterRCNNBoxScoreTarget`` computes its own (``box_iou``, arg-max, threshold, Python branch), from one
    image's (M, 4 + K) candidates."""

    def __init__(self, label: int, box: torch.Tensor, iou_threshold: float = 0.5):
        self.label = label
        self.box = box
        self.iou_threshold = iou_threshold

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        boxes, scores = output[:, :4], output[:, 4:]
        ious = torchvision.ops.box_iou(self.box[None].to(boxes.dtype), boxes)
        index = ious.argmax()
        if ious[0, index] > self.iou_threshold and scores[index, self.label] > 0:
            return scores[index, self.label]
        return output.sum() * 0


def build(kind: str, size: int):
    """(model as pyattr explains it, decode or None, CAM layer names, image (1, 3, S, S), label)."""
    torch.manual_seed(0)
    if kind == "builtin":
        model = load_builtin_detector()
        image = torch.from_numpy(generate(1, seed=40_000, size=size).images).permute(0, 3, 1, 2).float() / 255
        return model, decode_detections, [DETMODEL_LAYER], image, "pyattr built-in ShapesDetNet (shipped weights)"
    det = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=size,
                                                              max_size=size).eval()
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return DenseCandidates(det), None, feature_levels(det), image, "retinanet_resnet50_fpn (random init, seed 0)"


def top_boxes(model, decode, x: torch.Tensor, k: int = BOXES) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest-scoring candidates (best class score) with an area: boxes (k, 4), labels (k,)."""
    with torch.no_grad():
        out = model(x)
        boxes, scores = decode(out) if decode is not None else out
    h, w = x.shape[-2:]
    boxes = torch.stack((boxes[0, :, 0].clamp(0, w), boxes[0, :, 1].clamp(0, h), boxes[0, :, 2].clamp(0, w),
                         boxes[0, :, 3].clamp(0, h)), -1)
    best, label = scores[0].max(1)
    best = torch.where(torchvision.ops.box_area(boxes) > 1, best, torch.full_like(best, -1))
    order = best.argsort(descending=True)[:k]
    return boxes[order], label[order]


def layer_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    return [model.get_submodule(n) for n in names]


def run_config(name: str, rounds: int, budget: float, log) -> dict:
    import onnxruntime as ort
    import pytorch_grad_cam as pgc

    kind, size = CONFIGS[name]
    model, decode, layers, x, label = build(kind, size)
    boxes, labels = top_boxes(model, decode, x)
    target = DetectionTarget(boxes=boxes, box_classes=labels, decode=decode)
    layer = layers if len(layers) > 1 else layers[0]
    cam = pyattr.GradCAM(model, layer)
    modules = layer_modules(model, layers)

    def objective(out):  # the 10 boxes' matched scores, summed (pyattr's own matching)
        return target.scores(out, target.prepare_inputs(x, target.run_time_inputs(x))).sum()

    def forward():
        with torch.no_grad():
            return model(x)

    def bound_input():
        xi = x.detach().requires_grad_(True)
        return torch.autograd.grad(objective(model(xi)), xi)[0]

    def forward_capturing():  # the model's output and the CAM layers' activations (hooks removed after)
        acts: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _i, o: acts.append(o)) for m in modules]
        try:
            return model(x), acts
        finally:
            for h in handles:
                h.remove()

    def bound_layers():
        out, acts = forward_capturing()
        return torch.autograd.grad(objective(out), acts)

    def bound_layers_per_box():
        out, acts = forward_capturing()
        inputs = target.prepare_inputs(x, target.run_time_inputs(x))
        scores = target.scores(out, inputs)[0]
        return [torch.autograd.grad(scores[j], acts, retain_graph=j + 1 < len(scores)) for j in range(len(scores))]

    log(f"  export ({name}) ...")
    tmp = tempfile.mkdtemp()
    path = Path(tmp) / "gradcam.onnx"
    t0 = time.perf_counter()
    pyattr.export(cam, x, path, target=DetectionTarget(boxes=boxes, box_classes=labels, decode=decode))
    export_s = time.perf_counter() - t0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in sess.get_inputs()],
                     [x.numpy(), boxes[None].numpy().astype(np.float32), labels[None].numpy().astype(np.int64)]))
    log(f"  exported in {export_s:.1f} s")

    peer_model = Candidates(model, decode).eval()
    peer_layers = layer_modules(peer_model.model, layers)
    targets = [BoxScoreTarget(int(c), b) for b, c in zip(boxes, labels)]

    def gradcam_per_box():
        maps = []
        for t in targets:
            with pgc.GradCAM(model=peer_model, target_layers=peer_layers) as gc:
                maps.append(gc(input_tensor=x, targets=[t])[0])
        return np.stack(maps)

    def gradcam_copies():
        with pgc.GradCAM(model=peer_model, target_layers=peer_layers) as gc:
            return gc(input_tensor=x.expand(len(targets), -1, -1, -1).contiguous(), targets=targets)

    free = lambda: peer_model.zero_grad(set_to_none=True)
    contenders = [
        Contender("forward (no_grad)", "reference", "eager", "forward", forward),
        Contender("forward + backward to the input (bound)", "reference", "eager", "bound", bound_input),
        Contender("forward + backward to the CAM layer(s)", "reference", "eager", "bound", bound_layers),
        Contender("forward + 10 backward to the CAM layer(s), 1 per box", "reference", "eager", "bound",
                  bound_layers_per_box),
        Contender("pyattr Grad-CAM eager (10 boxes, 1 call)", "pyattr", "eager", "pyattr", lambda: cam(x, target)),
        Contender("pyattr Grad-CAM ONNX (onnxruntime, 1 thread)", "pyattr", "onnxruntime-cpu", "pyattr",
                  lambda: sess.run(None, feeds)),
        Contender("pytorch-grad-cam GradCAM (1 call per box)", "pytorch-grad-cam", "eager", "peer",
                  gradcam_per_box, after=free),
    ]
    if kind == "builtin":
        contenders.append(Contender("pytorch-grad-cam GradCAM (10 copies, 1 call)", "pytorch-grad-cam", "eager",
                                    "peer", gradcam_copies, after=free))

    # same work: pyattr's maps against grad-cam's, per box
    res = cam(x, target)
    ours = res.maps[0].detach().numpy()
    theirs = gradcam_per_box()
    free()
    ort_maps = sess.run(None, feeds)[3][0]
    corr = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.std() > 0 and b.std() > 0 else None
            for a, b in zip(ours, theirs)]

    load_before = load_average()
    measured = measure(contenders, torch.device("cpu"), warmup=1, min_rounds=rounds, max_rounds=max(rounds, 9),
                       budget_s=budget, log=log)
    load_after = load_average()
    forward_ms = statistics.median(measured[0].times) * 1e3 if measured[0].times else None
    rows = []
    for m in measured:
        row = {"contender": m.contender.name, "library": m.contender.library, "role": m.contender.role,
               "rounds": len(m.times), "error": m.error}
        if m.times:
            q1, med, q3 = quartiles(m.times)
            row.update(ms=round(med * 1e3, 1), q1_ms=round(q1 * 1e3, 1), q3_ms=round(q3 * 1e3, 1),
                       x_forward=round(med * 1e3 / forward_ms, 2) if forward_ms else None)
        rows.append(row)
        log(f"    {row}")
    return {"config": name, "model": label, "size": size, "boxes": BOXES, "layers": layers,
            "matched": res.outputs["matched"][0].tolist(), "export_s": round(export_s, 1),
            "onnx_vs_eager_maps_max_abs": float(np.abs(ort_maps - ours).max()),
            "gradcam_vs_pyattr_corr": [None if c is None else round(c, 4) for c in corr],
            "load_before": load_before, "load_after": load_after, "rows": rows}


def write(results: list[dict], meta: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "configs": results}, indent=1) + "\n")
    lines = [f"# Detection speed: explaining the top {BOXES} boxes of one image with Grad-CAM",
             "", (f"- commands: {', '.join(sorted({'`' + r['command'] + '`' for r in results}))} "
             "(`OMP_NUM_THREADS=1`)"),
             (f"- machine: {meta['cpu']}, {meta['cpu_count']} cores, **shared** (other jobs ran at the same time: "
             "load averages below); torch threads "
             f"{meta['torch_threads']}, onnxruntime 1 intra-op thread (OMP_NUM_THREADS={meta['omp']})"),
             (f"- torch {meta['torch']}, torchvision {meta['torchvision']}, onnxruntime {meta['onnxruntime']}, "
             f"pytorch-grad-cam {meta['peers'].get('grad-cam')}, pyattr {meta['pyattr_commit']}, {meta['date']}"),
             ("- times: median (q1-q3) of interleaved rounds (each contender once per round, rotated order); "
             "`x forward` = median / the forward's median. See the script's docstring for each contender."), ""]
    for r in results:
        lines += [f"## {r['model']}, {r['size']}x{r['size']}", "",
                  (f"CAM layer(s): {', '.join(r['layers'])}; boxes matched (pyattr): {sum(r['matched'])}/{r['boxes']}; "
                  f"pyattr.export to ONNX {r['export_s']} s; ONNX vs eager maps max |diff| "
                  f"{r['onnx_vs_eager_maps_max_abs']:.1e}; grad-cam vs pyattr maps, Pearson r per box: "
                  f"{r['gradcam_vs_pyattr_corr']}; load average before {r['load_before']}, after {r['load_after']}."),
                  "", "| contender | ms | q1-q3 ms | x forward | rounds |", "|---|---|---|---|---|"]
        for row in r["rows"]:
            if row.get("ms") is None:
                lines.append(f"| {row['contender']} | error: {row['error']} | | | |")
            else:
                lines.append(f"| {row['contender']} | {row['ms']} | {row['q1_ms']}-{row['q3_ms']} | "
                             f"{row['x_forward']} | {row['rounds']} |")
        lines.append("")
    lines += ["## Notes", "", *NOTES]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5, help="at least this many timed rounds")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds per configuration")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "detection_speed"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    meta = describe(torch.device("cpu"), 1)
    meta["command"] = "python benchmarks/detection_speed.py " + " ".join(sys.argv[1:])
    meta["omp"] = os.environ.get("OMP_NUM_THREADS")
    out = Path(args.out)
    for name in args.configs.split(","):
        print(f"{name}", flush=True)
        result = run_config(name, args.rounds, args.budget, lambda s: print(s, flush=True))
        result["command"] = meta["command"]
        # merge with the configurations of earlier runs (one process per configuration is allowed)
        old = json.loads(out.with_suffix(".json").read_text())["configs"] if out.with_suffix(".json").exists() else []
        results = [r for r in old if r["config"] != name] + [result]
        results.sort(key=lambda r: list(CONFIGS).index(r["config"]))
        write(results, meta, out)


if __name__ == "__main__":
    main()
