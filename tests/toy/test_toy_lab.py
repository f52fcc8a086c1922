"""The toy lab reproduces (or, where stated, does not reproduce) the 3D-properties paper's claims.

Every assertion reads the recorded trajectories. Thresholds come from measured runs (docs/toy.md
has the numbers) with generous margins; the defaults are ToyConfig's.
"""

from __future__ import annotations

import json

import pytest

from dpolab.toy.lab import RLHF, ToyConfig, run_toy
from dpolab.toy.scenarios import PRESETS, load_scenario


@pytest.fixture(scope="module")
def runs():
    configs = {f"dpo-{name}": ToyConfig(scenario=name, loss="dpo", loss_params={"beta": 0.1}) for name in PRESETS}
    configs["dpop"] = ToyConfig(loss="dpop", loss_params={"beta": 0.1, "lam": 50.0})
    configs["dpo+sft"] = ToyConfig(loss="dpo", loss_params={"beta": 0.1}, sft_weight=1.0)
    configs["rlhf"] = ToyConfig(loss=RLHF)
    return {name: run_toy(config) for name, config in configs.items()}


def test_dpo_on_policy_drastic_drop(runs):
    summary = runs["dpo-1"].summary()
    # π_l falls by orders of magnitude (measured: 0.15 → ~1e-39) ...
    assert summary["final_rejected_prob"] < summary["initial_rejected_prob"] * 1e-20
    # ... and falls faster than π_w rises: after 100 steps log π_l moved far more than log π_w.
    import math

    early = runs["dpo-1"].metrics[100]
    first = runs["dpo-1"].metrics[0]
    fall = math.log(first["rejected_prob"]) - math.log(early["rejected_prob"])
    rise = math.log(early["chosen_prob"]) - math.log(first["chosen_prob"])
    assert fall > 3 * rise > 0


def test_dpo_on_policy_degradation_chosen_rises_then_falls(runs):
    summary = runs["dpo-1"].summary()
    assert summary["peak_step"] < summary["steps"] - 100  # measured peak near step 200 of 1000
    assert summary["peak_chosen_prob"] > 0.95
    assert summary["final_chosen_prob"] < summary["peak_chosen_prob"] - 0.1  # measured 0.72


def test_dpo_gradient_ratio_grows_over_training(runs):
    ratios = runs["dpo-1"].series("grad_ratio")
    assert ratios[-1] > 1e10 * ratios[0]  # measured: 2 → ~2e39
    assert ratios[500] > ratios[100] > ratios[0]


def test_dpo_dispersion_mass_leaves_the_data(runs):
    summary = runs["dpo-1"].summary()
    # Mass outside the prompt's pairs ends above its start (measured 0.10 → 0.28) ...
    assert 1 - summary["final_data_mass"] > (1 - summary["initial_data_mass"]) + 0.05
    # ... but NOT on the never-seen responses 9–10, which fall to ~0: it goes to the other prompts'
    # chosen responses. docs/toy.md reports this as the part of the claim that did not reproduce.
    assert summary["final_unseen_mass"] < summary["initial_unseen_mass"]


def test_off_policy_scenarios_end_worse_than_on_policy(runs):
    on_policy = runs["dpo-1"].summary()
    for name in ("2", "3", "4"):
        summary = runs[f"dpo-{name}"].summary()
        worse_chosen = summary["final_chosen_prob"] < on_policy["final_chosen_prob"] - 0.1
        more_outside = summary["final_data_mass"] < on_policy["final_data_mass"] - 0.1
        assert worse_chosen or more_outside, name


def test_dpop_first_step_gradient_ratio_equals_dpo(runs):
    # At step 0 the policy is the reference (r_w = 0): DPOP's penalty is inactive, so its gradients
    # and their ratio are DPO's (same seed, same rejected draws, same β).
    first_dpop, first_dpo = runs["dpop"].metrics[0], runs["dpo-1"].metrics[0]
    for key in ("grad_ratio", "grad_logp_chosen", "grad_logp_rejected"):
        assert first_dpop[key] == pytest.approx(first_dpo[key], rel=1e-12), key
    assert first_dpop["grad_logp_chosen"] == pytest.approx(first_dpop["grad_logp_rejected"], rel=1e-12)


def test_sft_term_keeps_the_chosen_and_the_mass(runs):
    dpo = runs["dpo-1"].summary()
    summary = runs["dpo+sft"].summary()
    assert summary["final_chosen_prob"] > dpo["final_chosen_prob"] + 0.2  # measured 1.0000 vs 0.72
    assert 1 - summary["final_data_mass"] < (1 - dpo["final_data_mass"]) / 10


def test_dpop_acts_only_below_the_reference(runs):
    # DPOP's penalty guards π_w against falling below its *reference* value, not from its peak. In scenario 1
    # π_w rises far above the reference first, so the penalty is almost never active and DPOP degrades like
    # DPO (docs/toy.md: measured final π_w 0.786 vs DPO's 0.722, penalty > 0 at 5 of 1,001 steps).
    dpop, dpo = runs["dpop"], runs["dpo-1"]
    reference_chosen = dpop.metrics[0]["chosen_prob"]
    assert min(dpop.series("chosen_prob")) >= reference_chosen - 1e-3
    assert sum(p > 0 for p in dpop.series("dpop_penalty")) < 50
    assert dpop.summary()["chosen_fall_from_peak"] > 0.1 and dpo.summary()["chosen_fall_from_peak"] > 0.1


def test_reward_model_gradients_are_balanced_and_rlhf_does_not_degrade(runs):
    rlhf = runs["rlhf"]
    for entry in rlhf.reward_metrics:
        assert entry["grad_reward_chosen"] == pytest.approx(entry["grad_reward_rejected"], rel=1e-12)
    assert rlhf.reward_metrics[-1]["reward_accuracy"] == 1.0
    summary = rlhf.summary()
    assert summary["max_grad_ratio"] < 10  # bounded, unlike DPO's 1e39
    assert summary["final_chosen_prob"] > summary["peak_chosen_prob"] - 0.01


def test_step_one_reaches_the_targets_for_every_preset(runs):
    for name in PRESETS:
        sft = runs[f"dpo-{name}"].sft
        assert sft["sft_converged"] and sft["sft_kl"] < 1e-4
        first = runs[f"dpo-{name}"].metrics[0]
        targets = load_scenario(name).targets
        assert first["chosen_prob"] == pytest.approx(targets[0][0], abs=0.01)


def test_runs_are_deterministic():
    config = ToyConfig(loss="dpo", steps=50)
    assert run_toy(config).metrics == run_toy(ToyConfig(loss="dpo", steps=50)).metrics


def test_run_folder_contents(tmp_path, runs):
    directory = runs["dpop"].save(tmp_path / "run")
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == runs["dpop"].config.steps + 1
    first = json.loads(lines[0])
    assert {
        "chosen_prob",
        "rejected_prob",
        "unseen_mass",
        "data_mass",
        "grad_chosen",
        "grad_rejected",
        "grad_ratio",
        "loss",
        "margin",
        "dpop_penalty",
    } <= set(first)
    header = (directory / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "grad_ratio" in header and "chosen_prob_per_prompt" not in header
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["scenario"] == "1" and summary["loss"] == "dpop"
    config = json.loads((directory / "config.json").read_text())
    assert config["kind"] == "toy" and len(config["targets"]) == 4
