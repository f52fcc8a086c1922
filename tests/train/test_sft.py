"""`dpolab sft`: completion-only NLL, equal to Hugging Face's own masked cross-entropy; CLI; errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dpolab.train import TrainConfig, load_config, run
from tests.tiny import save_tiny_model

ROWS = [{"prompt": f"Q: what is {a} plus {b}? A:", "completion": f" {a + b}"} for a in range(6) for b in range(4)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    save_tiny_model(root / "llama", seed=0)
    return root


def test_first_step_loss_is_the_masked_cross_entropy_of_transformers(workspace, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = ROWS[:8]
    (tmp_path / "eight.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = TrainConfig(
        model=str(workspace / "llama"),
        data=str(tmp_path / "eight.jsonl"),
        task="sft",
        loss="sft",
        loss_params={"reduction": "batch_token_mean"},
        output_dir=str(tmp_path / "run"),
        batch_size=8,
        max_steps=1,
        progress=False,
        tensorboard=False,
        save_model=False,
    )
    run(config)
    ours = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    model = AutoModelForCausalLM.from_pretrained(workspace / "llama").eval()
    tokenizer = AutoTokenizer.from_pretrained(workspace / "llama")
    sequences, labels = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        full = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        sequences.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt) :])
    width = max(map(len, sequences))
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=target).loss  # token mean over the batch
    assert ours == pytest.approx(float(expected), rel=1e-5)


def test_cli_sft_trains_and_saves_a_loadable_model(workspace, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpolab",
            "sft",
            "--model",
            str(workspace / "llama"),
            "--data",
            str(workspace / "sft.jsonl"),
            "--output_dir",
            str(out),
            "--max_steps",
            "30",
            "--batch_size",
            "8",
            "--learning_rate",
            "3e-3",
            "--eval_fraction",
            "0.2",
            "--progress",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]  # measured 5.94 → 3.62
    assert any("eval/loss" in m for m in metrics)
    assert "rewards/margins" not in train[0]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")


def test_conversational_sft_rows(workspace, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workspace / "llama")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tokenizer.save_pretrained(tmp_path / "tok")
    rows = [
        {"messages": [{"role": "user", "content": f"{a} plus {b}"}, {"role": "assistant", "content": f"{a + b}"}]}
        for a in range(4)
        for b in range(3)
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = load_config(
        None,
        [
            "--model",
            str(workspace / "llama"),
            "--tokenizer",
            str(tmp_path / "tok"),
            "--data",
            str(tmp_path / "chat.jsonl"),
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "2",
            "--progress",
            "false",
            "--tensorboard",
            "false",
            "--save_model",
            "false",
        ],
        {"task": "sft", "loss": "sft"},
    )
    summary = run(config)
    assert summary["data"]["pairs_kept"] == 12 and summary["forward"] == "packed"


def test_sft_errors(workspace, tmp_path):
    with pytest.raises(ValueError, match="loss: task sft trains with loss: sft; got 'dpo'"):
        load_config(
            None, ["--model", str(workspace / "llama"), "--data", str(workspace / "sft.jsonl"), "--task", "sft"]
        )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q"}) + "\n" + json.dumps({"prompt": "Q", "completion": " 4"}) + "\n")
    config = TrainConfig(
        model=str(workspace / "llama"),
        data=str(bad),
        task="sft",
        loss="sft",
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    with pytest.raises(ValueError, match=r"line 1 \(row 0\): missing field 'completion'"):
        run(config)
