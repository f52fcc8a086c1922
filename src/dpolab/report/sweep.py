"""The sweep's page: ``index.html`` with the table (mean ± 95% interval over seeds), the plots of
``plots:`` (a metric against a swept key, one line per value of another), and a report per point."""

from __future__ import annotations

import html
import json
from pathlib import Path

from dpolab.outputs import write_bytes, write_text
from dpolab.report.html import COLOURS, STYLE, _png, _pyplot, write_report

GENERATOR = "dpolab sweep"
CHANGE_SUFFIX = " change"  # "evaluate/accuracy change": a run's value minus its seed's baseline value


def value_text(value) -> str:
    """A swept value as shown in labels, tables and plot legends."""
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def table_columns(results: dict) -> list[str]:
    """The table's metrics, then their baseline changes where runs have them."""
    changes = [m + CHANGE_SUFFIX for m in results["metrics"]]
    return results["metrics"] + [c for c in changes if any(c in row["metrics"] for row in results["points"])]


def cell(stats: dict | None) -> str:
    """``mean ± half-width (n)``, or the single value."""
    if stats is None:
        return "—"
    if stats["half_width"] is None:
        return f"{stats['mean']:.4g} (n={stats['n']})"
    return f"{stats['mean']:.4g} ± {stats['half_width']:.2g} (n={stats['n']})"


def markdown_table(results: dict) -> str:
    """The table as Markdown (``results.md``, for docs and papers): a row per point, its swept values, and per
    metric ``mean ± half-width`` to 3 significant digits; ``(n = k)`` where fewer seeds than the most finished."""
    columns = table_columns(results)
    keys = results["swept_keys"]
    most = max((s["n"] for row in results["points"] for s in row["metrics"].values()), default=0)
    lines = ["| point | " + " | ".join([*keys, *columns]) + " |", "|---" * (1 + len(keys) + len(columns)) + "|"]
    for row in results["points"]:
        cells = [value_text(row["coordinates"].get(key, "")) for key in keys]
        for column in columns:
            stats = row["metrics"].get(column)
            if stats is None:
                cells.append("—")
                continue
            text = f"{stats['mean']:.3g}" + (f" ± {stats['half_width']:.2g}" if stats["half_width"] is not None else "")
            cells.append(text + (f" (n = {stats['n']})" if stats["n"] < most else ""))
        lines.append("| " + " | ".join([row["point"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(results: dict) -> str:
    """The ``compare:`` results as Markdown: a row per pair of points, per metric ``a − b`` as mean ± half-width
    over the seeds they share, and in how many seeds a − b was above zero."""
    comparisons = results.get("comparisons") or []
    if not comparisons:
        return ""
    metrics = [m for m in results["metrics"] if any(m in c["metrics"] for c in comparisons)]
    lines = ["| a | b | " + " | ".join(f"{m}: a − b" for m in metrics) + " |", "|---" * (2 + len(metrics)) + "|"]
    for comparison in comparisons:
        cells = []
        for metric in metrics:
            stats = comparison["metrics"].get(metric)
            if stats is None:
                cells.append("—")
                continue
            above = sum(v > 0 for v in stats["values"])
            spread = f" ± {stats['half_width']:.2g}" if stats["half_width"] is not None else ""
            cells.append(f"{stats['mean']:+.3g}{spread} ({above}/{stats['n']} > 0)")
        lines.append("| " + " | ".join([comparison["a"], comparison["b"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def _as_number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def plot_metric(
    results: dict, x_key: str, metric: str, line_key: str | list[str] | None, log_x: bool, where: dict | None = None
) -> str | None:
    """``metric`` against ``x_key`` as a PNG data URL (None when no point has both)."""
    rows = [
        row
        for row in results["points"]
        if not row["baseline"]
        and x_key in row["coordinates"]
        and all(value_text(row["coordinates"].get(k)) == value_text(v) for k, v in (where or {}).items())
    ]
    line_keys = [line_key] if isinstance(line_key, str) else list(line_key or [])
    lines: dict[str, list[tuple]] = {}
    for row in rows:
        stats = row["metrics"].get(metric)
        if stats is None:
            continue
        others = {k: v for k, v in row["coordinates"].items() if k != x_key}
        if line_keys:  # a point without those keys gets its own line, under its name
            values = [row["coordinates"][k] for k in line_keys if k in row["coordinates"]]
            label = " ".join(value_text(v) for v in values) if values else row["point"]
        else:
            label = " ".join(f"{k}={value_text(v)}" for k, v in others.items()) or metric
        lines.setdefault(label, []).append((row["coordinates"][x_key], stats))
    if not lines:
        return None
    xs = [x for points in lines.values() for x, _ in points]
    numeric = all(_as_number(x) is not None for x in xs)
    categories = list(dict.fromkeys(str(x) for x in xs))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for index, (label, points) in enumerate(lines.items()):
        points.sort(key=lambda p: _as_number(p[0]) if numeric else categories.index(str(p[0])))
        positions = [float(x) if numeric else categories.index(str(x)) for x, _ in points]
        means = [s["mean"] for _, s in points]
        errors = [s["half_width"] or 0.0 for _, s in points]
        ax.errorbar(positions, means, yerr=errors, marker="o", markersize=4, capsize=3, linewidth=1.3,
                    color=COLOURS[index % len(COLOURS)], label=label)  # fmt: skip
    if numeric and log_x:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(categories)), categories, fontsize=7)
    ax.set_xlabel(x_key, fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    condition = ", ".join(f"{k}={value_text(v)}" for k, v in (where or {}).items())
    ax.set_title(f"{metric}{f' ({condition})' if condition else ''}: mean, 95% interval over seeds", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def _file_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text).strip("_")


def write_sweep_page(plots: list, folder: Path, results: dict) -> Path:
    """Write ``plots/*.png``, ``reports/<point>.html`` (the point's seeds as one dpolab report) and ``index.html``."""
    import base64

    figures = []
    for plot in plots:  # dpolab.sweep.PlotSpec
        for metric in plot.metrics:
            png = plot_metric(results, plot.x, metric, plot.line, plot.log_x, plot.where)
            if png is None:
                continue
            condition = "".join(f"-{k}={value_text(v)}" for k, v in plot.where.items())
            name = _file_name(f"{metric}-vs-{plot.x}{condition}") + ".png"
            write_bytes(folder / "plots" / name, base64.b64decode(png.split(",", 1)[1]))
            figures.append((name, png))
    links = {}
    for row in results["points"]:
        runs = [folder / "runs" / row["folder"] / f"seed{seed}" for seed in row["seeds_done"]]
        runs = [run for run in runs if (run / "metrics.jsonl").exists()]  # the baseline has no training run
        if runs:
            target = folder / "reports" / f"{row['folder']}.html"
            write_report(runs, target, title=f"sweep point: {row['point']}")
            links[row["point"]] = target.relative_to(folder)
    columns = table_columns(results)
    header = "".join(f"<th>{html.escape(c)}</th>" for c in ["point", "seeds", *columns, "report"])
    body = ""
    for row in results["points"]:
        link = links.get(row["point"])
        cells = "".join(f"<td>{html.escape(cell(row['metrics'].get(c)))}</td>" for c in columns)
        report = f"<a href='{html.escape(str(link))}'>report</a>" if link else ""
        body += (
            f"<tr><td>{html.escape(row['point'])}</td><td>{len(row['seeds_done'])}</td>{cells}<td>{report}</td></tr>"
        )
    failures = "".join(
        f"<li>{html.escape(f['point'])} seed {f['seed']}: {html.escape(f['error'])}</li>"
        for f in results.get("failures", [])
    )
    images = "".join(f'<img alt="{html.escape(name)}" src="{png}">' for name, png in figures)
    spec_text = (
        (folder / "spec.yaml").read_text() if (folder / "spec.yaml").exists() else json.dumps(results["swept_keys"])
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{GENERATOR}"><title>sweep {html.escape(folder.name)}</title><style>{STYLE}</style></head>
<body><h1>sweep {html.escape(folder.name)}</h1>
<p>Recipe <code>{html.escape(results["recipe"])}</code>; seeds {html.escape(str(results["seeds"]))}. Each cell: the mean over
seeds ± the half-width of its 95% interval (Student's t), and n, the seeds finished.
"… change" is the run's value minus its seed's baseline value, paired by seed.</p>
{f"<h2>Failed runs</h2><ul class='alarm'>{failures}</ul>" if failures else ""}
<h2>Results</h2><table><tr>{header}</tr>{body}</table>
<h2>Plots</h2><div class="plots">{images or "<p>no plots: add plots: to the spec</p>"}</div>
<h2>Spec</h2><pre>{html.escape(spec_text)}</pre>
</body></html>
"""
    return write_text(folder / "index.html", page)
