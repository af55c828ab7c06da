"""pyattr's own model zoo: a procedural dataset with ground-truth masks and small trained CNNs.

Nothing is downloaded at run time: :func:`load_builtin` reads ``shapesnet.pt`` from this package,
weights trained by ``python -m pyattr.zoo.train`` on :func:`generate` images. Built on the same data:

- :func:`load_builtin_segmenter`: :class:`ShapesSegNet`, a per-pixel segmenter over
  :data:`SEG_CLASSES` (background 0, shape class ``k`` at ``k + 1``), weights ``shapesseg.pt`` trained
  by ``python -m pyattr.zoo.train_seg`` (:data:`SEG_INFO`);
- :func:`load_builtin_detector`: :class:`ShapesDetNet`, a one-stage dense detector over
  :data:`DET_CLASSES` (raw output decoded by :func:`decode_detections`, boxes + NMS by :func:`detect`),
  weights ``shapesdet.pt`` trained by ``python -m pyattr.zoo.train_det`` (:data:`DET_INFO`);
- :func:`load_builtin_embedding`: :class:`ShapesEmbedding`, the classifier's pooled 128-d features as an
  embedding model (:data:`EMBEDDING_INFO`), with :func:`generate_similarity` query/reference pairs
  whose shared shape's mask is the ground truth of a similarity explanation.

Example:
    >>> import torch
    >>> from pyattr.zoo import generate, load_builtin, SHAPESNET_LAYER
    >>> batch = generate(8, seed=20_000)
    >>> images = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255.0
    >>> logits = load_builtin()(images)  # (8, 6), classes in SHAPE_CLASSES order
"""

from __future__ import annotations

from typing import Any

from pyattr.zoo.detmodel import (
    DET_CLASSES,
    DETMODEL_LAYER,
    ShapesDetNet,
    decode_detections,
    detect,
    detection_average_precision,
    load_builtin_detector,
    mask_boxes,
)
from pyattr.zoo.model import SHAPESNET_LAYER, ShapesEmbedding, ShapesNet, load_builtin, load_builtin_embedding
from pyattr.zoo.segmodel import SEG_CLASSES, SHAPESSEG_LAYER, ShapesSegNet, class_map, load_builtin_segmenter
from pyattr.zoo.shapes import (
    SHAPE_CLASSES,
    ShapesBatch,
    ShapesSample,
    SimilarityBatch,
    generate,
    generate_similarity,
    mean_average_precision,
)

BUILTIN_INFO: dict[str, Any] = {
    "name": "shapesnet",
    "classes": SHAPE_CLASSES,
    "input_size": 64,
    "preprocessing": "rgb in [0,1]; normalization inside the model",
    "default_layer": SHAPESNET_LAYER,
    "task": "multi-label (sigmoid per class)",
    "num_parameters": 307_582,  # 1,152 of them the fixed (untrained) 3x3 blur of layer3
    "weights_file": "pyattr/zoo/shapesnet.pt",
    "training_command": "python -m pyattr.zoo.train",
    # Macro mAP on generate(2000, seed=10_000), a seed never used for training (train.py prints it).
    "heldout_map": 1.0,
    "heldout_map_per_class": {
        "circle": 1.0,
        "square": 1.0,
        "triangle": 1.0,
        "star": 1.0,
        "cross": 1.0,
        "ring": 1.0,
    },
}

SEG_INFO: dict[str, Any] = {
    "name": "shapesseg",
    "classes": SEG_CLASSES,  # background at 0, SHAPE_CLASSES[k] at k + 1
    "input_size": 64,  # any H, W divisible by 4 works; output logits (N, 7, H, W)
    "preprocessing": "rgb in [0,1]; normalization inside the model",
    "default_layer": SHAPESSEG_LAYER,
    "task": "semantic segmentation (softmax over 7 classes per pixel)",
    "num_parameters": 276_351,
    "weights_file": "pyattr/zoo/shapesseg.pt",
    "training_command": "python -m pyattr.zoo.train_seg",
    # IoU over every pixel of generate(1000, seed=10_000), a seed never used for training (train_seg prints it).
    "heldout_miou": 0.9483,
    "heldout_iou_per_class": {
        "background": 0.9934,
        "circle": 0.9764,
        "square": 0.9565,
        "triangle": 0.9276,
        "star": 0.9229,
        "cross": 0.9073,
        "ring": 0.9536,
    },
}

DET_INFO: dict[str, Any] = {
    "name": "shapesdet",
    "classes": DET_CLASSES,  # SHAPE_CLASSES; sigmoid scores, no background class
    "input_size": 64,  # any H, W divisible by 4 works; raw output (N, 4 + 6, H/4, W/4)
    "preprocessing": "rgb in [0,1]; normalization inside the model",
    "default_layer": DETMODEL_LAYER,
    "task": "object detection (one-stage, dense: a box and 6 sigmoid scores per stride-4 cell)",
    "box_format": "xyxy in input pixels; a mask's tight box ends at its last column/row + 1",
    "num_parameters": 276_546,
    "weights_file": "pyattr/zoo/shapesdet.pt",
    "training_command": "python -m pyattr.zoo.train_det",
    # VOC all-point AP at IoU 0.5 of detect(score_threshold=0.01) on generate(2000, seed=10_000), a seed
    # never used for training: python benchmarks/builtin_detector.py (benchmarks/results/builtin_detector.md).
    "heldout_map50": 1.0,
    "heldout_ap50_per_class": {
        "circle": 1.0,
        "square": 1.0,
        "triangle": 1.0,
        "star": 1.0,
        "cross": 1.0,
        "ring": 1.0,
    },
    "heldout_map75": 0.9987,
    "heldout_map50_95": 0.8773,  # VOC AP averaged over IoU 0.50:0.05:0.95
    "training_time_s": 1197,  # 750 steps from the segmenter's weights, 1 thread on the shared 2-core machine
}

EMBEDDING_INFO: dict[str, Any] = {
    "name": "shapesnet-embedding",
    "embedding_dim": 128,
    "input_size": 64,
    "preprocessing": "rgb in [0,1]; normalization inside the model",
    "default_layer": SHAPESNET_LAYER,
    "task": "embedding: ShapesNet's layer3 features, GeM-pooled (p=3; pooling=\"avg\": the features fc reads)",
    "weights_file": "pyattr/zoo/shapesnet.pt",
}

__all__ = [
    "BUILTIN_INFO",
    "DETMODEL_LAYER",
    "DET_CLASSES",
    "DET_INFO",
    "EMBEDDING_INFO",
    "SEG_CLASSES",
    "SEG_INFO",
    "SHAPESNET_LAYER",
    "SHAPESSEG_LAYER",
    "SHAPE_CLASSES",
    "ShapesBatch",
    "ShapesDetNet",
    "ShapesEmbedding",
    "ShapesNet",
    "ShapesSample",
    "ShapesSegNet",
    "SimilarityBatch",
    "class_map",
    "decode_detections",
    "detect",
    "detection_average_precision",
    "generate",
    "generate_similarity",
    "load_builtin",
    "load_builtin_detector",
    "load_builtin_embedding",
    "load_builtin_segmenter",
    "mask_boxes",
    "mean_average_precision",
]
