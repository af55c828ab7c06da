"""Tests for the built-in segmentation and embedding models of pyattr.zoo and the similarity pairs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.nn import functional as F

from pyattr.zoo import (
    EMBEDDING_INFO,
    SEG_CLASSES,
    SEG_INFO,
    SHAPE_CLASSES,
    SHAPESNET_LAYER,
    SHAPESSEG_LAYER,
    ShapesEmbedding,
    ShapesNet,
    ShapesSegNet,
    class_map,
    generate,
    generate_similarity,
    load_builtin,
    load_builtin_embedding,
    load_builtin_segmenter,
    train_seg,
)
from pyattr.zoo import segmodel as zoo_segmodel


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


# --------------------------------------------------------------------------------------------------
# generate() is unchanged by the renderer refactoring
# --------------------------------------------------------------------------------------------------


def test_generate_bit_identical_to_before_the_similarity_refactoring() -> None:
    # sha256 of images, labels and masks of generate(8, seed=0), recorded before _render_image took
    # its `classes` argument.
    batch = generate(8, seed=0)
    digest = hashlib.sha256()
    for array in (batch.images, batch.labels, batch.masks):
        digest.update(array.tobytes())
    assert digest.hexdigest() == "fc437c00af2126c08b365991d3e58f8a8ad61ca7f163d6c81302f8a2d0bf93cb"


# --------------------------------------------------------------------------------------------------
# Segmentation model
# --------------------------------------------------------------------------------------------------


def test_seg_classes_and_class_map() -> None:
    assert SEG_CLASSES == ("background", *SHAPE_CLASSES) and len(SEG_CLASSES) == 7
    masks = np.zeros((2, 6, 3, 4), dtype=bool)
    masks[0, 0, 0, 0] = True  # circle -> 1
    masks[0, 5, 2, 3] = True  # ring -> 6
    masks[1, 3, 1, :] = True  # star -> 4
    expected = np.zeros((2, 3, 4), dtype=np.uint8)
    expected[0, 0, 0], expected[0, 2, 3], expected[1, 1, :] = 1, 6, 4
    np.testing.assert_array_equal(class_map(masks), expected)
    # On rendered images: pixel p has class k + 1 exactly where mask k is set, 0 where none is.
    batch = generate(6, seed=3)
    maps = class_map(batch.masks)
    assert maps.shape == (6, 64, 64) and maps.dtype == np.uint8
    for k in range(6):
        np.testing.assert_array_equal(maps == k + 1, batch.masks[:, k])
    np.testing.assert_array_equal(maps == 0, ~batch.masks.any(axis=1))
    with pytest.raises(ValueError, match="6, H, W"):
        class_map(np.zeros((5, 8, 8), dtype=bool))


@pytest.mark.parametrize("height, width", [(64, 64), (32, 48)])
def test_segnet_output_and_cam_layer_shapes(height: int, width: int) -> None:
    torch.manual_seed(0)
    model = ShapesSegNet().eval()
    captured: list[torch.Tensor] = []
    layer = dict(model.named_modules())[SHAPESSEG_LAYER]
    handle = layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        logits = model(torch.rand(2, 3, height, width))
    finally:
        handle.remove()
    assert logits.shape == (2, 7, height, width) and logits.dtype == torch.float32
    assert captured[0].shape == (2, 64, height // 4, width // 4)
    # The CAM layer is the classifier's input: the logits are the upsampled 1x1 conv of it.
    expected = F.interpolate(
        model.classifier(captured[0]), size=(height, width), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(logits, expected)
    # Autograd reaches the input (no detached or in-place step in between).
    images = torch.rand(1, 3, height, width, requires_grad=True)
    (gradient,) = torch.autograd.grad(model(images)[:, 3].sum(), images)
    assert gradient.abs().sum() > 0


def test_segnet_traces_and_exports_with_dynamic_batch() -> None:
    # Standard layers only: TorchScript tracing and torch.export take the plain forward as it is.
    torch.manual_seed(1)
    model = ShapesSegNet().eval()
    images, other_batch = torch.rand(2, 3, 32, 32), torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, images)
        torch.testing.assert_close(traced(other_batch), model(other_batch))
        exported = torch.export.export(
            model, (images,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},)
        )
        torch.testing.assert_close(exported.module()(other_batch), model(other_batch))


def test_iou_from_confusion_analytic() -> None:
    # 2 classes: class 0 has TP 3, FN 1, FP 0 -> 3/4; class 1 TP 4, FP 1 -> 4/5; class 2 absent -> nan.
    mean_iou, per_class = train_seg.iou_from_confusion(torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]]))
    np.testing.assert_allclose(per_class[:2], [0.75, 0.8])
    assert np.isnan(per_class[2]) and mean_iou == pytest.approx(0.775)


def test_shipped_segmenter_reaches_miou_on_heldout_images() -> None:
    model = load_builtin_segmenter()
    assert not model.training and SEG_INFO["num_parameters"] == sum(p.numel() for p in model.parameters())
    batch = generate(64, seed=10_000)  # the held-out seed: never trained on
    images, truth = _to_tensor(batch.images), class_map(batch.masks)
    uint8_images = torch.from_numpy(batch.images).permute(0, 3, 1, 2)
    confusion = train_seg.confusion_matrix(model, uint8_images, torch.from_numpy(truth))
    mean_iou, per_class = train_seg.iou_from_confusion(confusion)
    # Independent IoU: straight from the predicted and true class maps.
    with torch.no_grad():
        predicted = model(images).argmax(1).numpy()
    own = [((predicted == k) & (truth == k)).sum() / ((predicted == k) | (truth == k)).sum() for k in range(7)]
    np.testing.assert_allclose(per_class, own, rtol=1e-12)
    assert mean_iou >= 0.8, per_class
    assert per_class.min() >= 0.6, per_class


def test_load_builtin_segmenter_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train_seg"):
        load_builtin_segmenter(weights=tmp_path / "absent.pt")


def test_train_seg_refuses_reserved_seeds_and_smoke_runs(tmp_path) -> None:
    for seed in (10_000, 40_000, 45_000):
        with pytest.raises(ValueError, match="reserved"):
            train_seg.train(tmp_path / "x.pt", seed=seed)
    out = tmp_path / "tiny.pt"
    threads = torch.get_num_threads()
    mean_iou, per_class = train_seg.train(out, epochs=1, train_size=32, heldout_size=8, num_threads=1)
    assert torch.get_num_threads() == threads
    assert per_class.shape == (7,) and 0.0 <= mean_iou <= 1.0
    reloaded = load_builtin_segmenter(weights=out)
    assert reloaded(torch.rand(1, 3, 64, 64)).shape == (1, 7, 64, 64)
    # Seeded: the same run again gives the same weights (same machine, threads and software).
    again = tmp_path / "again.pt"
    mean_iou_again, _ = train_seg.train(again, epochs=1, train_size=32, heldout_size=8, num_threads=1)
    assert mean_iou_again == mean_iou
    first, second = torch.load(out, weights_only=True), torch.load(again, weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_seg_info_matches_files() -> None:
    assert SEG_INFO["classes"] == SEG_CLASSES and SEG_INFO["default_layer"] == SHAPESSEG_LAYER
    assert zoo_segmodel.SEG_WEIGHTS_PATH.is_file()
    assert zoo_segmodel.SEG_WEIGHTS_PATH.stat().st_size < 1.5e6
    assert set(SEG_INFO["heldout_iou_per_class"]) == set(SEG_CLASSES)
    per_class = list(SEG_INFO["heldout_iou_per_class"].values())
    assert SEG_INFO["heldout_miou"] == pytest.approx(np.mean(per_class), abs=1e-4)  # 4-digit rounding


# --------------------------------------------------------------------------------------------------
# Embedding model
# --------------------------------------------------------------------------------------------------


def test_embedding_equals_classifier_pooled_features_and_leaves_it_unchanged() -> None:
    classifier = load_builtin()
    before = {name: tensor.clone() for name, tensor in classifier.state_dict().items()}
    modules_before = dict(classifier.named_modules())
    images = _to_tensor(generate(4, seed=20_000).images)
    with torch.no_grad():
        logits_before = classifier(images)

    embed = ShapesEmbedding(classifier, pooling="avg")
    assert not embed.training
    # Same submodule names as ShapesNet, so SHAPESNET_LAYER names the CAM layer; same objects.
    assert dict(embed.named_modules())[SHAPESNET_LAYER] is classifier.layer3
    for name in ("stem", "layer1", "layer2", "layer3"):
        assert getattr(embed, name) is getattr(classifier, name)

    # Reference: the input of the classifier's fc, captured by a hook on the classifier itself.
    captured: list[torch.Tensor] = []
    handle = classifier.fc.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    try:
        with torch.no_grad():
            logits = classifier(images)
    finally:
        handle.remove()
    with torch.no_grad():
        embeddings = embed(images)
    assert embeddings.shape == (4, 128) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, captured[0], rtol=0, atol=0)
    torch.testing.assert_close(classifier.fc(embeddings), logits)

    # The classifier is untouched: same weights and buffers, same modules, same outputs.
    after = classifier.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert dict(classifier.named_modules()).keys() == modules_before.keys()
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), logits_before, rtol=0, atol=0)


def test_load_builtin_embedding() -> None:
    embed = load_builtin_embedding()
    assert isinstance(embed, ShapesEmbedding) and not embed.training
    assert EMBEDDING_INFO["embedding_dim"] == 128 and EMBEDDING_INFO["default_layer"] == SHAPESNET_LAYER
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        classifier = load_builtin()
        features = classifier.layer3(classifier.layer2(classifier.layer1(
            classifier.stem((images - classifier.mean) / classifier.std))))
        # GeM, p = 3, written out: the cube root of the mean cube of the (clamped) features
        gem = torch.from_numpy(np.cbrt((np.maximum(features.double().numpy(), 1e-6) ** 3).mean((2, 3))))
        torch.testing.assert_close(embed(images).double(), gem, rtol=1e-5, atol=1e-7)
        expected = classifier.avgpool(features).flatten(1)
        torch.testing.assert_close(load_builtin_embedding(pooling="avg")(images), expected, rtol=0, atol=0)
    # A fresh ShapesNet in training mode gives a training-mode embedding (BN batch statistics).
    assert ShapesEmbedding(ShapesNet()).training


# --------------------------------------------------------------------------------------------------
# Similarity pairs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs():
    return generate_similarity(48, seed=40_000)


def test_similarity_pairs_shapes_and_determinism(pairs) -> None:
    assert len(pairs) == 48
    assert pairs.queries.shape == (48, 64, 64, 3) and pairs.queries.dtype == np.uint8
    assert pairs.references.shape == (48, 64, 64, 3) and pairs.references.dtype == np.uint8
    assert pairs.shared_classes.shape == (48,) and pairs.shared_classes.dtype == np.int64
    assert pairs.shared_masks.shape == (48, 64, 64) and pairs.shared_masks.dtype == np.bool_
    assert pairs.query_masks.shape == (48, 6, 64, 64) and pairs.reference_masks.shape == (48, 64, 64)
    again = generate_similarity(48, seed=40_000)
    for name in ("queries", "references", "shared_classes", "shared_masks"):
        np.testing.assert_array_equal(getattr(again, name), getattr(pairs, name))
    tail = generate_similarity(8, seed=40_000, start=40)  # pair i depends on (seed, i) only
    np.testing.assert_array_equal(tail.queries, pairs.queries[40:])
    np.testing.assert_array_equal(tail.references, pairs.references[40:])
    assert len(generate_similarity(0, seed=1)) == 0
    assert not np.array_equal(generate_similarity(4, seed=1).queries, pairs.queries[:4])
    # Its own stream: no query repeats the background of generate()'s image at the same seed and index.
    same_seed = generate(8, seed=40_000).images.astype(int)
    assert (np.abs(same_seed - pairs.queries[:8]).mean(axis=(1, 2, 3)) > 10).all()
    with pytest.raises(ValueError, match="seed"):
        generate_similarity(2, seed=-1)


def test_similarity_pairs_invariants(pairs) -> None:
    rows = np.arange(len(pairs))
    counts = pairs.query_labels.sum(axis=1)
    assert set(np.unique(counts).tolist()) == {2.0, 3.0}  # 2 or 3 shapes, distinct classes
    np.testing.assert_array_equal(pairs.query_labels, pairs.query_masks.any(axis=(2, 3)))
    assert pairs.query_labels[rows, pairs.shared_classes].all()  # the shared class is in the query
    np.testing.assert_array_equal(pairs.shared_masks, pairs.query_masks[rows, pairs.shared_classes])
    assert pairs.shared_masks.sum(axis=(1, 2)).min() >= 35  # a real object, not a sliver
    assert pairs.reference_masks.sum(axis=(1, 2)).min() >= 35
    # Each object is one connected region (the reference's one shape, the query's shared shape).
    for index in range(len(pairs)):
        assert ndimage.label(pairs.reference_masks[index], structure=np.ones((3, 3)))[1] == 1
        assert ndimage.label(pairs.shared_masks[index], structure=np.ones((3, 3)))[1] == 1
    # A new rendering, not a crop: the reference's shape sits elsewhere / at another size.
    def centroid(masks: np.ndarray) -> np.ndarray:
        return np.stack([np.argwhere(mask).mean(axis=0) for mask in masks])

    moved = np.hypot(*(centroid(pairs.reference_masks) - centroid(pairs.shared_masks)).T) > 2.0
    resized = pairs.reference_masks.sum(axis=(1, 2)) != pairs.shared_masks.sum(axis=(1, 2))
    assert (moved | resized).all() and moved.mean() > 0.8
    assert (pairs.references != pairs.queries).mean() > 0.9
    every_class = set(pairs.shared_classes.tolist())
    assert every_class == set(range(6))


def test_similarity_pairs_agree_with_the_builtin_classifier(pairs) -> None:
    # Independent of the renderer's bookkeeping: the shipped classifier (held-out mAP 1.0) sees
    # exactly the shared class in every reference and exactly the labelled classes in every query.
    classifier = load_builtin()
    with torch.no_grad():
        reference_present = classifier(_to_tensor(pairs.references)).numpy() > 0
        query_present = classifier(_to_tensor(pairs.queries)).numpy() > 0
    expected_reference = np.zeros_like(reference_present)
    expected_reference[np.arange(len(pairs)), pairs.shared_classes] = True
    assert (reference_present == expected_reference).all(axis=1).mean() >= 0.97
    assert (query_present == pairs.query_labels.astype(bool)).all(axis=1).mean() >= 0.95
