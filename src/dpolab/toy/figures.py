"""The toy lab's figures: the paper's Figure 2 and Figure 3, the remedies, and a β_rejected sweep."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

from dpolab.outputs import atomic_path, write_json
from dpolab.toy.lab import RLHF, ToyConfig, ToyRun, run_toy
from dpolab.toy.scenarios import PRESETS

COLOURS = {"chosen": "#1b9e77", "rejected": "#d95f02", "unseen": "#7570b3", "outside": "#e7298a"}

# The remedies compared on one scenario (docs/toy.md). β = 0.1 throughout, as in the 3D paper.
REMEDIES: list[dict] = [
    {"loss": "dpo", "loss_params": {"beta": 0.1}},
    {"loss": "dpop", "loss_params": {"beta": 0.1, "lam": 50.0}},
    {"loss": "flex", "loss_params": {"beta_chosen": 0.1, "beta_rejected": 0.02}},
    {"loss": "dpo", "loss_params": {"beta": 0.1}, "sft_weight": 1.0},
    {"loss": "ipo", "loss_params": {"tau": 0.1, "length_normalized": False}},
    {"loss": "slic", "loss_params": {"delta": 1.0, "reg_weight": 0.1}},
    {"loss": RLHF, "kl_beta": 0.1},
]
BETA_REJECTED_SWEEP = [0.1, 0.05, 0.02, 0.01, 0.005, 0.002]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _steps(run: ToyRun) -> list[int]:
    return run.series("step")


def _outside(run: ToyRun) -> list[float]:
    return run.series("other_mass")


def _plot_probabilities(ax, run: ToyRun) -> None:
    """The four probability curves every figure shows: chosen, rejected (summed), unseen, outside the pairs."""
    steps = _steps(run)
    ax.plot(steps, run.series("chosen_prob"), color=COLOURS["chosen"], label="π(chosen)")
    ax.plot(steps, run.series("rejected_mass"), color=COLOURS["rejected"], label="π(rejected), 4 summed")
    ax.plot(steps, run.series("unseen_mass"), color=COLOURS["unseen"], label="π(unseen 9–10)")
    ax.plot(steps, _outside(run), color=COLOURS["outside"], ls="--", label="mass outside the prompt's pairs")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=110)
    _pyplot().close(fig)


def plot_figure2(run: ToyRun, path: Path) -> None:
    """Probabilities, gradient magnitudes and π_l over steps for one run (the paper's Figure 2)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    steps = _steps(run)
    ax = axes[0]
    _plot_probabilities(ax, run)
    ax.set(title="probabilities (mean over prompts)", xlabel="step", ylabel="probability", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.semilogy(steps, run.series("grad_chosen"), color=COLOURS["chosen"], label="|∂L/∂π_w|")
    ax.semilogy(steps, run.series("grad_rejected"), color=COLOURS["rejected"], label="|∂L/∂π_l|")
    ax.semilogy(steps, run.series("grad_ratio"), color="black", ls=":", label="ratio |∂L/∂π_l| / |∂L/∂π_w|")
    ax.set(title="gradients in probability space", xlabel="step")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.semilogy(steps, run.series("chosen_prob"), color=COLOURS["chosen"], label="π(chosen)")
    ax.semilogy(steps, run.series("rejected_prob"), color=COLOURS["rejected"], label="π(rejected), each")
    ax.set(title="log scale: the drastic drop", xlabel="step")
    ax.legend(fontsize=8)
    fig.suptitle(f"{run.config.label}, scenario {run.scenario.name} ({run.scenario.description})")
    _save(fig, path)


def plot_scenarios(runs: list[ToyRun], path: Path) -> None:
    """One column per scenario: the paper's Figure 3."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8), sharey=True)
    for ax, run in zip(axes, runs, strict=True):
        _plot_probabilities(ax, run)
        ax.set(title=f"scenario {run.scenario.name}: {run.scenario.description}", xlabel="step")
        ax.title.set_fontsize(9)
    axes[0].set_ylabel("probability")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{runs[0].config.label} in the four data scenarios")
    _save(fig, path)


def plot_remedies(runs: list[ToyRun], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        steps = _steps(run)
        axes[0].plot(steps, run.series("chosen_prob"), label=run.config.label)
        axes[1].semilogy(steps, [max(v, 1e-300) for v in run.series("rejected_prob")], label=run.config.label)
        axes[2].plot(steps, _outside(run), label=run.config.label)
    axes[0].set(title="π(chosen)", xlabel="step", ylim=(-0.02, 1.02))
    axes[1].set(title="π(rejected), each (log scale)", xlabel="step")
    axes[2].set(title="mass outside the prompt's pairs", xlabel="step")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"remedies, scenario {runs[0].scenario.name} ({runs[0].scenario.description})")
    _save(fig, path)


def plot_sweep(runs: list[ToyRun], path: Path) -> None:
    plt = _pyplot()
    betas = [run.config.loss_params["beta_rejected"] for run in runs]
    summaries = [run.summary() for run in runs]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.semilogx(
        betas, [s["final_chosen_prob"] for s in summaries], "o-", color=COLOURS["chosen"], label="final π(chosen)"
    )
    ax.semilogx(
        betas, [s["peak_chosen_prob"] for s in summaries], "s:", color=COLOURS["chosen"], label="peak π(chosen)"
    )
    ax.semilogx(
        betas,
        [1 - s["final_data_mass"] for s in summaries],
        "o-",
        color=COLOURS["outside"],
        label="final mass outside the pairs",
    )
    ax.set(xlabel="β_rejected (β_chosen = 0.1)", ylabel="probability", title="flex-β: sweep of β_rejected")
    ax.legend(fontsize=8)
    _save(fig, path)


def make_figures(
    out: str | Path, scenario: str = "1", steps: int = 1000, seed: int = 0, save_runs: bool = True, progress=None
) -> dict:
    """Run every experiment of docs/toy.md and write the four figures and summary.json to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = ToyConfig(scenario=scenario, steps=steps, seed=seed)
    plan: list[tuple[str, ToyConfig]] = []
    for name in PRESETS:
        plan.append((f"scenario{name}-dpo", replace(base, scenario=name, loss="dpo", loss_params={"beta": 0.1})))
    for remedy in REMEDIES:
        config = replace(base, **remedy)
        slug = config.loss + ("-sft" if config.sft_weight else "")
        plan.append((f"remedy-{slug}", config))
    for beta_rejected in BETA_REJECTED_SWEEP:
        params = {"beta_chosen": 0.1, "beta_rejected": beta_rejected}
        plan.append((f"sweep-beta_rejected={beta_rejected:g}", replace(base, loss="flex", loss_params=params)))

    runs: dict[str, ToyRun] = {}
    by_config: dict[str, ToyRun] = {}  # the DPO baseline appears in three experiments: run it once
    for index, (name, config) in enumerate(plan):
        if progress:
            progress(index, len(plan), name)
        key = json.dumps(asdict(config), sort_keys=True)
        if key not in by_config:
            by_config[key] = run_toy(config)
        runs[name] = by_config[key]
        if save_runs:
            runs[name].save(out / "runs" / name)
    if progress:
        progress(len(plan), len(plan), "figures")

    scenario_runs = [runs[f"scenario{name}-dpo"] for name in PRESETS]
    remedy_runs = [runs[name] for name in runs if name.startswith("remedy-")]
    sweep_runs = [runs[name] for name in runs if name.startswith("sweep-")]
    figures = {
        "figure2": out / "figure2_dpo_3d_properties.png",
        "figure3": out / "figure3_scenarios.png",
        "remedies": out / "remedies.png",
        "sweep": out / "beta_rejected_sweep.png",
    }
    plot_figure2(runs["scenario1-dpo"], figures["figure2"])  # Figure 2 is DPO on-policy, whatever the remedy scenario
    plot_scenarios(scenario_runs, figures["figure3"])
    plot_remedies(remedy_runs, figures["remedies"])
    plot_sweep(sweep_runs, figures["sweep"])
    summary = {
        "settings": {"steps": steps, "seed": seed, "remedy_scenario": scenario, **_settings(base)},
        "runs": {name: _finite(run.summary()) for name, run in runs.items()},
        "figures": {key: path.name for key, path in figures.items()},
    }
    write_json(out / "summary.json", summary)
    return summary


def _settings(config: ToyConfig) -> dict:
    keys = (
        "learning_rate",
        "hidden_size",
        "sft_learning_rate",
        "sft_tolerance",
        "reward_steps",
        "reward_learning_rate",
    )
    return {key: getattr(config, key) for key in keys}


def _finite(summary: dict) -> dict:
    """JSON has no inf/nan: write them as strings so the file stays valid JSON."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
