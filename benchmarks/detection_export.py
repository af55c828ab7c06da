"""Detection targets (issue 15) on torchvision's detectors: eager methods, and the export contract per method.

Two parts, each writing one row per (model, method[, format]) to ``benchmarks/results/detection_<part>.{json,md}``:

- ``eager``: every method of the list on the real torchvision detectors (random init, 128 px): RetinaNet, FCOS
  (resnet50 FPN) and SSDlite through :class:`pyattr.detection.DenseCandidates`, Faster R-CNN (mobilenet v3
  FPN) through its post-NMS detections (:class:`pyattr.detection.DetectionsDecoder`). Boxes: three of the
  model's own detections (with an area) and one box no candidate matches. Recorded: seconds, which boxes
  matched, whether the matched boxes' maps are finite and not all zero and the unmatched box's map is zero.
- ``export``: each method exported to ONNX, TorchScript and .pt2 from a batch-1 example with B = 3 boxes, run
  at batches 1 and 2 (one box padded, one unmatched) and compared with eager (tests/contract.py's
  ``assert_detection_contract``): ``ok`` or the first failed check, and the seconds. Models: ``small_fcos``
  (torchvision FCOS on a small body, as in tests/test_targets_detection.py) by default; ``fcos_resnet50_fpn``
  or ``retinanet_resnet50_fpn`` with --models (minutes per export on 2 cores).

    python benchmarks/detection_export.py eager
    python benchmarks/detection_export.py export --models small_fcos,small_retinanet
    python benchmarks/detection_export.py export --models fcos_resnet50_fpn --methods gradcam,saliency

- ``contract``: the export contract measured rather than asserted, on the one-stage torchvision detectors
  (``retinanet_resnet50_fpn``, ``fcos_resnet50_fpn``, ``ssdlite320_mobilenet_v3_large``; random init, 128 px)
  through :class:`pyattr.detection.DenseCandidates` with Grad-CAM (every :func:`feature_levels` level) and
  Saliency: exported once per format from a batch-1 example with B = 3 boxes, then run at batches 1 and 2
  against eager. Boxes: image 0 (the model's own detection, an unmatched corner box, a detection), image 1
  (two detections, one padded with class -1). Recorded per (model, method, format): ``status`` (``ok``: every
  check of tests/contract.py's ``assert_detection_contract`` holds at both batches; ``mismatch``; ``error``
  with the exception, which must be a pyattr ``ExportError`` naming the op), the max |maps| error, the max
  relative scores error, whether ``matched`` is equal, the max |iou| error (each over both batches) and the
  export seconds. One model per process (``--models``) so the models can run in parallel; each run merges
  its rows into ``detection_export_contract.{json,md}``.

    python benchmarks/detection_export.py contract --models retinanet_resnet50_fpn
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import pyattr
from pyattr.detection import DenseCandidates, DetectionsDecoder, feature_levels
from pyattr.methods import build_method, needs_layer
from pyattr.targets import DetectionTarget

D = torchvision.models.detection
METHODS = ("gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "saliency", "inputxgradient",
           "integratedgradients", "smoothgrad", "guidedbackprop")
OPTIONS = {"integratedgradients": {"steps": 8}, "smoothgrad": {"samples": 4}}


def build(name: str, size: int):
    """(the model as given to the method, the decoder, the detector) at ``size`` px, random init."""
    torch.manual_seed(0)
    if name.startswith("small_"):
        import test_targets_detection as t

        model = getattr(t, name)(size=size)
    elif name.startswith("ssd"):
        model = getattr(D, name)(weights=None, weights_backbone=None).eval()
        model.transform.fixed_size = (size, size)
    elif name.startswith("fasterrcnn"):
        model = getattr(D, name)(weights=None, weights_backbone=None, min_size=size, max_size=size).eval()
        model.roi_heads.score_thresh = 0.0
        return model, DetectionsDecoder.of(model), model
    else:
        model = getattr(D, name)(weights=None, weights_backbone=None, min_size=size, max_size=size).eval()
    model.score_thresh = 0.0
    return DenseCandidates(model), None, model


def boxes_for(detector, x: torch.Tensor, unmatched: bool = True):
    """Three of the detector's own detections with an area per image, the second replaced by a box in a
    corner that no candidate matches; (boxes (N, 3, 4), labels (N, 3))."""
    with torch.no_grad():
        dets = detector(list(x))
    keep = [torch.nonzero(torchvision.ops.box_area(d["boxes"]) > 0.1)[:3, 0] for d in dets]
    boxes = torch.stack([d["boxes"][k] for d, k in zip(dets, keep)])
    labels = torch.stack([d["labels"][k] for d, k in zip(dets, keep)])
    if unmatched:
        w = x.shape[-1]
        boxes[0, 1] = torch.tensor([w - 4.0, 0, w, 2])
    return boxes, labels


def method_for(name: str, model, layer: str):
    return build_method(name, model, layer if needs_layer(name) else None, **OPTIONS.get(name, {}))


def eager(models: list[str], methods: list[str], size: int) -> list[dict]:
    rows = []
    for mname in models:
        model, decode, detector = build(mname, size)
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        boxes, labels = boxes_for(detector, x)
        layer = feature_levels(detector)  # every level: a box's candidate may be on any
        for meth in methods:
            row = {"model": mname, "method": meth, "size": size, "layers": len(layer) if needs_layer(meth) else None}
            try:
                m = method_for(meth, model, layer)
                t0 = time.perf_counter()
                res = m(x, DetectionTarget(boxes=boxes, box_classes=labels, decode=decode))
                row["seconds"] = round(time.perf_counter() - t0, 2)
                matched = res.outputs["matched"][0]
                maps = res.maps[0]
                row["matched"] = matched.tolist()
                row["ok"] = bool(torch.isfinite(res.maps).all()) and all(
                    (float(maps[b].abs().max()) > 0) == bool(matched[b]) for b in range(maps.shape[0]))
            except Exception as err:  # noqa: BLE001 - a benchmark row, not a crash
                row["ok"] = False
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def contract_case(mname: str, size: int):
    """(model, images (2, 3, size, size), boxes (2, 3, 4), labels (2, 3), CAM layers): image 0's boxes
    are detections and an unmatched box, image 1's last box is padding (-1)."""
    model, _decode, detector = build(mname, size)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    boxes, labels = boxes_for(detector, x)
    labels[1, 2] = -1
    return model, x, boxes, labels, feature_levels(detector)


def export(models: list[str], methods: list[str], formats: list[str], size: int, out_name: str | None = None
           ) -> list[dict]:
    from contract import assert_detection_contract

    rows = []
    for mname in models:
        model, x, boxes, labels, layer = contract_case(mname, size)
        for meth in methods:
            for fmt in formats:
                row = {"model": mname, "method": meth, "format": fmt, "size": size}
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        m = method_for(meth, model, layer)
                        t0 = time.perf_counter()
                        assert_detection_contract(m, x, boxes, labels, Path(tmp), DetectionTarget(max_boxes=3),
                                                  formats=(fmt,))
                        row["status"] = "ok"
                    except AssertionError as err:
                        row["status"] = "mismatch"
                        row["error"] = str(err).splitlines()[0][:300]
                    except Exception as err:  # noqa: BLE001
                        row["status"] = "error"
                        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                        traceback.print_exc()
                    row["seconds"] = round(time.perf_counter() - t0, 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
                if out_name is not None:
                    write(rows, "export", out_name)
    return rows


CONTRACT_MODELS = ("retinanet_resnet50_fpn", "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large")


def contract(models: list[str], methods: list[str], formats: list[str], size: int) -> list[dict]:
    """The export contract per (model, method, format), measured (see the module docstring)."""
    from contract import FORMATS, run_exported

    out = ROOT / "benchmarks" / "results" / "detection_export_contract.json"
    mine = []
    for mname in models:
        model, x, boxes, labels, layer = contract_case(mname, size)
        for meth in methods:
            m = method_for(meth, model, layer)
            refs = {b: m(x[:b], DetectionTarget(boxes=boxes[:b], box_classes=labels[:b])) for b in (1, 2)}
            for fmt in formats:
                row = {"model": mname, "method": meth, "format": fmt, "size": size,
                       "matched_eager": refs[2].outputs["matched"].tolist(),
                       "boxes_path": "one forward, B backward" if m.multi_target else "batch repeated B times"}
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / f"{meth}{FORMATS[fmt]}"
                    t0 = time.perf_counter()
                    try:
                        pyattr.export(m, x[:1], path, target=DetectionTarget(max_boxes=3))
                        row["export_s"] = round(time.perf_counter() - t0, 1)
                        maps_err = scores_err = iou_err = 0.0
                        matched_eq = explained_eq = True
                        for b in (1, 2):
                            ref = refs[b]
                            scores, explained, _raw, maps, matched, iou = run_exported(fmt, path, x[:b], boxes[:b],
                                                                                      labels[:b])
                            if maps.shape != ref.maps.shape:
                                raise AssertionError(f"batch {b}: maps shape {tuple(maps.shape)}")
                            maps_err = max(maps_err, float((maps - ref.maps).abs().max()))
                            scale = ref.scores.abs().max().clamp_min(1e-12)
                            scores_err = max(scores_err, float((scores - ref.scores).abs().max() / scale))
                            iou_err = max(iou_err, float((iou - ref.outputs["iou"]).abs().max()))
                            matched_eq &= torch.equal(matched.bool(), ref.outputs["matched"])
                            explained_eq &= torch.equal(explained.long(), ref.target)
                        row.update(maps_err=float(f"{maps_err:.2e}"), scores_err=float(f"{scores_err:.2e}"),
                                   iou_err=float(f"{iou_err:.2e}"), matched_equal=matched_eq)
                        good = matched_eq and explained_eq and maps_err <= 1e-4 and scores_err < 1e-4 and iou_err < 1e-4
                        row["status"] = "ok" if good else "mismatch"
                    except Exception as err:  # noqa: BLE001 - a benchmark row, not a crash
                        row["status"] = "error"
                        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                        row.setdefault("export_s", round(time.perf_counter() - t0, 1))
                        traceback.print_exc()
                print(json.dumps(row), flush=True)
                mine.append(row)
                rows = json.loads(out.read_text()) if out.exists() else []  # re-read: other models' processes
                rows = [r for r in rows if (r["model"], r["method"], r["format"]) != (mname, meth, fmt)] + [row]
                order = {k: i for i, k in enumerate(CONTRACT_MODELS)}
                rows.sort(key=lambda r: (order.get(r["model"], 9), r["method"], r["format"]))
                write_contract(rows)
    return mine


def write_contract(rows: list[dict]) -> None:
    out = ROOT / "benchmarks" / "results" / "detection_export_contract"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = ["model", "method", "format", "status", "maps_err", "scores_err", "iou_err", "matched_equal", "export_s",
            "boxes_path", "matched_eager", "error"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    head = (f"# detection export contract ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, CPU, 1 torch thread, random init)\n\n"
            "`python benchmarks/detection_export.py contract --models <model>` (one process per model). Exported "
            "from a batch-1 example with B = 3 boxes; run at batches 1 and 2 against eager. Boxes: image 0 = "
            "(detection, unmatched corner box, detection), image 1 = (detection, detection, padded -1); "
            "`matched_eager` is eager's matched flags at batch 2. Errors: max over both batches; maps_err absolute "
            "(maps in [0, 1]), scores_err relative to the largest score, iou_err absolute. `ok` = all of "
            "tests/contract.py's assert_detection_contract checks (maps <= 1e-4, scores and iou < 1e-4, matched "
            "and explained boxes equal). export_s: pyattr.export wall seconds on a shared 2-core machine (load average 6-11 "
            "during these runs: seconds are only indicative). `boxes_path`: how the method explained the B boxes "
            "(Grad-CAM before commit 280122b: the batch repeated B times; since: one forward pass and one backward "
            "pass per box; Saliency: always the latter).\n\n")
    out.with_suffix(".md").write_text(head + "\n".join(lines) + "\n")


def write(rows: list[dict], part: str, name: str) -> None:
    out = ROOT / "benchmarks" / "results" / f"detection_{part}{name}"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    out.with_suffix(".md").write_text(f"# detection {part} ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
                                      f"CPU, random init)\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("eager", "export", "contract"))
    parser.add_argument("--models", default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--formats", default="onnx,torchscript,pt2")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--name", default="", help="suffix of the results file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    if args.part == "eager":
        models = (args.models or "retinanet_resnet50_fpn,fcos_resnet50_fpn,ssdlite320_mobilenet_v3_large,"
                                 "fasterrcnn_mobilenet_v3_large_fpn").split(",")
        rows = eager(models, methods, args.size or 128)
    elif args.part == "contract":
        methods = args.methods.split(",") if args.methods != ",".join(METHODS) else ["gradcam", "saliency"]
        contract((args.models or ",".join(CONTRACT_MODELS)).split(","), methods, args.formats.split(","),
                 args.size or 128)
        return
    else:
        models = (args.models or "small_fcos").split(",")
        size = args.size or (64 if all(m.startswith("small_") for m in models) else 128)
        rows = export(models, methods, args.formats.split(","), size, args.name)
    write(rows, args.part, args.name)
    _ = pyattr


if __name__ == "__main__":
    main()
