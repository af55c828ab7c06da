"""Rows from the measurements, the Markdown tables, the goals and the PNG chart."""

from __future__ import annotations

import statistics
from pathlib import Path

from .cases import METHOD_LABELS
from .timing import Measured, paired_ratio, quartiles

GOAL_BOUND, GOAL_EXPORT, GOAL_PEER = 1.05, 1.2, 2.0


def rows_of(measured: list[Measured], batch: int) -> list[dict]:
    """One row per contender (a peer's post-processing folded into its row as "end to end")."""
    posts = {m.contender.of: m for m in measured if m.contender.role == "post"}

    def times(role: str, name: str | None = None) -> list[float]:
        for m in measured:
            if m.contender.role == role and (name is None or m.contender.name == name) and m.error is None:
                return m.times
        return []

    bound, forward, eager = times("bound"), times("forward"), times("pyattr", "pyattr eager")
    rows = []
    for m in measured:
        c = m.contender
        if c.role == "post":
            continue
        row = {"name": c.name, "library": c.library, "backend": c.backend, "role": c.role, "output": c.output,
               "rounds": len(m.times), "error": m.error, "peak_mib": _round(m.peak_mib, 1),
               "process_peak_mib": _round(m.total_mib, 1), "warmup_s": [round(w, 4) for w in m.warmup_s]}
        if m.error is None and m.times:
            e2e = list(m.times)
            post = posts.get(c.name)
            if post is not None and post.error is None and post.times:
                n = min(len(e2e), len(post.times))
                e2e = [e2e[i] + post.times[i] for i in range(n)]
                q1, med, q3 = quartiles(post.times)
                row["post_median_ms"] = round(med * 1e3, 3)
            elif post is not None:
                row["post_error"] = post.error
                e2e = []
            q1, med, q3 = quartiles(m.times)
            row.update(median_ms=round(med * 1e3, 3), q1_ms=round(q1 * 1e3, 3), q3_ms=round(q3 * 1e3, 3),
                       iqr_ms=round((q3 - q1) * 1e3, 3), images_per_s=round(batch / med, 3),
                       cpu_median_ms=round(statistics.median(m.cpu_times) * 1e3, 3), times_ms=_ms_list(m.times))
            row["x_bound"] = _round(paired_ratio(m.times, bound), 3) if c.role != "bound" else 1.0
            if c.output != "none" and e2e:
                q1, med, q3 = quartiles(e2e)
                row.update(e2e_median_ms=round(med * 1e3, 3), e2e_iqr_ms=round((q3 - q1) * 1e3, 3),
                           e2e_images_per_s=round(batch / med, 3),
                           x_forward=_round(paired_ratio(e2e, forward), 3),
                           x_pyattr_eager=_round(paired_ratio(e2e, eager), 3))
            elif c.output == "none":
                row["x_forward"] = _round(paired_ratio(m.times, forward), 3)
        rows.append(row)
    return rows


def _ms_list(values: list[float]) -> list[float]:
    return [round(v * 1e3, 3) for v in values]


def _round(v, n):
    return None if v is None else round(v, n)


def fastest(rows: list[dict], library: str | None = None, peers: bool = False) -> dict | None:
    """The fastest end-to-end row of pyattr (``library="pyattr"``) or of the peers."""
    pick = [r for r in rows if r.get("e2e_median_ms") is not None
            and ((peers and r["role"] == "peer") or (library is not None and r["library"] == library))]
    return min(pick, key=lambda r: r["e2e_median_ms"]) if pick else None


# --- Markdown ------------------------------------------------------------------------------------


def _ms(v) -> str:
    if v is None:
        return "—"
    return f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _x(v) -> str:
    return "—" if v is None else f"{v:.2f}x"


def config_table(cfg: dict) -> str:
    lines = [f"#### {cfg['model']} · {METHOD_LABELS.get(cfg['method'], cfg['method'])} · batch {cfg['batch']}"
             + (f" · layer `{cfg['layer']}`" if cfg.get("layer") and cfg["method"] in
                ("gradcam", "gradcampp", "scorecam") else "")
             + (f" · {cfg['task']}, {cfg['size']}x{cfg['size']}: {cfg['objective']}" if cfg.get("task") else ""), ""]
    lines.append("| contender | output | raw ms (IQR) | CPU ms | end-to-end ms | img/s (e2e) | × bound | × forward "
                 "| × pyattr eager | peak MiB |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in cfg["rows"]:
        if r.get("error"):
            lines.append(f"| {r['name']} | error | {r['error'][:90]} | | | | | | | |")
            continue
        if r.get("median_ms") is None:
            continue
        raw = f"{_ms(r['median_ms'])} ({_ms(r['iqr_ms'])})"
        e2e = _ms(r.get("e2e_median_ms")) if r["output"] != "none" else "—"
        ips = f"{r.get('e2e_images_per_s', r.get('images_per_s')):.1f}"
        name = f"**{r['name']}**" if r["library"] == "pyattr" else r["name"]
        out = {"e2e": "maps", "raw": "raw", "none": "—"}[r["output"]]
        lines.append(f"| {name} | {out} | {raw} | {_ms(r.get('cpu_median_ms'))} | {e2e} | {ips} | {_x(r.get('x_bound'))} | {_x(r.get('x_forward'))} "
                     f"| {_x(r.get('x_pyattr_eager'))} | {_ms(r.get('peak_mib'))} |")
    notes = []
    if cfg.get("export_s"):
        notes.append("export (trace + write) s: " + ", ".join(f"{k} {v}" for k, v in cfg["export_s"].items()))
    for key in ("compile_s", "export_error", "onnx_error", "compile_error"):
        if cfg.get(key) is not None:
            notes.append(f"{key.replace('_', ' ')}: {cfg[key]}")
    if cfg.get("load"):
        notes.append(f"load average before/after: {cfg['load'][0]} / {cfg['load'][1]}")
    if notes:
        lines += ["", "; ".join(notes)]
    return "\n".join(lines)


def goals(configs: list[dict], device: str) -> tuple[str, list[dict]]:
    """The issue's three goals, as ratios per configuration."""
    rows = []
    for cfg in configs:
        r = {x["name"]: x for x in cfg["rows"]}
        eager = r.get("pyattr eager")
        if cfg["method"] in ("gradcam", "saliency") and eager and eager.get("x_bound") is not None:
            rows.append({"goal": "eager <= 1.05x bound", "config": _label(cfg), "value": eager["x_bound"],
                         "target": GOAL_BOUND, "met": eager["x_bound"] <= GOAL_BOUND})
        for x in cfg["rows"]:
            if x["library"] == "pyattr" and x["backend"] != "eager" and x.get("x_pyattr_eager") is not None:
                rows.append({"goal": "export <= 1.2x eager", "config": f"{_label(cfg)} · {x['backend']}",
                             "value": x["x_pyattr_eager"], "target": GOAL_EXPORT,
                             "met": x["x_pyattr_eager"] <= GOAL_EXPORT})
        best, peer = fastest(cfg["rows"], "pyattr"), fastest(cfg["rows"], peers=True)
        if cfg["method"] in ("gradcam", "saliency") and best and peer:
            ratio = best["e2e_images_per_s"] / peer["e2e_images_per_s"]
            applies = device == "cuda" and cfg["batch"] == 64
            rows.append({"goal": "fastest pyattr >= 2x fastest peer (e2e img/s)" + ("" if applies else " [info]"),
                         "config": f"{_label(cfg)} · {best['name']} vs {peer['name']}", "value": round(ratio, 3),
                         "target": GOAL_PEER, "met": ratio >= GOAL_PEER if applies else None})
    lines = ["| goal | configuration | value | target | met |", "|---|---|---:|---:|:---:|"]
    for g in rows:
        met = "—" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} | {g['config']} | {g['value']:.2f}x | {g['target']}x | {met} |")
    return "\n".join(lines), rows


def _label(cfg: dict) -> str:
    return f"{cfg['model']} {cfg['method']} b{cfg['batch']}"


def summary_table(configs: list[dict]) -> str:
    """One line per configuration: the ratios that matter."""
    lines = [("| model | method | batch | bound ms | pyattr eager ms (× bound) | best export (× eager) "
             "| fastest peer, e2e (× pyattr eager) |"),
             "|---|---|---:|---:|---:|---|---|"]
    for cfg in configs:
        r = {x["name"]: x for x in cfg["rows"]}
        bound = next((x for x in cfg["rows"] if x["role"] == "bound" and x.get("median_ms")), None)
        eager = r.get("pyattr eager")
        exports = [x for x in cfg["rows"] if x["library"] == "pyattr" and x["backend"] != "eager"
                   and x.get("x_pyattr_eager") is not None]
        best_export = min(exports, key=lambda x: x["x_pyattr_eager"]) if exports else None
        peer = fastest(cfg["rows"], peers=True)
        lines.append(
            f"| {cfg['model']} | {METHOD_LABELS.get(cfg['method'], cfg['method'])} | {cfg['batch']} "
            f"| {_ms(bound['median_ms']) if bound else '—'} "
            f"| {_ms(eager.get('e2e_median_ms')) if eager else '—'} ({_x(eager.get('x_bound') if eager else None)}) "
            f"| {best_export['backend'] + ' ' + _x(best_export['x_pyattr_eager']) if best_export else '—'} "
            f"| {peer['name'] + ' ' + _x(peer.get('x_pyattr_eager')) if peer else '—'} |")
    return "\n".join(lines)


def e2e_table(e2e: dict) -> str:
    if not e2e or not e2e.get("rows"):
        return ""
    lines = [(f"{e2e['images']} images ({e2e['formats']}), {e2e['model']} Grad-CAM, batch {e2e['batch']}, "
             "overlay PNGs written:"), "",
             "| pipeline | median s (IQR) | images/s | × pyattr eager | peak MiB |", "|---|---:|---:|---:|---:|"]
    for r in e2e["rows"]:
        if r.get("error"):
            lines.append(f"| {r['name']} | error: {r['error'][:90]} | | | |")
            continue
        lines.append(f"| {r['name']} | {r['median_ms'] / 1e3:.2f} ({r['iqr_ms'] / 1e3:.2f}) "
                     f"| {e2e['images'] / (r['median_ms'] / 1e3):.1f} | {_x(r.get('x_pyattr_eager'))} "
                     f"| {_ms(r.get('peak_mib'))} |")
    return "\n".join(lines)


def _sizes(results: dict) -> str:
    """The input side(s): ``--size``, or each configuration's own (task models have theirs)."""
    meta = results["metadata"]
    sizes = sorted({c.get("size", meta["size"]) for c in results["configs"]} or {meta["size"]})
    return ", ".join(f"{v}x{v}" for v in sizes)


def markdown(results: dict) -> str:
    meta = results["metadata"]
    device = meta["device"].split(":")[0]
    goal_md, _ = goals(results["configs"], device)
    head = [
        f"# pyattr benchmarks — {meta['device_name']} ({meta['device']})", "",
        (f"`{meta['command']}` · {meta['date']} · pyattr {meta['pyattr']} ({meta['pyattr_commit']}) · "
        f"torch {meta['torch']} · onnxruntime {meta['onnxruntime']} · threads {meta['torch_threads']} · "
        f"input {_sizes(results)} · load average at start {meta['load']['load_at_start']} "
        f"(waited {meta['load']['waited_s']} s for < {meta['load']['threshold']}), at end {meta.get('load_at_end')}"),
        "",
        ("Times are medians over interleaved rounds (IQR in brackets); ratios are medians of per-round "
        "ratios. *raw*: the library's own output; *end to end*: normalized maps at the input size "
        "(pyattr always returns both; a peer's post-processing is timed separately and added). "
        "× bound uses the raw time (pyattr: its full call). CPU ms: the process's CPU time per call, all "
        "threads (spin-waiting included). Peak MiB: memory the call added "
        "(CPU: peak RSS above the level before the call; CUDA: max allocated above it)."), "",
        "## Goals", "", goal_md, "", "## Summary", "", summary_table(results["configs"]), "",
    ]
    body = ["## End to end", "", e2e_table(results.get("e2e", {})), "", "## All configurations", ""]
    for cfg in results["configs"]:
        body += [config_table(cfg), ""]
    if meta.get("skipped"):
        body += ["## Not run", ""] + [f"- {s}" for s in meta["skipped"]] + [""]
    return "\n".join(head + body)


# --- chart --------------------------------------------------------------------------------------


def chart(results: dict, path: Path) -> None:
    """One panel per configuration: end-to-end time of each contender relative to the bound (log)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in results["configs"] if any(r.get("x_bound") for r in c["rows"])]
    if not configs:
        return
    cols = min(4, len(configs))
    rows = -(-len(configs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 0.5 + 2.6 * rows), squeeze=False)
    colors = {"pyattr": "#1f77b4", "reference": "#7f7f7f", "captum": "#d62728", "pytorch-grad-cam": "#ff7f0e",
              "torchcam": "#2ca02c", "zennit": "#9467bd"}
    for ax, cfg in zip(axes.flat, configs):
        bound = next((r for r in cfg["rows"] if r["role"] == "bound" and r.get("median_ms")), None)
        items = []
        for r in cfg["rows"]:
            ms = r.get("e2e_median_ms") or r.get("median_ms")
            if ms is None or bound is None:
                continue
            items.append((r["name"].replace("pytorch-grad-cam", "pgc"), ms / bound["median_ms"], r["library"]))
        items.sort(key=lambda i: i[1])
        ax.barh([i[0] for i in items], [i[1] for i in items], color=[colors.get(i[2], "#333") for i in items])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        for y, item in enumerate(items):
            ax.text(item[1], y, f" {item[1]:.2f}", va="center", fontsize=6)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.invert_yaxis()
        ax.tick_params(labelsize=6)
        ax.set_title(f"{cfg['model']} {cfg['method']} b{cfg['batch']}", fontsize=8)
    for ax in list(axes.flat)[len(configs):]:
        ax.axis("off")
    meta = results["metadata"]
    fig.suptitle(f"median time / median bound (end to end, log scale) — {meta['device_name']}, torch {meta['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def median(values):
    return statistics.median(values) if values else None
