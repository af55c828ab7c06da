"""Tests for the built-in detector of pyattr.zoo: ShapesDetNet, its decoder, detect(), the mAP metric."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou as torchvision_box_iou

from pyattr.errors import InputError
from pyattr.zoo import (
    DET_CLASSES,
    DET_INFO,
    DETMODEL_LAYER,
    SHAPE_CLASSES,
    ShapesDetNet,
    class_map,
    decode_detections,
    detect,
    detection_average_precision,
    generate,
    load_builtin_detector,
    mask_boxes,
    train_det,
)
from pyattr.zoo import detmodel as zoo_detmodel


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def detector() -> ShapesDetNet:
    return load_builtin_detector()


@pytest.fixture(scope="module")
def heldout():
    return generate(100, seed=10_000)  # the held-out seed: never trained on


# --------------------------------------------------------------------------------------------------
# Ground-truth boxes
# --------------------------------------------------------------------------------------------------


def test_mask_boxes_are_tight_and_match_the_training_targets() -> None:
    masks = np.zeros((6, 10, 12), dtype=bool)
    masks[1, 2:5, 3:9] = True  # square: rows 2-4, columns 3-8
    masks[4, 7, 0] = True  # cross: one pixel
    boxes, labels = mask_boxes(masks)
    np.testing.assert_array_equal(boxes, [[3, 2, 9, 5], [0, 7, 1, 8]])
    np.testing.assert_array_equal(labels, [1, 4])
    assert mask_boxes(np.zeros((6, 4, 4), dtype=bool))[0].shape == (0, 4)
    # On rendered images: every object's pixels lie in its box and touch all four sides; the training
    # targets (computed from class maps, in torch) give the same boxes.
    batch = generate(16, seed=5)
    present, target_boxes = train_det.class_map_boxes(torch.from_numpy(class_map(batch.masks)))
    for index in range(16):
        boxes, labels = mask_boxes(batch.masks[index])
        np.testing.assert_array_equal(labels, np.flatnonzero(batch.labels[index]))
        np.testing.assert_array_equal(boxes, target_boxes[index][present[index]].numpy())
        for (x0, y0, x1, y1), label in zip(boxes.astype(int), labels):
            mask = batch.masks[index, label]
            assert mask[y0:y1, x0:x1].sum() == mask.sum()
            assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()
            assert 12 <= x1 - x0 <= 29 and 12 <= y1 - y0 <= 29


def test_dense_targets_peak_on_the_object() -> None:
    # A solid object: the peak is the cell holding the box centre, as in CenterNet.
    maps = torch.zeros(1, 64, 64, dtype=torch.uint8)
    maps[0, 20:37, 10:31] = 2  # square: box (10, 20, 31, 37), centre (20.5, 28.5): cell (x 5, y 7)
    present, boxes = train_det.class_map_boxes(maps)
    heat, peaks, distances, weights = train_det.dense_targets(present, boxes, train_det.cell_coverage(maps))
    assert peaks.sum() == 1 and peaks[0, 1, 7, 5]
    assert heat[0, 1, 7, 5] == 1.0 and heat[0, 1].max() == 1.0 and heat[0, [0, 2, 3, 4, 5]].abs().sum() == 0
    # Cell (7, 5) has centre (22, 30): 12 px to the left side, 10 to the top, 9 right, 7 bottom.
    torch.testing.assert_close(distances[0, :, 7, 5], torch.tensor([12.0, 10.0, 9.0, 7.0]))
    assert weights[0, 7, 5] == 1.0 and (weights[0] > 0).sum() > 1
    assert weights[0, 0, 0] == 0 and weights[0, 12, 5] == 0  # outside the box
    assert heat[0, 1, 4, 5] == 0 and heat[0, 1, 5, 5] > 0  # heat only on cells at least half on the object

    # A ring centred on cell (7, 9): its centre is its hole. The peak is a cell fully on the band, next to
    # the hole; the hole gets no heat; the peak regresses the ring's whole box.
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    distance = ((xx - 38) ** 2 + (yy - 30) ** 2).sqrt()
    maps = torch.zeros(1, 64, 64, dtype=torch.uint8)
    maps[0][(distance > 5) & (distance < 12)] = 6
    present, boxes = train_det.class_map_boxes(maps)
    heat, peaks, distances, weights = train_det.dense_targets(present, boxes, train_det.cell_coverage(maps))
    assert peaks.sum() == 1
    y, x = (int(i) for i in peaks[0, 5].nonzero()[0])
    assert (maps[0, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4] == 6).all()
    full = train_det.cell_coverage(maps)[0, 5] == 1
    cell_distance = (torch.arange(16.0).view(-1, 1) - 7) ** 2 + (torch.arange(16.0) - 9) ** 2
    assert cell_distance[y, x] == 4 and cell_distance[full].min() == 4  # the nearest full cells to the hole
    assert heat[0, 5, y, x] == 1.0 and heat[0, 5, 7, 9] == 0 and maps[0, 28:32, 36:40].eq(0).all()
    x0, y0, x1, y1 = boxes[0, 5].tolist()
    cx, cy = 4 * x + 2, 4 * y + 2
    torch.testing.assert_close(distances[0, :, y, x], torch.tensor([cx - x0, cy - y0, x1 - cx, y1 - cy]))
    assert weights[0, y, x] == 1.0 and weights[0, 7, 9] > 0.3  # the hole cell still regresses the box

    # Rendered images: every object's peak lies on it (its 4x4 patch's central pixels in its mask), once.
    batch = generate(32, seed=5)
    maps = torch.from_numpy(class_map(batch.masks))
    present, boxes = train_det.class_map_boxes(maps)
    _, peaks, _, _ = train_det.dense_targets(present, boxes, train_det.cell_coverage(maps))
    assert torch.equal(peaks.flatten(2).sum(-1), present.long())
    for image, k, y, x in peaks.nonzero().tolist():
        assert batch.masks[image, k, 4 * y + 1 : 4 * y + 3, 4 * x + 1 : 4 * x + 3].all(), (image, k)


# --------------------------------------------------------------------------------------------------
# mAP: analytic cases
# --------------------------------------------------------------------------------------------------


def _found(boxes, labels, scores) -> dict:
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "labels": np.asarray(labels), "scores": np.asarray(scores)}


def test_detection_average_precision_analytic() -> None:
    box = [0, 0, 10, 10]
    far = [50, 50, 60, 60]
    # One image, three objects of class 0. Ranked detections: TP, FP, FP, TP, TP. Precision 1, 1/2,
    # 1/3, 1/2, 3/5 at recall 1/3, 1/3, 1/3, 2/3, 1. All-point interpolation replaces the 1/2 at
    # recall 2/3 with the 3/5 after it: AP = (1 + 3/5 + 3/5) / 3 = 0.7333 (un-interpolated: 0.7).
    truth = [(np.array([box, [20, 0, 30, 10], [40, 0, 50, 10]], float), np.array([0, 0, 0]))]
    found = [_found([box, far, far, [20, 0, 30, 10], [40, 0, 50, 10]], [0] * 5, [0.9, 0.8, 0.7, 0.6, 0.5])]
    mean_ap, per_class = detection_average_precision(found, truth, num_classes=2)
    assert per_class[0] == pytest.approx(11 / 15) and np.isnan(per_class[1]) and mean_ap == pytest.approx(11 / 15)

    # A duplicate of a matched box is a false positive; a box of the wrong class matches nothing.
    truth = [(np.array([box], float), np.array([0]))]
    found = [_found([box, box, box], [0, 0, 1], [0.9, 0.95, 0.99])]
    _, per_class = detection_average_precision(found, truth, num_classes=2)
    assert per_class[0] == pytest.approx(1.0)  # the first-ranked (0.95) matches; recall 1 at precision 1
    found = [_found([box, box], [0, 0], [0.5, 0.5])]  # tie: one TP, one FP after it
    assert detection_average_precision(found, truth, num_classes=1)[0] == pytest.approx(1.0)

    # IoU threshold: [0, 0, 10, 20] against [0, 0, 10, 10] has IoU exactly 1/2.
    half = [_found([[0, 0, 10, 20]], [0], [0.9])]
    assert detection_average_precision(half, truth, num_classes=1, iou_threshold=0.5)[0] == 1.0
    assert detection_average_precision(half, truth, num_classes=1, iou_threshold=0.51)[0] == 0.0

    # Two images; a missed object caps recall at 1/2: AP = 1/2.
    truth = [(np.array([box], float), np.array([3])), (np.array([far], float), np.array([3]))]
    found = [_found([box], [3], [0.2]), _found(np.zeros((0, 4)), [], [])]
    mean_ap, per_class = detection_average_precision(found, truth, num_classes=6)
    assert per_class[3] == pytest.approx(0.5) and mean_ap == pytest.approx(0.5)
    assert np.isnan(per_class[[0, 1, 2, 4, 5]]).all()
    with pytest.raises(ValueError, match="ground-truth"):
        detection_average_precision(found, truth[:1])


def test_box_iou_matches_torchvision() -> None:
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 64, size=(2, 20, 2, 2))
    boxes = np.concatenate([corners.min(2), corners.max(2)], axis=-1)  # (2, 20, 4) xyxy
    expected = torchvision_box_iou(torch.from_numpy(boxes[0]), torch.from_numpy(boxes[1])).numpy()
    np.testing.assert_allclose(zoo_detmodel.box_iou(boxes[0], boxes[1]), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Model, decoder, detect()
# --------------------------------------------------------------------------------------------------


def test_decode_detections_hand_made_output() -> None:
    raw = torch.full((2, 4 + 6, 3, 5), -30.0)  # softplus(-30) ~ 0: zero-size boxes at the cell centres
    inverse_softplus = math.log(math.expm1(1.0))  # softplus of this is 1 cell = 4 px
    raw[1, 0:4, 2, 3] = torch.tensor([2.0, 1.0, 0.5, 3.0]).expm1().log()  # 8, 4, 2, 12 px
    raw[1, 4 + 5, 2, 3] = 0.0  # ring probability 1/2
    raw[0, 0:4, 0, 0] = inverse_softplus
    boxes, scores = decode_detections(raw)
    assert boxes.shape == (2, 15, 4) and scores.shape == (2, 15, 6)
    # Cell (y 2, x 3) is candidate 2 * 5 + 3 = 13, centred at (14, 10) px.
    torch.testing.assert_close(boxes[1, 13], torch.tensor([14 - 8.0, 10 - 4.0, 14 + 2.0, 10 + 12.0]))
    torch.testing.assert_close(boxes[0, 0], torch.tensor([-2.0, -2.0, 6.0, 6.0]))
    centres = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(5.0), indexing="ij"), -1).flip(-1)
    centres = ((centres + 0.5) * 4).reshape(15, 2)
    torch.testing.assert_close(boxes[0, 1:, :2], centres[1:], atol=1e-12, rtol=0)
    torch.testing.assert_close(boxes[0, 1:, 2:], centres[1:], atol=1e-12, rtol=0)
    assert scores[1, 13, 5] == 0.5 and scores.amax() == 0.5
    torch.testing.assert_close(scores[0], torch.sigmoid(torch.tensor(-30.0)).expand(15, 6))


def test_detnet_shapes_layer_and_gradient() -> None:
    torch.manual_seed(0)
    model = ShapesDetNet().eval()
    captured: list[torch.Tensor] = []
    layer = dict(model.named_modules())[DETMODEL_LAYER]
    handle = layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        output = model(torch.rand(2, 3, 64, 64))
    finally:
        handle.remove()
    assert output.shape == (2, 10, 16, 16) and captured[0].shape == (2, 64, 16, 16)
    # The default layer feeds the two 1x1 heads and nothing else.
    torch.testing.assert_close(output, torch.cat([model.box(captured[0]), model.cls(captured[0])], 1))
    images = torch.rand(1, 3, 64, 64, requires_grad=True)
    boxes, scores = decode_detections(model(images))
    (gradient,) = torch.autograd.grad(scores[0, 100, 2] + boxes[0, 100].sum(), images)
    assert gradient.abs().sum() > 0


def test_detnet_traces_and_exports_with_the_decoder(detector) -> None:
    class Decoded(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return decode_detections(self.model(x))

    images = _to_tensor(generate(3, seed=10_000).images)
    with torch.no_grad():
        eager = detector(images)
        for batch in (1, 2):
            traced = torch.jit.trace(detector, images[:batch], check_trace=False)
            torch.testing.assert_close(traced(images[:batch]), eager[:batch], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(traced(images), eager, rtol=1e-5, atol=1e-5)  # batch 2 trace, batch 3
        # The decoder traces with the model as one graph (traced at batch 2, run at batch 3).
        decoded = torch.jit.trace(Decoded(detector), images[:2], check_trace=False)
        for got, expected in zip(decoded(images), decode_detections(eager)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_shipped_detector_reaches_map_on_heldout_images(detector, heldout) -> None:
    truth = [mask_boxes(masks) for masks in heldout.masks]
    found = detect(detector, _to_tensor(heldout.images), score_threshold=train_det.EVAL_SCORE_THRESHOLD)
    mean_ap, per_class = detection_average_precision(found, truth)
    assert mean_ap >= 0.9 and per_class.min() >= 0.8, per_class
    # At the default threshold it finds each object once: the predicted classes are the image's.
    found = detect(detector, _to_tensor(heldout.images))
    exact = [sorted(d["labels"].tolist()) == np.flatnonzero(label).tolist() for d, label in zip(found, heldout.labels)]
    assert np.mean(exact) >= 0.95


def test_gradcam_of_each_detection_peaks_on_the_object_rings_included(detector, heldout) -> None:
    """The training targets put each object's peak on the object, so Grad-CAM of a detected box peaks on its
    mask -- also for a ring, whose box centre is its hole (the centre-peak weights hit 0% of rings)."""
    import pyattr
    from pyattr.targets import DetectionTarget

    images = _to_tensor(heldout.images[:40])
    with torch.no_grad():
        found = detect(detector, images)
    result = pyattr.GradCAM(detector, DETMODEL_LAYER)(
        images, DetectionTarget.from_detections(found, decode=decode_detections))
    hits = {name: [] for name in DET_CLASSES}
    for index, result_boxes in enumerate(found):
        for box in range(len(result_boxes["labels"])):
            label = int(result_boxes["labels"][box])
            mask = torch.from_numpy(heldout.masks[index, label])
            if not mask.any():
                continue  # a false detection: no object of that class
            hits[DET_CLASSES[label]].append(bool(pyattr.pointing_game(result.maps[index, box][None], mask[None])[0]))
    assert len(hits["ring"]) >= 8 and all(hits["ring"]), hits["ring"]
    assert np.mean([hit for h in hits.values() for hit in h]) >= 0.95, {name: np.mean(h) for name, h in hits.items()}


def test_detect_output_contract(detector, heldout) -> None:
    images = _to_tensor(heldout.images[:8])
    found = detect(detector, images, score_threshold=0.05, iou_threshold=0.4)
    assert len(found) == 8
    _boxes, scores = decode_detections(detector(images))
    for index, result in enumerate(found):
        assert set(result) == {"boxes", "labels", "scores"}
        count = len(result["scores"])
        assert result["boxes"].shape == (count, 4) and result["labels"].shape == (count,)
        assert result["labels"].dtype == torch.int64 and result["boxes"].dtype == torch.float32
        assert (result["scores"][:-1] >= result["scores"][1:]).all() and (result["scores"] > 0.05).all()
        assert ((result["boxes"] >= 0) & (result["boxes"] <= 64)).all()
        assert ((0 <= result["labels"]) & (result["labels"] < len(DET_CLASSES))).all()
        # Every kept score is one of the decoder's (candidate, class) probabilities.
        for score, label in zip(result["scores"], result["labels"]):
            assert torch.isclose(scores[index, :, label], score, rtol=0, atol=0).any()
        # NMS: no two kept boxes of one class overlap more than iou_threshold.
        for label in result["labels"].unique():
            same = result["boxes"][result["labels"] == label]
            overlaps = torchvision_box_iou(same, same).fill_diagonal_(0)
            assert (overlaps <= 0.4).all()
    assert sum(len(r["scores"]) for r in detect(detector, images, score_threshold=1.0)) == 0
    with pytest.raises(InputError, match="N, 3, H, W"):
        detect(detector, images[0])


# --------------------------------------------------------------------------------------------------
# Loader, training script, DET_INFO
# --------------------------------------------------------------------------------------------------


def test_load_builtin_detector_refuses_bad_weights(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train_det"):
        load_builtin_detector(weights=tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(InputError, match="garbage.pt.*train_det"):
        load_builtin_detector(weights=garbage)
    wrong = tmp_path / "segmenter.pt"
    torch.save(zoo_detmodel.ShapesDetNet(num_classes=3).state_dict(), wrong)
    with pytest.raises(InputError, match="does not hold ShapesDetNet weights"):
        load_builtin_detector(weights=wrong)


def test_train_det_refuses_reserved_seeds_and_smoke_runs(tmp_path) -> None:
    for seed in (10_000, 40_000, 45_000):
        with pytest.raises(ValueError, match="reserved"):
            train_det.train(tmp_path / "x.pt", seed=seed)
    out = tmp_path / "tiny.pt"
    threads = torch.get_num_threads()
    mean_ap, per_class = train_det.train(out, epochs=1, train_size=32, heldout_size=8, num_threads=1)
    assert torch.get_num_threads() == threads
    assert per_class.shape == (6,) and 0.0 <= mean_ap <= 1.0
    reloaded = load_builtin_detector(weights=out)
    assert reloaded(torch.rand(1, 3, 64, 64)).shape == (1, 10, 16, 16)
    again = tmp_path / "again.pt"
    train_det.train(again, epochs=1, train_size=32, heldout_size=8, num_threads=1)
    first, second = torch.load(out, weights_only=True), torch.load(again, weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_det_info_matches_files() -> None:
    assert DET_CLASSES == SHAPE_CLASSES and DET_INFO["classes"] == DET_CLASSES
    assert DET_INFO["default_layer"] == DETMODEL_LAYER
    assert zoo_detmodel.DET_WEIGHTS_PATH.is_file()
    assert zoo_detmodel.DET_WEIGHTS_PATH.stat().st_size < 1.5e6
    assert DET_INFO["num_parameters"] == sum(p.numel() for p in ShapesDetNet().parameters())
    assert set(DET_INFO["heldout_ap50_per_class"]) == set(DET_CLASSES)
    per_class = list(DET_INFO["heldout_ap50_per_class"].values())
    assert DET_INFO["heldout_map50"] == pytest.approx(np.mean(per_class), abs=1e-4)
    assert DET_INFO["heldout_map50"] >= 0.9
