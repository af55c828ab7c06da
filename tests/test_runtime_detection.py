"""Detection graphs in the torch-free runtime (pyattr.runtime, pyattr run): boxes in, one map per box out.

One export per module (``pyattr export --task detection --max-boxes 2 --detector-out``: the built-in detector's
explanation graph with B = 2 box inputs and its dense detector graph); the runtime's results are compared with
eager pyattr (Grad-CAM + DetectionTarget, pyattr.zoo.detect) on 64x64 images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchfree import run_without_torch

import pyattr
from pyattr import zoo
from pyattr.errors import InputError
from pyattr.runtime import AttributionRuntime, Detector
from pyattr.runtime.cli import load_boxes_file, main
from pyattr.runtime.detection import nms
from pyattr.targets import DetectionTarget

BOXES = np.array([[4, 18, 26, 42], [34, 28, 57, 51], [0, 0, 64, 64], [10, 14, 35, 40], [2, 3, 5, 9]], np.float32)
CLASSES = [3, "ring", 0, 3, 4]
CLASS_IDS = [3, 5, 0, 3, 4]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pyattr.cli import main as pyattr_main

    root = tmp_path_factory.mktemp("runtime_det")
    graph, detector = root / "det.onnx", root / "detector.onnx"
    assert pyattr_main(["export", str(graph), "--task", "detection", "--max-boxes", "2",
                        "--detector-out", str(detector)]) == 0
    batch = zoo.generate(3, seed=5)
    files = []
    for i, image in enumerate(batch.images):
        files.append(root / f"img{i}.png")
        Image.fromarray(image).save(files[-1])
    model = zoo.load_builtin_detector()
    x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255
    return {"root": root, "graph": graph, "detector": detector, "files": files, "images": batch.images,
            "model": model, "x": x, "runtime": AttributionRuntime(graph, num_threads=1)}


def eager(setup, x: torch.Tensor, boxes, classes):
    target = DetectionTarget(boxes=torch.as_tensor(boxes), box_classes=torch.as_tensor(classes),
                             decode=zoo.decode_detections)
    return pyattr.GradCAM(setup["model"], zoo.DETMODEL_LAYER)(x, target)


def assert_same(e, reference, j: int, atol: float = 1e-5) -> None:
    """One image's runtime explanation == the eager result's image j (all its boxes)."""
    d = len(e.boxes)
    np.testing.assert_allclose(e.maps, reference.maps[j, :d].numpy(), rtol=0, atol=atol)
    np.testing.assert_allclose(e.scores, reference.scores[j, :d].numpy(), rtol=0, atol=atol)
    np.testing.assert_allclose(e.raw, reference.raw[j, :d].numpy(), rtol=1e-4, atol=atol)
    np.testing.assert_array_equal(e.matched, reference.outputs["matched"][j, :d].numpy())
    np.testing.assert_allclose(e.iou, reference.outputs["iou"][j, :d].numpy(), rtol=0, atol=atol)


def test_more_boxes_than_the_graph_takes_run_in_chunks(setup):
    """B = 2 graph, 5 boxes (ids and a class name) on 3 images == one eager call with all 5 boxes."""
    runtime = setup["runtime"]
    assert runtime.target_kind == "detection" and runtime.max_boxes == 2
    got = runtime.explain(setup["files"], boxes=BOXES, box_classes=CLASSES)
    reference = eager(setup, setup["x"], BOXES, CLASS_IDS)
    assert reference.outputs["matched"].any() and not reference.outputs["matched"].all()  # both cases present
    for j, e in enumerate(got):
        assert e.maps.shape == (5, 64, 64) and e.box_classes.tolist() == CLASS_IDS
        assert e.class_names == [zoo.DET_CLASSES[k] for k in CLASS_IDS]
        assert_same(e, reference, j)
        assert e.overlay.shape == (64, 64, 3) and len(e.overlays) == 5

    # per-image lists of different lengths (3, 1 and 4 boxes): padded per batch, then chunked
    counts = [3, 1, 4]
    per_image = [BOXES[:c] for c in counts]
    got = runtime.explain(setup["images"], boxes=per_image, box_classes=[CLASS_IDS[:c] for c in counts],
                          batch_size=2)
    for j, (e, c) in enumerate(zip(got, counts)):
        assert len(e.boxes) == c
        assert_same(e, reference, j)

    # run(): boxes in input pixels, any count, the same numbers
    out = runtime.run(runtime.preprocess(setup["images"]), boxes=BOXES, box_classes=np.array(CLASS_IDS))
    np.testing.assert_allclose(out.maps, reference.maps.numpy(), rtol=0, atol=1e-5)
    assert out.explained_class.tolist() == [list(range(5))] * 3


def test_boxes_are_in_the_images_pixels(setup, tmp_path):
    """A 128x96 image: its boxes are scaled to the graph's 64x64 input; overlays at the image's own size."""
    big = tmp_path / "big.png"
    Image.fromarray(setup["images"][0]).resize((128, 96), Image.BILINEAR).save(big)
    scale = np.array([2, 1.5, 2, 1.5], np.float32)
    runtime = setup["runtime"]
    e = runtime.explain([big], boxes=BOXES[:3] * scale, box_classes=CLASS_IDS[:3])[0]
    np.testing.assert_allclose(e.input_boxes, BOXES[:3], atol=1e-5)
    x = torch.from_numpy(runtime.preprocess([big]))
    assert_same(e, eager(setup, x, BOXES[:3], CLASS_IDS[:3]), 0)
    assert e.overlay.shape == (96, 128, 3) and e.overlays[0].shape == (96, 128, 3)


def test_no_box_is_an_empty_result(setup):
    runtime = setup["runtime"]
    e, f = runtime.explain(setup["images"][:2], boxes=[[], BOXES[:1]], box_classes=[[], [3]])
    assert e.maps.shape == (0, 64, 64) and e.raw.shape == (0, 16, 16) and e.scores.shape == (0,)
    assert e.overlays == [] and np.array_equal(e.overlay, setup["images"][0]) and e.summary()["boxes"] == []
    assert f.maps.shape == (1, 64, 64)
    out = runtime.run(runtime.preprocess(setup["images"]), boxes=np.zeros((3, 0, 4)), box_classes=np.zeros((3, 0), int))
    assert out.maps.shape == (3, 0, 64, 64) and out.matched.shape == (3, 0)
    assert [len(e.boxes) for e in runtime.explain(setup["images"], boxes=[], box_classes=[])] == [0, 0, 0]


@pytest.mark.parametrize("boxes, classes, words", [
    (BOXES[:1], [6], "class 6 is out of range: the graph's metadata names 6 classes"),
    (BOXES[:1], ["squre"], "did you mean 'square'"),
    (BOXES[:1], [-1], "-1 marks padding"),
    (BOXES[:1], [1.0], "is a float"),
    ([[1, 2, 3]], [1], "4 numbers"),
    ([[1, np.nan, 3, 4]], [1], "NaN or infinite"),
    ([[5, 2, 3, 4]], [1], "x1 < x0"),
    (BOXES[:2], [1], "1 classes for 2 boxes"),
    ([BOXES[:1], BOXES[:1]], [[1], [1]], "2 lists for 3 images"),
    (None, None, "give boxes="),
])
def test_bad_boxes_raise_input_errors(setup, boxes, classes, words):
    with pytest.raises(InputError, match=None) as info:
        setup["runtime"].explain(setup["images"], boxes=boxes, box_classes=classes)
    assert words in str(info.value), str(info.value)


def test_numpy_nms_is_torchvisions_batched_nms():
    from torchvision.ops import batched_nms

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 20, (300, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    labels = rng.integers(0, 4, 300)
    for threshold in (0.3, 0.5, 0.7):
        expected = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), threshold)
        assert nms(boxes, scores, labels, threshold).tolist() == expected.tolist()


def cli(capsys, *argv) -> tuple[int, list[dict], str]:
    code = main([str(a) for a in argv], prog="pyattr run")
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_cli_detector_end_to_end_matches_eager(setup, tmp_path, capsys):
    """pyattr run --detector: the dense detector graph's boxes after the runtime's NMS == zoo.detect's, and
    the maps written == eager Grad-CAM on those boxes."""
    code, lines, err = cli(capsys, setup["graph"], *setup["files"], "--detector", setup["detector"], "--max-boxes", "10",
                           "--out", tmp_path / "o", "--save-maps", "--threads", "1", "--batch-size", "2")
    assert code == 0, err
    found = zoo.detect(setup["model"], setup["x"])
    assert [len(d["labels"]) for d in found] == [2, 3, 2]
    for j, (line, det) in enumerate(zip(lines, found)):
        assert [b["class_id"] for b in line["boxes"]] == det["labels"].tolist()
        assert [b["class"] for b in line["boxes"]] == [zoo.DET_CLASSES[k] for k in det["labels"]]
        saved = np.load(line["maps"])
        np.testing.assert_allclose(saved["boxes"], det["boxes"].numpy(), atol=1e-4)
        np.testing.assert_allclose(saved["detector_scores"], det["scores"].numpy(), atol=1e-5)
        reference = eager(setup, setup["x"][j:j + 1], det["boxes"], det["labels"])
        np.testing.assert_allclose(saved["maps"], reference.maps[0].numpy(), rtol=0, atol=1e-4)
        assert saved["matched"].all() and all(b["matched"] for b in line["boxes"])
        figure = Image.open(line["figure"])
        assert figure.width > (1 + len(det["labels"])) * 192  # the boxes | one overlay per box
    # --max-boxes and --target select among the detector's boxes (best first)
    code, lines, _ = cli(capsys, setup["graph"], setup["files"][1], "--detector", setup["detector"], "--max-boxes", "1",
                         "--out", tmp_path / "o2")
    assert [b["class_id"] for b in lines[0]["boxes"]] == found[1]["labels"][:1].tolist()
    code, lines, _ = cli(capsys, setup["graph"], setup["files"][1], "--detector", setup["detector"], "--target",
                         zoo.DET_CLASSES[int(found[1]["labels"][2])], "--out", tmp_path / "o3")
    assert [b["class_id"] for b in lines[0]["boxes"]] == found[1]["labels"][2:3].tolist()


def test_cli_boxes_file_forms_agree(setup, tmp_path, capsys):
    """--boxes: a list per image, torchvision's layout keyed by file name, and the JSON lines of a run fed back
    give the same numbers; an image without boxes gets an empty entry and a figure saying so."""
    files = setup["files"][:2]
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps([[{"box": b.tolist(), "class": c} for b, c in zip(BOXES, CLASSES)], []]))
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"img1": [], "img0.png": {"boxes": BOXES.tolist(), "labels": CLASS_IDS}}))
    code, first, err = cli(capsys, setup["graph"], *files, "--boxes", listed, "--out", tmp_path / "a")
    assert code == 0, err
    reference = eager(setup, setup["x"][:1], BOXES, CLASS_IDS)
    assert [b["score"] for b in first[0]["boxes"]] == pytest.approx(reference.scores[0].tolist(), abs=1e-5)
    assert first[1]["boxes"] == [] and (tmp_path / "a" / "img1_gradcam_figure.png").is_file()
    code, second, _ = cli(capsys, setup["graph"], *files, "--boxes", keyed, "--out", tmp_path / "b")
    again = tmp_path / "again.json"
    again.write_text(json.dumps([line["boxes"] for line in first]))
    code, third, _ = cli(capsys, setup["graph"], *files, "--boxes", again, "--out", tmp_path / "c")
    for lines in (second, third):
        assert [[b["score"] for b in line["boxes"]] for line in lines] == \
            [[b["score"] for b in line["boxes"]] for line in first]


def test_cli_errors_are_one_line_and_write_nothing(setup, tmp_path, capsys):
    files = setup["files"][:2]
    cases = {
        "bad.json": ('[[{"box": [1, 2, 30, 40], "class": 3}], [', "is not valid JSON"),
        "nan.json": ('[[{"box": [1, NaN, 30, 40], "class": 3}], []]', "is not valid JSON"),
        "count.json": ('[[{"box": [1, 2, 30, 40], "class": 3}]]', "1 entries for 2 images"),
        "class.json": ('[[{"box": [1, 2, 30, 40], "class": "hexagon"}], []]', "unknown class name 'hexagon'"),
        "range.json": ('[[{"box": [1, 2, 30, 40], "class": 9}], []]', "class 9 is out of range"),
        "three.json": ('[[{"box": [1, 2, 30], "class": 3}], []]', "4 numbers"),
        "key.json": ('{"nope.png": []}', "names none of the 2 images"),
    }
    out = tmp_path / "out"
    for name, (text, words) in cases.items():
        (tmp_path / name).write_text(text)
        code, lines, err = cli(capsys, setup["graph"], *files, "--boxes", tmp_path / name, "--out", out)
        assert code == 2 and lines == [] and err.count("\n") == 1 and err.startswith("pyattr: error: "), err
        assert words in err, (name, err)
        assert not out.exists(), name
    for argv, words in [((), "give --boxes FILE.json"), (("--max-boxes", "3"), "options of --detector"),
                        (("--boxes", tmp_path / "count.json", "--detector", setup["detector"]), "not allowed with"),
                        (("--detector", setup["graph"]), "is an explanation graph (pyattr export), not a detector")]:
        with pytest.raises(SystemExit) as info:
            raise SystemExit(main([str(a) for a in (setup["graph"], *files, *argv, "--out", out)], prog="pyattr run"))
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and words in err, err
        assert not out.exists()
    code, _, err = cli(capsys, setup["detector"], *files, "--out", out)
    assert code == 2 and "is a detector graph" in err and not out.exists()


def test_post_nms_detector_layout(setup, tmp_path):
    """A detector graph that returns post-NMS boxes, labels, scores (no batch dimension): kept above the
    threshold, best first, scaled to the image's pixels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    boxes = np.array([[1, 2, 30, 40], [10, 10, 20, 20], [5, 5, 60, 60]], np.float32)
    scores = np.array([0.2, 0.9, 0.6], np.float32)
    labels = np.array([1, 4, 2], np.int64)
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_value"))
             for name, value in (("boxes", boxes), ("labels", labels), ("scores", scores))]
    graph = helper.make_graph(nodes, "post_nms", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                 [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [3, 4]),
                               helper.make_tensor_value_info("labels", TensorProto.INT64, [3]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [3])])
    path = tmp_path / "post.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    runtime = setup["runtime"]
    detector = Detector(path, preprocessing=runtime.preprocessing, class_names=runtime.class_names)
    assert detector.layout == "post-nms" and not detector.batched
    big = np.zeros((128, 64, 3), np.uint8)
    found = detector.detect([setup["images"][0], big], score_threshold=0.3)
    assert found[0]["labels"].tolist() == [4, 2] and found[0]["scores"].tolist() == pytest.approx([0.9, 0.6])
    np.testing.assert_allclose(found[0]["boxes"], boxes[[1, 2]])
    np.testing.assert_allclose(found[1]["boxes"], boxes[[1, 2]] * [1, 2, 1, 2])
    e = runtime.explain([setup["images"][0]], boxes=found[:1])[0]
    assert e.box_classes.tolist() == [4, 2] and e.detector_scores.tolist() == pytest.approx([0.9, 0.6])




def test_detection_runs_without_torch(setup, tmp_path):
    """Detector + explain in Python and pyattr run --detector, in a process where importing torch fails."""
    code = (
        """
        import json, sys
        from pyattr.runtime import AttributionRuntime, Detector
        from pyattr.runtime.cli import main

        graph, detector, out, *images = sys.argv[1:]
        runtime = AttributionRuntime(graph, num_threads=1)
        found = Detector(detector, num_threads=1).detect(images)
        explained = runtime.explain(images, boxes=found)
        assert main([graph, *images, "--detector", detector, "--out", out, "--threads", "1"]) == 0
        print(json.dumps({"scores": [e.scores.tolist() for e in explained],
                          "torch": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))}))
        """
    )
    result = run_without_torch(code, setup["graph"], setup["detector"], tmp_path, *setup["files"])
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.splitlines()[-1])
    assert got["torch"] == []
    found = zoo.detect(setup["model"], setup["x"])
    for j, det in enumerate(found):
        expected = eager(setup, setup["x"][j:j + 1], det["boxes"][:100], det["labels"][:100]).scores[0]
        assert got["scores"][j] == pytest.approx(expected.tolist(), abs=1e-5)
    assert len(list(tmp_path.glob("*_figure.png"))) == 3 == len(list(tmp_path.glob("*_overlay.png")))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 70) | st.floats(-10, 100) | st.sampled_from(
    ["star", "ring", "nope", "3", "img0.png", "box", "class", "boxes", "labels"]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(
        ["box", "class", "score", "boxes", "labels", "scores", "img0.png", "img1", "x"]), inner, max_size=4),
    max_leaves=20)
BOX = st.fixed_dictionaries({"box": st.lists(st.floats(-10, 100), min_size=4, max_size=4).map(
    lambda v: [min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]), max(v[1], v[3])]),
    "class": st.integers(0, 5) | st.sampled_from(zoo.DET_CLASSES)})
VALID = st.lists(st.lists(BOX, max_size=3), min_size=2, max_size=2)  # one list of boxes per image


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=JSON | VALID)
def test_fuzz_boxes_file(setup, tmp_path, data):
    """Any JSON in a --boxes file: per image checked boxes and class ids, or an InputError; nothing else."""
    from pyattr.runtime.cli import load_boxes_file

    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(data))
    try:
        found = load_boxes_file(path, setup["files"][:2], setup["runtime"])
    except InputError as err:
        assert str(err).startswith(f"--boxes {path}")
        return
    assert len(found) == 2
    for d in found:
        assert d["boxes"].dtype == np.float32 and d["boxes"].shape == (len(d["labels"]), 4)
        assert np.isfinite(d["boxes"]).all() and ((d["labels"] >= 0) & (d["labels"] < 6)).all()


def test_class_range_comes_from_the_graph_without_names(setup, tmp_path):
    """A detection graph's metadata records the detector's K (its outputs do not show it), so a runtime without
    class names still rejects an id the graph would otherwise clamp to K - 1."""
    runtime = AttributionRuntime(setup["graph"], num_threads=1)
    assert runtime.metadata["target"]["num_classes"] == len(zoo.DET_CLASSES) == 6
    runtime.class_names = None
    batch = runtime.preprocess(setup["images"][:1])
    with pytest.raises(InputError, match=r"outside 0\.\.5"):
        runtime.run(batch, boxes=BOXES[None, :1], box_classes=np.array([[6]]))
    with pytest.raises(InputError, match="out of range: the graph's metadata names 6 classes"):
        runtime.explain(setup["images"][:1], boxes=BOXES[:1], box_classes=[6])
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps([[{"box": BOXES[0].tolist(), "class": 6}]]))
    with pytest.raises(InputError, match="class 6 is out of range"):
        load_boxes_file(boxes_file, setup["files"][:1], runtime)
    assert runtime.run(batch, boxes=BOXES[None, :1], box_classes=np.array([[5]])).maps.shape == (1, 1, 64, 64)
