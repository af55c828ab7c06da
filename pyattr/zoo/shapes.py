"""Procedural "shapes" dataset with ground-truth masks, and the mAP metric used to score it (NumPy only).

Each image shows 1-3 objects of *different* classes from :data:`SHAPE_CLASSES`, placed at random
positions with random scale, rotation and saturated colour, on a textured background (smooth colour
gradient, soft low-contrast blobs and lines, per-pixel noise). The colour of an object is drawn
independently of its class, so the class must be read from the outline.

Every image is rendered from its own generator, seeded with ``(seed, index)``, so image ``i`` of
``generate(n, seed)`` does not depend on ``n``. The per-class masks are what the pointing game scores
attribution maps against: a heatmap "hits" when its maximum lies inside the target class's mask.

Example:
    >>> batch = generate(4, seed=0)
    >>> batch.images.shape, batch.labels.shape, batch.masks.shape
    ((4, 64, 64, 3), (4, 6), (4, 6, 64, 64))
    >>> bool((batch.labels == batch.masks.any(axis=(2, 3))).all())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
"""Class names; the position in this tuple is the class index used by labels, masks and the model."""

NUM_CLASSES = len(SHAPE_CLASSES)

# Object size: the diameter of the object's bounding circle, in pixels at size 64 (scaled with size).
# The minimum is 4 cells of the built-in model's 16x16 CAM layer (stride 4): at 12 px (3 cells) the
# 4 px Grad-CAM grid could not tell a small star's arms from the gaps between them.
_MIN_DIAMETER_64 = 16.0
_MAX_DIAMETER_64 = 28.0
_MAX_PLACEMENT_TRIES = 100


class ShapesSample(NamedTuple):
    """One image of a :class:`ShapesBatch`: image (H,W,3) uint8, label (6,) float32, mask (6,H,W) bool."""

    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class ShapesBatch:
    """A batch of rendered images with multi-hot labels and per-class masks.

    Attributes:
        images: uint8 RGB images, shape (N, H, W, 3).
        labels: float32 multi-hot labels, shape (N, 6); ``labels[i, k] == 1`` iff class k is present.
        masks: bool per-class masks, shape (N, 6, H, W); the union of the visible pixels of the
            objects of class k, all-false when class k is absent.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> ShapesSample:
        return ShapesSample(self.images[index], self.labels[index], self.masks[index])


def generate(n: int, seed: int, size: int = 64, *, start: int = 0) -> ShapesBatch:
    """Render ``n`` images of the shapes dataset.

    The result is a pure function of ``(n, seed, size, start)``; image ``i`` of the stream is
    rendered from ``np.random.default_rng([seed, i])``, so it equals image ``i`` of any longer batch
    with the same seed and size, and ``generate(n, seed, start=s)`` is images ``s .. s+n-1`` of
    ``generate(s + n, seed)`` (handy for rendering a large set in chunks).

    Args:
        n: number of images (>= 0).
        seed: non-negative integer seed.
        size: height and width in pixels (>= 32); object sizes scale with it.
        start: index of the first image in the seed's stream (>= 0).

    Returns:
        A :class:`ShapesBatch` with images (n,size,size,3) uint8, labels (n,6) float32 and
        masks (n,6,size,size) bool.

    Example:
        >>> batch = generate(2, seed=1, size=64)
        >>> image, label, mask = batch[0]
        >>> image.dtype, int(label.sum()) >= 1, mask.shape
        (dtype('uint8'), True, (6, 64, 64))
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.zeros((n, NUM_CLASSES), dtype=np.float32)
    masks = np.zeros((n, NUM_CLASSES, size, size), dtype=bool)
    coords = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    grid_y, grid_x = np.meshgrid(coords, coords, indexing="ij")
    for index in range(n):
        rng = np.random.default_rng([seed, start + index])
        images[index] = _render_image(rng, grid_x, grid_y, masks[index])
        labels[index] = masks[index].any(axis=(1, 2))
    return ShapesBatch(images=images, labels=labels, masks=masks)


@dataclass(frozen=True)
class SimilarityBatch:
    """Query/reference pairs for explaining similarity: the query holds 2-3 shapes, the reference one
    of them, re-rendered (its own background, position, scale, rotation and colour).

    Attributes:
        queries: uint8 RGB query images, (N, H, W, 3).
        references: uint8 RGB reference images, (N, H, W, 3), each with exactly one shape.
        shared_classes: int64 (N,), the class (index into :data:`SHAPE_CLASSES`) of the reference's
            shape, which is also in the query.
        shared_masks: bool (N, H, W), the visible pixels of the shared shape in the query: what a
            similarity explanation should point at.
        query_labels: float32 multi-hot (N, 6), the classes of the query's shapes (2 or 3 of them).
        query_masks: bool (N, 6, H, W), the query's per-class masks (as :attr:`ShapesBatch.masks`).
        reference_masks: bool (N, H, W), the visible pixels of the reference's shape.
    """

    queries: np.ndarray
    references: np.ndarray
    shared_classes: np.ndarray
    shared_masks: np.ndarray
    query_labels: np.ndarray
    query_masks: np.ndarray
    reference_masks: np.ndarray

    def __len__(self) -> int:
        return int(self.queries.shape[0])


def generate_similarity(n: int, seed: int, size: int = 64, *, start: int = 0) -> SimilarityBatch:
    """Render ``n`` query/reference pairs for the similarity pointing game.

    Pair ``i`` is rendered from its own generator, ``np.random.default_rng([seed, i, 1])`` (as
    :func:`generate` renders image ``i`` from ``[seed, i]``, so pair ``i`` does not depend on ``n`` and
    ``start`` renders a later slice of the stream; the extra ``1`` keeps the pairs' stream apart from
    :func:`generate`'s, so the two never share a background at the same seed):
    the query gets 2 or 3 shapes of distinct classes on a textured background (drawn again, from the
    same generator, in the rare case that fewer than two found room); then one of the query's classes
    is drawn as the shared class and the reference is rendered with that one shape only -- a new
    rendering with its own background, position, scale, rotation and colour, not a crop.

    Args:
        n: number of pairs (>= 0).
        seed: non-negative integer seed.
        size: height and width in pixels (>= 32).
        start: index of the first pair in the seed's stream (>= 0).

    Returns:
        A :class:`SimilarityBatch`.

    Example:
        >>> pairs = generate_similarity(4, seed=40_000)
        >>> pairs.queries.shape, pairs.shared_masks.shape, pairs.shared_classes.shape
        ((4, 64, 64, 3), (4, 64, 64), (4,))
        >>> bool(pairs.query_labels[np.arange(4), pairs.shared_classes].all())
        True
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    queries = np.empty((n, size, size, 3), dtype=np.uint8)
    references = np.empty((n, size, size, 3), dtype=np.uint8)
    shared_classes = np.zeros(n, dtype=np.int64)
    query_masks = np.zeros((n, NUM_CLASSES, size, size), dtype=bool)
    reference_masks = np.zeros((n, size, size), dtype=bool)
    coords = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    grid_y, grid_x = np.meshgrid(coords, coords, indexing="ij")
    for index in range(n):
        rng = np.random.default_rng([seed, start + index, 1])
        while True:
            query_masks[index] = False
            classes = rng.choice(NUM_CLASSES, size=int(rng.integers(2, 4)), replace=False)
            queries[index] = _render_image(rng, grid_x, grid_y, query_masks[index], classes)
            present = np.flatnonzero(query_masks[index].any(axis=(1, 2)))
            if present.size >= 2:
                break
        shared = int(rng.choice(present))
        shared_classes[index] = shared
        masks = np.zeros((NUM_CLASSES, size, size), dtype=bool)
        references[index] = _render_image(rng, grid_x, grid_y, masks, np.array([shared]))
        reference_masks[index] = masks[shared]
    rows = np.arange(n)
    return SimilarityBatch(
        queries=queries,
        references=references,
        shared_classes=shared_classes,
        shared_masks=query_masks[rows, shared_classes],
        query_labels=query_masks.any(axis=(2, 3)).astype(np.float32),
        query_masks=query_masks,
        reference_masks=reference_masks,
    )


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Macro mean average precision of multi-label scores.

    Per class k, AP is the area under the precision-recall step curve, as in scikit-learn's
    ``average_precision_score``: ``AP = sum_n (R_n - R_{n-1}) * P_n`` over the distinct score
    thresholds, taken from the highest score down (tied scores form one threshold). A class without
    positives has AP ``nan`` and is left out of the mean.

    Args:
        scores: (N, C) real-valued scores (logits or probabilities; only the order matters).
        labels: (N, C) binary ground truth (bool, int or float 0/1).

    Returns:
        ``(mAP, per_class)`` with ``per_class`` float64 of shape (C,).

    Example:
        >>> scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.6]])
        >>> labels = np.array([[1, 0], [0, 1], [1, 1]])
        >>> mAP, per_class = mean_average_precision(scores, labels)
        >>> per_class.round(4).tolist()
        [0.8333, 1.0]
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim == 1:
        scores, labels = scores[:, None], labels[:, None]
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores and labels must both be (N, C); got {scores.shape} and {labels.shape}")
    positives = labels.astype(bool)
    per_class = np.full(scores.shape[1], np.nan)
    for class_index in range(scores.shape[1]):
        class_scores = scores[:, class_index]
        class_positives = positives[:, class_index]
        num_positives = int(class_positives.sum())
        if num_positives == 0:
            continue
        order = np.argsort(-class_scores, kind="stable")
        sorted_scores = class_scores[order]
        true_positives = np.cumsum(class_positives[order])
        # Last index of each run of tied scores: the operating points of the PR curve.
        threshold_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
        true_positives = true_positives[threshold_ends]
        precision = true_positives / (threshold_ends + 1)
        recall = true_positives / num_positives
        per_class[class_index] = float(np.sum(np.diff(recall, prepend=0.0) * precision))
    valid = ~np.isnan(per_class)
    mean_ap = float(per_class[valid].mean()) if valid.any() else float("nan")
    return mean_ap, per_class


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _render_image(
    rng: np.random.Generator,
    grid_x: np.ndarray,
    grid_y: np.ndarray,
    masks_out: np.ndarray,
    classes: np.ndarray | None = None,
) -> np.ndarray:
    """Render one image into float RGB, fill ``masks_out`` (6,H,W) in place, return uint8 (H,W,3).

    ``classes``: the classes of the objects to paint, in order (an object that finds no room is left
    out); None draws 1-3 distinct classes from ``rng`` (what :func:`generate` does).
    """
    size = grid_x.shape[0]
    canvas = _render_background(rng, grid_x, grid_y)

    if classes is None:
        num_objects = int(rng.integers(1, 4))
        classes = rng.choice(NUM_CLASSES, size=num_objects, replace=False)
    placed: list[tuple[float, float, float]] = []  # (cx, cy, radius) of bounding circles
    scale = size / 64.0
    for class_index in classes:
        placement = _place_object(rng, placed, size, scale)
        if placement is None:  # no room left; the first object always fits
            continue
        placed.append(placement)
        center_x, center_y, radius = placement
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
        # Local coordinates of every pixel, rotated into the object's frame.
        cos_a, sin_a = math.cos(angle), math.sin(angle)
        dx = grid_x - center_x
        dy = grid_y - center_y
        local_x = cos_a * dx + sin_a * dy
        local_y = -sin_a * dx + cos_a * dy
        inside_distance = _SIGNED_DISTANCE[SHAPE_CLASSES[class_index]](local_x, local_y, radius)
        coverage = np.clip(inside_distance + 0.5, 0.0, 1.0)  # ~1 px anti-aliased edge
        colour = _saturated_colour(rng)
        # Mild shading across the object so its surface is not one flat colour.
        shade = 1.0 + 0.15 * (local_x * math.cos(angle) + local_y * math.sin(angle)) / radius
        fill = np.clip(colour[None, None, :] * shade[..., None], 0.0, 1.0)
        canvas += coverage[..., None] * (fill - canvas)
        visible = inside_distance > 0.0
        masks_out[:, visible] = False  # an object hides whatever was painted before it
        masks_out[class_index] |= visible

    canvas += rng.normal(0.0, rng.uniform(0.02, 0.06), size=canvas.shape)  # sensor noise
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _place_object(
    rng: np.random.Generator, placed: list[tuple[float, float, float]], size: int, scale: float
) -> tuple[float, float, float] | None:
    """Sample a bounding circle fully inside the image and disjoint from ``placed`` (or None)."""
    for _ in range(_MAX_PLACEMENT_TRIES):
        radius = 0.5 * scale * float(rng.uniform(_MIN_DIAMETER_64, _MAX_DIAMETER_64))
        margin = radius + 1.0
        center_x = float(rng.uniform(margin, size - margin))
        center_y = float(rng.uniform(margin, size - margin))
        if all(
            math.hypot(center_x - other_x, center_y - other_y) >= radius + other_radius
            for other_x, other_y, other_radius in placed
        ):
            return center_x, center_y, radius
    return None


def _render_background(rng: np.random.Generator, grid_x: np.ndarray, grid_y: np.ndarray) -> np.ndarray:
    """Textured background (H,W,3) float in [0,1]: gradient + soft blobs + faint lines."""
    size = grid_x.shape[0]
    # Smooth gradient between two muted colours along a random direction.
    colour_a = _muted_colour(rng)
    colour_b = _muted_colour(rng)
    direction = float(rng.uniform(0.0, 2.0 * math.pi))
    ramp = (math.cos(direction) * grid_x + math.sin(direction) * grid_y) / size
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    canvas = colour_a[None, None, :] + ramp[..., None] * (colour_b - colour_a)[None, None, :]

    # Soft Gaussian blobs: low contrast, no sharp edge, so they do not read as circles.
    for _ in range(int(rng.integers(2, 6))):
        center_x, center_y = rng.uniform(0.0, size, size=2)
        sigma = float(rng.uniform(0.06, 0.2)) * size
        weight = np.exp(-((grid_x - center_x) ** 2 + (grid_y - center_y) ** 2) / (2.0 * sigma**2))
        tint = rng.uniform(-0.18, 0.18, size=3)
        canvas += weight[..., None] * tint[None, None, :]

    # Faint straight lines (clutter with edges), 1-2 px wide.
    for _ in range(int(rng.integers(0, 4))):
        point_x, point_y = rng.uniform(0.0, size, size=2)
        theta = float(rng.uniform(0.0, math.pi))
        distance = np.abs(-math.sin(theta) * (grid_x - point_x) + math.cos(theta) * (grid_y - point_y))
        half_width = float(rng.uniform(0.5, 1.0))
        coverage = np.clip(half_width + 0.5 - distance, 0.0, 1.0)
        tint = rng.uniform(-0.15, 0.15, size=3)
        canvas += coverage[..., None] * tint[None, None, :]

    # Fine texture: smooth-ish per-pixel variation (noise blurred by a 2x2 box).
    texture = rng.normal(0.0, 0.04, size=(size + 1, size + 1))
    texture = 0.25 * (texture[:-1, :-1] + texture[1:, :-1] + texture[:-1, 1:] + texture[1:, 1:])
    canvas += texture[..., None]
    return canvas


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """Convert one HSV colour (all in [0,1]) to RGB float32 (3,)."""
    sector = hue * 6.0
    channel = np.array([5.0, 3.0, 1.0]) + sector
    k = np.mod(channel, 6.0)
    rgb = value - value * saturation * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return rgb.astype(np.float32)


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv_to_rgb(float(rng.uniform()), float(rng.uniform(0.65, 1.0)), float(rng.uniform(0.55, 1.0)))


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv_to_rgb(float(rng.uniform()), float(rng.uniform(0.0, 0.35)), float(rng.uniform(0.3, 0.8)))


# --------------------------------------------------------------------------------------------------
# Signed distances (positive inside, in pixels) in the object's rotated frame; ``radius`` is the
# radius of the object's bounding circle. Polygon distances are exact near edges, which is all the
# anti-aliasing needs.
# --------------------------------------------------------------------------------------------------


def _circle(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    return 0.85 * radius - np.hypot(x, y)


def _square(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    half_side = 0.68 * radius  # corners at 0.96 * radius
    return half_side - np.maximum(np.abs(x), np.abs(y))


def _regular_polygon(x: np.ndarray, y: np.ndarray, circumradius: float, sides: int) -> np.ndarray:
    """Convex regular polygon with a vertex on the +y axis: min over edges of the half-plane distance."""
    apothem = circumradius * math.cos(math.pi / sides)
    distance = None
    for edge in range(sides):
        normal_angle = math.pi / 2 + math.pi / sides + 2.0 * math.pi * edge / sides
        edge_distance = apothem - (math.cos(normal_angle) * x + math.sin(normal_angle) * y)
        distance = edge_distance if distance is None else np.minimum(distance, edge_distance)
    assert distance is not None
    return distance


def _triangle(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    # Shift down so the triangle's area is centred in its bounding circle.
    return _regular_polygon(x, y + 0.12 * radius, 0.95 * radius, 3)


def _star(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Five-pointed star, outer radius 0.98 * ``radius``, inner radius 0.58 * ``radius``.

    A "fat" star (inner / outer ~0.6; a regular pentagram has 0.38): arms as wide as a CAM cell even on
    small stars, still five clear points that tell it from a circle or a polygon.
    """
    outer, inner = 0.98 * radius, 0.58 * radius
    sector = 2.0 * math.pi / 5.0
    angle = np.mod(np.arctan2(x, y), sector)  # 0 at a tip (on the +y axis)
    angle = np.minimum(angle, sector - angle)  # fold onto [0, sector / 2]
    distance_to_centre = np.hypot(x, y)
    folded_x = distance_to_centre * np.cos(angle)
    folded_y = distance_to_centre * np.sin(angle)
    # Edge from the tip (outer, 0) to the inner vertex (inner*cos, inner*sin) at half a sector.
    tip_x, tip_y = outer, 0.0
    valley_x, valley_y = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    edge_x, edge_y = valley_x - tip_x, valley_y - tip_y
    edge_length = math.hypot(edge_x, edge_y)
    # Inward normal of the edge points towards the centre (left of tip->valley).
    return ((folded_x - tip_x) * edge_y - (folded_y - tip_y) * edge_x) / -edge_length


def _cross(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Plus sign: union of two bars of half-length 0.9 * radius and half-width 0.33 * radius."""
    half_length, half_width = 0.9 * radius, 0.33 * radius
    abs_x, abs_y = np.abs(x), np.abs(y)
    horizontal = np.minimum(half_length - abs_x, half_width - abs_y)
    vertical = np.minimum(half_width - abs_x, half_length - abs_y)
    return np.maximum(horizontal, vertical)


def _ring(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Annulus with outer radius 0.9 * radius and inner radius 0.42 * radius."""
    distance_to_centre = np.hypot(x, y)
    return np.minimum(0.9 * radius - distance_to_centre, distance_to_centre - 0.42 * radius)


_SIGNED_DISTANCE = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "ring": _ring,
}
