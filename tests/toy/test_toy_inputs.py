"""Bad toy specs and configs fail with one line naming the field; the CLI commands work end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpolab.toy.lab import ToyConfig, run_toy
from dpolab.toy.scenarios import grouped_targets, load_scenario


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_custom_scenario_files(tmp_path):
    targets = [list(row) for row in grouped_targets(0.4, 0.1)]
    scenario = load_scenario(write(tmp_path, "s.json", json.dumps({"name": "mine", "targets": targets})))
    assert scenario.name == "mine" and scenario.targets[0][0] == 0.4
    grouped = load_scenario(write(tmp_path, "g.yaml", "chosen: 0.5\nrejected_each: 0.05\n"))
    assert grouped.targets[1][1] == 0.5 and grouped.targets[1][4] == 0.05


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"targets": [[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05]]}', "targets must be a list of 4 rows"),
        ('{"targets": ' + json.dumps([[0.1] * 10] * 3 + [[0.1] * 9 + [0.05]]) + "}", "targets[3] sums to 0.95, not 1"),
        ('{"targets": ' + json.dumps([[0.1] * 10] * 3 + [[0.1] * 9]) + "}", "targets[3] must list 10 probabilities"),
        (
            '{"targets": ' + json.dumps([[0.1] * 10] * 3 + [[0.1] * 8 + [-0.1, 0.3]]) + "}",
            "targets[3][8] must lie in [0, 1]",
        ),
        (
            '{"targets": ' + json.dumps([[0.1] * 10] * 3 + [[0.1] * 8 + ["a", 0.2]]) + "}",
            "targets[3][8] must be a number",
        ),
        ('{"chosen": 0.5, "rejected_each": 0.2}', "chosen + 4 × rejected_each must be below 1"),
        ('{"chosen": 0.5}', "give 'targets' or both 'chosen' and 'rejected_each'"),
        ('{"chosen": 0.5, "rejected_each": 0.1, "colour": 1}', "unknown key 'colour'"),
        ("{not json", "cannot parse"),
    ],
)
def test_bad_scenario_files_name_the_field(tmp_path, text, message):
    path = write(tmp_path, "bad.json", text)
    with pytest.raises(ValueError) as error:
        load_scenario(path)
    assert message in str(error.value) and "bad.json" in str(error.value)


@pytest.mark.parametrize(
    "config, message",
    [
        (ToyConfig(steps=-1), "steps must be a non-negative integer; got -1"),
        (ToyConfig(learning_rate=0), "learning_rate must be a number > 0; got 0"),
        (ToyConfig(loss="dpoo"), "unknown loss 'dpoo'"),
        (ToyConfig(loss="dpo", loss_params={"beta": -1}), "dpo.beta must be > 0; got -1"),
        (ToyConfig(scenario="7"), "scenario '7' is neither a preset (1, 2, 3, 4) nor an existing file"),
        (ToyConfig(sft_weight=-0.5), "sft_weight must be >= 0; got -0.5"),
    ],
)
def test_bad_configs_name_the_field(config, message):
    with pytest.raises(ValueError) as error:
        run_toy(config)
    assert message in str(error.value)


def test_every_logps_loss_runs_in_the_toy_lab():
    from dpolab.losses import LOSSES

    for name, spec in LOSSES.items():
        if spec.inputs != "logps":
            continue
        run = run_toy(ToyConfig(loss=name, steps=5))
        assert len(run.metrics) == 6, name


def cli(*args):
    return subprocess.run([sys.executable, "-m", "dpolab", "toy", *args], capture_output=True, text=True, timeout=300)


def test_cli_toy_run_writes_a_run_folder(tmp_path):
    result = cli(
        "run",
        "--loss",
        "dpop",
        "--param",
        "beta=0.3",
        "--param",
        "lam=50",
        "--steps",
        "30",
        "--out",
        str(tmp_path / "r"),
    )
    assert result.returncode == 0, result.stderr
    assert "π(chosen)" in result.stdout and "peak π(chosen)" in result.stdout
    assert (tmp_path / "r" / "metrics.jsonl").exists()
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["loss_params"] == {"beta": 0.3, "lam": 50}


def test_cli_toy_errors_are_one_line(tmp_path):
    result = cli("run", "--loss", "dpo", "--param", "beta=0", "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.strip() == "dpolab toy: error: dpo.beta must be > 0; got 0"
    assert cli("run", "--param", "oops", "--out", str(tmp_path / "r")).returncode == 2


@pytest.mark.slow
def test_cli_toy_figures_writes_figures_and_summary(tmp_path):
    result = cli("figures", "--out", str(tmp_path / "f"), "--steps", "150")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "f"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["beta_rejected_sweep.png", "figure2_dpo_3d_properties.png", "figure3_scenarios.png", "remedies.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 17 and summary["settings"]["steps"] == 150
    assert {"peak_chosen_prob", "peak_step", "final_chosen_prob", "final_unseen_mass", "max_grad_ratio"} <= set(
        summary["runs"]["scenario1-dpo"]
    )
