"""The adversarial trial of issue 13, scripted: each case a command line that must be refused (or end) with
one line naming what to change, the exit code the docs promise (2: usage, 1: runtime), no traceback, and
no input deleted or changed.

Cases that need a real process — kills, signals, a full disk, resume after a change, a damaged checkpoint,
the LLM judge against a real server — are in tests/train/test_reliability.py, tests/train/test_hardening.py,
tests/data/test_hardening.py and tests/data/test_onpolicy.py; this file is the one-line-refusal half.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main
from tests.tiny import save_tiny_model

RUNS = itertools.count()
PAIRS = [{"prompt": f"Q: {a} plus {a}? A:", "chosen": f" {2 * a}", "rejected": f" {2 * a + 1}"} for a in range(6)]


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Real inputs and broken ones; a finished run (for report cases)."""
    root = tmp_path_factory.mktemp("adversarial")
    save_tiny_model(root / "model", seed=0)
    jsonl(root / "pairs.jsonl", PAIRS)
    messages = [{"role": "user", "content": "hi"}]
    for name, content in (("int", 123), ("null", None), ("dict", {"a": 1}), ("parts", [{"type": "text"}])):
        chosen = [{"role": "assistant", "content": content}]
        rows = [{"prompt": messages, "chosen": chosen, "rejected": [{"role": "assistant", "content": "no"}]}]
        jsonl(root / f"content-{name}.jsonl", rows)
    same = [{"role": "assistant", "content": "yes"}]
    jsonl(root / "identical-messages.jsonl", [{"prompt": messages, "chosen": same, "rejected": same}])
    (root / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n" + json.dumps(PAIRS[0]) + "\n")
    (root / "surrogate.jsonl").write_text('{"prompt": "a\\ud800", "chosen": "b", "rejected": "c"}\n')
    (root / "empty.csv").write_text("")
    (root / "header.csv").write_text("prompt,chosen,rejected\n")
    (root / "folder.jsonl").mkdir()
    scored = {"prompt_id": 0, "prompt": "p", "candidates": ["a", "b"], "scores": ["5", "1"]}
    jsonl(root / "string-scores.jsonl", [scored])
    jsonl(root / "nan-scores.jsonl", [{**scored, "scores": [float("nan"), 1.0]}])
    # a model folder with only pickle weights, one with truncated safetensors, one with another vocabulary
    shutil.copytree(root / "model", root / "pickle-model")
    torch.save(load_file(str(root / "pickle-model" / "model.safetensors")), root / "pickle-model" / "pytorch_model.bin")
    (root / "pickle-model" / "model.safetensors").unlink()
    shutil.copytree(root / "model", root / "truncated-model")
    weights = root / "truncated-model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    shutil.copytree(root / "model", root / "raising-template")
    config_file = root / "raising-template" / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**settings, "chat_template": "{{ raise_exception('no system turns') }}"}))
    jsonl(
        root / "chat.jsonl",
        [{"prompt": messages, "chosen": same, "rejected": [{"role": "assistant", "content": "no"}]}],
    )
    base = ["--model", root / "model", "--data", root / "pairs.jsonl", "--output_dir", root / "run", "--max_steps", "1"]
    base += ["--batch_size", "2", "--progress", "false", "--tensorboard", "false", "--cache_dir", root / "cache"]
    assert main(["train", *map(str, base)]) == 0
    return root


def train(root: Path, *extra) -> list[str]:
    out = root / "outputs" / f"run-{next(RUNS)}"  # a new one each case: no case sees another's outputs
    words = ["train", "--model", root / "model", "--data", root / "pairs.jsonl", "--output_dir", out]
    words += ["--max_steps", "1", "--batch_size", "2", "--progress", "false", "--tensorboard", "false"]
    words += ["--save_model", "false", "--cache_dir", root / "outputs" / "cache", *extra]
    return words


# (case, command line (from the inputs folder), exit code, what the one line must say)
CASES = [
    # 1-4: data loss
    ("output_dir contains the model", lambda r: train(r, "--output_dir", r, "--overwrite"), 2, "contains the model"),
    ("output_dir inside the model", lambda r: train(r, "--output_dir", r / "model" / "out"), 2, "is inside the model"),
    ("keep_checkpoints -1", lambda r: train(r, "--keep_checkpoints", "-1"), 2, "keep_checkpoints: must be > 0"),
    ("keep_checkpoints 0", lambda r: train(r, "--keep_checkpoints", "0"), 2, "keep_checkpoints: must be > 0"),
    ("report over metrics", lambda r: ["report", r / "run", "--out", r / "run" / "metrics.jsonl"], 2, "metrics.jsonl"),
    ("report into a folder", lambda r: ["report", r / "run", "--out", r / "run"], 2, "folder"),
    # 6-9: wrong results accepted silently
    *[
        (
            f"message content {name}",
            lambda r, n=name: ["data", "check", r / f"content-{n}.jsonl"],
            1,
            "must be a string",
        )
        for name in ("int", "null", "dict", "parts")
    ],
    (
        "message content in training",
        lambda r: train(r, "--data", r / "content-int.jsonl"),
        2,
        "chosen[0].content must be a string",
    ),
    ("identical message lists", lambda r: ["data", "check", r / "identical-messages.jsonl"], 1, "identical"),
    ("string scores", lambda r: ["data", "pairs", r / "string-scores.jsonl", "--out", r / "outputs" / "p"], 2, '"5"'),
    ("NaN scores", lambda r: ["data", "pairs", r / "nan-scores.jsonl", "--out", r / "outputs" / "p"], 2, "scores"),
    ("learning rate inf", lambda r: train(r, "--learning_rate", ".inf"), 2, "learning_rate: must be a finite number"),
    ("eval limit -1", lambda r: ["eval", r / "pairs.jsonl", "--model", r / "model", "--limit", "-1"], 2, "--limit"),
    # 10: tracebacks that must be one line
    ("JSON nested 100,000 deep", lambda r: ["data", "check", r / "deep.jsonl"], 1, "nested too deeply"),
    ("lone surrogate (check)", lambda r: ["data", "check", r / "surrogate.jsonl"], 1, "surrogate"),
    ("lone surrogate (train)", lambda r: train(r, "--data", r / "surrogate.jsonl"), 2, "surrogate"),
    (
        "chat template that raises",
        lambda r: train(r, "--model", r / "raising-template", "--data", r / "chat.jsonl"),
        2,
        "chat template fails",
    ),
    ("reference missing", lambda r: train(r, "--reference", r / "no-such-reference"), 2, "reference: no such folder"),
    ("tokenizer missing", lambda r: train(r, "--tokenizer", r / "no-such-tokenizer"), 2, "tokenizer: no such folder"),
    ("model missing", lambda r: train(r, "--model", r / "no-such-model"), 2, "model: no such folder"),
    ("only .bin weights", lambda r: train(r, "--model", r / "pickle-model"), 2, "only pickle (.bin) weights"),
    ("truncated safetensors", lambda r: train(r, "--model", r / "truncated-model"), 2, "cannot load the model"),
    ("loss list in a list", lambda r: train(r, "--loss", "[dpo, [ipo]]"), 2, "loss[1]: expected str"),
    ("unknown LoRA key", lambda r: train(r, "--lora", "{bogus: 1}"), 2, "lora.bogus: not a LoRA setting"),
    ("mixed_precision fp8", lambda r: train(r, "--mixed_precision", "fp8"), 2, "mixed_precision: must be one of"),
    ("seed -1", lambda r: train(r, "--seed", "-1"), 2, "seed: must lie in"),
    ("threads 0", lambda r: train(r, "--threads", "0"), 2, "threads: must be > 0"),
    ("max_prompt_length over max_length", lambda r: train(r, "--max_prompt_length", "2048"), 2, "max_prompt_length"),
    ("truncation_mode bogus", lambda r: train(r, "--truncation_mode", "middle"), 2, "truncation_mode: must be one of"),
    ("output_dir is a file", lambda r: train(r, "--output_dir", r / "pairs.jsonl"), 2, "output_dir:"),
    ("cache_dir is a file", lambda r: train(r, "--cache_dir", r / "pairs.jsonl"), 2, "cache_dir:"),
    ("a folder as data", lambda r: train(r, "--data", r / "folder.jsonl"), 2, "is a folder"),
    ("empty CSV", lambda r: train(r, "--data", r / "empty.csv"), 2, "empty"),
    ("header-only CSV", lambda r: train(r, "--data", r / "header.csv"), 2, "only a header"),
    ("mistyped data path", lambda r: ["data", "check", r / "pairz.jsonl"], 2, "no such file"),
    ("mistyped relative data path", lambda r: ["data", "check", "data/pairz.jsonl"], 2, "no such file"),
    # 12: TRL's names with another meaning get a pointer, not just "unknown"
    ("TRL's rpo_alpha", lambda r: train(r, "--rpo_alpha", "1.0"), 2, "use sft_weight"),
    ("a typo", lambda r: train(r, "--learnig_rate", "0.1"), 2, "did you mean 'learning_rate'"),
]


def fingerprint(folder: Path) -> dict[str, str]:
    skip = {"outputs", "run"}  # the outputs the cases may write, and the finished run (its lock)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] not in skip
    }


@pytest.mark.parametrize("case, command, code, message", CASES, ids=[case[0] for case in CASES])
def test_each_case_is_one_line_naming_what_to_change(inputs, capsys, monkeypatch, case, command, code, message):
    monkeypatch.chdir(inputs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = fingerprint(inputs)
    run_files = {p: p.read_bytes() for p in (inputs / "run").iterdir() if p.is_file() and p.name != ".lock"}
    assert main([str(word) for word in command(inputs)]) == code, capsys.readouterr().err[-2000:]
    output = capsys.readouterr()
    assert "Traceback" not in output.err and "internal error" not in output.err, output.err[-2000:]
    assert message in output.out + output.err, (output.out + output.err)[-2000:]  # data check reports on stdout
    assert fingerprint(inputs) == before  # no input deleted or changed
    assert {p: p.read_bytes() for p in run_files} == run_files  # nor the finished run's files
