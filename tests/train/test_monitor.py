"""The 3D monitor: its rules on synthetic, toy and real trajectories; it never changes training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dpolab.report.runs import load_run
from dpolab.settings import MonitorSettings, monitor_settings
from dpolab.toy.lab import RLHF, ToyConfig, run_toy
from dpolab.train import TrainConfig, run
from dpolab.train.monitor import Trajectory, check_alarms
from tests.tiny import save_tiny_model

# Low edit distance: chosen and rejected differ in one number (the Smaug setting).
PAIRS = [
    {"prompt": f"Q: what is {a} plus {b}? A:", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
    for a in range(6)
    for b in range(4)
]


def trajectory(chosen, rejected, margin, below, probe_data=(), probe_samples=()):
    t = Trajectory(steps=list(range(1, len(chosen) + 1)))
    fired, alarms = set(), []
    for i in range(len(chosen)):
        t.steps = list(range(1, i + 2))
        t.chosen_logratio.append(chosen[i])
        t.rejected_logratio.append(rejected[i])
        t.margin.append(margin[i])
        t.chosen_below_reference.append(below[i])
        if i < len(probe_data):
            t.probe_steps.append(i + 1)
            t.probe_data_logp.append(probe_data[i])
            t.probe_sample_logp.append(probe_samples[i])
        alarms += check_alarms(t, MonitorSettings(window=10), fired)
    return [a["alarm"] for a in alarms]


def test_rules_on_synthetic_trajectories():
    n = 40
    falling = [-0.1 * i for i in range(n)]
    rising = [0.05 * i for i in range(n)]
    assert "degradation" in trajectory(falling, [-0.3 * i for i in range(n)], [0.2 * i for i in range(n)], [0.8] * n)
    # chosen rising with the margin: healthy
    assert trajectory(rising, [-0.1 * i for i in range(n)], [0.15 * i for i in range(n)], [0.0] * n) == []
    # rejected falls 10× faster than chosen moves, by more than 2 nats in a window: drastic drop
    assert "drastic_drop" in trajectory(
        [0.01 * i for i in range(n)], [-1.0 * i for i in range(n)], [1.0 * i for i in range(n)], [0.0] * n
    )
    # data likelihood down from its best, samples up since then: dispersion
    data = [-1.0 + 0.01 * i if i < 20 else -0.8 - 0.02 * (i - 20) for i in range(n)]
    samples = [-3.0 + 0.02 * i for i in range(n)]
    assert trajectory(rising, rising, rising, [0.0] * n, data, samples) == ["dispersion"]


def test_monitor_config_errors():
    with pytest.raises(ValueError, match="monitor.windw: not a monitor setting \\(did you mean 'window'\\?\\)"):
        monitor_settings({"windw": 3})
    with pytest.raises(ValueError, match="monitor.on_alarm: must be warn or stop; got 'halt'"):
        monitor_settings({"on_alarm": "halt"})


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    configs = {
        "dpo": ToyConfig(loss="dpo"),
        "dpop": ToyConfig(loss="dpop"),
        "ipo": ToyConfig(loss="ipo", loss_params={"length_normalized": False}),
        "rlhf": ToyConfig(loss=RLHF),
    }
    return {name: load_run(run_toy(config).save(root / name)) for name, config in configs.items()}


def test_toy_dpo_raises_all_three_alarms(toy_runs):
    kinds = {a["alarm"] for a in toy_runs["dpo"].alarms}
    assert kinds == {"degradation", "drastic_drop", "dispersion"}


def test_toy_remedies_are_quiet_where_they_work(toy_runs):
    assert toy_runs["ipo"].alarms == [] and toy_runs["rlhf"].alarms == []


def test_toy_dpop_alarms_like_dpo_where_its_penalty_stays_inactive(toy_runs):
    # In scenario 1 π_w climbs far above its reference before it falls, so DPOP's penalty (which acts only
    # below the reference) stays off and DPOP degrades as DPO does: the monitor must say so, not stay quiet.
    kinds = {a["alarm"] for a in toy_runs["dpop"].alarms}
    assert kinds == {"degradation", "drastic_drop", "dispersion"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    save_tiny_model(root / "llama", seed=0)
    return root


def base(workspace, out, **overrides) -> TrainConfig:
    settings = dict(
        model=str(workspace / "llama"),
        data=str(workspace / "pairs.jsonl"),
        output_dir=str(out),
        cache_dir=str(workspace / "cache"),
        max_steps=60,
        batch_size=4,
        learning_rate=3e-3,
        loss_params={"beta": 0.5},
        progress=False,
        tensorboard=False,
        save_model=False,
        monitor={"probe_steps": 10},
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def alarms_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"alarm"' in line]


@pytest.mark.slow
def test_real_dpo_on_low_edit_pairs_degrades_and_dpop_stays_above_the_reference(workspace, tmp_path):
    run(base(workspace, tmp_path / "dpo"))
    run(base(workspace, tmp_path / "dpop", loss="dpop"))
    dpo_alarms, dpop_alarms = alarms_of(tmp_path / "dpo"), alarms_of(tmp_path / "dpop")
    assert [a["alarm"] for a in dpo_alarms] == ["degradation"]
    # DPOP's chosen log-ratio also falls from its peak (the alarm's drop-from-best rule, later than DPO's) but,
    # as its penalty guarantees, not below the reference: measured 0% of pairs below it at the end, DPO 25%.
    assert all(a["alarm"] == "degradation" and a["step"] > dpo_alarms[0]["step"] for a in dpop_alarms)
    last = {
        name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1]) for name in ("dpo", "dpop")
    }
    assert last["dpop"]["monitor/chosen_below_reference"] == 0 < last["dpo"]["monitor/chosen_below_reference"]
    assert last["dpop"]["logratio/chosen"] > last["dpo"]["logratio/chosen"] + 0.3
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    for key in (
        "monitor/logratio_chosen_p50",
        "monitor/chosen_below_reference",
        "monitor/grad_logp_chosen",
        "monitor/param_grad_norm_rejected",
        "monitor/probe_chosen_logp",
        "monitor/sample_logp_reference",
        "monitor/sample_entropy",
    ):
        assert key in first, key


def test_on_alarm_stop_checkpoints_and_stops(workspace, tmp_path):
    summary = run(base(workspace, tmp_path / "stop", monitor={"probe_steps": 10, "on_alarm": "stop"}))
    assert summary["stopped_by_alarm"] == "degradation" and summary["steps"] < 60
    assert (tmp_path / "stop" / "checkpoints" / f"step-{summary['steps']:07d}").exists()


def test_the_monitor_never_changes_training(workspace, tmp_path):
    weights = []
    for name, monitor in (("on", {"probe_steps": 3}), ("off", {"enabled": False})):
        run(base(workspace, tmp_path / name, max_steps=8, monitor=monitor, checkpoint_steps=8))
        weights.append(load_file(str(tmp_path / name / "checkpoints" / "step-0000008" / "model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
