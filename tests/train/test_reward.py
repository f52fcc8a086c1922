"""`dpolab rm` (reward models) end to end on tiny local models: TRL 1.16 parity, learning, outputs, errors, resume.

The engine's packed score pass is checked against Hugging Face's classifier in tests/engine/test_scores.py;
two processes against one in tests/train/test_distributed.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from dpolab.train import TrainConfig, run
from tests.tiny import save_tiny_model, tiny_scalar_model, tiny_tokenizer
from tests.train.killing import kill_after_checkpoint_then_resume, run_to_end

PAIRS = [
    {"prompt": f"Q: what is {a} plus {b}? A:", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
    for a in range(6)
    for b in range(4)
]
# A signal a tiny model learns in a few steps: the preferred answer says "good", the other "bad".
EASY = [
    {"prompt": f"Human: rate answer {n}. Assistant:", "chosen": f" {n} good", "rejected": f" {n} bad"}
    for n in range(40)
]


def write_rows(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    write_rows(root / "pairs.jsonl", PAIRS)
    write_rows(root / "easy.jsonl", EASY)
    save_tiny_model(root / "llama", seed=0)
    tokenizer = tiny_tokenizer()
    classifier = tiny_scalar_model("llama", len(tokenizer), seed=3, pad_token_id=tokenizer.pad_token_id)
    classifier.save_pretrained(root / "classifier", safe_serialization=True)
    tokenizer.save_pretrained(root / "classifier")
    return root


def base(workspace, tmp_path, **overrides) -> TrainConfig:
    settings = dict(
        task="reward",
        loss="reward_model",
        model=str(workspace / "llama"),
        data=str(workspace / "pairs.jsonl"),
        output_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        max_steps=3,
        batch_size=4,
        learning_rate=1e-3,
        progress=False,
        tensorboard=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "case", [{}, {"margin": True, "center_rewards_coefficient": 0.05}], ids=["plain", "margin-and-centring"]
)
def test_first_step_equals_trl_reward_trainer(workspace, tmp_path, case):
    """Same one-label classifier, pairs and batch: TRL 1.16 RewardTrainer's first logged step, to 1e-5."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [dict(r) for r in PAIRS[:8]]
    if case.get("margin"):
        for index, row in enumerate(rows):
            row["margin"] = 0.25 * index - 0.5
    data = write_rows(tmp_path / "pairs.jsonl", rows)
    coefficient = case.get("center_rewards_coefficient")
    args = trl.RewardConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        center_rewards_coefficient=coefficient,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.RewardTrainer(
            model=AutoModelForSequenceClassification.from_pretrained(workspace / "classifier"),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(workspace / "classifier"),
        )
        trainer.train()
    theirs = trainer.state.log_history[0]

    extra = {"loss_params": {"center_coefficient": coefficient}} if coefficient else {}
    run(base(workspace, tmp_path, model=str(workspace / "classifier"), data=data, batch_size=8, max_steps=1,
             save_model=False, **extra))  # fmt: skip
    (ours,) = read_metrics(tmp_path / "run")
    pairs = {
        "loss": "loss",
        "rewards/accuracies": "accuracy",
        "rewards/margins": "margin",
        "rewards/mean": "mean_reward",
        "rewards/min": "min_reward",
        "rewards/max": "max_reward",
        "grad_norm": "grad_norm",
    }
    for key, trl_key in pairs.items():
        assert ours[key] == pytest.approx(theirs[trl_key], abs=1e-5, rel=1e-5), key
    assert 0 < ours["rewards/accuracies"] < 1  # an untrained model: a value the comparison can get wrong


def test_cli_rm_learns_a_clear_preference_and_saves_a_classifier(workspace, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "easy"
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "rm", "--model", str(workspace / "llama"), "--data", str(workspace / "easy.jsonl"),
         "--output_dir", str(out), "--max_steps", "24", "--batch_size", "8", "--learning_rate", "3e-3",
         "--eval_fraction", "0.2", "--eval_steps", "8", "--progress", "false", "--tensorboard", "false"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with a new one-output score head" in result.stderr and "LOAD REPORT" not in result.stderr
    metrics = read_metrics(out)
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in evals] == [8, 16, 24]
    for key in ("rewards/accuracies", "rewards/margins", "rewards/mean", "rewards/min", "rewards/max"):
        assert f"eval/{key}" in evals[0] and key in metrics[0]
    first = next(m for m in metrics if "loss" in m)
    assert evals[-1]["eval/rewards/accuracies"] == 1.0 and evals[-1]["eval/loss"] < 0.5 * first["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["forward"] == "packed" and summary["pairs_seen"] == 24 * 8

    # The saved model is a one-label classifier whose pooled score (pad ≠ EOS here) ranks a held-out pair right.
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    texts = [f"Human: rate answer 99. Assistant: 99 {word}{tokenizer.eos_token}" for word in ("good", "bad")]
    with torch.no_grad():
        good, bad = (model(**tokenizer(t, return_tensors="pt")).logits[0, 0] for t in texts)
    assert good > bad


def test_lora_reward_model_trains_the_adapter_and_the_whole_score_head(workspace, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    config = base(workspace, tmp_path, model=str(workspace / "classifier"), lora={"r": 4, "target_modules": ["q_proj"]})
    run(config)
    adapted = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(workspace / "classifier"), tmp_path / "run" / "model"
    )
    original = AutoModelForSequenceClassification.from_pretrained(workspace / "classifier")
    assert not torch.equal(adapted.base_model.model.score.modules_to_save["default"].weight, original.score.weight)
    assert any(float(p.abs().max()) > 0 for n, p in adapted.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss": "dpo"}, "loss: task reward trains with loss: reward_model"),
        ({"sft_weight": 0.5}, "sft_weight: not used by task reward"),
        ({"loss_params": {"beta": 0.1}}, "loss_params: loss 'reward_model' has no parameter 'beta'"),
        ({"loss_params": {"center_coefficient": -1.0}}, "center_coefficient must be >= 0"),
        ({"task": "preference"}, "loss: reward_model trains a reward model: use dpolab rm"),
    ],
)
def test_bad_reward_configs_fail_before_loading_anything(workspace, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        base(workspace, tmp_path, **overrides).validate()


def test_a_classifier_with_two_labels_and_a_bad_margin_are_refused_with_one_line(workspace, tmp_path):
    from transformers import AutoModelForSequenceClassification

    two = tmp_path / "two-labels"
    model = AutoModelForSequenceClassification.from_pretrained(workspace / "classifier", num_labels=2,
                                                               ignore_mismatched_sizes=True)  # fmt: skip
    model.save_pretrained(two)
    tiny_tokenizer().save_pretrained(two)
    with pytest.raises(ValueError, match="is a sequence classifier with 2 labels; a reward model has one output"):
        run(base(workspace, tmp_path, model=str(two)))

    bad = write_rows(tmp_path / "bad.jsonl", [{**PAIRS[0], "margin": "high"}, *PAIRS[1:4]])
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "rm", "--model", str(workspace / "llama"), "--data", bad,
         "--output_dir", str(tmp_path / "bad-run")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "(row 0): field 'margin' must be a finite number or null; got 'high'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_rm_killed_with_sigkill_resumes_to_the_same_weights(workspace, tmp_path):
    def command(out, *extra):
        return [sys.executable, "-m", "dpolab", "rm", "--model", str(workspace / "llama"), "--data",
                str(workspace / "pairs.jsonl"), "--output_dir", str(out), "--max_steps", "24", "--batch_size", "4",
                "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--checkpoint_steps", "4",
                "--eval_fraction", "0.2", "--eval_steps", "6", "--progress", "false", "--tensorboard", "false", *extra]  # fmt: skip

    run_to_end(command(tmp_path / "whole"))
    out = tmp_path / "killed"
    kill_after_checkpoint_then_resume(command, out, "step-0000008")
    final, expected = (
        load_file(str(out / "model" / "model.safetensors")),
        load_file(str(tmp_path / "whole" / "model" / "model.safetensors")),
    )
    assert final.keys() == expected.keys()
    for name in final:
        assert torch.equal(final[name], expected[name]), name
    ours, theirs = read_metrics(out), read_metrics(tmp_path / "whole")
    assert [m["step"] for m in ours] == [m["step"] for m in theirs]
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "eval/loss", "rewards/min", "eval/rewards/max"):
            assert a.get(key) == b.get(key), (a["step"], key)


def test_the_reward_model_judge_reads_a_model_trained_with_dpolab_rm(workspace, tmp_path):
    """docs/data.md's `--judge reward-model` with a model `dpolab rm` trained: the judge's scores of the held-out
    pairs give the recipe's own held-out mean rewards (same text, same last-token score)."""
    from dpolab.eval.judges import RewardModelJudge

    summary = run(base(workspace, tmp_path, data=str(workspace / "easy.jsonl"), eval_data=str(workspace / "easy.jsonl"),
                       max_steps=6))  # fmt: skip
    judge = RewardModelJudge(str(tmp_path / "run" / "model"))
    chosen = [v.score for v in judge.score([(r["prompt"], r["chosen"], None) for r in EASY])]
    rejected = [v.score for v in judge.score([(r["prompt"], r["rejected"], None) for r in EASY])]
    evaluation = summary["eval"]
    assert sum(chosen) / len(chosen) == pytest.approx(evaluation["eval/rewards/chosen"], abs=1e-4)
    assert sum(rejected) / len(rejected) == pytest.approx(evaluation["eval/rewards/rejected"], abs=1e-4)
    assert evaluation["eval/rewards/chosen"] != pytest.approx(evaluation["eval/rewards/rejected"], abs=1e-3)
