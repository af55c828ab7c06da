"""Tests for pyattr.zoo: the shapes dataset, the mAP metric, the shipped ShapesNet and its training script."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from pyattr.zoo import (
    BUILTIN_INFO,
    SHAPE_CLASSES,
    SHAPESNET_LAYER,
    ShapesNet,
    generate,
    load_builtin,
    mean_average_precision,
)
from pyattr.zoo import model as zoo_model
from pyattr.zoo import shapes as zoo_shapes
from pyattr.zoo import train as zoo_train

# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_seed7() -> zoo_shapes.ShapesBatch:
    return generate(64, seed=7)


def test_generate_shapes_and_dtypes(batch_seed7: zoo_shapes.ShapesBatch) -> None:
    assert SHAPE_CLASSES == ("circle", "square", "triangle", "star", "cross", "ring")
    assert batch_seed7.images.shape == (64, 64, 64, 3) and batch_seed7.images.dtype == np.uint8
    assert batch_seed7.labels.shape == (64, 6) and batch_seed7.labels.dtype == np.float32
    assert batch_seed7.masks.shape == (64, 6, 64, 64) and batch_seed7.masks.dtype == np.bool_
    assert len(batch_seed7) == 64
    image, label, mask = batch_seed7[3]
    assert image.shape == (64, 64, 3) and label.shape == (6,) and mask.shape == (6, 64, 64)

    other_size = generate(3, seed=7, size=96)
    assert other_size.images.shape == (3, 96, 96, 3) and other_size.masks.shape == (3, 6, 96, 96)
    empty = generate(0, seed=7)
    assert empty.images.shape == (0, 64, 64, 3) and empty.labels.shape == (0, 6)


def test_generate_is_deterministic_per_seed_and_index(batch_seed7: zoo_shapes.ShapesBatch) -> None:
    again = generate(64, seed=7)
    np.testing.assert_array_equal(again.images, batch_seed7.images)
    np.testing.assert_array_equal(again.labels, batch_seed7.labels)
    np.testing.assert_array_equal(again.masks, batch_seed7.masks)
    # Image i depends on (seed, i) only, not on n; start= renders a later slice of the stream.
    shorter = generate(10, seed=7)
    np.testing.assert_array_equal(shorter.images, batch_seed7.images[:10])
    tail = generate(4, seed=7, start=60)
    np.testing.assert_array_equal(tail.images, batch_seed7.images[60:])
    np.testing.assert_array_equal(tail.masks, batch_seed7.masks[60:])
    # A different seed gives different images.
    other = generate(64, seed=8)
    assert not np.array_equal(other.images, batch_seed7.images)
    assert (other.images != batch_seed7.images).mean() > 0.9


def test_labels_match_masks_and_object_counts(batch_seed7: zoo_shapes.ShapesBatch) -> None:
    np.testing.assert_array_equal(batch_seed7.labels, batch_seed7.masks.any(axis=(2, 3)))
    objects_per_image = batch_seed7.labels.sum(axis=1)
    assert objects_per_image.min() >= 1 and objects_per_image.max() <= 3
    assert set(np.unique(objects_per_image).tolist()) == {1.0, 2.0, 3.0}
    # Present classes have masks of real objects; the smallest possible one, a 12 px star, covers ~43 px.
    mask_areas = batch_seed7.masks.sum(axis=(2, 3))
    assert mask_areas[batch_seed7.labels == 1].min() >= 35
    assert mask_areas[batch_seed7.labels == 0].max() == 0
    # Objects barely overlap, so one pixel belongs to at most one class.
    assert batch_seed7.masks.sum(axis=1).max() <= 1
    # Every class shows up, with roughly balanced frequency (each ~1/3 of images).
    frequency = batch_seed7.labels.mean(axis=0)
    assert frequency.min() > 0.1 and frequency.max() < 0.6


def test_object_colour_does_not_reveal_class() -> None:
    batch = generate(300, seed=11)
    mean_colour = {}
    for class_index, name in enumerate(SHAPE_CLASSES):
        pixels = batch.images[batch.masks[:, class_index]].astype(np.float64)
        mean_colour[name] = pixels.mean(axis=0)
    colours = np.stack(list(mean_colour.values()))
    # Per-class mean colours are all close to grey-ish average: spread well below the colour range.
    assert np.ptp(colours, axis=0).max() < 40, mean_colour


def test_shapes_module_does_not_import_torch() -> None:
    source = Path(zoo_shapes.__file__).read_text()
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert "torch" not in imported and "numpy" in imported


def test_generate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="seed"):
        generate(1, seed=-1)
    with pytest.raises(ValueError, match="n must be"):
        generate(-1, seed=0)


# --------------------------------------------------------------------------------------------------
# Metric
# --------------------------------------------------------------------------------------------------


def test_mean_average_precision_hand_computed() -> None:
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.6]])
    labels = np.array([[1, 0], [0, 1], [1, 1]])
    mean_ap, per_class = mean_average_precision(scores, labels)
    # Class 0: ranking +,-,+ -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6. Class 1: ranking +,+,- -> AP = 1.
    np.testing.assert_allclose(per_class, [5 / 6, 1.0])
    assert mean_ap == pytest.approx((5 / 6 + 1.0) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_average_precision_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random((500, 6)) < [0.05, 0.2, 0.33, 0.5, 0.7, 0.9]).astype(np.float32)
    scores = labels * rng.uniform(0.0, 1.5, size=(1, 6)) + rng.normal(size=(500, 6))
    scores[:100] = np.round(scores[:100], 1)  # ties must be handled like sklearn does
    mean_ap, per_class = mean_average_precision(scores, labels)
    expected = [average_precision_score(labels[:, k], scores[:, k]) for k in range(6)]
    np.testing.assert_allclose(per_class, expected, rtol=1e-12, atol=1e-12)
    assert mean_ap == pytest.approx(float(np.mean(expected)), abs=1e-12)
    assert mean_ap == pytest.approx(average_precision_score(labels, scores, average="macro"), abs=1e-12)


def test_mean_average_precision_skips_classes_without_positives() -> None:
    labels = np.array([[1, 0], [0, 0], [1, 0]])
    scores = np.array([[0.9, 0.5], [0.1, 0.2], [0.3, 0.4]])
    mean_ap, per_class = mean_average_precision(scores, labels)
    assert per_class[0] == 1.0 and np.isnan(per_class[1]) and mean_ap == 1.0


# --------------------------------------------------------------------------------------------------
# Shipped model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin() -> ShapesNet:
    return load_builtin()


def test_builtin_model_is_small_and_in_eval_mode(builtin: ShapesNet) -> None:
    assert isinstance(builtin, ShapesNet)
    assert not builtin.training
    assert not any(module.training for module in builtin.modules())
    num_parameters = sum(parameter.numel() for parameter in builtin.parameters())
    assert 100_000 < num_parameters < 1_250_000  # < 5 MB of float32
    assert zoo_model.WEIGHTS_PATH.stat().st_size < 5 * 2**20
    assert all(parameter.device.type == "cpu" for parameter in builtin.parameters())


def test_load_builtin_returns_a_fresh_eval_model_each_time(builtin: ShapesNet) -> None:
    builtin.train()  # callers may flip the mode of their copy ...
    try:
        again = load_builtin()
        assert not again.training  # ... without affecting the next load
        assert again is not builtin
    finally:
        builtin.eval()


def test_builtin_layers_and_cam_layer_shape(builtin: ShapesNet) -> None:
    children = dict(builtin.named_children())
    for name in ("stem", "layer1", "layer2", "layer3", "avgpool", "fc"):
        assert name in children, name
    assert SHAPESNET_LAYER == "layer3" == BUILTIN_INFO["default_layer"]
    assert isinstance(builtin.fc, torch.nn.Linear) and builtin.fc.out_features == 6
    assert not any(getattr(module, "inplace", False) for module in builtin.modules())

    captured: dict[str, torch.Tensor] = {}
    handle = builtin.get_submodule(SHAPESNET_LAYER).register_forward_hook(
        lambda module, inputs, output: captured.setdefault("maps", output)
    )
    try:
        with torch.no_grad():
            logits = builtin(torch.rand(2, 3, 64, 64))
    finally:
        handle.remove()
    assert logits.shape == (2, 6)
    assert captured["maps"].shape == (2, builtin.fc.in_features, 16, 16)


def test_blur_is_the_fixed_binomial_filter(builtin: ShapesNet) -> None:
    blur = builtin.layer3.blur
    assert isinstance(blur, zoo_model.Blur2d) and not blur.weight.requires_grad
    taps = torch.tensor([1.0, 2.0, 1.0])
    expected = (torch.outer(taps, taps) / 16).expand(blur.in_channels, 1, 3, 3)
    torch.testing.assert_close(blur.weight, expected, rtol=0, atol=0)  # shipped weights hold it exactly
    # On a constant map the filter is the identity inside and loses the padded taps at the border.
    out = blur(torch.ones(1, blur.in_channels, 5, 5))[0, 0]
    assert out[1:4, 1:4].eq(1).all() and out[0, 2] == 0.75 and out[0, 0] == 0.5625
    for name in ("layer1", "layer2"):  # only the CAM layer is low-passed
        assert isinstance(builtin.get_submodule(name).blur, torch.nn.Identity)


def test_builtin_info_describes_the_shipped_model() -> None:
    assert BUILTIN_INFO["classes"] == SHAPE_CLASSES
    assert BUILTIN_INFO["input_size"] == 64
    assert "normalization inside the model" in BUILTIN_INFO["preprocessing"]
    assert 0.95 <= BUILTIN_INFO["heldout_map"] <= 1.0
    assert tuple(BUILTIN_INFO["heldout_map_per_class"]) == SHAPE_CLASSES
    assert BUILTIN_INFO["num_parameters"] == sum(p.numel() for p in ShapesNet().parameters())


@pytest.mark.slow  # ~10-20 s: renders and scores the full 2000-image held-out set
def test_builtin_info_heldout_map_is_what_the_shipped_model_scores(builtin: ShapesNet) -> None:
    batch = generate(2000, seed=zoo_train.HELDOUT_SEED)
    images = torch.from_numpy(batch.images).permute(0, 3, 1, 2)  # uint8: predict_logits divides by 255
    mean_ap, per_class = mean_average_precision(
        zoo_train.predict_logits(builtin, images).numpy(), batch.labels
    )
    assert mean_ap == pytest.approx(BUILTIN_INFO["heldout_map"], abs=5e-5)
    expected = list(BUILTIN_INFO["heldout_map_per_class"].values())
    np.testing.assert_allclose(per_class, expected, atol=5e-5)


def test_builtin_model_accuracy_on_fresh_images(builtin: ShapesNet) -> None:
    batch = generate(300, seed=20_000)
    images = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        logits = builtin(images)
    mean_ap, per_class = mean_average_precision(logits.numpy(), batch.labels)
    assert mean_ap >= 0.95, (mean_ap, per_class)
    assert per_class.min() >= 0.9, per_class
    # Thresholded at 0.5 probability, most images get every label right.
    exact_match = ((logits > 0).numpy() == (batch.labels == 1)).all(axis=1).mean()
    assert exact_match >= 0.8, exact_match


def test_load_builtin_loads_other_weights(builtin: ShapesNet, tmp_path: Path) -> None:
    torch.manual_seed(5)
    other = ShapesNet()
    torch.save(other.state_dict(), tmp_path / "run.pt")
    loaded = load_builtin(weights=tmp_path / "run.pt")
    assert not loaded.training
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name]), name
    assert not torch.equal(loaded.fc.weight, builtin.fc.weight)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt.*python -m pyattr\.zoo\.train"):
        load_builtin(weights=tmp_path / "missing.pt")


def test_load_builtin_missing_weights_says_how_to_train(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(zoo_model, "WEIGHTS_PATH", tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match=r"python -m pyattr\.zoo\.train"):
        load_builtin()


# --------------------------------------------------------------------------------------------------
# Training script
# --------------------------------------------------------------------------------------------------


def test_quick_training_run_writes_loadable_state_dict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "nested" / "quick.pt"
    num_threads = torch.get_num_threads()
    zoo_train.main(["--quick", "--out", str(out_path), "--seed", "3", "--threads", "1"])
    assert torch.get_num_threads() == num_threads  # restored after training
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "held-out mAP" in printed
    assert sorted(path.name for path in out_path.parent.iterdir()) == ["quick.pt"]  # no temp left
    state_dict = torch.load(out_path, weights_only=True)
    model = ShapesNet()
    model.load_state_dict(state_dict)
    assert set(state_dict) == set(ShapesNet().state_dict())
    torch.testing.assert_close(state_dict["layer3.blur.weight"], ShapesNet().layer3.blur.weight)  # not trained


def test_training_refuses_the_heldout_seed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="held-out"):
        zoo_train.train(tmp_path / "x.pt", epochs=1, seed=zoo_train.HELDOUT_SEED, train_size=8)


def test_random_dihedral_keeps_pixels_and_labels_invariant() -> None:
    images = torch.arange(4 * 3 * 5 * 5, dtype=torch.float32).reshape(4, 3, 5, 5)
    transformed = zoo_train.random_dihedral(images, torch.Generator().manual_seed(0))
    assert transformed.shape == images.shape
    for original, result in zip(images, transformed):
        candidates = [original.rot90(k, (1, 2)) for k in range(4)]
        candidates += [candidate.flip(2) for candidate in candidates]
        assert any(torch.equal(result, candidate) for candidate in candidates)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
