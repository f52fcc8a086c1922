"""Read run folders, training (`dpolab train`) or toy (`dpolab toy run`), into one shape for the report."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dpolab import safe_yaml
from dpolab.settings import MonitorSettings
from dpolab.train.metrics import read_metrics
from dpolab.train.monitor import Trajectory, check_alarms


@dataclass
class Run:
    name: str
    kind: str  # "train" or "toy"
    path: Path
    config: dict
    steps: list[int]
    series: dict[str, list[float]]  # aligned with steps (NaN where a step lacks the value)
    alarms: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)  # dpolab ppo: the logged responses of the last sampled step
    evaluations: list[dict] = field(default_factory=list)  # eval_harness: harness.jsonl, one line per evaluation

    def values(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) where the value exists."""
        pairs = [(s, v) for s, v in zip(self.steps, self.series.get(key, []), strict=False) if v == v]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def last(self, key: str) -> float:
        _, values = self.values(key)
        return values[-1] if values else float("nan")


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a metrics file; a torn line (a run killed mid-write) is skipped with a note on stderr."""
    if not path.exists():
        return []
    rows, torn = read_metrics(path)
    if torn:
        print(f"note: skipped {torn} unreadable line(s) of {path} (torn by a kill mid-write)", file=sys.stderr)
    return rows


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def _series(rows: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    steps = [row["step"] for row in rows]
    keys = sorted({k for row in rows for k, v in row.items() if isinstance(v, (int, float)) and k != "step"})
    return steps, {
        k: [float(row[k]) if isinstance(row.get(k), (int, float)) else math.nan for row in rows] for k in keys
    }


def load_run(path: str | Path) -> Run:
    """A `dpolab train` output_dir or a `dpolab toy run` folder; ``ValueError`` naming the folder otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder")
    summary = _read_json(path / "summary.json") if (path / "summary.json").exists() else {}
    rows = _read_jsonl(path / "metrics.jsonl")
    toy = (path / "config.json").exists() and _read_json(path / "config.json").get("kind") == "toy"
    if not toy and not (path / "config.yaml").exists():
        raise ValueError(f"{path}: not a dpolab run folder (no config.yaml + metrics.jsonl, nor a toy run)")
    if not any("alarm" not in row for row in rows):
        what = "is missing" if not (path / "metrics.jsonl").exists() else "holds no logged step"
        raise ValueError(
            f"{path}: metrics.jsonl {what}: the run stopped before its first logged step (or has not reached it "
            "yet); there is nothing to plot"
        )
    if toy:
        return _toy_run(path, _read_json(path / "config.json"), rows, summary)
    config = safe_yaml.load((path / "config.yaml").read_text(), str(path / "config.yaml")) or {}
    alarms = [row for row in rows if "alarm" in row]
    # a training line has the loss, or (dpolab ppo) the rollout's reward
    training = [dict(row) for row in rows if "alarm" not in row and ("loss" in row or "rewards/mean" in row)]
    by_step = {row["step"]: row for row in training}
    for row in rows:  # held-out values join the training line of their step (eval_steps on a logged step)
        held_out = {k: v for k, v in row.items() if k.startswith("eval/")}
        if held_out and len(held_out) == len(row) - 1 and row["step"] in by_step:
            by_step[row["step"]].update(held_out)
    steps, series = _series(training)
    evaluations = [row for row in _read_jsonl_plain(path / "harness.jsonl") if isinstance(row.get("tasks"), dict)]
    return Run(path.name, "train", path, config, steps, series, alarms, summary, _last_samples(path), evaluations)


def _last_samples(path: Path) -> list[dict]:
    """The responses of the last step in ``samples.jsonl`` (dpolab ppo), or none."""
    rows = [row for row in _read_jsonl_plain(path / "samples.jsonl") if isinstance(row.get("step"), int)]
    return [row for row in rows if row["step"] == rows[-1]["step"]] if rows else []


def _read_jsonl_plain(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill mid-write
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _toy_run(path: Path, config: dict, rows: list[dict], summary: dict) -> Run:
    """Toy runs in the report's vocabulary: log-ratios against step 0 (the reference), data and outside mass.

    Mapping: r_w = log π_w − log π_w(step 0) per prompt (mean over prompts); r_l likewise with the mean
    rejected probability; "data likelihood" = log(chosen + rejected mass); "policy samples" = log of
    the mass outside the prompt's pairs.
    """
    steps, series = _series(rows)
    first = rows[0]
    chosen0, rejected0 = first["chosen_prob_per_prompt"], first["rejected_prob_per_prompt"]

    def logratio(values, start):
        return [math.log(max(v, 1e-300)) - math.log(s) for v, s in zip(values, start, strict=True)]

    series["monitor/logratio_chosen_mean"], series["monitor/logratio_rejected_mean"] = [], []
    series["monitor/chosen_below_reference"], series["rewards/margins"] = [], series.get("margin", [])
    series["monitor/probe_chosen_logp"], series["monitor/sample_logp_policy"] = [], []
    for row in rows:
        r_w = logratio(row["chosen_prob_per_prompt"], chosen0)
        r_l = logratio(row["rejected_prob_per_prompt"], rejected0)
        series["monitor/logratio_chosen_mean"].append(sum(r_w) / len(r_w))
        series["monitor/logratio_rejected_mean"].append(sum(r_l) / len(r_l))
        series["monitor/chosen_below_reference"].append(sum(v < 0 for v in r_w) / len(r_w))
        series["monitor/probe_chosen_logp"].append(math.log(max(row["data_mass"], 1e-300)))
        series["monitor/sample_logp_policy"].append(math.log(max(row["other_mass"], 1e-300)))
    run = Run(path.name, "toy", path, config, steps, series, [], summary)
    run.alarms = replay_alarms(run)
    return run


def replay_alarms(run: Run, config: MonitorSettings | None = None) -> list[dict]:
    """Evaluate the monitor's alarm rules over a recorded run, step by step (as they would fire live)."""
    config = config or MonitorSettings()
    trajectory, fired, alarms = Trajectory(), set(), []
    s = run.series
    for i, step in enumerate(run.steps):
        trajectory.steps.append(step)
        trajectory.chosen_logratio.append(s["monitor/logratio_chosen_mean"][i])
        trajectory.rejected_logratio.append(s["monitor/logratio_rejected_mean"][i])
        trajectory.margin.append(s["rewards/margins"][i])
        trajectory.chosen_below_reference.append(s["monitor/chosen_below_reference"][i])
        if s["monitor/probe_chosen_logp"][i] == s["monitor/probe_chosen_logp"][i]:
            trajectory.probe_steps.append(step)
            trajectory.probe_data_logp.append(s["monitor/probe_chosen_logp"][i])
            trajectory.probe_sample_logp.append(s["monitor/sample_logp_policy"][i])
        alarms += check_alarms(trajectory, config, fired)
    return alarms
