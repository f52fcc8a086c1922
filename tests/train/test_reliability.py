"""Exact resume after SIGKILL, clean stops on SIGTERM/SIGINT, the non-finite guard, protected outputs.

These run `dpolab train` as real subprocesses and really kill them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dpolab.train import TrainConfig, run
from dpolab.train.guard import NonFiniteError, RunLock
from tests.tiny import save_tiny_model

PAIRS = [
    {"prompt": f"Q: what is {a} plus {b}? A:", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
    for a in range(8)
    for b in range(6)
]
STEPS = 60


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    save_tiny_model(root / "llama", seed=0)
    config = {
        "model": str(root / "llama"),
        "data": str(root / "pairs.jsonl"),
        "loss": "dpo",
        "loss_params": {"beta": 0.1},
        "learning_rate": 1e-3,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": STEPS,
        "warmup_steps": 5,
        "lr_scheduler": "cosine",
        "checkpoint_steps": 5,
        "keep_checkpoints": 3,
        "cache_dir": str(root / "cache"),
        "progress": False,
        "tensorboard": False,
    }
    import yaml

    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def train(workspace, output_dir, *extra, wait=True):
    command = [
        sys.executable,
        "-m",
        "dpolab",
        "train",
        str(workspace / "config.yaml"),
        "--output_dir",
        str(output_dir),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every run, for bitwise equality
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def logged_steps(output_dir) -> int:
    path = output_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_step(process, output_dir, step: int) -> None:
    deadline = time.time() + 300
    while logged_steps(output_dir) < step:
        assert process.poll() is None, f"the run ended before step {step}: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.005)


def final_weights(output_dir) -> dict:
    return load_file(str(output_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    out = workspace / "uninterrupted"
    result = train(workspace, out)
    assert result.returncode == 0, result.stderr
    return final_weights(out)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [8, 33])
def test_sigkill_then_resume_is_bitwise_equal(workspace, uninterrupted, kill_at):
    out = workspace / f"killed-{kill_at}"
    process = train(workspace, out, wait=False)
    wait_for_step(process, out, kill_at)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists(), "the kill must land before the end"
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert checkpoints and all(not c.name.startswith(".tmp") for c in checkpoints[-1:])

    again = train(workspace, out)  # no --resume: refused, the folder holds an unfinished run
    assert again.returncode == 2 and "holds an unfinished run; pass --resume" in again.stderr
    resumed = train(workspace, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    weights = final_weights(out)
    assert weights.keys() == uninterrupted.keys()
    for name in weights:
        assert torch.equal(weights[name], uninterrupted[name]), name
    # The monitor's history and fired alarms come back from the checkpoint (they used to be lost).
    resumed_summary = json.loads((out / "summary.json").read_text())
    whole_summary = json.loads((workspace / "uninterrupted" / "summary.json").read_text())
    assert resumed_summary["monitor"] == whole_summary["monitor"]
    assert resumed_summary["alarms"] == whole_summary["alarms"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # steps redone after the checkpoint are logged once
    assert len(list((out / "checkpoints").iterdir())) == 3  # keep_checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_stop_signals_checkpoint_and_exit(workspace, uninterrupted, signum, code):
    out = workspace / f"signal-{code}"
    process = train(workspace, out, wait=False)
    wait_for_step(process, out, 12)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert f"stopped by {signal.Signals(signum).name} after step" in stderr and "--resume" in stderr
    stopped_at = logged_steps(out)
    latest = sorted((out / "checkpoints").iterdir())[-1]
    assert latest.name == f"step-{stopped_at:07d}"
    resumed = train(workspace, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for name, tensor in final_weights(out).items():
        assert torch.equal(tensor, uninterrupted[name]), name


def base(workspace, output_dir, **overrides) -> TrainConfig:
    settings = dict(
        model=str(workspace / "llama"),
        data=str(workspace / "pairs.jsonl"),
        output_dir=str(output_dir),
        cache_dir=str(workspace / "cache"),
        max_steps=4,
        batch_size=4,
        progress=False,
        tensorboard=False,
        save_model=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_nonfinite_loss_stops_naming_the_step_and_rows(workspace, tmp_path):
    config = base(workspace, tmp_path / "nan", learning_rate=1e10, max_grad_norm=None, max_steps=30, checkpoint_steps=1)
    with pytest.raises(NonFiniteError) as error:
        run(config)
    message = str(error.value)
    assert message.startswith("step ") and "non-finite" in message and "data rows [" in message
    for checkpoint in (tmp_path / "nan" / "checkpoints").iterdir():  # every checkpoint written is finite
        for tensor in load_file(str(checkpoint / "model.safetensors")).values():
            assert torch.isfinite(tensor).all()


def test_skip_nonfinite_counts_and_stops_after_the_maximum(workspace, tmp_path):
    config = base(
        workspace,
        tmp_path / "skip",
        learning_rate=1e10,
        max_grad_norm=None,
        max_steps=30,
        skip_nonfinite=True,
        max_nonfinite=3,
    )
    with pytest.raises(NonFiniteError, match="4 non-finite batches, more than max_nonfinite=3"):
        run(config)
    metrics = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [m["nonfinite_skipped"] for m in metrics][-4:] == [1, 2, 3, 4]  # the stopping step is logged too


def test_finished_runs_are_not_clobbered(workspace, tmp_path):
    config = base(workspace, tmp_path / "done")
    run(config)
    with pytest.raises(ValueError, match="holds a finished run; pass --overwrite"):
        run(config)
    summary = run(config, overwrite=True)
    assert summary["steps"] == 4


def test_a_run_directory_in_use_is_locked(workspace, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    lock = RunLock(out)
    try:
        with pytest.raises(ValueError, match=f"is in use by another run \\(pid {os.getpid()}\\)"):
            run(base(workspace, out))
    finally:
        lock.release()


def test_resume_refuses_a_changed_result_and_allows_harmless_changes(workspace, tmp_path):
    out = tmp_path / "changed"
    run(base(workspace, out, checkpoint_steps=2))
    with pytest.raises(ValueError) as error:
        run(base(workspace, out, checkpoint_steps=2, loss="ipo", learning_rate=5e-4), resume="latest")
    assert "config changed in keys that change the result (learning_rate: 1e-06 → 0.0005, loss: 'dpo' → 'ipo')" in str(
        error.value
    )
    summary = run(base(workspace, out, checkpoint_steps=2, logging_steps=3), resume="latest")
    assert summary["resumed_from"].endswith("step-0000004")


def test_pickle_weights_are_refused_unless_allowed(workspace, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(workspace / "llama")
    model.save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()  # transformers 5 only writes safetensors: make a .bin
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(workspace / "llama").save_pretrained(tmp_path / "pickled")
    with pytest.raises(ValueError, match=r"has only pickle \(.bin\) weights; convert them to safetensors"):
        run(base(workspace, tmp_path / "p1", model=str(tmp_path / "pickled")))
    run(base(workspace, tmp_path / "p2", model=str(tmp_path / "pickled"), allow_pickle=True, max_steps=1))


def test_resume_from_a_named_older_checkpoint_redoes_the_same_steps(workspace, tmp_path):
    out = tmp_path / "named"
    run(base(workspace, out, checkpoint_steps=2))
    before = load_file(str(out / "checkpoints" / "step-0000004" / "model.safetensors"))
    summary = run(base(workspace, out, checkpoint_steps=2), resume=str(out / "checkpoints" / "step-0000002"))
    assert summary["resumed_from"].endswith("step-0000002")
    after = load_file(str(out / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert all(torch.equal(before[name], after[name]) for name in before)
    with pytest.raises(ValueError, match="is not a dpolab checkpoint"):
        run(base(workspace, out), resume=str(tmp_path))


@pytest.mark.parametrize(
    "case",
    ["bad row", "no usable pair", "non-finite", "loss needs a reference", "resume with another config"],
)
def test_the_run_lock_is_released_on_every_error_path(workspace, tmp_path, case):
    """Each failure after the output folder is locked; then a second run into the same folder is not refused as busy."""
    out = tmp_path / "failing"
    if case == "bad row":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "", "rejected": "y"}) + "\n")
        config, error = base(workspace, out, data=str(bad)), ValueError
    elif case == "no usable pair":
        config, error = base(workspace, out, max_length=2, truncation_mode="drop"), ValueError
    elif case == "non-finite":
        config, error = base(workspace, out, learning_rate=1e10, max_grad_norm=None, max_steps=30), NonFiniteError
    elif case == "loss needs a reference":
        config, error = base(workspace, out, reference="none"), ValueError
    else:
        run(base(workspace, out, checkpoint_steps=2))
        config, error = base(workspace, out, checkpoint_steps=2, learning_rate=0.5), ValueError
    with pytest.raises(error):
        run(config, resume="latest" if case == "resume with another config" else None)
    RunLock(out).release()  # would raise "in use by another run" if the failed run still held it
    summary = run(base(workspace, out, max_steps=1), overwrite=True)
    assert summary["steps"] == 1


def dpolab(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "dpolab", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd
    )


@pytest.mark.slow
def test_an_output_folder_never_holds_or_sits_inside_an_input(workspace, tmp_path):
    """The model trained from, the data, the cache: none may be inside output_dir, nor output_dir inside them."""
    import shutil

    run_dir = tmp_path / "x"
    shutil.copytree(workspace / "llama", run_dir / "model")
    before = {p.name: p.read_bytes() for p in (run_dir / "model").iterdir()}
    result = dpolab(
        "train", workspace / "config.yaml", "--model", run_dir / "model", "--output_dir", run_dir, "--overwrite"
    )
    assert result.returncode == 2 and "contains the model" in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / "model").iterdir()} == before  # nothing deleted

    # model: ./model and output_dir: . in the model's own folder: the weights and the user's config stay
    folder = tmp_path / "here"
    shutil.copytree(workspace / "llama", folder)
    (folder / "config.yaml").write_text(f"model: .\ndata: {workspace / 'pairs.jsonl'}\noutput_dir: .\nmax_steps: 1\n")
    weights = (folder / "model.safetensors").read_bytes()
    result = dpolab("train", "config.yaml", cwd=folder)
    assert result.returncode == 2 and "is the model" in result.stderr, result.stderr
    assert (folder / "model.safetensors").read_bytes() == weights
    assert (folder / "config.yaml").read_text().startswith("model: .")

    inside = dpolab("train", workspace / "config.yaml", "--output_dir", workspace / "llama" / "run")
    assert inside.returncode == 2 and "is inside the model" in inside.stderr
    data_inside = dpolab("train", workspace / "config.yaml", "--output_dir", workspace)
    assert data_inside.returncode == 2 and "contains the" in data_inside.stderr


@pytest.mark.parametrize("keep", [-1, 0])
def test_keep_checkpoints_below_one_is_refused(workspace, tmp_path, keep):
    with pytest.raises(ValueError, match=f"keep_checkpoints: must be > 0; got {keep}"):
        run(base(workspace, tmp_path / "k", keep_checkpoints=keep))


def test_report_never_writes_over_a_run_file_a_folder_or_another_file(workspace, tmp_path):
    out = tmp_path / "r"
    run(base(workspace, out))
    metrics = (out / "metrics.jsonl").read_text()
    refused = dpolab("report", out, "--out", out / "metrics.jsonl")
    assert refused.returncode == 2 and "metrics.jsonl, which the training run" in refused.stderr
    unwritten = dpolab("report", out, "--out", out / "summary.json")  # would make the run look finished
    assert unwritten.returncode == 2 and "summary.json, which the training run" in unwritten.stderr
    assert (out / "metrics.jsonl").read_text() == metrics
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert dpolab("report", out, "--out", other).returncode == 2 and other.read_text() == "mine"
    assert "is a folder" in dpolab("report", out, "--out", tmp_path).stderr
    page = tmp_path / "report.html"
    assert dpolab("report", out, "--out", page).returncode == 0
    assert dpolab("report", out, "--out", page).returncode == 0  # an earlier dpolab report is replaced
    assert dpolab("report", out, "--out", out / "report.html").returncode == 0


def test_resume_refuses_training_data_whose_contents_changed(workspace, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    out = tmp_path / "changed-data"
    run(base(workspace, out, data=str(data), checkpoint_steps=2, max_steps=4))
    rows = [dict(r) for r in PAIRS]
    rows[5]["chosen"] = " 1000"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # same path, one pair different
    with pytest.raises(ValueError, match="is not what the checkpoint was trained on"):
        run(base(workspace, out, data=str(data), checkpoint_steps=2, max_steps=4), resume="latest")
    data.write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")  # back as it was: the resume goes on
    assert run(base(workspace, out, data=str(data), checkpoint_steps=2, max_steps=4), resume="latest")["steps"] == 4


def test_a_lora_run_checkpoints_only_the_adapter_and_resumes_exactly(workspace, tmp_path):
    out = tmp_path / "lora"
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    run(base(workspace, out, lora=lora, checkpoint_steps=2, save_model=True, learning_rate=1e-2))
    adapter = load_file(str(out / "model" / "adapter_model.safetensors"))
    saved = load_file(str(out / "checkpoints" / "step-0000002" / "model.safetensors"))
    assert saved and all("lora_" in name for name in saved)  # the frozen base is not copied into checkpoints
    run(base(workspace, out, lora=lora, checkpoint_steps=2, save_model=True, learning_rate=1e-2),
        resume=str(out / "checkpoints" / "step-0000002"))  # fmt: skip
    again = load_file(str(out / "model" / "adapter_model.safetensors"))
    assert adapter.keys() == again.keys() and all(torch.equal(adapter[k], again[k]) for k in adapter)
    assert any(float(t.abs().max()) > 0 for k, t in again.items() if "lora_B" in k)  # it trained


def test_a_checkpoint_from_before_the_engine_options_resumes_with_what_it_ran():
    """A saved config without attention_kernel and the other issue-16 keys ran the dense mask and the full head."""
    import dataclasses

    from dpolab.train.checkpoint import config_differences

    current = dataclasses.asdict(TrainConfig(model="m", data="d", attention_kernel="dense"))
    new_keys = ("attention_kernel", "logit_chunk_tokens", "gradient_checkpointing", "compile")
    saved = {key: value for key, value in current.items() if key not in new_keys}
    assert config_differences(saved, current) == []
    assert config_differences(saved, {**current, "attention_kernel": "auto", "logit_chunk_tokens": 256}) == [
        "attention_kernel",
        "logit_chunk_tokens",
    ]
