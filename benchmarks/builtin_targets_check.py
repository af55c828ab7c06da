"""Feasibility check for issue 14's built-in targets: Grad-CAM's pointing game, written by hand.

Plain autograd, no pyattr method or target API: Grad-CAM (Selvaraju et al. 2017) at a layer is
``relu(sum_c mean_hw(d objective / d A_c) * A_c)``, bilinearly upsampled (align_corners=False) to the
image size; a map *hits* when its maximum pixel lies in the ground-truth mask (an all-zero map misses).

(a) segmentation, the built-in ShapesSegNet at ``head``: for every object of ``generate(N, seed)``,
    objective = the logit of its class (``k + 1``) summed over the pixels where the model predicts
    ``k + 1``; ground truth = the object's class mask.
    Also with the class logit summed over the whole image.
(b) similarity, the built-in ShapesNet's pooled features (ShapesEmbedding) at ``layer3`` (or
    ``--embedding-layer``): objective = cosine similarity between the query's embedding and the
    (detached) reference's embedding, on ``generate_similarity(N, seed)``; ground truth = the shared
    shape's mask in the query. Also with the dot product as the objective.

Usage::

    PYTHONPATH=$PWD python benchmarks/builtin_targets_check.py [--n 300] [--seed 40000]
        [--embedding-layer layer3] [--seg-weights FILE]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pyattr.zoo.model import SHAPESNET_LAYER, load_builtin_embedding
from pyattr.zoo.segmodel import SEG_CLASSES, SHAPESSEG_LAYER, load_builtin_segmenter
from pyattr.zoo.shapes import SHAPE_CLASSES, generate, generate_similarity


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float (N,3,H,W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def grad_cam(
    model: nn.Module, layer: str, images: torch.Tensor, objective, batch_size: int = 50
) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) of ``objective(model_output, batch_slice) -> (n,)`` at ``layer``."""
    module = dict(model.named_modules())[layer]
    maps, captured = [], []
    for start in range(0, len(images), batch_size):
        captured.clear()
        handle = module.register_forward_hook(lambda _m, _i, output: captured.append(output))
        try:
            output = model(images[start : start + batch_size].requires_grad_(True))
        finally:
            handle.remove()
        activation = captured[0]
        score = objective(output, slice(start, start + batch_size))
        (gradient,) = torch.autograd.grad(score.sum(), activation)
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activation).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
        maps.append(cam[:, 0].detach())
    return torch.cat(maps)


def pointing_hits(maps: torch.Tensor, masks: np.ndarray) -> np.ndarray:
    """bool (N,): the map's maximum pixel lies in the mask (N,H,W); all-zero maps miss."""
    flat = maps.flatten(1)
    peak = flat.argmax(1).numpy()
    inside = masks.reshape(len(masks), -1)[np.arange(len(masks)), peak]
    return inside & (flat.max(1).values > 0).numpy()


def check_segmentation(n: int, seed: int, weights: str | None) -> dict[str, float]:
    model = load_builtin_segmenter(weights=weights)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    batch = generate(n, seed)
    image_index, class_index = np.nonzero(batch.labels)  # one row per object
    images = to_tensor(batch.images)[torch.from_numpy(image_index)]
    seg_class = torch.from_numpy(class_index + 1)
    with torch.no_grad():
        predicted = torch.cat([model(images[i : i + 100]).argmax(1) for i in range(0, len(images), 100)])
    regions = {
        "predicted region": (predicted == seg_class[:, None, None]).float(),  # where the model predicts it
        "whole image": torch.ones_like(predicted, dtype=torch.float32),
    }
    results = {}
    for name, region in regions.items():

        def objective(logits: torch.Tensor, rows: slice, region: torch.Tensor = region) -> torch.Tensor:
            index = seg_class[rows, None, None, None].expand(-1, 1, *logits.shape[2:])
            return (logits.gather(1, index)[:, 0] * region[rows]).sum(dim=(1, 2))

        start = time.perf_counter()
        maps = grad_cam(model, SHAPESSEG_LAYER, images, objective)
        hits = pointing_hits(maps, batch.masks[image_index, class_index])
        empty = int((region.sum(dim=(1, 2)) == 0).sum())
        print(
            f"(a) segmentation, ShapesSegNet at {SHAPESSEG_LAYER!r}, class logit summed over the {name}, "
            f"generate({n}, seed={seed}): {len(hits)} objects, Grad-CAM pointing game {hits.mean():.2%} "
            f"({empty} objects with an empty region; {time.perf_counter() - start:.1f} s)"
        )
        for k in range(len(SHAPE_CLASSES)):
            rows = class_index == k
            print(f"    {SEG_CLASSES[k + 1]:>8}: {hits[rows].mean():.2%} of {rows.sum()}")
        results[name] = float(hits.mean())
    return results


def check_similarity(n: int, seed: int, layer: str) -> dict[str, float]:
    model = load_builtin_embedding()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    pairs = generate_similarity(n, seed)
    queries, references = to_tensor(pairs.queries), to_tensor(pairs.references)
    with torch.no_grad():
        reference_embeddings = model(references)
        similarity = F.cosine_similarity(model(queries), reference_embeddings, dim=1)
    objectives = {
        "cosine similarity": lambda e, rows: F.cosine_similarity(e, reference_embeddings[rows], dim=1),
        "dot product": lambda e, rows: (e * reference_embeddings[rows]).sum(1),
    }
    results = {}
    for name, objective in objectives.items():
        start = time.perf_counter()
        maps = grad_cam(model, layer, queries, objective)
        hits = pointing_hits(maps, pairs.shared_masks)
        print(
            f"(b) similarity, ShapesEmbedding at {layer!r}, {name} to the reference, "
            f"generate_similarity({n}, seed={seed}): Grad-CAM pointing game {hits.mean():.2%} "
            f"(query-reference cosine similarity mean {similarity.mean():.3f}; "
            f"{time.perf_counter() - start:.1f} s)"
        )
        for k, class_name in enumerate(SHAPE_CLASSES):
            rows = pairs.shared_classes == k
            print(f"    {class_name:>8}: {hits[rows].mean():.2%} of {rows.sum()}")
        results[name] = float(hits.mean())
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=40_000)
    parser.add_argument("--embedding-layer", default=SHAPESNET_LAYER)
    parser.add_argument("--seg-weights", default=None, help="ShapesSegNet state_dict (default: shipped)")
    parser.add_argument("--skip", choices=["segmentation", "similarity"], default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.skip != "segmentation":
        check_segmentation(args.n, args.seed, args.seg_weights)
    if args.skip != "similarity":
        check_similarity(args.n, args.seed, args.embedding_layer)


if __name__ == "__main__":
    main()
