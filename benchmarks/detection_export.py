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


def export(models: list[str], methods: list[str], formats: list[str], size: int, out_name: str | None = None
           ) -> list[dict]:
    from contract import assert_detection_contract

    rows = []
    for mname in models:
        model, _decode, detector = build(mname, size)
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3))
        boxes, labels = boxes_for(detector, x)
        labels[1, 2] = -1
        layer = feature_levels(detector)
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
    parser.add_argument("part", choices=("eager", "export"))
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
    else:
        models = (args.models or "small_fcos").split(",")
        size = args.size or (64 if all(m.startswith("small_") for m in models) else 128)
        rows = export(models, methods, args.formats.split(","), size, args.name)
    write(rows, args.part, args.name)
    _ = pyattr


if __name__ == "__main__":
    main()
