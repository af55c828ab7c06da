"""``pyattr evaluate``: methods x metrics on the built-in model or image files, written as a report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import pyattr
from pyattr.cli import main
from pyattr.errors import InputError
from pyattr.evaluate import METRICS, builtin_images, default_methods, evaluate


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["evaluate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_builtin_images_explain_a_present_object_whose_mask_is_the_truth():
    images, targets, masks = builtin_images(6)
    assert images.shape == (6, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert masks.shape == (6, 64, 64) and masks.dtype == torch.bool
    assert bool(masks.flatten(1).any(1).all())  # every explained object is there
    from pyattr.zoo import generate

    data = generate(6, seed=40_000)
    for i, k in enumerate(targets.tolist()):
        assert data.labels[i, k] == 1 and np.array_equal(data.masks[i, k], masks[i].numpy())


def test_cli_numbers_are_the_metrics_of_the_methods_maps(tmp_path, capsys):
    code, _out, err = run(capsys, "--methods", "gradcam,saliency", "--metrics",
                         "pointing_game,energy_pointing_game,deletion,average_drop", "--deletion-steps", "8", "--n", "5", "--batch-size", "2", "--out", str(tmp_path / "ev"), "--quiet")
    assert code == 0, err
    data = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert data["methods"] == ["gradcam", "saliency"] and data["n_images"] == 5
    for name in data["methods"]:  # seconds per method and metric: every metric timed, positive
        assert sorted(data["metric_seconds"][name]) == sorted(["pointing_game", "energy_pointing_game", "deletion",
                                                               "average_drop"])
        assert all(0 < v < 600 for v in data["metric_seconds"][name].values())
    # recomputed independently: the same method on the same images, the same metric functions
    images, targets, masks = builtin_images(5)
    model = pyattr.zoo.load_builtin()
    for name, method in (("gradcam", pyattr.GradCAM(model, "layer3")), ("saliency", pyattr.Saliency(model))):
        maps = method(images, targets).maps
        hits = pyattr.pointing_game(maps, masks).float().mean()
        energy = pyattr.metrics.energy_pointing_game(maps, masks).mean()
        assert data["table"][name]["pointing_game"] == pytest.approx(float(hits), abs=1e-6)
        assert data["table"][name]["energy_pointing_game"] == pytest.approx(float(energy), rel=1e-4)
        # the built-in model is multi-label: its probabilities are sigmoids
        curve = pyattr.metrics.deletion(model, images, maps, targets, steps=8, score="sigmoid")
        assert data["table"][name]["deletion"] == pytest.approx(float(curve.auc.mean()), rel=1e-4)
        assert data["curves"]["deletion"][name] == pytest.approx(curve.scores.mean(0).tolist(), rel=1e-4)
        drop = pyattr.metrics.confidence_change(model, images, maps, targets, score="sigmoid").drop
        assert data["table"][name]["average_drop"] == pytest.approx(float(drop.mean()), rel=1e-4)
    md = (tmp_path / "ev" / "results.md").read_text().splitlines()
    assert len(md) == 2 + 2 and md[2].startswith("| gradcam |")
    html = (tmp_path / "ev" / "report.html").read_text()
    assert html.count('<img src="images/') == 5 * 3  # the grid: 5 images x (image + 2 methods)


def test_default_methods_are_every_method_without_aliases_and_the_slowest():
    names = default_methods()
    assert "lrp" not in names and "lrp_epsilon_plus" in names and not {"sscam", "iscam"} & set(names)
    assert default_methods(slow=True) == [m for m in pyattr.METHODS if m != "lrp"]


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "nope"], "--metrics: unknown name 'nope'"),
    (["--methods", "gradcm"], "Did you mean 'gradcam'"),
    (["--methods", ","], "--methods is empty"),
    (["--n", "0"], "--n"),
    (["--target", "1"], "--target: the generated images explain each image's own object"),
])
def test_cli_bad_input_is_one_error_line_and_nothing_written(tmp_path, capsys, argv, message):
    code, _out, err = run(capsys, *argv, "--out", str(tmp_path / "ev"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "ev").exists()


def test_image_files_cannot_have_mask_metrics(tmp_path, capsys):
    picture = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(picture)
    code, _out, err = run(capsys, str(picture), "--metrics", "pointing_game", "--out", str(tmp_path / "ev"))
    assert code == 2 and "need ground-truth object masks" in err and not (tmp_path / "ev").exists()


def test_evaluate_rejects_masks_of_the_wrong_shape():
    images, targets, masks = builtin_images(2)
    with pytest.raises(InputError, match=r"masks must be \(N, H, W\)"):
        evaluate(["gradcam"], ["pointing_game"], images=images, targets=targets, masks=masks[:, :32])
    with pytest.raises(InputError, match="need ground-truth masks"):
        evaluate(["gradcam"], ["pointing_game"], images=images, targets=targets)
    assert set(METRICS) >= {"pointing_game", "energy_pointing_game"}


def test_image_files_are_evaluated_at_the_models_input_size(tmp_path, capsys):
    """Image files: resized once to the model's input, explained for their top class, scored without the mask
    metrics; the Average Drop is pyattr.metrics' on the same resized input."""
    picture = tmp_path / "a.png"
    pixels = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(picture)
    code, _out, err = run(capsys, str(picture), "--methods", "gradcam", "--metrics", "average_drop",
                          "--out", str(tmp_path / "ev"), "--quiet")
    assert code == 0, err
    data = json.loads((tmp_path / "ev" / "results.json").read_text())
    x = torch.from_numpy(np.asarray(Image.fromarray(pixels).resize((64, 64), Image.BILINEAR))).permute(2, 0, 1)
    x = x[None].float() / 255
    model = pyattr.zoo.load_builtin()
    maps = pyattr.GradCAM(model, "layer3")(x).maps
    drop = pyattr.metrics.confidence_change(model, x, maps, score="sigmoid").drop
    assert data["table"]["gradcam"]["average_drop"] == pytest.approx(float(drop.mean()), rel=1e-4, abs=1e-7)
