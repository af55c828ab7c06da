"""pyattr's own model zoo: a procedural dataset with ground-truth masks and a small trained CNN.

Nothing is downloaded at run time: :func:`load_builtin` reads ``shapesnet.pt`` from this package,
weights trained by ``python -m pyattr.zoo.train`` on :func:`generate` images.

Example:
    >>> import torch
    >>> from pyattr.zoo import generate, load_builtin, SHAPESNET_LAYER
    >>> batch = generate(8, seed=20_000)
    >>> images = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255.0
    >>> logits = load_builtin()(images)  # (8, 6), classes in SHAPE_CLASSES order
"""

from __future__ import annotations

from typing import Any

from pyattr.zoo.model import SHAPESNET_LAYER, ShapesNet, load_builtin
from pyattr.zoo.shapes import SHAPE_CLASSES, ShapesBatch, ShapesSample, generate, mean_average_precision

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

__all__ = [
    "BUILTIN_INFO",
    "SHAPESNET_LAYER",
    "SHAPE_CLASSES",
    "ShapesBatch",
    "ShapesNet",
    "ShapesSample",
    "generate",
    "load_builtin",
    "mean_average_precision",
]
