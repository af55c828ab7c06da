"""The evaluation report: ``results.json``, a Markdown table and a self-contained HTML page.

:func:`write_report` takes an :class:`Evaluation` (what ``pyattr evaluate`` measured: one number per method
and metric, the mean deletion/insertion curves, an image x method grid of overlays) and writes, in a folder:

- ``results.json``: every number, with the metrics' definitions and directions;
- ``results.md``: the methods x metrics table (the README's quality table is this file);
- ``report.html``: a sortable methods x metrics table (click a column header), the mean curves drawn as inline
  SVG, and the image x method grid; its pictures are PNG files in ``images/`` beside it, referenced by relative
  paths. No script or style comes from the network: the page works offline, from the folder, as it is.

The files are written into a staging folder first and moved into place at the end, so a failed run leaves no
partial report.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> ev = Evaluation(model="builtin", images=[np.zeros((8, 8, 3), np.uint8)], methods=["gradcam"],
    ...                 metrics=[Metric("deletion", "Deletion AUC", higher_is_better=False)],
    ...                 table={"gradcam": {"deletion": 0.25}})
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> sorted(p.name for p in write_report(ev, out))
    ['report.html', 'results.json', 'results.md']
"""

from __future__ import annotations

import html
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._files import staging_folder
from .figures import save_png_atomic

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
           "#756bb1", "#636363")


@dataclass
class Metric:
    """A column of the report: ``key`` (in the table and JSON), a ``label``, which direction is better, and
    one sentence saying what it measures (shown under the table)."""

    key: str
    label: str
    higher_is_better: bool
    description: str = ""


@dataclass
class Evaluation:
    """What an evaluation measured.

    Attributes:
        model: the model's name, as shown in the report.
        images: the evaluated images (H, W, 3) uint8 shown in the grid (a few; not necessarily all evaluated).
        methods: method names, in table order.
        metrics: the table's columns.
        table: method -> metric key -> value (NaN where a metric does not apply to a method).
        curves: curve name (e.g. "deletion") -> method -> mean curve values (K + 1 points from 0 to 1 of the
            pixels); drawn as one SVG chart per curve.
        overlays: method -> one (H, W, 3) uint8 overlay per image of ``images``.
        seconds: method -> seconds its maps took (shown in the table).
        metric_seconds: method -> metric key -> seconds that metric took on the method's maps (in results.json; a
            cost two metrics share is counted in the first of them, e.g. Average Drop's masked pass that Increase
            in Confidence reuses).
        n_images: how many images the numbers average over.
        notes: free lines shown under the title (settings, seeds).
        captions: one line per image of ``images`` shown under it in the grid (e.g. the explained class).
    """

    model: str
    images: list[np.ndarray]
    methods: list[str]
    metrics: list[Metric]
    table: dict[str, dict[str, float]]
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    overlays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    metric_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    n_images: int = 0
    notes: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


def _number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def best_values(ev: Evaluation) -> dict[str, float | None]:
    """Each metric's best finite value over the methods (by its direction), or None."""
    best = {}
    for m in ev.metrics:
        values = [v for v in (_number(ev.table.get(name, {}).get(m.key)) for name in ev.methods) if v is not None]
        best[m.key] = (max(values) if m.higher_is_better else min(values)) if values else None
    return best


def results_json(ev: Evaluation) -> dict:
    """The JSON document of ``results.json`` (non-finite values are ``null``)."""
    return {
        "model": ev.model,
        "n_images": ev.n_images,
        "methods": list(ev.methods),
        "metrics": [{"key": m.key, "label": m.label, "higher_is_better": m.higher_is_better,
                     "description": m.description} for m in ev.metrics],
        "table": {name: {m.key: _number(ev.table.get(name, {}).get(m.key)) for m in ev.metrics}
                  for name in ev.methods},
        "seconds": {name: _number(ev.seconds.get(name)) for name in ev.methods if name in ev.seconds},
        "metric_seconds": {name: {key: _number(v) for key, v in ev.metric_seconds[name].items()}
                           for name in ev.methods if name in ev.metric_seconds},
        "curves": {kind: {name: [_number(v) for v in values] for name, values in by_method.items()}
                   for kind, by_method in ev.curves.items()},
        "notes": list(ev.notes),
    }


def markdown_table(ev: Evaluation) -> str:
    """The methods x metrics table in Markdown; the best value of each column in bold, arrows for directions."""
    best = best_values(ev)
    head = ["method"] + [f"{m.label} {'↑' if m.higher_is_better else '↓'}" for m in ev.metrics]
    if ev.seconds:
        head.append("seconds")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name in ev.methods:
        cells = [name]
        for m in ev.metrics:
            value = _number(ev.table.get(name, {}).get(m.key))
            text = _format(value)
            cells.append(f"**{text}**" if value is not None and value == best[m.key] else text)
        if ev.seconds:
            cells.append(_format(_number(ev.seconds.get(name))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3;cursor:pointer;user-select:none;white-space:nowrap}
td:first-child,th:first-child{text-align:left}
td.best{font-weight:bold;background:#e7f5e7}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
.notes{color:#555;font-size:.9em}.charts{display:flex;flex-wrap:wrap;gap:24px}
.grid td{padding:2px;border:none;text-align:center;font-size:.8em}.grid img{width:112px;height:112px;
image-rendering:pixelated;display:block}
dl{font-size:.9em}dt{font-weight:bold}dd{margin:0 0 .4em 1.2em}
"""

_SCRIPT = r"""
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th, col){
    th.addEventListener('click', function(){
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = !th.classList.contains('sorted-asc');
      table.querySelectorAll('th').forEach(function(h){h.classList.remove('sorted-asc','sorted-desc');});
      th.classList.add(asc ? 'sorted-asc' : 'sorted-desc');
      rows.sort(function(a, b){
        var x = a.cells[col].getAttribute('data-value'), y = b.cells[col].getAttribute('data-value');
        var fx = parseFloat(x), fy = parseFloat(y);
        if (isNaN(fx) && isNaN(fy)) { return asc ? x.localeCompare(y) : y.localeCompare(x); }
        if (isNaN(fx)) { return 1; } if (isNaN(fy)) { return -1; }
        return asc ? fx - fy : fy - fx;
      });
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
// report.html#sort=K opens the page sorted by column K (clicked twice: descending), e.g. for a headless check
(function(){
  var m = location.hash.match(/^#sort=(\d+)(-desc)?$/), th;
  if (m && (th = document.querySelectorAll('#metrics th')[+m[1]])) { th.click(); if (m[2]) { th.click(); } }
})();
"""


def _table_html(ev: Evaluation) -> str:
    best = best_values(ev)
    esc = html.escape
    head = ['<th title="click to sort">method</th>']
    for m in ev.metrics:
        arrow = "↑" if m.higher_is_better else "↓"
        head.append(f'<th title="{esc(m.description)} ({"higher" if m.higher_is_better else "lower"} is better)">'
                    f"{esc(m.label)} {arrow}</th>")
    if ev.seconds:
        head.append('<th title="seconds the maps took">seconds</th>')
    rows = []
    for name in ev.methods:
        cells = [f'<td data-value="{esc(name)}">{esc(name)}</td>']
        for m in ev.metrics:
            value = _number(ev.table.get(name, {}).get(m.key))
            cls = ' class="best"' if value is not None and value == best[m.key] else ""
            cells.append(f'<td{cls} data-value="{"" if value is None else repr(value)}">{_format(value)}</td>')
        if ev.seconds:
            value = _number(ev.seconds.get(name))
            cells.append(f'<td data-value="{"" if value is None else repr(value)}">{_format(value)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ('<table class="sortable" id="metrics"><thead><tr>' + "".join(head) + "</tr></thead><tbody>\n"
            + "\n".join(rows) + "\n</tbody></table>")


def curve_svg(title: str, by_method: dict[str, list[float]], methods: list[str], width: int = 440,
              height: int = 300) -> str:
    """One chart: each method's curve over the fraction of pixels (0..1), as inline SVG with a legend."""
    esc = html.escape
    left, right, top, bottom = 44, 150, 26, 34
    pw, ph = width - left - right, height - top - bottom
    values = [v for name in methods for v in by_method.get(name, []) if _number(v) is not None]
    lo, hi = (min(values + [0.0]), max(values + [1.0])) if values else (0.0, 1.0)
    span = hi - lo or 1.0

    def xy(i: int, n: int, v: float) -> str:
        return f"{left + pw * i / max(n - 1, 1):.1f},{top + ph * (1 - (v - lo) / span):.1f}"

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}"><title>{esc(title)}</title>'),
             f'<text x="{left}" y="16" font-size="13" font-weight="bold">{esc(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for k in range(5):
        v = lo + span * k / 4
        y = top + ph * (1 - k / 4)
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{v:.2f}</text>')
        parts.append(f'<text x="{left + pw * k / 4:.1f}" y="{top + ph + 14}" font-size="10" '
                     f'text-anchor="middle">{k / 4:.2f}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 4}" font-size="11" text-anchor="middle">'
                 "fraction of pixels</text>")
    for j, name in enumerate(methods):
        curve = [_number(v) for v in by_method.get(name, [])]
        if not curve or any(v is None for v in curve):
            continue
        color = PALETTE[j % len(PALETTE)]
        points = " ".join(xy(i, len(curve), v) for i, v in enumerate(curve))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{points}">'
                     f"<title>{esc(name)}</title></polyline>")
        ly = top + 12 * j + 6
        parts.append(f'<line x1="{left + pw + 10}" y1="{ly}" x2="{left + pw + 26}" y2="{ly}" stroke="{color}" '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{left + pw + 30}" y="{ly + 4}" font-size="10">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def report_html(ev: Evaluation, pictures: dict[tuple[str, int], str]) -> str:
    """The HTML page; ``pictures`` maps (method or "image", image index) to the relative path of its PNG."""
    esc = html.escape
    from . import __version__

    body = [f"<h1>pyattr evaluation: {esc(ev.model)}</h1>",
            (f'<p class="notes">pyattr {esc(__version__)} · {ev.n_images} images · {len(ev.methods)} methods · '
            f"{len(ev.metrics)} metrics · {esc(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))}</p>")]
    body += [f'<p class="notes">{esc(line)}</p>' for line in ev.notes]
    body.append("<h2>Methods x metrics</h2><p class=\"notes\">Means over the images; the best value of each "
                "column is highlighted; click a header to sort.</p>")
    body.append(_table_html(ev))
    body.append("<dl>" + "".join(f"<dt>{esc(m.label)} ({'higher' if m.higher_is_better else 'lower'} is better)"
                                 f"</dt><dd>{esc(m.description)}</dd>" for m in ev.metrics) + "</dl>")
    if ev.curves:
        body.append("<h2>Curves</h2><div class=\"charts\">")
        body += [curve_svg(kind, by_method, ev.methods) for kind, by_method in ev.curves.items()]
        body.append("</div>")
    if ev.overlays and ev.images:
        body.append('<h2>Maps</h2><table class="grid"><tr><td></td>'
                    + "".join(f"<td>{esc(name)}</td>" for name in ev.methods if name in ev.overlays) + "</tr>")
        for i in range(len(ev.images)):
            caption = f"<br>{esc(ev.captions[i])}" if i < len(ev.captions) else ""
            row = [f'<td><img src="{pictures[("image", i)]}" alt="image {i}">{caption}</td>']
            row += [f'<td><img src="{pictures[(name, i)]}" alt="{esc(name)} on image {i}"></td>'
                    for name in ev.methods if name in ev.overlays]
            body.append("<tr>" + "".join(row) + "</tr>")
        body.append("</table>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>pyattr evaluation: {esc(ev.model)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_report(ev: Evaluation, out: str | Path) -> list[Path]:
    """Write ``results.json``, ``results.md``, ``report.html`` (and ``images/``) into the folder ``out``
    (created if needed; existing files of these names are replaced). Returns the three files' paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = staging_folder(out, "report")
    try:
        pictures: dict[tuple[str, int], str] = {}
        if ev.overlays and ev.images:
            (stage / "images").mkdir()
            for i, image in enumerate(ev.images):
                pictures[("image", i)] = f"images/image{i:03d}.png"
                save_png_atomic(np.asarray(image, np.uint8), stage / pictures[("image", i)])
            for name in ev.methods:
                for i, overlay in enumerate(ev.overlays.get(name, [])):
                    pictures[(name, i)] = f"images/{_slug(name)}_{i:03d}.png"
                    save_png_atomic(np.asarray(overlay, np.uint8), stage / pictures[(name, i)])
        (stage / "results.json").write_text(json.dumps(results_json(ev), indent=2) + "\n")
        (stage / "results.md").write_text(markdown_table(ev))
        (stage / "report.html").write_text(report_html(ev, pictures), encoding="utf-8")
        if (out / "images").exists():
            shutil.rmtree(out / "images")
        for entry in stage.iterdir():
            entry.replace(out / entry.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [out / "report.html", out / "results.json", out / "results.md"]


__all__ = ["Evaluation", "Metric", "best_values", "curve_svg", "markdown_table", "report_html", "results_json",
           "write_report"]
