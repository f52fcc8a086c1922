"""The edges of multi-process training (CPU, gloo, 2 processes, one thread each), launched as a user would.

A process killed mid-training ends the survivor with one line naming it and the command that resumes the run
(a command that works: it is run); a resume with another number of processes is refused before the data is
read, with a command that works on this machine; an accelerate config file's num_processes is honoured or
refused by name; ``--resume --overwrite`` and a flag without its value are refused.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpolab.cli import main
from dpolab.train.config import load_config
from tests.tiny import save_tiny_model

PAIRS = [
    {"prompt": f"Q: what is {a} plus {b}? A:", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
    for a in range(5)
    for b in range(4)
]
STEPS = 40  # ~50 ms a step: the kill after step 2's checkpoint lands with most of the run still to go
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dpolab"]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    save_tiny_model(root / "llama", seed=0)
    config = {
        "model": str(root / "llama"),
        "data": str(root / "pairs.jsonl"),
        "loss": "dpo",
        "batch_size": 2,
        "max_steps": STEPS,
        "checkpoint_steps": 2,
        "keep_checkpoints": 2,
        "cache_dir": str(root / "cache"),
        "progress": False,
        "tensorboard": False,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def environment(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def child_with_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker of ``rank`` that torchrun started (its child with RANK=rank in its environment)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().rpartition(")")[2].split()[1] == str(launcher.pid):
                if f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"torchrun has no worker of rank {rank}")


@pytest.fixture(scope="module")
def killed(workspace):
    """A 2-process run whose rank 1 is SIGKILLed after its checkpoint of step 2: (output_dir, pid, result)."""
    out = workspace / "killed"
    launcher = subprocess.Popen(
        [*TORCHRUN, "train", str(workspace / "config.yaml"), "--output_dir", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
    )  # fmt: skip
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-0000002").exists():
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    pid = child_with_rank(launcher, 1)
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=60)  # torchrun's own grace period before SIGKILL is 30 s
    assert not (out / "summary.json").exists(), "the kill must land before the end"
    return out, pid, subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)


@pytest.mark.slow
def test_a_killed_process_ends_the_survivor_with_one_line_and_the_command_that_resumes(workspace, killed):
    out, pid, result = killed
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("dpolab train:")]
    assert len(ours) == 1, result.stderr[-3000:]
    line = ours[0]
    assert f"rank 1 of 2 (pid {pid} on host " in line and "died" in line, line
    assert "internal error" not in result.stderr and "a bug in dpolab" not in result.stderr
    assert not [row for row in result.stderr.splitlines() if row.strip().startswith("File ") and "dpolab" in row]
    # The survivor ended itself (exit status 1), neither torchrun's SIGTERM nor, 30 s later, its SIGKILL.
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*\n\s*exitcode\s*:\s*1 ", result.stderr), result.stderr[-3000:]
    checkpoint = re.search(r"resume from (\S+) with: (.*)$", line)
    assert checkpoint and Path(checkpoint[1]).parent == out / "checkpoints", line
    command = shlex.split(checkpoint[2])
    assert command[-1] == "--resume" and "train" in command and str(workspace / "config.yaml") in command

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint[1]}" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["processes"] == 2


@pytest.mark.slow
def test_resume_with_another_number_of_processes_is_refused_before_the_data_is_read(workspace, killed):
    out = killed[0]
    data = workspace / "pairs.jsonl"
    rows = data.read_text()
    data.write_text("not a row\n")  # were the data read first, the run would fail on it instead
    try:
        result = subprocess.run(
            [sys.executable, "-m", "dpolab", "train", str(workspace / "config.yaml"), "--output_dir", str(out),
             "--resume"],
            capture_output=True, text=True, timeout=300, env=environment(),
        )  # fmt: skip
    finally:
        data.write_text(rows)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpolab train: error: "), result.stderr[-3000:]
    assert "written by 2 process(es) and this run has 1" in lines[0]
    expected = f"torchrun --standalone --nproc_per_node 2 -m dpolab train {out / 'config.yaml'} --resume"
    assert expected in lines[0]  # on a machine without GPUs accelerate launch --num_processes 2 starts one


def accelerate_settings(**settings) -> str:
    base = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_CPU",
        "num_processes": 2,
        "num_machines": 1,
        "machine_rank": 0,
        "use_cpu": True,
        "mixed_precision": "no",
        "main_training_function": "main",
    }
    return yaml.safe_dump({**base, **settings})


def short_run(workspace, out) -> list[str]:
    return ["train", str(workspace / "config.yaml"), "--output_dir", str(out), "--max_steps", "2"]


@pytest.mark.slow
def test_an_accelerate_config_file_with_two_processes_trains_on_two(workspace, tmp_path):
    config = tmp_path / "accelerate.yaml"
    config.write_text(accelerate_settings())
    out = tmp_path / "run"
    result = subprocess.run(
        [ACCELERATE, "launch", "--config_file", str(config), "-m", "dpolab", *short_run(workspace, out)],
        capture_output=True, text=True, timeout=300, env=environment(HF_HOME=str(tmp_path / "hf")),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"num_processes: 2 in {config}" in result.stderr
    assert "2 process(es)" in result.stderr
    assert json.loads((out / "summary.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_a_default_accelerate_config_that_cannot_be_honoured_is_refused_by_name(workspace, tmp_path):
    """Two machines from accelerate's default config file ($HF_HOME/accelerate/default_config.yaml): accelerate
    launch would start one process; dpolab refuses, naming the file and the key, and trains on none."""
    home = tmp_path / "hf"
    (home / "accelerate").mkdir(parents=True)
    config = home / "accelerate" / "default_config.yaml"
    config.write_text(accelerate_settings(num_machines=2, main_process_ip="127.0.0.1", main_process_port=29577))
    out = tmp_path / "run"
    result = subprocess.run(
        [ACCELERATE, "launch", "-m", "dpolab", *short_run(workspace, out)],
        capture_output=True, text=True, timeout=300, env=environment(HF_HOME=str(home)),
    )  # fmt: skip
    assert result.returncode != 0, result.stderr[-3000:]  # dpolab's 2; accelerate's launcher then exits with 1
    ours = [line for line in result.stderr.splitlines() if line.startswith("dpolab train:")]
    assert len(ours) == 1 and f"num_processes: 2 in {config}" in ours[0] and "num_machines: 2" in ours[0], ours
    assert not out.exists()


def test_resume_with_overwrite_is_refused(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(workspace / "config.yaml"), "--output_dir", str(out), "--resume", "--overwrite"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert error.startswith("dpolab train: error: --resume and --overwrite contradict each other")
    assert not out.exists()  # refused before anything was touched


def test_a_flag_without_its_value_is_named_and_negative_numbers_stay_values(workspace, tmp_path, capsys):
    model, data = str(workspace / "llama"), str(workspace / "pairs.jsonl")
    for flags in (["--loss_params.beta", "--max_steps", "3"], ["--max_steps", "3", "--loss_params.beta"]):
        code = main(["train", "--model", model, "--data", data, "--output_dir", str(tmp_path / "run"), *flags])
        error = capsys.readouterr().err
        assert code == 2 and error == "dpolab train: error: --loss_params.beta: missing value\n", flags
    assert load_config(None, ["--model", model, "--data", data, "--loss", "simpo", "--loss_params.gamma", "-1"]
                       ).loss_params == {"gamma": -1}  # fmt: skip
    with pytest.raises(ValueError, match=r"learning_rate: must be > 0; got -0\.001"):  # read, then refused
        load_config(None, ["--model", model, "--data", data, "--learning_rate", "-1e-3"])
