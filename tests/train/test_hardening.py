"""Issue 13, the training side: bad configs are one line naming the key; no state a rerun cannot leave.

Each test here failed on the code before the fix it covers (a traceback, a silent acceptance, or a
folder that neither a rerun nor ``--resume`` could use).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from dpolab.cli import main
from dpolab.train import TrainConfig, load_config, run
from dpolab.train.config import TRL_NAMES, key_groups
from dpolab.train.guard import NonFiniteError
from tests.tiny import save_tiny_model
from tests.train.test_train import PAIRS


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    save_tiny_model(root / "llama", seed=0)
    return root


def flags(workspace: Path, output_dir: Path, **overrides) -> list[str]:
    settings = {
        "model": str(workspace / "llama"),
        "data": str(workspace / "pairs.jsonl"),
        "output_dir": str(output_dir),
        "cache_dir": str(workspace / "cache"),
        "max_steps": 4,
        "batch_size": 4,
        "progress": False,
        "tensorboard": False,
        "save_model": False,
        **overrides,
    }
    return [word for key, value in settings.items() for word in (f"--{key}", str(value))]


def dpolab(*args, cwd=None, limit_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit():  # a full disk, as the process sees it: writes past the limit fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "dpolab", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=limit if limit_file_bytes else None,
    )


def one_line_error(result: subprocess.CompletedProcess, code: int) -> str:
    """The error line of a refused command: exit ``code``, no traceback, no internal error."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# --- config: one line naming the key ---------------------------------------------------------------


@pytest.mark.parametrize(
    "override, named",
    [
        (["--loss", "[dpo, [ipo]]"], "loss[1]: expected str"),
        (["--loss_weights", "[1, two]"], "loss_weights[1]"),
        (["--lora", "{bogus: 1}"], "lora.bogus: not a LoRA setting"),
        (["--lora", "{r: 0}"], "lora.r: must be a positive integer"),
        (["--lora", "{dropout: 1.5}"], "lora.dropout"),
        (["--mixed_precision", "fp8"], "mixed_precision: must be one of"),
        (["--seed", "-1"], "seed: must lie in"),
        (["--seed", str(2**32)], "seed: must lie in"),
        (["--learning_rate", ".inf"], "learning_rate: must be a finite number"),
        (["--learning_rate", ".nan"], "learning_rate: must be a finite number"),
        (["--loss_params.beta", ".inf"], "beta"),
        (["--reference", "./no/such/reference"], "reference: no such folder"),
        (["--tokenizer", "./no/such/tokenizer"], "tokenizer: no such folder"),
    ],
)
def test_config_errors_name_the_key(workspace, tmp_path, override, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, flags(workspace, tmp_path / "out") + override)


@pytest.mark.parametrize("key", ["output_dir", "cache_dir"])
def test_a_file_where_a_folder_is_needed_is_named(workspace, tmp_path, key):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ValueError, match=f"{key}: .*a-file is a file"):
        load_config(None, flags(workspace, tmp_path / "out") + [f"--{key}", str(tmp_path / "a-file" / "below")])
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_yaml_aliases_are_refused_before_they_expand(workspace, tmp_path):
    # 9 levels of 9 aliases: ~387 million list items if expanded (PyYAML's safe loader expands them)
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("lora:\n" + "\n".join("  " + line for line in lines) + "\n")
    with pytest.raises(ValueError, match="bomb.yaml: invalid YAML: line 2: YAML anchors"):
        load_config(str(bomb), flags(workspace, tmp_path / "out"))


def test_trl_names_are_accepted_with_a_note(workspace, tmp_path, capsys):
    arguments = flags(workspace, tmp_path / "out")
    del arguments[arguments.index("--batch_size") : arguments.index("--batch_size") + 2]
    config = load_config(
        None,
        arguments
        + ["--beta", "0.25", "--per_device_train_batch_size", "2", "--num_train_epochs", "2"]
        + ["--lr_scheduler_type", "cosine", "--bf16", "true"],
    )
    assert config.loss_params == {"beta": 0.25}
    assert (config.batch_size, config.epochs, config.lr_scheduler) == (2, 2.0, "cosine")
    assert config.mixed_precision == "bf16"
    notes = capsys.readouterr().err
    assert "note: TRL's beta is loss_params.beta in dpolab" in notes
    assert "per_device_train_batch_size is batch_size" in notes
    with pytest.raises(ValueError, match="beta .*conflicts with loss_params.beta"):
        load_config(None, flags(workspace, tmp_path / "out") + ["--beta", "0.2", "--loss_params.beta", "0.3"])
    with pytest.raises(ValueError, match="precompute_ref_log_probs.*always computes the reference"):
        load_config(None, flags(workspace, tmp_path / "out") + ["--precompute_ref_log_probs", "true"])
    with pytest.raises(ValueError, match="unknown config key 'learnin_rate' .*did you mean 'learning_rate'"):
        load_config(None, flags(workspace, tmp_path / "out") + ["--learnin_rate", "0.1"])


def test_help_lists_every_key_and_keys_explains_each(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    short = capsys.readouterr().out
    assert main(["train", "--keys"]) == 0
    full = capsys.readouterr().out
    names = [item.name for _, items in key_groups() for item in items]
    assert sorted(names) == sorted(TrainConfig.__dataclass_fields__)  # every key is in a group
    for name in names:
        assert f"{name} [" in short, name
        assert f"\n  {name} (default: " in full, name
    for alias in TRL_NAMES:
        assert alias in full


# --- non-finite log-probs ------------------------------------------------------------------------------


def test_a_blown_up_policy_is_skipped_and_stops_with_a_checkpoint(workspace, tmp_path):
    """lr 1e10: the forward itself gives NaN log-probs (the objective's input check used to raise first)."""
    out = tmp_path / "blown"
    config = load_config(
        None,
        flags(workspace, out, learning_rate=1e10, max_grad_norm="null", max_steps=30, skip_nonfinite="true")
        + ["--max_nonfinite", "3", "--monitor.probe_steps", "1"],
    )
    with pytest.raises(NonFiniteError) as stop:
        run(config)
    message = str(stop.value)
    assert message.startswith("step ") and "data rows [" in message and "more than max_nonfinite=3" in message
    assert "checkpoint: " in message and "--resume --max_nonfinite" in message
    checkpoint = Path(message.split("checkpoint: ")[1].split(";")[0])
    step = int(message.split()[1].rstrip(":"))
    assert checkpoint.name == f"step-{step:07d}"
    import torch

    assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values())


def test_without_skip_the_stop_checkpoints_and_a_resume_may_skip(workspace, tmp_path):
    out = tmp_path / "stop"
    arguments = flags(workspace, out, learning_rate=1e10, max_grad_norm="null", max_steps=6)
    result = dpolab("train", *arguments)
    error = one_line_error(result, 1)
    assert "non-finite" in error and "--resume --skip_nonfinite true" in error
    resumed = dpolab("train", *arguments, "--resume", "--skip_nonfinite", "true", "--max_nonfinite", "10")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


# --- states a rerun can always leave ---------------------------------------------------------------


def test_a_failed_first_attempt_never_blocks_the_next(workspace, tmp_path):
    out = tmp_path / "first"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "", "rejected": "r"}) + "\n")
    assert "empty chosen" in one_line_error(dpolab("train", *flags(workspace, out, data=bad)), 2)
    resume = one_line_error(dpolab("train", *flags(workspace, out), "--resume"), 2)
    assert "nothing to resume" in resume and "without --resume" in resume
    rerun = dpolab("train", *flags(workspace, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "starting over" in rerun.stderr


def test_a_full_disk_is_one_line_and_the_rerun_starts_over(workspace, tmp_path):
    out = tmp_path / "full"
    result = dpolab("train", *flags(workspace, out, checkpoint_steps=1), limit_file_bytes=200_000)
    error = one_line_error(result, 1)
    assert "cannot write the checkpoint of step 1" in error and "is the disk full?" in error
    assert not list((out / "checkpoints").glob("step-*"))  # nothing partial under a step name
    rerun = dpolab("train", *flags(workspace, out, checkpoint_steps=1))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_torn_metrics_damaged_checkpoints_and_orphans(workspace, tmp_path):
    out = tmp_path / "run"
    arguments = flags(workspace, out, checkpoint_steps=2, keep_checkpoints=3)
    assert dpolab("train", *arguments).returncode == 0
    # a kill mid-write: a torn last line, and an orphaned temporary checkpoint folder
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 0.6')
    orphan = out / "checkpoints" / ".tmp-step-0000006"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"\0" * 1000)
    report = dpolab("report", out, "--out", tmp_path / "report.html")
    assert report.returncode == 0 and "skipped 1 unreadable line" in report.stderr, report.stderr[-3000:]
    # the newest checkpoint damaged: named, with the older one to use instead
    optimizer = out / "checkpoints" / "step-0000004" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    error = one_line_error(dpolab("train", *arguments, "--resume"), 2)
    assert "step-0000004 is damaged: optimizer.bin cannot be read" in error
    assert f"--resume {out / 'checkpoints' / 'step-0000002'}" in error
    assert not orphan.exists()
    resumed = dpolab("train", *arguments, "--resume", out / "checkpoints" / "step-0000002")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_the_saved_config_resumes_from_any_directory(workspace, tmp_path):
    (tmp_path / "start").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(workspace / "llama", tmp_path / "start" / "llama")
    (tmp_path / "start" / "pairs.jsonl").write_text((workspace / "pairs.jsonl").read_text())
    arguments = flags(Path("."), Path("run"), checkpoint_steps=2, max_steps=4)
    arguments[arguments.index("--cache_dir") + 1] = str(workspace / "cache")
    first = dpolab("train", *arguments, cwd=tmp_path / "start")
    assert first.returncode == 0, first.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "start" / "run" / "config.yaml").read_text())
    for key in ("model", "data", "output_dir", "cache_dir"):
        assert Path(saved[key]).is_absolute(), key
    resumed = dpolab(
        "train",
        tmp_path / "start" / "run" / "config.yaml",
        "--resume",
        tmp_path / "start" / "run" / "checkpoints" / "step-0000002",
        cwd=tmp_path / "elsewhere",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "elsewhere" / "run").exists()


@pytest.mark.parametrize("eval_steps, evaluations", [(None, [6]), (2, [2, 4, 6])])
def test_resuming_after_an_alarm_stop_logs_each_evaluation_once(workspace, tmp_path, eval_steps, evaluations):
    """An alarm at step 2 stops the run (thresholds that always fire); the resume goes on to step 6.

    The stop's evaluation came after its checkpoint, so the resume drops it (it used to stay, a stray line);
    a stop right after a periodic evaluation does not evaluate twice."""
    out = tmp_path / "alarm"
    monitor = "{drop_ratio: -1000.0, drop_min_fall: -1000.0, window: 2, probe_steps: 0, on_alarm: stop}"
    arguments = flags(workspace, out, max_steps=6, eval_fraction=0.25) + ["--monitor", monitor]
    if eval_steps:
        arguments += ["--eval_steps", str(eval_steps)]
    first = dpolab("train", *arguments)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if any(key.startswith("eval/") for key in row)] == [2]
    resumed = dpolab("train", *arguments, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if any(key.startswith("eval/") for key in row)] == evaluations


def test_a_reference_with_another_vocabulary_is_named(workspace, tmp_path):
    from tests.tiny import tiny_causal_lm

    other = tiny_causal_lm("llama", 123)
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    config = load_config(None, flags(workspace, tmp_path / "out", reference=tmp_path / "other"))
    with pytest.raises(ValueError, match="reference: .*has 123 output tokens but the model has"):
        run(config)


def test_a_truncated_model_file_is_named(workspace, tmp_path):
    import shutil

    shutil.copytree(workspace / "llama", tmp_path / "broken")
    weights = tmp_path / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    error = one_line_error(dpolab("train", *flags(workspace, tmp_path / "out", model=tmp_path / "broken")), 2)
    assert f"model: cannot load the model in {tmp_path / 'broken'}" in error
