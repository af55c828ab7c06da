"""Object detection targets (issue 15): the matching, torchvision's detectors, pytorch-grad-cam, the export contract.

- the matching on hand-made candidates: IoU values, the strict threshold, padding, zero-area and clipped
  boxes, no match (score 0, zero map, ``matched`` False), ``score`` vs ``score+iou``, ``match="iou"`` vs
  ``"class"``; a tiny linear detector whose Saliency map is its gradient written out by hand;
- :class:`pyattr.detection.DenseCandidates` against the model's own eval output (RetinaNet, FCOS, SSDlite,
  random init): every post-NMS detection is one of the wrapper's candidates, with the same box and score;
- Faster R-CNN (post-NMS detections through ``DetectionsDecoder``): pyattr's Grad-CAM with a
  ``DetectionTarget`` ("score+iou") vs pytorch-grad-cam's Grad-CAM with its ``FasterRCNNBoxScoreTarget``,
  one box at a time, on the finest FPN level (``backbone.fpn.layer_blocks.0``: pytorch-grad-cam hooks
  gradients of tensor outputs only, so the backbone's dict output cannot be its Grad-CAM layer);
- the export contract (eager == ONNX in onnxruntime == TorchScript == .pt2) for Grad-CAM and Saliency on a
  small torchvision FCOS (resnet18 FPN, 64 px), batches 1 and 2, three boxes per image (one padded, one
  unmatched); Faster R-CNN refuses export with an ExportError. The full method list on the torchvision
  detectors: benchmarks/detection_export.py.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from contract import assert_detection_contract
from torch import nn

import pyattr
from pyattr.detection import DenseCandidates, DetectionsDecoder, feature_levels
from pyattr.errors import ExportError, InputError
from pyattr.targets import DetectionTarget
from pyattr.targets.detection import pairwise_iou

D = torchvision.models.detection


# -- the matching on hand-made candidates -----------------------------------------------------------------
CAND_BOXES = torch.tensor([[[0.0, 0, 10, 10],      # IoU 1 with the box [0, 0, 10, 10]
                            [0.0, 0, 10, 5],       # IoU 0.5
                            [5.0, 0, 15, 10],      # IoU 1/3
                            [20.0, 20, 30, 30]]])  # IoU 0
# per-class scores (K = 3): candidate 0's top class is 2, candidate 1's is 1
CAND_SCORES = torch.tensor([[[0.1, 0.3, 0.6], [0.2, 0.7, 0.1], [0.5, 0.25, 0.25], [0.9, 0.05, 0.05]]])


def match(boxes, labels, **options):
    target = DetectionTarget(**options)
    inputs = {"boxes": torch.as_tensor(boxes, dtype=torch.float32)[None],
              "box_classes": torch.as_tensor(labels)[None]}
    inputs = target.prepare_inputs(torch.zeros(1, 3, 32, 32), inputs)
    objective, matched, iou, best = target.matching((CAND_BOXES, CAND_SCORES), inputs)
    return objective[0], matched[0], iou[0], best[0]


def test_pairwise_iou_values():
    box = torch.tensor([[[0.0, 0, 10, 10]]])
    iou = pairwise_iou(box, CAND_BOXES)[0, 0]
    assert torch.allclose(iou, torch.tensor([1.0, 0.5, 1 / 3, 0.0]))
    ref = torchvision.ops.box_iou(box[0], CAND_BOXES[0])[0]
    assert torch.allclose(iou, ref)
    # zero-area against zero-area: 0, not NaN
    assert float(pairwise_iou(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))) == 0.0


def test_match_iou_ranking_score_and_threshold():
    box = [[0.0, 0, 10, 10], [0.0, 0, 10, 5], [0.0, 0, 10, 5], [0.0, 0, 10, 10]]
    objective, matched, iou, best = match(box, [1, 1, 2, -1])
    # box 0: best candidate 0 (IoU 1), class 1 score 0.3; box 1: candidate 1 (IoU 1), class 1 score 0.7;
    # box 2: candidate 1, class 2 score 0.1; box 3: padded
    assert best[:3].tolist() == [0, 1, 1]
    assert torch.allclose(objective, torch.tensor([0.3, 0.7, 0.1, 0.0]))
    assert matched.tolist() == [True, True, True, False]
    assert torch.allclose(iou, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    # score + IoU (pytorch-grad-cam's objective)
    objective, *_ = match(box, [1, 1, 2, -1], objective="score+iou")
    assert torch.allclose(objective, torch.tensor([1.3, 1.7, 1.1, 0.0]))


def test_match_threshold_is_strict():
    box = [[0.0, 0, 10, 10]]
    cands = (CAND_BOXES[:, 1:], CAND_SCORES[:, 1:])  # best IoU 0.5 exactly
    target = DetectionTarget(iou_threshold=0.5)
    inputs = {"boxes": torch.tensor([box]), "box_classes": torch.tensor([[1]])}
    objective, matched, iou, _ = target.matching(cands, inputs)
    assert not bool(matched[0, 0]) and float(objective[0, 0]) == 0.0 and float(iou[0, 0]) == 0.0
    objective, matched, iou, _ = DetectionTarget(iou_threshold=0.49).matching(cands, inputs)
    assert bool(matched[0, 0]) and float(objective[0, 0]) == pytest.approx(0.7) and float(iou[0, 0]) == 0.5


def test_match_class_ranking():
    # box [0, 0, 10, 10] of class 1: by IoU alone candidate 0 (class-1 score 0.3); among the candidates whose top
    # class is 1 only candidate 1 (IoU 0.5, not > 0.5: no match at 0.5, a match at 0.4 with score 0.7)
    box = [[0.0, 0, 10, 10]]
    assert match(box, [1], match="iou")[3].tolist() == [0]
    objective, matched, _, _ = match(box, [1], match="class")
    assert not bool(matched[0]) and float(objective[0]) == 0
    objective, matched, iou, best = match(box, [1], match="class", iou_threshold=0.4)
    assert best.tolist() == [1] and bool(matched[0]) and float(objective[0]) == pytest.approx(0.7)
    assert float(iou[0]) == pytest.approx(0.5)


def test_match_zero_area_outside_and_zero_score():
    # a zero-area box, a box entirely outside the 32 px image (clipped to zero area), a box far from every
    # candidate: no match; a box whose best candidate scores 0 for its class: no match (pgc: label differs)
    boxes = [[5.0, 5, 5, 9], [40.0, 40, 60, 60], [22.0, 0, 32, 8], [0.0, 0, 10, 10]]
    scores = CAND_SCORES.clone()
    scores[0, 0, 0] = 0.0
    target = DetectionTarget()
    inputs = target.prepare_inputs(torch.zeros(1, 3, 32, 32), {"boxes": torch.tensor([boxes]),
                                                              "box_classes": torch.tensor([[0, 0, 0, 0]])})
    assert inputs["boxes"][0, 1].tolist() == [32.0, 32.0, 32.0, 32.0]
    objective, matched, _, _ = target.matching((CAND_BOXES, scores), inputs)
    assert matched[0].tolist() == [False, False, False, False]
    assert objective.abs().sum() == 0


def test_clipping_partly_outside():
    # [-10, 0, 10, 10] clipped to [0, 0, 10, 10]: IoU 1 with candidate 0
    objective, matched, iou, _ = match([[-10.0, 0, 10, 10]], [2])
    assert bool(matched[0]) and float(iou[0]) == 1.0 and float(objective[0]) == pytest.approx(0.6)


class LinearDetector(nn.Module):
    """Fixed candidate boxes, sigmoid scores linear in the image: ``scores[n, m, k] = sigmoid(x_n . W[:, m*K+k])``."""

    def __init__(self, boxes: torch.Tensor, k: int = 3, size: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("boxes", boxes)
        self.k = k
        self.weight = nn.Parameter(torch.randn(3 * size * size, boxes.shape[0] * k, generator=g) * 0.1)

    def forward(self, x):
        n = x.shape[0]
        scores = torch.sigmoid(x.flatten(1) @ self.weight).view(n, -1, self.k)
        return self.boxes[None].expand(n, -1, 4), scores


def test_linear_detector_saliency_is_the_gradient_and_unmatched_maps_are_zero():
    model = LinearDetector(CAND_BOXES[0]).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 5], [20.0, 20, 30, 30], [0.0, 0, 10, 10]])
    labels = torch.tensor([[2, 1, 0, 0], [1, 1, 0, -1]])  # box 2: IoU 1 with candidate 3; box 3: padded
    boxes[2] = torch.tensor([6.0, 6, 7, 7])  # inside the 8 px image, overlaps no candidate > 0.5
    target = DetectionTarget(boxes=boxes, box_classes=labels)
    res = pyattr.Saliency(model)(x, target)
    assert res.maps.shape == (2, 4, 8, 8) and res.raw.shape == (2, 4, 8, 8)
    assert res.target.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert res.outputs["matched"].tolist() == [[True, True, False, True], [True, True, False, False]]
    s = model(x)[1].detach()
    for n in range(2):
        for b, m in ((0, 0), (1, 1)):
            c = int(labels[n, b])
            p = s[n, m, c]
            assert float(res.scores[n, b]) == pytest.approx(float(p), rel=1e-6)
            grad = (p * (1 - p) * model.weight[:, m * 3 + c]).detach().view(3, 8, 8)
            assert torch.allclose(res.raw[n, b], grad.abs().amax(0), rtol=1e-5, atol=1e-9)
    assert float(res.scores[0, 2]) == 0 and float(res.raw[:, 2].abs().sum()) == 0
    assert float(res.maps[:, 2].abs().sum()) == 0 and float(res.maps[1, 3].abs().sum()) == 0
    # classes= picks boxes: box 1 alone is the same map
    one = pyattr.Saliency(model)(x, DetectionTarget(boxes=boxes, box_classes=labels, classes=1))
    assert torch.allclose(one.raw, res.raw[:, 1])


def test_bad_inputs():
    model = LinearDetector(CAND_BOXES[0]).eval()
    x = torch.randn(1, 3, 8, 8)
    sal = pyattr.Saliency(model)
    box = [[0.0, 0, 4, 4]]
    with pytest.raises(InputError, match="detector scores 3 classes"):
        sal(x, DetectionTarget(boxes=box, box_classes=[3]))
    with pytest.raises(InputError, match=r"\(N, B, 4\) or \(B, 4\)"):
        sal(x, DetectionTarget(boxes=[0.0, 0, 4, 4], box_classes=[0]))
    with pytest.raises(InputError, match=r"box_classes must be \(1, 1\) or \(1,\)"):
        sal(x, DetectionTarget(boxes=box, box_classes=[0, 1]))
    with pytest.raises(InputError, match="B = 0"):
        sal(x, DetectionTarget(boxes=torch.zeros(0, 4), box_classes=torch.zeros(0, dtype=torch.long)))
    with pytest.raises(InputError, match="needs boxes"):
        sal(x, DetectionTarget())
    with pytest.raises(InputError, match="NaN"):
        sal(x, DetectionTarget(boxes=[[0.0, 0, float("nan"), 4]], box_classes=[0]))
    with pytest.raises(InputError, match="integer class ids"):
        sal(x, DetectionTarget(boxes=box, box_classes=[0.5]))
    with pytest.raises(InputError, match="< -1"):
        sal(x, DetectionTarget(boxes=box, box_classes=[-2]))
    with pytest.raises(InputError, match="objective"):
        DetectionTarget(objective="iou")
    with pytest.raises(InputError, match="iou_threshold"):
        DetectionTarget(iou_threshold=1.5)
    with pytest.raises(InputError, match="decode="):
        pyattr.Saliency(nn.Conv2d(3, 2, 1))(x, DetectionTarget(boxes=box, box_classes=[0]))
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(InputError, match="class logits only"):
        pyattr.CAM(conv, "0")(x, DetectionTarget(boxes=box, box_classes=[0]))


# -- torchvision's dense detectors: the wrapper's candidates hold the model's detections ------------------
def own_detections_are_candidates(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        detections = model(list(x))
        boxes, scores = DenseCandidates(model)(x)
    count = 0
    for i, det in enumerate(detections):
        assert len(det["boxes"]) > 0
        for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
            same = (boxes[i] == box).all(1) & (scores[i, :, label] == score)
            assert bool(same.any()), f"detection {box.tolist()} ({int(label)}, {float(score)}) is no candidate"
            count += 1
    return count


@pytest.mark.parametrize("name", [
    "small_fcos", "small_retinanet",
    pytest.param("retinanet_resnet50_fpn", marks=pytest.mark.slow),
    pytest.param("fcos_resnet50_fpn", marks=pytest.mark.slow),
    pytest.param("ssdlite320_mobilenet_v3_large", marks=pytest.mark.slow)])
def test_dense_candidates_hold_the_models_detections(name):
    torch.manual_seed(0)
    size = 64 if name.startswith("small") else 128
    if name.startswith("small"):
        model = globals()[name](size=size)
    else:
        kw = {} if name.startswith("ssd") else {"min_size": size, "max_size": size}
        model = getattr(D, name)(weights=None, weights_backbone=None, **kw).eval()
    if name.startswith("ssd"):
        model.transform.fixed_size = (size, size)  # the test's own model: no resize
    model.score_thresh = 0.0
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    params = {k: v.clone() for k, v in model.state_dict().items()}
    assert own_detections_are_candidates(model, x) >= 100
    wrapped = DenseCandidates(model)
    # no copy: the wrapper's parameters are the model's tensors
    ours = dict(wrapped.named_parameters())
    assert ours and all(ours[k].data_ptr() == model.get_parameter(k).data_ptr() for k in ours)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())


# -- Faster R-CNN: pytorch-grad-cam's FasterRCNNBoxScoreTarget ------------------------------------------
@pytest.fixture(scope="module")
def rcnn():
    torch.manual_seed(0)
    model = D.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, min_size=128, max_size=128,
                                                rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50).eval()
    model.roi_heads.score_thresh = 0.0  # random init: the class scores are ~1/91, below the default 0.05
    return model


def pgc_raw_gradcam(model, layer, x, target):
    import pytorch_grad_cam as pgc

    cam = pgc.GradCAM(model=model, target_layers=[model.get_submodule(layer)])
    try:
        outputs = cam.activations_and_grads(x)
        sum(t(o) for t, o in zip([target], outputs)).backward()
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = cam.get_cam_image(x, layer, [target], acts, grads, False)
        return torch.from_numpy(np.maximum(raw, 0))[0]
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)


def test_faster_rcnn_gradcam_agrees_with_pytorch_grad_cam(rcnn):
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    layer = "backbone.fpn.layer_blocks.0"
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        det = rcnn(x)[0]
    assert len(det["boxes"]) >= 2
    boxes = det["boxes"][:2].clone()
    labels = det["labels"][:2].clone()
    boxes = torch.cat([boxes, torch.tensor([[0.0, 0, 2, 2]])])  # a box no detection matches
    labels = torch.cat([labels, torch.tensor([1])])
    target = DetectionTarget(boxes=boxes, box_classes=labels, decode=DetectionsDecoder.of(rcnn),
                             objective="score+iou")
    res = pyattr.GradCAM(rcnn, layer)(x, target)
    assert res.outputs["matched"][0].tolist() == [True, True, False]
    for b in range(2):
        theirs = pgc_raw_gradcam(rcnn, layer, x, FasterRCNNBoxScoreTarget([labels[b]], [boxes[b].numpy()]))
        assert float(theirs.abs().max()) > 0
        err = float((res.raw[0, b] - theirs).abs().max() / theirs.abs().max())
        print(f"rel_err box {b}: {err:.2e}")
        assert err < 1e-4
        score = float(det["scores"][b]) + 1.0  # its own detection: IoU 1
        assert float(res.scores[0, b]) == pytest.approx(score, rel=1e-5)
    assert float(res.raw[0, 2].abs().sum()) == 0 and float(res.maps[0, 2].abs().sum()) == 0
    assert float(res.scores[0, 2]) == 0


def pgc_eigen_projection(cls, model, layer, x, target):
    """pytorch-grad-cam's signed Eigen(-Grad)-CAM projection for one image (before its ReLU), with its LAPACK
    sign flipped to pyattr's convention: the map correlates non-negatively with the channel sum of what was
    projected (activations, or gradients x activations)."""
    import pytorch_grad_cam as pgc

    cam = getattr(pgc, cls)(model=model, target_layers=[model.get_submodule(layer)])
    try:
        outputs = cam.activations_and_grads(x)
        projected = cam.activations_and_grads.activations[0].numpy()
        grads = None
        if cam.uses_gradients:
            sum(t(o) for t, o in zip([target], outputs)).backward()
            grads = cam.activations_and_grads.gradients[0].numpy()
            projected = grads * projected
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = torch.from_numpy(cam.get_cam_image(x, layer, [target], projected if grads is None else
                                                     cam.activations_and_grads.activations[0].numpy(), grads,
                                                     False))[0].double()
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    channel_sum = torch.from_numpy(projected[0]).double().sum(0)
    flip = float((raw * (channel_sum - channel_sum.mean())).sum()) < 0
    return torch.relu(-raw if flip else raw), flip


@pytest.mark.parametrize("method", ["EigenCAM", pytest.param("EigenGradCAM", marks=pytest.mark.slow)])
def test_faster_rcnn_eigencam_agrees_with_pytorch_grad_cam(rcnn, method):
    """Issue 15 item 5: Eigen-CAM with pytorch-grad-cam's FasterRCNNBoxScoreTarget (which Eigen-CAM ignores: no
    gradient) on the Grad-CAM test's layer; every box, matched or not, gets the same map. Eigen-Grad-CAM: one
    map per box, zero for the unmatched box."""
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    layer = "backbone.fpn.layer_blocks.0"
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        det = rcnn(x)[0]
    boxes = torch.cat([det["boxes"][:2].clone(), torch.tensor([[0.0, 0, 2, 2]])])  # the last: no detection matches
    labels = torch.cat([det["labels"][:2].clone(), torch.tensor([1])])
    target = DetectionTarget(boxes=boxes, box_classes=labels, decode=DetectionsDecoder.of(rcnn),
                             objective="score+iou")
    res = getattr(pyattr, method)(rcnn, layer)(x, target)
    assert res.outputs["matched"][0].tolist() == [True, True, False]
    for b in range(1 if method == "EigenCAM" else 2):  # Eigen-CAM ignores the target: one reference map
        theirs, flip = pgc_eigen_projection(method, rcnn, layer, x,
                                            FasterRCNNBoxScoreTarget([labels[b]], [boxes[b].numpy()]))
        assert float(theirs.abs().max()) > 0
        err = float((res.raw[0, b].double() - theirs).abs().max() / theirs.abs().max())
        print(f"{method} rel_err box {b}: {err:.2e} (pytorch-grad-cam's sign flipped: {flip})")
        assert err < 1e-4
    if method == "EigenCAM":  # every box, the unmatched one too, gets the same map
        assert torch.equal(res.raw[0, 0], res.raw[0, 1]) and torch.equal(res.raw[0, 0], res.raw[0, 2])
    else:
        assert float(res.raw[0, 2].abs().sum()) == 0 and float(res.maps[0, 2].abs().sum()) == 0


def builtin_detector_case(b: int):
    """The built-in detector, two generated images (seed 4242) and B = ``b`` boxes per image: up to b - 1 of each
    image's detections, then padding (class -1), and in the second image's last slot a 3x3 corner box of class 0
    that no candidate matches (IoU <= 0.5)."""
    model = pyattr.zoo.load_builtin_detector()
    x = torch.from_numpy(pyattr.zoo.generate(2, seed=4242).images).permute(0, 3, 1, 2).float() / 255
    boxes = torch.zeros(2, b, 4)
    labels = torch.full((2, b), -1, dtype=torch.long)
    for j, det in enumerate(pyattr.zoo.detect(model, x)):
        k = min(b - 1, len(det["labels"]))
        boxes[j, :k], labels[j, :k] = det["boxes"][:k], det["labels"][:k]
    boxes[1, b - 1], labels[1, b - 1] = torch.tensor([0.0, 0.0, 3.0, 3.0]), 0
    return model, x, boxes, labels


# CI time: both ONNX exports take the direct route (about 8 s each on 2 cores: Eigen-Grad-CAM's (N, B) target is
# one forward pass and B backward passes, and aten::rsub.Scalar / sym_numel are spelled for the translation).
@pytest.mark.parametrize("method", ["EigenCAM", "EigenGradCAM"])
def test_eigencam_on_the_builtin_detector_and_in_onnx(method, tmp_path):
    """Eigen-CAM and Eigen-Grad-CAM on the built-in detector with a DetectionTarget, eagerly and in ONNX
    (onnxruntime == eager, batches 1 and 2; the other formats: the classifier's contract in test_eigencam.py)."""
    model, x, boxes, labels = builtin_detector_case(2)
    m = getattr(pyattr, method)(model, pyattr.zoo.DETMODEL_LAYER)
    ref = m(x, DetectionTarget(boxes=boxes, box_classes=labels, decode=pyattr.zoo.decode_detections))
    assert ref.outputs["matched"].tolist() == [[True, False], [True, False]]
    assert ref.maps.shape == (2, 2, 64, 64) and bool(torch.isfinite(ref.maps).all())
    if method == "EigenCAM":  # the target is ignored: a padded or unmatched box gets the image's map
        assert torch.equal(ref.raw[:, 0], ref.raw[:, 1]) and bool((ref.raw.flatten(2).amax(2) > 0).all())
    else:
        assert ((ref.maps.flatten(2).amax(2) > 0) == ref.outputs["matched"]).all()
    assert_detection_contract(m, x, boxes, labels, tmp_path,
                              DetectionTarget(decode=pyattr.zoo.decode_detections, max_boxes=2), formats=("onnx",))


def test_faster_rcnn_wrapper_and_export_refused(rcnn, tmp_path):
    with pytest.raises(InputError, match="two-stage"):
        DenseCandidates(rcnn)
    cam = pyattr.GradCAM(rcnn, "backbone.fpn.layer_blocks.0")
    with pytest.raises(ExportError, match="NMS"):
        pyattr.export(cam, torch.rand(1, 3, 128, 128), tmp_path / "rcnn.pt2",
                      target=DetectionTarget(max_boxes=2, decode=DetectionsDecoder.of(rcnn)))


# -- the export contract on a small torchvision FCOS ------------------------------------------------------
def tiny_body() -> nn.Module:
    """A small convolutional body with resnet's stage names (strides 8, 16, 32 at layer2..layer4)."""
    def stage(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(OrderedDict(stem=stage(3, 16), layer1=stage(16, 16), layer2=stage(16, 32),
                                     layer3=stage(32, 32), layer4=stage(32, 64)))


def small_fpn(extra: str = "p6p7") -> nn.Module:
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    return BackboneWithFPN(tiny_body(), {"layer2": "0", "layer3": "1", "layer4": "2"}, [32, 32, 64], 64,
                           extra_blocks=LastLevelP6P7(64, 64))


def small_fcos(num_classes: int = 5, size: int = 64) -> nn.Module:
    """torchvision's FCOS on a small body: FPN of 64 channels (P3-P7), a one-conv head (random init)."""
    from torchvision.models.detection.fcos import FCOS, FCOSHead

    torch.manual_seed(0)
    head = FCOSHead(64, 1, num_classes, num_convs=1)
    return FCOS(small_fpn(), num_classes, min_size=size, max_size=size, head=head, score_thresh=0.0).eval()


def small_retinanet(num_classes: int = 5, size: int = 64) -> nn.Module:
    """torchvision's RetinaNet on the same small FPN (9 anchors per location, random init)."""
    from torchvision.models.detection.retinanet import RetinaNet

    torch.manual_seed(0)
    return RetinaNet(small_fpn(), num_classes, min_size=size, max_size=size, score_thresh=0.0).eval()


@pytest.fixture(scope="module")
def fcos_case():
    model = small_fcos()
    wrapped = DenseCandidates(model)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        detections = model(list(x))
    # random init: many boxes are degenerate (zero width or height: never matched); take three with an area
    keep = [torch.nonzero(torchvision.ops.box_area(d["boxes"]) > 0.1)[:3, 0] for d in detections]
    boxes = torch.stack([d["boxes"][k] for d, k in zip(detections, keep)])
    labels = torch.stack([d["labels"][k] for d, k in zip(detections, keep)])
    labels[1, 2] = -1  # padding
    boxes[0, 1] = torch.tensor([60.0, 0, 64, 2])  # no candidate overlaps it > 0.5
    return model, wrapped, x, boxes, labels


# CI time (on 2 cores shared with 3 other jobs: Grad-CAM ONNX 139 s, Saliency TorchScript 74 s, Saliency .pt2
# 190 s): Grad-CAM in ONNX; the other formats with -m slow (the built-in detector below runs every format);
# every method in every format: benchmarks/detection_export.py
@pytest.mark.parametrize("method, formats", [
    ("gradcam", ("onnx",)),
    pytest.param("gradcam", ("torchscript", "pt2"), marks=pytest.mark.slow),
    pytest.param("saliency", ("onnx", "torchscript", "pt2"), marks=pytest.mark.slow)])
def test_export_contract_fcos(fcos_case, method, formats, tmp_path):
    _, wrapped, x, boxes, labels = fcos_case
    levels = feature_levels(wrapped)
    assert levels == [f"backbone.fpn.layer_blocks.{i}" for i in range(3)]
    m = pyattr.GradCAM(wrapped, levels) if method == "gradcam" else pyattr.Saliency(wrapped)
    ref = m(x, DetectionTarget(boxes=boxes, box_classes=labels))
    matched = ref.outputs["matched"]
    assert matched.tolist() == [[True, False, True], [True, True, False]]
    # every matched box has a map (all levels fused), the others none: the comparison below compares something
    assert ((ref.maps.flatten(2).abs().amax(2) > 0) == matched).all()
    assert_detection_contract(m, x, boxes, labels, tmp_path, DetectionTarget(max_boxes=3), formats=formats)
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}[formats[-1]]
    meta = pyattr.read_metadata(tmp_path / f"{m.name}{suffix}")
    assert meta["inputs"] == ["images", "boxes", "box_classes"]
    if method == "gradcam":
        assert meta["layer"] == levels
    assert meta["outputs"] == ["scores", "explained_class", "raw", "maps", "matched", "iou"]
    # num_classes: the detector's K (small_fcos's 5), recorded at export for the runtime's class checks
    assert meta["target"] == {"kind": "detection", "iou_threshold": 0.5, "objective": "score", "match": "iou",
                              "boxes": 3, "num_classes": 5}


def test_export_examples_and_metadata():
    x = torch.zeros(2, 3, 16, 16)
    boxes, labels = torch.rand(3, 4, 4) * 8, torch.zeros(3, 4, dtype=torch.long)
    given = DetectionTarget(boxes=boxes, box_classes=labels).example_inputs(x, None)  # 3 images' boxes, batch 2
    assert given["boxes"].shape == (2, 4, 4) and torch.equal(given["boxes"][1], boxes[0])
    assert given["box_classes"].shape == (2, 4)
    assert DetectionTarget(boxes=boxes, box_classes=labels, max_boxes=7).metadata()["boxes"] == 4
    made = DetectionTarget(max_boxes=5).example_inputs(x, None)
    assert made["boxes"].shape == (2, 5, 4) and made["box_classes"].shape == (2, 5)
    assert DetectionTarget().metadata() == {"kind": "detection", "iou_threshold": 0.5, "objective": "score",
                                            "match": "iou", "boxes": 1}
    from pyattr.exporting.trace import input_names, output_names

    assert input_names(DetectionTarget()) == ("images", "boxes", "box_classes")
    assert output_names(DetectionTarget()) == ("scores", "explained_class", "raw", "maps", "matched", "iou")


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_export_contract_builtin_detector(method, tmp_path):
    """The built-in one-stage detector, every format, batches 1 and 2, three boxes per image: the detections
    of the first image, a padded box and a box with no candidate over the IoU threshold in the second."""
    model, x, boxes, labels = builtin_detector_case(3)
    m = pyattr.GradCAM(model, pyattr.zoo.DETMODEL_LAYER) if method == "gradcam" else pyattr.Saliency(model)
    ref = m(x, DetectionTarget(boxes=boxes, box_classes=labels, decode=pyattr.zoo.decode_detections))
    assert bool(ref.outputs["matched"][0, 0]) and not bool(ref.outputs["matched"][1, 2])
    assert ((ref.maps.flatten(2).amax(2) > 0) == ref.outputs["matched"]).all()
    assert_detection_contract(m, x, boxes, labels, tmp_path,
                              DetectionTarget(decode=pyattr.zoo.decode_detections, max_boxes=3))
