"""The export coverage matrix (benchmarks/export_matrix.py): its driver, and a representative slice of it.

Fast: a cell's check on the built-in model, the timeout that kills a hung cell, resuming from the
results JSON, the report's pass rates. Slow (``-m slow``): one model per architecture family, Saliency
and Grad-CAM, every format, as the full matrix checks them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "export_matrix.py"


@pytest.fixture(scope="module")
def matrix():
    spec = importlib.util.spec_from_file_location("export_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["export_matrix"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("export_matrix", None)


def test_cell_on_the_builtin_model_matches_eager(matrix, tmp_path):
    row = matrix.run_cell("builtin", "saliency", "torchscript", tmp_path)
    assert row["status"] == "ok", row
    assert row["size"] == 64 and row["export_s"] > 0
    assert 0 <= row["max_abs_maps"] <= matrix.TOLERANCE and row["max_rel_raw"] < 1e-4


def test_cell_errors_are_recorded_by_stage_and_type(matrix, tmp_path):
    row = matrix.run_cell("no_such_model", "saliency", "onnx", tmp_path)
    assert row["status"] == "error" and row["stage"] == "model"
    assert row["error_type"] == "RuntimeError" and "no input size" in row["error"]


def test_a_cell_past_its_timeout_is_killed_and_recorded(matrix):
    # the child needs far more than 0.5 s only to import torch
    row = matrix.run_in_subprocess(("builtin", "saliency", "onnx"), timeout=0.5, threads=1)
    assert row["status"] == "timeout" and row["cell_s"] < 30
    assert row["error"] == "no result within 0.5 s"


def test_a_group_exports_every_format_from_one_model_and_emits_each_row(matrix, tmp_path):
    emitted = []
    rows = matrix.run_group("builtin", "saliency", ["torchscript", "pt2"], tmp_path, emit=emitted.append)
    assert rows == emitted and [r["format"] for r in rows] == ["torchscript", "pt2"]
    for row in rows:
        assert row["status"] == "ok" and row["size"] == 64 and row["export_s"] > 0, row
        assert row["max_abs_maps"] <= matrix.TOLERANCE and row["max_rel_raw"] < 1e-4
    assert not list(tmp_path.iterdir())  # each exported file is removed once checked


def test_a_failure_before_the_export_is_every_formats_row(matrix, tmp_path):
    rows = matrix.run_group("no_such_model", "saliency", ["onnx", "pt2"], tmp_path)
    assert [(r["format"], r["status"], r["stage"]) for r in rows] == [("onnx", "error", "model"), ("pt2", "error", "model")]


def test_a_group_past_its_timeout_records_its_unfinished_cells_as_timeout(matrix):
    seen = []
    rows = matrix.run_group_in_subprocess("builtin", "saliency", ["onnx", "torchscript"], timeout=0.5, threads=1,
                                          on_row=seen.append)
    assert rows == seen and [(r["format"], r["status"]) for r in rows] == [("onnx", "timeout"), ("torchscript", "timeout")]
    assert rows[0]["error"] == "no result within 0.5 s" and rows[0]["cell_s"] < 30
    assert rows[1]["error"] == "not reached: the group was killed when onnx ran past 0.5 s"


def test_the_channels_last_hint_of_a_cam_names_the_layer_the_matrix_takes(matrix):
    """A CAM on a channels-last model (timm's Swin) runs as the variant its InputError names: the regex must
    keep reading pyattr's message."""
    import torch
    from torch import nn

    from pyattr.models import default_layer_choice

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3, stride=2), nn.LayerNorm(8), nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.norm(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))

    layer, hint = default_layer_choice(ChannelsLast().eval(), torch.rand(1, 3, 16, 16))
    assert layer is None and matrix._NHWC_HINT.search(hint).group(1) == "norm"
    assert matrix.nhwc_to_nchw(torch.zeros(2, 5, 6, 8)).shape == (2, 8, 5, 6)


def test_models_ordered_by_parameter_count(matrix):
    names = ["resnet50", "timm/resnet18", "resnet18", "builtin", "vgg11"]
    assert sorted(names, key=matrix.parameter_count) == ["timm/resnet18", "builtin", "resnet18", "resnet50", "vgg11"]


def _row(model, method, fmt, status, **extra):
    family = "builtin" if model == "builtin" else ("timm" if model.startswith("timm/") else "torchvision")
    return {"model": model, "method": method, "format": fmt, "family": family, "status": status, "size": 64,
            **extra}


def test_run_resumes_from_the_results_and_reports_pass_rates(matrix, tmp_path, capsys):
    rows = [_row("resnet18", "saliency", f, "ok", max_abs_maps=1e-6, max_rel_raw=1e-6, export_s=3.0)
            for f in ("onnx", "torchscript", "pt2")]
    rows.append(_row("resnet18", "lrp", "onnx", "no_rule", error_type="NoRuleError", stage="build", error="no rule"))
    rows.append(_row("resnet18", "lrp", "torchscript", "mismatch", max_abs_maps=2e-4, max_rel_raw=1e-4, export_s=2.0,
                     eager_vs_fp64=1e-4, export_vs_fp64=1e-5))
    rows.append(_row("resnet18", "lrp", "pt2", "timeout", error="no result within 9 s"))
    rows.append(_row("timm/resnet18", "saliency", "onnx", "error", error_type="ExportError", stage="export",
                     error="bad op"))
    rows.append(_row("timm/resnet18", "lrp", "onnx", "no_rule", error_type="NoRuleError", stage="build", error="no rule"))
    (tmp_path / "export_matrix_t.json").write_text(json.dumps({"meta": {}, "results": rows}))
    code = matrix.main(["--models", "resnet18,timm/resnet18", "--methods", "saliency,lrp", "--formats", "onnx",
                        "--name", "t", "--results", str(tmp_path)])
    assert code == 0
    # every requested cell was recorded already, so nothing ran (a cell takes seconds; this took none)
    assert "4 cells, 4 already recorded, 0 to run" in capsys.readouterr().out
    saved = json.loads((tmp_path / "export_matrix_t.json").read_text())["results"]
    assert len(saved) == len(rows)
    md = (tmp_path / "export_matrix_t.md").read_text()
    # torchvision: 3 ok of 6 cells; without the NoRuleError cell 3 of 5
    assert "| torchvision (1 models) | 6 | 3/6 (50.0%) | 3/5 (60.0%) | 1 | 1 | 0 | 1 |" in md
    assert "| timm (1 models) | 2 | 0/2 (0.0%) | 0/1 (0.0%) | 0 | 1 | 1 | 0 |" in md
    assert "| resnet18 | 64 | lrp | NoRuleError | **mismatch 2.0e-04** (2s) | timeout |" in md
    assert "| 1 | error | ExportError (export) | bad op |" in md
    assert "| 2 | no_rule | NoRuleError (build) | no rule |" in md
    assert "| lrp | 0/1 (0.0%) | 1 | 0/1 |" in md  # timm, per method


def test_redo_reruns_the_named_statuses(matrix, tmp_path, capsys):
    rows = [_row("builtin", "saliency", "onnx", "timeout", error="no result within 1 s")]
    (tmp_path / "export_matrix_r.json").write_text(json.dumps({"meta": {}, "results": rows}))
    matrix.main(["--models", "builtin", "--methods", "saliency", "--formats", "onnx", "--name", "r",
                 "--results", str(tmp_path), "--redo", "timeout", "--timeout", "0.5"])
    assert "1 cells, 1 already recorded, 1 to run" in capsys.readouterr().out


def test_model_groups_expand_to_every_torchvision_builder_and_the_timm_set(matrix):
    import torchvision

    names = matrix.expand_models("builtin,torchvision,timm,resnet18")
    builders = torchvision.models.list_models(module=torchvision.models)
    assert names[0] == "builtin" and names[1:1 + len(builders)] == builders
    assert names[1 + len(builders):] == list(matrix.TIMM_MODELS)  # resnet18 is not repeated
    families = set(matrix.TIMM_MODELS.values())
    assert {"ViT", "DeiT", "Swin", "ConvNeXt", "EfficientNet", "MobileViT", "LeViT", "RegNet"} <= families


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
@pytest.mark.parametrize("method", ["saliency", "gradcam"])
@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v3_small", "timm/resnet18"])
def test_slice(matrix, tmp_path, model, method, fmt):
    row = matrix.run_cell(model, method, fmt, tmp_path)
    assert row["status"] == "ok", row


def test_report_only_runs_no_cell(matrix, tmp_path, capsys):
    rows = [_row("builtin", "saliency", "onnx", "ok", max_abs_maps=1e-7, max_rel_raw=1e-7, export_s=1.0)]
    meta = {"command": "python benchmarks/export_matrix.py --models builtin", "timeout": 7, "jobs": 1, "threads": 1}
    (tmp_path / "export_matrix_p.json").write_text(json.dumps({"meta": meta, "results": rows}))
    matrix.main(["--models", "builtin,resnet18", "--name", "p", "--results", str(tmp_path), "--report-only"])
    assert ", 0 to run" in capsys.readouterr().out
    md = (tmp_path / "export_matrix_p.md").read_text()
    assert "per-cell timeout 7 s" in md and "Command: `python benchmarks/export_matrix.py --models builtin`" in md
    assert "| builtin | 64 | saliency | ok 1e-07 (1s) |" in md
