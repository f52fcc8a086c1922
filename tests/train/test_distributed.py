"""Multi-process training on CPU (gloo, 2 processes, one thread each), launched as a user would.

A 2-process DDP run equals a 1-process run with the same global batch; a 2-process run killed with
SIGKILL and resumed equals the uninterrupted one (weights, monitor history, alarms); SFT and LoRA train
on 2 processes and their outputs load; resuming with another number of processes is refused with the
command to use.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.tiny import save_tiny_model

# 20 pairs: 3 held out, 17 to train on; global micro-batches of 8 leave a last one of 1 pair, so one
# process runs a stand-in forward.
PAIRS = [
    {"prompt": f"Q: what is {a} plus {b}? A:", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
    for a in range(5)
    for b in range(4)
]
SFT_ROWS = [{"prompt": f"Q: what is {a} times {b}? A:", "completion": f" {a * b}"} for a in range(5) for b in range(4)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in SFT_ROWS) + "\n")
    save_tiny_model(root / "llama", seed=0)
    config = {
        "model": str(root / "llama"),
        "data": str(root / "pairs.jsonl"),
        "loss": "dpo",
        "loss_params": {"beta": 0.5},
        "learning_rate": 2e-3,
        "batch_size": 4,
        "epochs": 4,
        "eval_fraction": 0.15,
        "eval_steps": 4,
        "checkpoint_steps": 3,
        "keep_checkpoints": 5,
        # Thresholds low enough that an alarm fires before the kill below: a resumed run must not fire it again.
        "monitor": {
            "window": 3,
            "probe_steps": 4,
            "probe_pairs": 3,
            "sample_prompts": 2,
            "sample_tokens": 4,
            "degradation_drop": 0.0,
            "drop_min_fall": 0.05,
            "drop_ratio": 1.0,
        },  # fmt: skip
        "cache_dir": str(root / "cache"),
        "progress": False,
        "tensorboard": False,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


FSDP2 = [
    "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
    "--fsdp_cpu_ram_efficient_loading", "false",
]  # fmt: skip


def command(processes: int, launcher: str = "torchrun") -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "dpolab"]
    if launcher == "fsdp":
        accelerate = str(Path(sys.executable).parent / "accelerate")
        return [accelerate, "launch", "--num_processes", str(processes), *FSDP2, "-m", "dpolab"]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "dpolab",
        ]
    # The command of the issue: accelerate's launcher starts one process with --cpu; dpolab starts the others.
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--cpu", "--num_processes", str(processes), "-m", "dpolab"]


def launch(processes: int, *args, launcher: str = "torchrun", wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = [*command(processes, launcher), *map(str, args)]
    if wait:
        return subprocess.run(full, capture_output=True, text=True, timeout=900, env=env)
    return subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_everything_writing_to(output_dir) -> None:
    """SIGKILL every process whose command line names ``output_dir``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(output_dir).encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def two_process_run(workspace):
    out = workspace / "ddp"
    # A cache of its own: the sharded, gathered reference pass must produce the values, not reuse them.
    result = launch(2, "train", workspace / "config.yaml", "--output_dir", out, "--cache_dir", workspace / "cache-ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference log-probs (train): computed and cached" in result.stderr
    return out


@pytest.fixture(scope="module")
def one_process_run(workspace):
    out = workspace / "one"
    result = launch(
        1, "train", workspace / "config.yaml", "--output_dir", out, "--batch_size", 8, "--cache_dir", workspace / "cache-one"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference log-probs (train): computed and cached" in result.stderr
    return out


def assert_same_run(many, one) -> None:
    """Same steps, the same logged values (training, evaluation, monitor and probes) and final weights, to 1e-5."""
    summary = json.loads((many / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed"] in ("multi_cpu", "fsdp")
    assert summary["pairs_seen"] == json.loads((one / "summary.json").read_text())["pairs_seen"]
    ours, theirs = metrics(many), metrics(one)
    assert [m["step"] for m in ours] == [m["step"] for m in theirs]
    compared = 0
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "pairs", "eval/loss", "eval/rewards/accuracies",
                    "monitor/logratio_chosen_p50", "monitor/param_grad_norm_chosen", "monitor/sample_logp_policy"):  # fmt: skip
            if key in a or key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["step"], key)
                compared += 1
    assert compared > 40
    mine, single = weights(many), weights(one)
    assert mine.keys() == single.keys()
    worst = max(float((mine[k] - single[k]).abs().max()) for k in mine)
    assert worst < 1e-5


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(two_process_run, one_process_run):
    assert_same_run(two_process_run, one_process_run)


@pytest.mark.slow
def test_fsdp2_on_two_processes_equals_one_process_and_resumes_exactly(workspace, one_process_run):
    """FSDP2 (sharded parameters, gradients and optimiser state; sharded checkpoints) on gloo."""
    out = workspace / "fsdp"
    result = launch(2, "train", workspace / "config.yaml", "--output_dir", out, launcher="fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["distributed"] == "fsdp"
    assert (out / "checkpoints" / "step-0000006" / "pytorch_model_fsdp_0").is_dir()  # sharded, one file per process
    assert_same_run(out, one_process_run)
    uninterrupted = weights(out)
    again = launch(
        2, "train", workspace / "config.yaml", "--output_dir", out, "--resume", out / "checkpoints" / "step-0000006",
        launcher="fsdp",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    for name, tensor in weights(out).items():
        assert torch.equal(tensor, uninterrupted[name]), name


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_equals_the_uninterrupted_run(workspace, two_process_run):
    out = workspace / "killed"
    process = launch(2, "train", workspace / "config.yaml", "--output_dir", out, wait=False)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step-0000009").exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    kill_everything_writing_to(out)  # the launcher and both workers (torchrun gives them sessions of their own)
    process.wait()
    assert not (out / "summary.json").exists(), "the kill must land before the end"
    assert not (out / "checkpoints" / "step-0000012").exists()

    other = launch(1, "train", workspace / "config.yaml", "--output_dir", out, "--resume")
    assert other.returncode == 2
    assert "written by 2 process(es) and this run has 1" in other.stderr and "--num_processes 2" in other.stderr

    resumed = launch(2, "train", workspace / "config.yaml", "--output_dir", out, "--resume", launcher="accelerate")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-0000012" not in resumed.stderr
    final, expected = weights(out), weights(two_process_run)
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    summary = json.loads((out / "summary.json").read_text())
    uninterrupted = json.loads((two_process_run / "summary.json").read_text())
    assert summary["monitor"] == uninterrupted["monitor"]  # trajectory, probes, fired alarms
    assert summary["alarms"] == uninterrupted["alarms"] and uninterrupted["alarms"][0]["step"] <= 9
    assert [m["step"] for m in metrics(out)] == [m["step"] for m in metrics(two_process_run)]


@pytest.mark.slow
def test_two_process_sft_with_accumulation_equals_one_process_and_lora_loads(workspace):
    """SFT's default reduction (token mean over the global micro-batch) with gradient accumulation 2."""
    from transformers import AutoModelForCausalLM

    runs = {}
    for processes, batch in ((2, 2), (1, 4)):
        out = workspace / f"sft-{processes}"
        result = launch(
            processes, "sft", "--model", workspace / "llama", "--data", workspace / "sft.jsonl", "--output_dir", out,
            "--max_steps", 3, "--batch_size", batch, "--gradient_accumulation_steps", 2, "--learning_rate", 1e-3,
            "--progress", "false", "--tensorboard", "false",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = out
    losses = {n: [m["loss"] for m in metrics(out)] for n, out in runs.items()}
    assert len(losses[2]) == 3 and losses[2] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    two, one = weights(runs[2]), weights(runs[1])
    assert max(float((two[k] - one[k]).abs().max()) for k in two) < 1e-5
    model = AutoModelForCausalLM.from_pretrained(runs[2] / "model")
    original = AutoModelForCausalLM.from_pretrained(workspace / "llama")
    assert not torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)

    lora = workspace / "lora"
    result = launch(
        2, "train", workspace / "config.yaml", "--output_dir", lora, "--max_steps", 3, "--eval_fraction", 0,
        "--lora", "{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "llama"), lora / "model")
    trained = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert trained and any(float(p.abs().max()) > 0 for p in trained)  # B starts at 0: the adapter trained
    assert metrics(lora)[0]["logratio/chosen"] == pytest.approx(0, abs=1e-6)  # reference = base, adapter off


@pytest.mark.slow
def test_two_process_reward_model_equals_one_process(workspace):
    """dpolab rm on 2 processes (a stand-in forward included: 17 pairs, global micro-batches of 4) equals one
    process with the same global batch: losses, held-out metrics, the reward extremes and the final weights."""
    runs = {}
    for processes, batch in ((2, 2), (1, 4)):
        out = workspace / f"rm-{processes}"
        result = launch(
            processes, "rm", "--model", workspace / "llama", "--data", workspace / "pairs.jsonl", "--output_dir", out,
            "--max_steps", 4, "--batch_size", batch, "--gradient_accumulation_steps", 2, "--learning_rate", 1e-3,
            "--eval_fraction", 0.15, "--eval_steps", 2, "--progress", "false", "--tensorboard", "false",
            # Without centring the loss is blind to a shift of every reward, and Adam's first step turns the
            # rounding noise of that direction's ~0 gradient into updates of order lr, different per layout.
            "--loss_params.center_coefficient", 0.01,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = out
    ours, theirs = metrics(runs[2]), metrics(runs[1])
    assert [m["step"] for m in ours] == [m["step"] for m in theirs]
    compared = 0
    for a, b in zip(ours, theirs, strict=True):
        for key in (
            "loss",
            "rewards/min",
            "rewards/max",
            "rewards/accuracies",
            "grad_norm",
            "eval/loss",
            "eval/rewards/min",
        ):
            if key in a or key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
                compared += 1
    assert compared >= 20
    two, one = weights(runs[2]), weights(runs[1])
    assert two.keys() == one.keys() and "score.weight" in two
    assert max(float((two[k] - one[k]).abs().max()) for k in two) < 1e-5


@pytest.mark.slow
def test_two_process_ppo_with_ddp_and_fsdp2_equals_one_process(tmp_path):
    """dpolab ppo on 2 processes equals one process with the same global rollout batch: each response's
    randomness is a function of (seed, step, prompt), minibatches are cut from one permutation of the global
    batch (so a process may hold none of one: a stand-in forward), losses are means over the global
    minibatch's tokens and advantages are whitened over both processes; the 3D monitor's probes (held-out pairs,
    the policy's own samples) read what one process reads."""
    from tests.tiny import save_digit_task

    paths = save_digit_task(tmp_path)
    rules = json.dumps([{"type": "regex", "pattern": r"^\s*{answer}\b"}])
    runs = {}
    for name, processes, batch in (("ddp", 2, 4), ("fsdp", 2, 4), ("one", 1, 8)):
        out = tmp_path / f"ppo-{name}"
        result = launch(
            processes, "ppo", "--model", paths["model"], "--data", paths["data"], "--output_dir", out,
            "--max_steps", 4, "--batch_size", batch, "--learning_rate", 3e-3, "--eval_fraction", 0.2, "--eval_steps", 2,
            "--ppo.reward.rules", rules, "--ppo.samples_per_prompt", 2, "--ppo.max_new_tokens", 3,
            "--ppo.minibatches", 3, "--ppo.ppo_epochs", 2, "--ppo.whiten_rewards", "true",
            "--monitor.pairs", paths["pairs"], "--monitor.probe_steps", 2, "--progress", "false", "--tensorboard", "false",
            launcher="fsdp" if name == "fsdp" else "torchrun",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((out / "summary.json").read_text())["distributed"] == {"ddp": "multi_cpu", "one": "no"}.get(
            name, name
        )
        runs[name] = out
    for many in ("ddp", "fsdp"):
        ours, theirs = metrics(runs[many]), metrics(runs["one"])
        assert [m["step"] for m in ours] == [m["step"] for m in theirs]
        compared = 0
        for a, b in zip(ours, theirs, strict=True):
            for key in ("rewards/mean", "rewards/std", "kl", "entropy", "loss/policy", "loss/value", "approx_kl",
                        "clip_fraction", "explained_variance", "grad_norm", "eval/rewards/mean",
                        "monitor/logratio_chosen_mean", "monitor/logratio_rejected_p90", "monitor/probe_chosen_logp",
                        "monitor/sample_logp_policy", "monitor/sample_logp_reference", "monitor/sample_entropy"):  # fmt: skip
                if key in a or key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (many, a["step"], key)
                    compared += 1
        assert compared >= 60
        for file in ("model.safetensors", "value_head.safetensors"):
            two, one = load_file(str(runs[many] / "model" / file)), load_file(str(runs["one"] / "model" / file))
            assert two.keys() == one.keys()
            assert max(float((two[k] - one[k]).abs().max()) for k in two) < 1e-5, (many, file)
