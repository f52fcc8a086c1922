"""`dpolab ppo` (RLHF-PPO) end to end on tiny local models: it learns a verifiable task, starts from the rollout
policy, resumes exactly after SIGKILL, reads each reward source as its judge does, and refuses bad configs.

PPO's maths are checked by hand in tests/test_losses_ppo.py; the rollout engine (sampling, packed log-probs and
values) in tests/engine/; two processes against one in tests/train/test_distributed.py.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dpolab.train import TrainConfig, run
from tests.tiny import digit_tokenizer, save_digit_task, tiny_scalar_model, tiny_tokenizer
from tests.train.killing import kill_after_checkpoint_then_resume, run_to_end

# "answer with the digit the prompt names": 1 when the response starts with it.
FIRST_DIGIT = {"rules": [{"type": "regex", "pattern": r"^\s*{answer}\b"}]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    paths = save_digit_task(root)
    tokenizer = digit_tokenizer()
    reward_model = tiny_scalar_model("llama", len(tokenizer), seed=5, pad_token_id=tokenizer.pad_token_id)
    reward_model.save_pretrained(root / "reward_model", safe_serialization=True)
    tokenizer.save_pretrained(root / "reward_model")
    return {**paths, "root": root}


def base(workspace, tmp_path, ppo: dict | None = None, **overrides) -> TrainConfig:
    settings = dict(
        task="ppo", loss="ppo", model=workspace["model"], data=workspace["data"], output_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"), max_steps=3, batch_size=10, learning_rate=3e-3, lr_scheduler="constant",
        progress=False, tensorboard=False,
        ppo={"reward": FIRST_DIGIT, "max_new_tokens": 2, "samples_per_prompt": 4, "kl_coef": 0.01, "ppo_epochs": 2,
             "minibatches": 2, **(ppo or {})},
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_raises_the_reward_of_the_digit_task_with_a_finite_kl(workspace, tmp_path):
    """60 rollouts of 40 responses: the share of responses that start with the named digit rises from chance
    (~1/15) to well above it; the KL to the initial policy stays finite; every documented metric is logged."""
    summary = run(base(workspace, tmp_path, max_steps=60, monitor={"pairs": workspace["pairs"], "probe_pairs": 10}))
    steps = [m for m in read_metrics(tmp_path / "run") if "rewards/mean" in m]
    assert len(steps) == 60
    # The 3D monitor sees the task being learnt on held-out pairs: the named digit gains on the next one.
    assert steps[-1]["monitor/margin"] > 1 and steps[0]["monitor/margin"] < 0.5
    assert summary["monitor"]["trajectory"]["steps"] == list(range(1, 61))
    first = sum(m["rewards/mean"] for m in steps[:5]) / 5
    last = sum(m["rewards/mean"] for m in steps[-5:]) / 5
    assert first < 0.2 and last > 0.5, (first, last)
    assert all(math.isfinite(m["kl"]) and abs(m["kl"]) < 20 for m in steps)
    for key in ("rewards/std", "scores/mean", "entropy", "clip_fraction", "approx_kl", "loss/policy", "loss/value",
                "explained_variance", "response_length", "no_eos_fraction", "time/generation", "time/update"):  # fmt: skip
        assert key in steps[-1], key
    assert steps[-1]["entropy"] < steps[0]["entropy"]  # the policy concentrates on the answer
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 10, 20, 30, 40, 50, 60}
    assert summary["prompts_seen"] == 600 and set(summary["phase_seconds"]) == {
        "generation",
        "reward",
        "logps",
        "update",
    }
    # The saved policy loads as a plain causal LM and the value head next to it.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert set(load_file(str(tmp_path / "run" / "model" / "value_head.safetensors"))) == {"weight", "bias"}


@pytest.mark.parametrize("lora", [False, True], ids=["copy", "lora"])
def test_the_first_update_starts_at_the_rollout_policy_and_the_reference(workspace, tmp_path, lora):
    """Step 1, one epoch, one minibatch: the update's log-probs are the rollout's (ratio 1: no clipping, approx KL
    0) and the rollout policy is the reference (KL 0), through the frozen copy or the LoRA adapter switched off."""
    extra = {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}} if lora else {}
    run(base(workspace, tmp_path, ppo={"ppo_epochs": 1, "minibatches": 1, "kl_estimator": "k3"}, max_steps=2,
             **extra))  # fmt: skip
    first, second = [m for m in read_metrics(tmp_path / "run") if "rewards/mean" in m]
    assert first["approx_kl"] == pytest.approx(0, abs=1e-10) and first["clip_fraction"] == 0
    assert first["kl"] == pytest.approx(0, abs=1e-6)
    assert second["kl"] > 1e-6  # the policy moved, and the reference did not
    if lora:
        assert (tmp_path / "run" / "model" / "adapter_model.safetensors").exists()


def test_rloo_trains_without_a_critic(workspace, tmp_path):
    run(base(workspace, tmp_path, ppo={"advantage": "rloo"}, max_steps=3))
    steps = [m for m in read_metrics(tmp_path / "run") if "rewards/mean" in m]
    assert len(steps) == 3 and "loss/value" not in steps[-1] and "explained_variance" not in steps[-1]
    assert not (tmp_path / "run" / "model" / "value_head.safetensors").exists()


def test_a_reward_model_reward_is_the_judges_score_of_the_response(workspace, tmp_path):
    """The reward of a logged sample equals what `dpolab data judge --judge reward-model` gives that text."""
    from dpolab.eval.judges import RewardModelJudge

    rm = str(workspace["root"] / "reward_model")
    run(base(workspace, tmp_path, ppo={"reward": {"model": rm}, "samples_logged": 6, "max_new_tokens": 3},
             max_steps=1, eval_fraction=0.2))  # fmt: skip
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    verdicts = RewardModelJudge(rm, score_empty=True).score([(s["prompt"], s["response"], None) for s in samples])
    assert [s["score"] for s in samples] == pytest.approx([v.score for v in verdicts], abs=1e-5)
    assert len({round(s["score"], 6) for s in samples}) > 1  # the scores differ: the comparison says something
    assert "eval/rewards/mean" in read_metrics(tmp_path / "run")[-1]


def test_a_separate_critic_and_the_math_judge(workspace, tmp_path):
    run(base(workspace, tmp_path, ppo={"reward": {"judge": "math"}, "value_model": workspace["model"]}, max_steps=2))
    steps = [m for m in read_metrics(tmp_path / "run") if "rewards/mean" in m]
    assert steps[-1]["rewards/mean"] == 0  # no response of this vocabulary states "A: N" or "#### N"
    assert steps[-1]["loss/value"] >= 0
    assert (tmp_path / "run" / "model" / "value_model" / "model.safetensors").exists()


def pair_logps(model_dir, pairs) -> torch.Tensor:
    """(pairs, 2) Σ log p of chosen and rejected, each pair a plain full forward of prompt + completion."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for pair in pairs:
            sums = []
            for completion in (pair.chosen_ids, pair.rejected_ids):
                ids = torch.tensor([pair.prompt_ids + completion])
                logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                targets = ids[0, 1:]
                sums.append(float(logps[torch.arange(len(targets)), targets][-len(completion) :].sum()))
            out.append(sums)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("lora", [False, True], ids=["copy", "lora"])
def test_the_3d_monitor_on_ppo_reads_held_out_pairs_as_a_plain_forward_does(workspace, tmp_path, lora):
    """monitor.pairs: every step logs the pairs' log-ratios r = log π_θ − log π_ref, probe steps (1, every
    probe_steps, the last) their per-token likelihood and the policy's own samples; the last step's values equal
    plain forwards of the saved policy and of the initial model (the frozen copy, or the adapter switched off)."""
    from dpolab.data.formats import load_examples
    from dpolab.data.tokenize import tokenize_pairs

    extra = {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "learning_rate": 3e-2} if lora else {}
    monitor = {"pairs": workspace["pairs"], "probe_steps": 2, "probe_pairs": 6}
    summary = run(base(workspace, tmp_path, max_steps=5, monitor=monitor, **extra))
    steps = [m for m in read_metrics(tmp_path / "run") if "rewards/mean" in m]
    assert all("monitor/logratio_chosen_mean" in m for m in steps)
    assert [m["step"] for m in steps if "monitor/sample_logp_policy" in m] == [1, 2, 4, 5]
    assert [m["step"] for m in steps if "monitor/probe_chosen_logp" in m] == [1, 2, 4, 5]
    examples, _ = load_examples(workspace["pairs"])
    pairs, _ = tokenize_pairs(digit_tokenizer(), examples[:6])
    if lora:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace["model"]),
                                           tmp_path / "run" / "model").merge_and_unload()  # fmt: skip
        merged.save_pretrained(tmp_path / "merged")
        policy = pair_logps(tmp_path / "merged", pairs)
    else:
        policy = pair_logps(tmp_path / "run" / "model", pairs)
    reference = pair_logps(workspace["model"], pairs)
    ratios, last = policy - reference, steps[-1]
    assert ratios.abs().max() > 0.05  # the policy moved: the comparison says something
    for side, name in enumerate(("chosen", "rejected")):
        assert last[f"monitor/logratio_{name}_mean"] == pytest.approx(float(ratios[:, side].mean()), abs=1e-4)
        assert last[f"monitor/logratio_{name}_p50"] == pytest.approx(float(ratios[:, side].quantile(0.5)), abs=1e-4)
        lengths = torch.tensor([float(len(p.branches[side])) for p in pairs], dtype=torch.float64)
        per_token = float((policy[:, side] / lengths).mean())
        assert last[f"monitor/probe_{name}_logp"] == pytest.approx(per_token, abs=1e-4)
    assert last["monitor/margin"] == pytest.approx(float((ratios[:, 0] - ratios[:, 1]).mean()), abs=1e-4)
    assert last["monitor/chosen_below_reference"] == pytest.approx(float((ratios[:, 0] < 0).double().mean()))
    assert last["monitor/sample_logratio"] == pytest.approx(
        last["monitor/sample_logp_policy"] - last["monitor/sample_logp_reference"]
    )
    assert 0 < last["monitor/sample_tokens"] <= 32 and last["monitor/sample_entropy"] > 0
    assert summary["monitor"]["trajectory"]["probe_steps"] == [1, 2, 4, 5]


def test_an_alarm_stops_a_ppo_run_with_a_checkpoint_when_asked(workspace, tmp_path):
    """on_alarm: stop: the run ends at the alarm's step, checkpointed, with the policy saved and the alarm in the
    summary, its log line and the PPO remedy."""
    monitor = {"pairs": workspace["pairs"], "probe_steps": 2, "dispersion_change": 0.01, "window": 3,
               "drop_min_fall": 0.05, "drop_ratio": 1.0, "on_alarm": "stop"}  # fmt: skip
    summary = run(base(workspace, tmp_path, max_steps=30, monitor=monitor))
    alarms = [m for m in read_metrics(tmp_path / "run") if "alarm" in m]
    assert summary["stopped_by_alarm"] == alarms[0]["alarm"] and summary["steps"] == alarms[0]["step"] < 30
    assert "ppo.kl_coef" in alarms[0]["remedy"]
    assert (tmp_path / "run" / "checkpoints" / f"step-{summary['steps']:07d}").is_dir()
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "ppo, message",
    [
        ({"reward": {}}, "ppo.reward: give exactly one reward source"),
        ({"reward": {"judge": "math", "rules": []}}, "ppo.reward: give exactly one reward source"),
        ({"reward": {"judge": "llm"}}, "ppo.reward.judge: the judge a PPO reward can use here is math"),
        ({"advantage": "rloo", "samples_per_prompt": 1}, "advantage rloo needs at least 2 samples per prompt"),
        ({"value_model": "none"}, "advantage gae needs a critic"),
        ({"kl_estimatr": "k3"}, "ppo.kl_estimatr: not a PPO setting (did you mean 'kl_estimator'?)"),
        ({"temperature": 0}, "ppo.temperature: out of range"),
        ({"reward": {"rules": [{"type": "regex", "pattern": "("}]}}, "ppo.reward.rules[0].pattern: not a regular"),
        ({"reward": {"model": "/no/such/rm"}}, "ppo.reward.model: no such folder"),
    ],
)
def test_bad_ppo_settings_fail_before_loading_anything(workspace, tmp_path, ppo, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        base(workspace, tmp_path, ppo=ppo).validate()


def test_ppo_settings_outside_task_ppo_and_preference_keys_inside_it_are_refused(workspace, tmp_path):
    with pytest.raises(ValueError, match=re.escape("monitor.pairs: read by task ppo only")):
        base(
            workspace, tmp_path, task="preference", loss="dpo", ppo={}, monitor={"pairs": workspace["pairs"]}
        ).validate()
    with pytest.raises(ValueError, match=re.escape("monitor.pairs: no such file: /no/such/pairs.jsonl")):
        base(workspace, tmp_path, monitor={"pairs": "/no/such/pairs.jsonl"}).validate()
    # a bad row of monitor.pairs is named before any model loads (no output but the run's inputs)
    bad = write_rows(tmp_path / "bad-pairs.jsonl", [{"prompt": "say 1 :", "chosen": " 1", "rejected": " 2"},
                                                    {"prompt": "say 2 :", "chosen": " 2"}])  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("bad-pairs.jsonl: line 2 (row 1): missing field 'rejected'")):
        run(base(workspace, tmp_path, monitor={"pairs": bad}))
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ValueError, match=re.escape("ppo: settings of dpolab ppo (task: ppo); not used by this task")):
        base(workspace, tmp_path, task="preference", loss="dpo").validate()
    with pytest.raises(ValueError, match=re.escape("loss: task ppo trains with the PPO objective (loss: ppo)")):
        base(workspace, tmp_path, loss="dpo").validate()
    with pytest.raises(ValueError, match=re.escape("sft_weight: not used by task ppo")):
        base(workspace, tmp_path, sft_weight=0.1).validate()


def test_bad_reward_sources_are_refused_with_one_line(workspace, tmp_path):
    """A two-label classifier, a reward model with another tokenizer and no chat template, a math reward on
    prompts without answers: `dpolab ppo` exits 2 with one line naming the problem, before training."""
    from transformers import AutoModelForSequenceClassification

    root = workspace["root"]
    two = root / "two-labels"
    if not two.exists():
        model = AutoModelForSequenceClassification.from_pretrained(root / "reward_model", num_labels=2,
                                                                   ignore_mismatched_sizes=True)  # fmt: skip
        model.save_pretrained(two)
        digit_tokenizer().save_pretrained(two)
    other = root / "other-tokenizer"
    if not other.exists():
        tokenizer = tiny_tokenizer()
        tiny_scalar_model("llama", len(tokenizer), seed=1, pad_token_id=tokenizer.pad_token_id).save_pretrained(other)
        tokenizer.save_pretrained(other)
    no_answers = write_rows(tmp_path / "no-answers.jsonl", [{"prompt": f"say {d} :"} for d in range(4)])
    cases = [
        (["--ppo.reward.model", str(two)], "has 2 labels; a reward model has one output"),
        (["--ppo.reward.model", str(other)], "has another tokenizer than the policy and no chat template"),
        (["--ppo.reward.judge", "math", "--data", no_answers], "4 rows have none (rows 0, 1, 2, 3)"),
    ]
    for extra, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "dpolab", "ppo", "--model", workspace["model"], "--data", workspace["data"],
             "--output_dir", str(tmp_path / "bad"), "--overwrite", *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()[-1]) > 20


@pytest.mark.slow
def test_ppo_killed_with_sigkill_resumes_to_the_same_weights(workspace, tmp_path):
    """The rollout randomness is a function of (seed, step, prompt): a run killed after a checkpoint and resumed
    samples the same responses and ends with bitwise the same policy and value head, and the same monitor."""

    def command(out, *extra):
        return [sys.executable, "-m", "dpolab", "ppo", "--model", workspace["model"], "--data", workspace["data"],
                "--output_dir", str(out), "--max_steps", "16", "--batch_size", "5", "--learning_rate", "3e-3",
                "--checkpoint_steps", "4", "--eval_fraction", "0.2", "--eval_steps", "6", "--progress", "false",
                "--tensorboard", "false", "--ppo.reward.rules", json.dumps(FIRST_DIGIT["rules"]),
                "--ppo.samples_per_prompt", "2", "--ppo.max_new_tokens", "3", "--monitor.pairs", workspace["pairs"],
                "--monitor.probe_steps", "3", "--monitor.window", "4", *extra]  # fmt: skip

    run_to_end(command(tmp_path / "whole"))
    out = tmp_path / "killed"
    kill_after_checkpoint_then_resume(command, out, "step-0000008")
    for name in ("model.safetensors", "value_head.safetensors"):
        final = load_file(str(out / "model" / name))
        expected = load_file(str(tmp_path / "whole" / "model" / name))
        assert final.keys() == expected.keys()
        assert all(torch.equal(final[k], expected[k]) for k in final), name
    ours, theirs = read_metrics(out), read_metrics(tmp_path / "whole")
    assert [m["step"] for m in ours] == [m["step"] for m in theirs]
    for a, b in zip(ours, theirs, strict=True):
        for key in ("rewards/mean", "kl", "loss/policy", "eval/rewards/mean", "monitor/logratio_chosen_mean",
                    "monitor/sample_logp_policy", "monitor/drop_ratio", "alarm"):  # fmt: skip
            assert a.get(key) == b.get(key), (a["step"], key)
    # the monitor's trajectory (and so its alarms) continues across the kill
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (out, tmp_path / "whole")]
    assert (
        summaries[0]["monitor"] == summaries[1]["monitor"] and len(summaries[0]["monitor"]["trajectory"]["steps"]) == 16
    )
