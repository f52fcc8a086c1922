"""``eval_harness:`` in the training config: the policy evaluated in memory every N steps and at the end
equals the harness on the saved model; training with it gives the same weights as without it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.eval.harness import evaluate_directory
from dpolab.eval.tasks import find_files
from dpolab.report.html import build_report
from dpolab.train import TrainConfig, run
from tests.tiny import save_tiny_model

FIXTURES = Path(__file__).parents[1] / "eval" / "fixtures"
PAIRS = [
    {"prompt": f"Q: what is {a} plus {b}? A:", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
    for a in range(4)
    for b in range(4)
]
HARNESS = {"tasks": ["arc", "winogrande"], "every": 2, "data_dir": str(FIXTURES), "limit": 3, "num_fewshot": 1}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness_eval")
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    save_tiny_model(root / "llama", seed=1)
    return root


def base(workspace, output_dir, **overrides) -> TrainConfig:
    settings = dict(
        model=str(workspace / "llama"), data=str(workspace / "pairs.jsonl"), output_dir=str(output_dir),
        cache_dir=str(workspace / "cache"), max_steps=3, batch_size=4, learning_rate=1e-3, progress=False,
        tensorboard=False, loss="dpo",
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def test_evaluation_during_training_equals_the_harness_on_the_saved_model(workspace, tmp_path):
    summary = run(base(workspace, tmp_path / "with", eval_harness=HARNESS))
    lines = [json.loads(line) for line in (tmp_path / "with" / "harness.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 3]  # every 2 steps, and the end
    saved = evaluate_directory(
        tmp_path / "with" / "model",
        {task: find_files(task, FIXTURES) for task in HARNESS["tasks"]},
        num_fewshot=1,
        limit=3,
    )
    for task in HARNESS["tasks"]:
        assert lines[-1]["tasks"][task]["metrics"] == saved["tasks"][task]["metrics"]
    logged = [json.loads(line) for line in (tmp_path / "with" / "metrics.jsonl").read_text().splitlines()]
    at_end = {k: v for line in logged if line.get("step") == 3 for k, v in line.items() if k.startswith("harness/")}
    assert (
        at_end == summary["harness"] and at_end["harness/arc/acc"] == saved["tasks"]["arc"]["metrics"]["acc"]["value"]
    )
    assert any(line.get("step") == 2 and "harness/winogrande/acc" in line for line in logged)
    # the evaluations change nothing in training
    run(base(workspace, tmp_path / "without"))
    with_harness = load_file(str(tmp_path / "with" / "model" / "model.safetensors"))
    for name, tensor in load_file(str(tmp_path / "without" / "model" / "model.safetensors")).items():
        assert torch.equal(tensor, with_harness[name]), name
    # the report's evaluation section: the last evaluation's table and a plot per metric over the steps
    page = build_report([tmp_path / "with", tmp_path / "without"])
    arc = lines[-1]["tasks"]["arc"]["metrics"]["acc"]
    row = f"<td>3</td><td>arc</td><td>acc</td><td>1</td><td>3</td><td>{100 * arc['value']:.1f}</td>"
    assert "<h2>Evaluation (lm-evaluation-harness during training)</h2>" in page and row in page
    section = page.split("<h2>Evaluation")[1].split("<h2>")[0]
    metrics = {(t, m) for t, r in lines[-1]["tasks"].items() for m in r["metrics"]}
    assert section.count('<img alt="plot"') == len(metrics) == 3  # arc: acc, acc_norm; winogrande: acc
    assert "Evaluation (lm-evaluation-harness" not in build_report([tmp_path / "without"])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tasks": ["arcc"], "data_dir": str(FIXTURES)}, "eval_harness: unknown task 'arcc'"),
        ({"tasks": ["arc"]}, "eval_harness: task arc: no data (give eval_harness.data_dir DIR with arc/test.jsonl"),
        (
            {"tasks": ["arc"], "data_dir": str(FIXTURES), "evry": 5},
            "eval_harness.evry: not an eval_harness setting (did you mean 'every'?)",
        ),
        ({"tasks": ["arc"], "data_dir": str(FIXTURES), "every": 0}, "eval_harness.every: must be >= 1 or null"),
        ({"every": 5}, "eval_harness.tasks: required"),
        ({"tasks": ["truthfulqa_mc1"], "data_dir": str(FIXTURES), "num_fewshot": 2}, "asks for 2 few-shot examples"),
    ],
)
def test_bad_settings_stop_the_run_before_any_model_loads(workspace, tmp_path, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        base(workspace, tmp_path / "bad", eval_harness=settings).validate()
    assert not (tmp_path / "bad").exists()


def test_a_reward_model_run_refuses_it(workspace, tmp_path):
    with pytest.raises(ValueError, match="eval_harness: evaluates a language model; task reward trains a scorer"):
        base(workspace, tmp_path / "rm", task="reward", loss="reward_model", eval_harness=HARNESS).validate()


@pytest.mark.slow
def test_two_processes_evaluate_what_one_process_evaluates(workspace, tmp_path):
    """DDP on gloo: the main process evaluates the unwrapped model, every process logs the broadcast values."""
    import os
    import subprocess
    import sys

    import yaml

    harness = {**HARNESS, "every": None}
    settings = base(workspace, tmp_path / "ddp", batch_size=2, eval_harness=harness, save_model=False).to_dict()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dpolab"]
    result = subprocess.run(
        [*command, "train", str(tmp_path / "config.yaml")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    one = run(base(workspace, tmp_path / "one", batch_size=4, eval_harness=harness, save_model=False))
    (line,) = [json.loads(x) for x in (tmp_path / "ddp" / "harness.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and line["step"] == 3 and summary["harness"].keys() == one["harness"].keys()
    for name, value in one["harness"].items():
        assert summary["harness"][name] == pytest.approx(value, abs=1e-6), name
