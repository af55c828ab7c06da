"""Exported (onnxruntime) vs eager maps for the three task targets on the built-in models.

    python benchmarks/targets_onnx_check.py

Grad-CAM and Saliency on the built-in segmenter (each image's first present class over its predicted region),
embedding (cosine to a generated reference) and detector (every detected box, padded): three generated images
(seed 999), exported at batch 1 and run at batch 3; prints max |maps_onnxruntime - maps_eager|
(last output: ``benchmarks/results/targets_onnx_check.txt``).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnxruntime as ort
import torch

import pyattr
from pyattr.targets import DetectionTarget, SegmentationTarget, SimilarityTarget


def run(path: str, feeds: dict) -> dict:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def main() -> None:
    folder = tempfile.mkdtemp()
    data = pyattr.zoo.generate(3, seed=999)
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().contiguous() / 255
    classes = torch.tensor([int(np.flatnonzero(row)[0]) + 1 for row in data.labels])  # segmenter ids: shape + 1
    seg, emb = pyattr.zoo.load_builtin_segmenter(), pyattr.zoo.load_builtin_embedding()
    det = pyattr.zoo.load_builtin_detector()
    refs = pyattr.zoo.generate_similarity(3, seed=5).references
    reference = emb(torch.from_numpy(refs).permute(0, 3, 1, 2).float() / 255).detach()
    boxes = DetectionTarget.from_detections(pyattr.zoo.detect(det, x), decode=pyattr.zoo.decode_detections)
    cases = (
        ("segmentation", seg, pyattr.zoo.SHAPESSEG_LAYER, SegmentationTarget(classes=classes), SegmentationTarget(),
         {"target": classes.numpy(), "region": -np.ones((3, 64, 64), np.float32)}),
        ("similarity", emb, "layer3", SimilarityTarget(reference), SimilarityTarget(),
         {"target": np.full(3, -1), "reference": reference.numpy()}),
        ("detection", det, pyattr.zoo.DETMODEL_LAYER, boxes,
         DetectionTarget(decode=pyattr.zoo.decode_detections, max_boxes=boxes.boxes.shape[1]),
         {"boxes": boxes.boxes.numpy(), "box_classes": boxes.box_classes.numpy()}),
    )
    for kind in ("gradcam", "saliency"):
        for task, model, layer, target, kind_target, feeds in cases:
            method = pyattr.GradCAM(model, layer) if kind == "gradcam" else pyattr.Saliency(model)
            eager = method(x, target)
            path = str(pyattr.export(method, x[:1], os.path.join(folder, f"{task}_{kind}.onnx"), target=kind_target))
            out = run(path, {"images": x.numpy(), **feeds})
            print(f"{task:12s} {kind:8s} max |maps onnxruntime - eager| = "
                  f"{np.abs(out['maps'] - eager.maps.numpy()).max():.1e} (eager map maxima "
                  f"{[round(v, 3) for v in eager.maps.flatten(1).amax(1).tolist()]})", flush=True)


if __name__ == "__main__":
    main()
