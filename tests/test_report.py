"""The evaluation report (pyattr.report): parsed back, the page has what it says and works offline."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pyattr.report import Evaluation, Metric, best_values, markdown_table, write_report


class Page(HTMLParser):
    """What a browser would load and show: image sources, links, scripts, the metrics table's rows."""

    def __init__(self):
        super().__init__()
        self.sources: list[str] = []
        self.external: list[str] = []
        self.scripts_with_src = 0
        self.table_rows: list[list[str]] = []
        self.header: list[str] = []
        self._in_metrics = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_head = False
        self.best_cells: list[str] = []
        self._best = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            value = attrs.get(key)
            if value and (value.startswith(("http:", "https:", "//")) or "://" in value):
                self.external.append(value)
        if tag == "img":
            self.sources.append(attrs["src"])
        if tag == "script" and "src" in attrs:
            self.scripts_with_src += 1
        if tag == "table" and attrs.get("id") == "metrics":
            self._in_metrics = True
        if self._in_metrics and tag == "thead":
            self._in_head = True
        if self._in_metrics and tag == "tr":
            self._row = []
        if self._in_metrics and tag in ("td", "th"):
            self._cell = []
            self._best = attrs.get("class") == "best"

    def handle_endtag(self, tag):
        if self._in_metrics and tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell).strip()
            self._row.append(text)
            if self._best:
                self.best_cells.append(text)
            self._cell = None
        if self._in_metrics and tag == "tr" and self._row is not None:
            if self._in_head:
                self.header.extend(self._row)
            else:
                self.table_rows.append(self._row)
            self._row = None
        if tag == "thead":
            self._in_head = False
        if tag == "table":
            self._in_metrics = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def evaluation(n_images: int = 3) -> Evaluation:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(n_images)]
    methods = ["gradcam", "saliency", "lrp<eps>"]  # a name that must be escaped
    return Evaluation(
        model="builtin", images=images, methods=methods,
        metrics=[Metric("deletion", "Deletion AUC", False, "area under the deletion curve"),
                 Metric("insertion", "Insertion AUC", True, "area under the insertion curve")],
        table={"gradcam": {"deletion": 0.2, "insertion": 0.7}, "saliency": {"deletion": 0.35, "insertion": 0.9},
               "lrp<eps>": {"deletion": 0.1, "insertion": float("nan")}},
        curves={"deletion": {m: list(np.linspace(1, v, 5)) for m, v in zip(methods, (0.1, 0.3, 0.2))}},
        overlays={m: [np.full((12, 12, 3), 40 * j, np.uint8)] * n_images for j, m in enumerate(methods)},
        seconds={"gradcam": 0.5, "saliency": 0.25, "lrp<eps>": 1.0}, n_images=n_images)


def test_report_files_parse_and_reference_only_local_images(tmp_path):
    ev = evaluation()
    paths = write_report(ev, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["report.html", "results.json", "results.md"]
    page = Page()
    page.feed((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))
    # one row per method, one column per metric (+ method, seconds), in the given order
    assert [row[0] for row in page.table_rows] == ev.methods
    assert len(page.header) == 1 + len(ev.metrics) + 1
    assert page.table_rows[0][1:] == ["0.200", "0.700", "0.500"]
    assert page.table_rows[2][2] == "n/a"  # NaN is shown as n/a, never as a best value
    # best per column by its direction: deletion lowest (0.1), insertion highest (0.9)
    assert sorted(page.best_cells) == ["0.100", "0.900"]
    # every picture exists beside the page: the image column + one per method, per image
    assert len(page.sources) == len(ev.images) * (1 + len(ev.methods))
    for src in page.sources:
        picture = tmp_path / "out" / src
        assert picture.is_file() and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    assert not page.external and page.scripts_with_src == 0  # works offline: nothing from the network
    assert "<polyline" in (tmp_path / "out" / "report.html").read_text()
    # nothing left behind but the outputs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images", "report.html", "results.json",
                                                                    "results.md"]


def test_results_json_round_trips_the_numbers(tmp_path):
    ev = evaluation()
    write_report(ev, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["methods"] == ev.methods and data["n_images"] == 3
    assert data["table"]["saliency"] == {"deletion": 0.35, "insertion": 0.9}
    assert data["table"]["lrp<eps>"]["insertion"] is None  # NaN -> null (valid JSON)
    assert [m["higher_is_better"] for m in data["metrics"]] == [False, True]
    assert data["curves"]["deletion"]["gradcam"][0] == 1.0 and math.isclose(data["curves"]["deletion"]["gradcam"][-1],
                                                                              0.1)


def test_markdown_table_marks_the_best_and_directions():
    md = markdown_table(evaluation()).splitlines()
    assert md[0] == "| method | Deletion AUC ↓ | Insertion AUC ↑ | seconds |"
    assert md[2] == "| gradcam | 0.200 | 0.700 | 0.500 |"
    assert md[3] == "| saliency | 0.350 | **0.900** | 0.250 |"
    assert md[4] == "| lrp<eps> | **0.100** | n/a | 1.000 |"
    assert best_values(evaluation()) == {"deletion": 0.1, "insertion": 0.9}


def test_a_second_report_replaces_the_first_without_stale_pictures(tmp_path):
    write_report(evaluation(3), tmp_path)
    write_report(evaluation(1), tmp_path)
    assert len(list((tmp_path / "images").iterdir())) == 1 + 3  # 1 image x (image + 3 methods)


def test_a_failed_write_leaves_no_partial_report(tmp_path, monkeypatch):
    from pyattr import report

    def broken(ev, pictures):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "report_html", broken)
    with pytest.raises(RuntimeError):
        write_report(evaluation(), tmp_path)
    assert list(Path(tmp_path).iterdir()) == []
