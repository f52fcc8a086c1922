"""``dpolab report``: one self-contained HTML file (inline PNG plots, no network) for one or more runs."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from dpolab.outputs import check_output, write_text
from dpolab.report.runs import Run, load_run
from dpolab.train.monitor import REMEDIES

MAX_POINTS = 1000  # per series; longer runs are strided so 10 runs of 10k steps stay fast
COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666", "#1f78b4", "#b2df8a"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _thin(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    stride = max(1, math.ceil(len(steps) / MAX_POINTS))
    return steps[::stride], values[::stride]


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


PANELS = [
    # title, [(key, label suffix, style)], y scale
    ("loss", [("loss", "", "-")], "linear"),
    ("reward margin", [("rewards/margins", "", "-")], "linear"),
    ("reward accuracy", [("rewards/accuracies", "", "-")], "linear"),
    ("held-out reward accuracy (every eval_steps)", [("eval/rewards/accuracies", "", "-o")], "linear"),
    (
        "log-ratio r = log π_θ − log π_ref (mean; solid chosen, dashed rejected)",
        [("monitor/logratio_chosen_mean", " chosen", "-"), ("monitor/logratio_rejected_mean", " rejected", "--")],
        "linear",
    ),
    ("share of pairs with chosen below the reference", [("monitor/chosen_below_reference", "", "-")], "linear"),
    (
        "gradient split: ‖∇θ‖ of the chosen (solid) and rejected (dashed) terms",
        [
            ("monitor/param_grad_norm_chosen", " chosen", "-o"),
            ("monitor/param_grad_norm_rejected", " rejected", "--o"),
            ("grad_chosen", " chosen |∂L/∂π_w|", "-"),
            ("grad_rejected", " rejected |∂L/∂π_l|", "--"),
        ],
        "log",
    ),
    (
        "dispersion probes (solid: held-out data log-likelihood; dashed: the policy's own samples)",
        [("monitor/probe_chosen_logp", " data", "-o"), ("monitor/sample_logp_policy", " samples", "--o")],
        "linear",
    ),
]


# dpolab ppo runs only (a reward model logs rewards/mean too, with another meaning)
PPO_PANELS = [
    (
        "PPO reward: rollouts' mean (solid), greedy held-out responses (dots)",
        [("rewards/mean", "", "-"), ("eval/rewards/mean", " held-out", "o")],
        "linear",
    ),
    ("PPO: KL to the reference, nats per response", [("kl", "", "-")], "linear"),
]


def is_ppo(run: Run) -> bool:
    return run.config.get("task") == "ppo"


def plot_panel(runs: list[Run], title: str, curves: list[tuple[str, str, str]], scale: str, include=None) -> str | None:
    """One plot of ``curves`` for every run (``include``: only the runs it accepts; a run keeps its colour)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 3.2))
    drawn = False
    for index, run in enumerate(runs):
        if include is not None and not include(run):
            continue
        colour = COLOURS[index % len(COLOURS)]
        for key, suffix, style in curves:
            steps, values = run.values(key)
            if not values:
                continue
            if scale == "log":
                pairs = [(s, v) for s, v in zip(steps, values, strict=True) if v > 0]
                steps, values = [p[0] for p in pairs], [p[1] for p in pairs]
                if not values:
                    continue
            steps, values = _thin(steps, values)
            marker = "o" in style
            ax.plot(
                steps,
                values,
                style.replace("o", ""),
                color=colour,
                marker="." if marker else None,
                markersize=4,
                linewidth=1.3,
                label=run.name + suffix,
            )
            drawn = True
        for alarm in run.alarms:
            ax.axvline(alarm["step"], color=colour, linestyle=":", linewidth=1)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_yscale(scale)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def verdict(run: Run) -> str:
    """One paragraph: what happened to chosen and rejected, and what the alarms say."""
    chosen, rejected = run.last("monitor/logratio_chosen_mean"), run.last("monitor/logratio_rejected_mean")
    if chosen != chosen:
        chosen, rejected = run.last("logratio/chosen"), run.last("logratio/rejected")
    parts = [f"After {run.steps[-1] if run.steps else 0} steps"]
    if chosen == chosen:
        direction = "rose" if chosen > 0 else "fell"
        parts.append(
            f"the chosen log-likelihood {direction} relative to the reference (mean r_w = {chosen:+.3g} nats) "
            f"and the rejected one moved by {rejected:+.3g} nats"
        )
    accuracy, margin = run.last("rewards/accuracies"), run.last("rewards/margins")
    if accuracy == accuracy:
        parts.append(f"reward accuracy {accuracy:.2f}, margin {margin:+.3g}")
    held_out = run.last("eval/rewards/accuracies")
    if held_out == held_out:
        parts.append(f"held-out accuracy {held_out:.2f}")
    text = ", ".join(parts) + "."
    if is_ppo(run):
        return ppo_verdict(run)
    if run.config.get("task") == "reward":
        return text + " A reward model (dpolab rm): no policy likelihood, so no 3D monitor."
    if run.alarms:
        kinds = ", ".join(f"{a['alarm']} (step {a['step']})" for a in run.alarms)
        remedies = "; ".join(f"{a['alarm']}: {REMEDIES[a['alarm']]}" for a in run.alarms)
        text += f" Alarms: {kinds}. Suggested: {remedies}."
    else:
        text += " No alarm fired: no sign of the 3D failure modes by the monitor's rules."
    return text


def ppo_verdict(run: Run) -> str:
    """A PPO run: its reward, KL and held-out reward, and what the 3D monitor saw on its held-out pairs."""
    _, rewards = run.values("rewards/mean")
    text = f"RLHF-PPO (dpolab ppo), {run.steps[-1] if run.steps else 0} steps"
    if rewards:
        text += f": mean rollout reward {rewards[0]:.3g} at the first step, {rewards[-1]:.3g} at the last"
    text += f"; KL to the reference {run.last('kl'):.3g} nats per response"
    held_out = run.last("eval/rewards/mean")
    if held_out == held_out:
        text += f"; greedy held-out reward {held_out:.3g}"
    chosen, rejected = run.last("monitor/logratio_chosen_mean"), run.last("monitor/logratio_rejected_mean")
    if chosen != chosen:
        return text + ". No held-out pairs (monitor.pairs), so the 3D monitor made no claim about this run."
    text += (
        f". On the monitor's held-out pairs the chosen log-ratio ended at {chosen:+.3g} nats and the rejected at "
        f"{rejected:+.3g}"
    )
    samples = run.last("monitor/sample_logratio")
    if samples == samples:
        text += f"; the policy's own samples at {samples:+.3g} nats per token against the reference"
    if run.alarms:
        kinds = ", ".join(f"{a['alarm']} (step {a['step']})" for a in run.alarms)
        return (
            text
            + f". Alarms: {kinds}. Suggested: "
            + "; ".join(f"{a['alarm']}: {a['remedy']}" for a in run.alarms)
            + "."
        )
    return text + ". No alarm fired: no sign of the 3D failure modes by the monitor's rules."


def samples_table(runs: list[Run]) -> str:
    """The last logged responses of each PPO run (prompt, response, reward)."""
    rows = "".join(
        f"<tr><td>{html.escape(run.name)}</td><td>{sample['step']}</td><td>{html.escape(str(sample.get('prompt'))[-120:])}</td>"
        f"<td>{html.escape(str(sample.get('response'))[:300])}</td><td>{float(sample.get('reward', float('nan'))):.3g}</td></tr>"
        for run in runs
        for sample in run.samples
    )
    if not rows:
        return ""
    return (
        "<h2>Samples (dpolab ppo: the last logged step)</h2><table><tr><th>run</th><th>step</th><th>prompt</th>"
        f"<th>response</th><th>reward</th></tr>{rows}</table>"
    )


def evaluation_section(runs: list[Run]) -> str:
    """lm-evaluation-harness results of runs trained with ``eval_harness``: the last evaluation's table (value
    and 95% bootstrap interval), and each metric over the steps when a run was evaluated more than once."""
    evaluated = [run for run in runs if run.evaluations]
    if not evaluated:
        return ""
    rows = []
    for run in evaluated:
        last = run.evaluations[-1]
        for task, result in last["tasks"].items():
            for metric, m in result["metrics"].items():
                rows.append(
                    f"<tr><td>{html.escape(run.name)}</td><td>{last['step']}</td><td>{html.escape(task)}</td>"
                    f"<td>{html.escape(metric)}</td><td>{result.get('num_fewshot')}</td><td>{m['documents']}</td>"
                    f"<td>{100 * m['value']:.1f}</td><td>{100 * m['low']:.1f} – {100 * m['high']:.1f}</td></tr>"
                )
    metrics = sorted(
        {
            (task, metric)
            for run in evaluated
            for e in run.evaluations
            for task, r in e["tasks"].items()
            for metric in r["metrics"]
        }
    )
    plots = []
    if any(len(run.evaluations) > 1 for run in evaluated):
        plt = _pyplot()
        for task, metric in metrics:
            fig, ax = plt.subplots(figsize=(4.8, 2.8))
            for index, run in enumerate(runs):
                points = [
                    (e["step"], e["tasks"][task]["metrics"][metric])
                    for e in run.evaluations
                    if metric in e["tasks"].get(task, {}).get("metrics", {})
                ]
                if not points:
                    continue
                steps = [step for step, _ in points]
                colour = COLOURS[index % len(COLOURS)]
                ax.plot(steps, [100 * m["value"] for _, m in points], "-", marker=".", color=colour, label=run.name)
                ax.fill_between(
                    steps, [100 * m["low"] for _, m in points], [100 * m["high"] for _, m in points],
                    color=colour, alpha=0.15, linewidth=0,
                )  # fmt: skip
            ax.set_title(f"{task}: {metric} (%), 95% interval shaded", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
            plots.append(f'<img alt="plot" src="{_png(fig)}">')
    return (
        "<h2>Evaluation (lm-evaluation-harness during training)</h2>"
        "<p>Each run's last evaluation; the interval is a percentile bootstrap over the task's documents.</p>"
        "<table><tr><th>run</th><th>step</th><th>task</th><th>metric</th><th>shots</th><th>documents</th>"
        f"<th>value (%)</th><th>95% interval (%)</th></tr>{''.join(rows)}</table>"
        f"<div class='plots'>{''.join(plots)}</div>"
    )


def _flatten(config: dict) -> dict[str, str]:
    from dpolab.settings import dotted_keys

    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in dotted_keys(config).items()}


def config_table(runs: list[Run]) -> str:
    flat = [_flatten({k: v for k, v in run.config.items() if k not in ("targets", "sft")}) for run in runs]
    keys = sorted(set().union(*flat))
    header = "".join(f"<th>{html.escape(run.name)}</th>" for run in runs)
    rows = []
    for key in keys:
        values = [f.get(key, "—") for f in flat]
        differs = len(set(values)) > 1
        cells = "".join(f"<td>{html.escape(str(v))}</td>" for v in values)
        rows.append(f'<tr class="{"differs" if differs else ""}"><th>{html.escape(key)}</th>{cells}</tr>')
    return f"<table class='config'><tr><th>key</th>{header}</tr>{''.join(rows)}</table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1500px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plots img { border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 12px; } td, th { border: 1px solid #ddd; padding: 3px 6px; text-align: left; }
tr.differs { background: #fff3c4; font-weight: 600; }
.alarm { color: #b00020; } .verdict { background: #f6f8fa; padding: 8px 12px; border-left: 4px solid #888; }
"""


def build_report(paths: list[str | Path], title: str = "dpolab report", preface: str = "") -> str:
    """The page; ``preface``: HTML put first, under the title (the quickstart's results table)."""
    runs = [load_run(p) for p in paths]
    names = [run.name for run in runs]
    for index, run in enumerate(runs):  # keep legend names unique
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({index + 1})"
    panels = [plot_panel(runs, *panel) for panel in PANELS]
    panels += [plot_panel(runs, *panel, include=is_ppo) for panel in PPO_PANELS]
    images = "".join(f'<img alt="plot" src="{png}">' for png in panels if png)
    alarm_rows = (
        "".join(
            f"<tr class='alarm'><td>{a['step']}</td><td>{html.escape(run.name)}</td><td>{a['alarm']}</td>"
            f"<td>{html.escape(a['message'])}</td><td>{html.escape(a['remedy'])}</td></tr>"
            for run in runs
            for a in sorted(run.alarms, key=lambda a: a["step"])
        )
        or "<tr><td colspan='5'>no alarm fired</td></tr>"
    )
    verdicts = "".join(
        f"<h3>{html.escape(run.name)} <small>({run.kind}, {html.escape(str(run.path))})</small></h3>"
        f"<p class='verdict'>{html.escape(verdict(run))}</p>"
        for run in runs
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{GENERATOR}"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body><h1>{html.escape(title)}</h1>
{preface}
<p>{len(runs)} run(s). Every plot is inline; this file needs no network. Dotted vertical lines mark alarms.</p>
<h2>Verdicts</h2>{verdicts}
<h2>Alarms</h2><table><tr><th>step</th><th>run</th><th>alarm</th><th>evidence</th><th>remedy</th></tr>{alarm_rows}</table>
<h2>Training curves and the 3D monitor</h2><div class="plots">{images}</div>
{evaluation_section(runs)}
{samples_table(runs)}
<h2>Configurations (differing keys highlighted)</h2>{config_table(runs)}
</body></html>
"""


GENERATOR = "dpolab report"


def check_report_target(out: Path, runs: list[str | Path]) -> None:
    """Refuse to write over anything but an earlier dpolab report: a run's files, a folder, any other file."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the HTML file to write (e.g. {out / 'report.html'})")
    check_output(out, "report", {"run folder": runs})
    if out.exists():
        head = out.read_bytes()[:400].decode("utf-8", errors="replace")
        if f'<meta name="generator" content="{GENERATOR}">' not in head:
            raise ValueError(f"--out {out} exists and is not a dpolab report; refusing to overwrite it")


def write_report(
    paths: list[str | Path], out: str | Path, title: str = "dpolab report", preface: str = "", own: bool = False
) -> Path:
    """Write the report to ``out`` (a new file, or an earlier dpolab report, which is replaced).

    ``own``: ``out`` is a file of the folder that is writing it (the quickstart's ``report.html``), not a
    report placed by ``dpolab report``: the rule of :func:`dpolab.outputs.check_output` is the folder's own."""
    out = Path(out)
    page = build_report(paths, title, preface)  # reads and checks the runs first
    if not own:
        check_report_target(out, paths)
    return write_text(out, page)
