"""`dpolab train` end to end on tiny local models; config errors; parity with TRL 1.16's DPOTrainer."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from dpolab.train import TrainConfig, load_config, run
from tests.tiny import save_tiny_model

PAIRS = [
    {"prompt": f"Q: what is {a} plus {b}? A:", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
    for a in range(6)
    for b in range(4)
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    save_tiny_model(root / "llama", seed=0)
    save_tiny_model(root / "llama_ref", seed=1)
    save_tiny_model(root / "gpt2", seed=0, architecture="gpt2")
    return root


def base(workspace, tmp_path, **overrides) -> TrainConfig:
    settings = dict(
        model=str(workspace / "llama"),
        data=str(workspace / "pairs.jsonl"),
        output_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        max_steps=3,
        batch_size=4,
        learning_rate=1e-3,
        progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def read_metrics(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_run_writes_metrics_tensorboard_and_a_loadable_model(workspace, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {workspace / 'llama'}\ndata: {workspace / 'pairs.jsonl'}\nloss: dpop\n"
        f"loss_params: {{beta: 0.3, lam: 50}}\nlearning_rate: 1e-3\nbatch_size: 4\nmax_steps: 4\n"
        f"eval_fraction: 0.25\neval_steps: 2\ncache_dir: {tmp_path / 'cache'}\n"
    )
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "train", str(config), "--output_dir", str(out), "--progress", "false"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "reference log-probs (train): computed and cached" in result.stderr
    metrics = read_metrics(out)
    train_steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_steps] == [1, 2, 3, 4]
    for key in (
        "loss",
        "dpop_penalty",
        "logps/chosen",
        "rewards/margins",
        "rewards/accuracies",
        "grad_norm",
        "learning_rate",
        "tokens_per_second",
        "pairs_per_second",
        "elapsed_seconds",
        "logratio/chosen",
    ):
        assert key in train_steps[0] and train_steps[0][key] == train_steps[0][key], key  # present and not NaN
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    AutoTokenizer.from_pretrained(out / "model")
    assert (out / "model" / "model.safetensors").exists()
    original = AutoModelForCausalLM.from_pretrained(workspace / "llama")
    assert not torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["forward"] == "packed" and summary["steps"] == 4

    # Same inputs again: the reference log-probs come from the cache.
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpolab",
            "train",
            str(config),
            "--output_dir",
            str(tmp_path / "run2"),
            "--progress",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "reference log-probs (train): reused from cache" in again.stderr


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_packed_and_naive_training_take_the_same_steps(workspace, tmp_path, architecture):
    losses = {}
    for packing in (True, False):
        config = base(
            workspace,
            tmp_path / str(packing),
            model=str(workspace / architecture),
            packing=packing,
            save_model=False,
            tensorboard=False,
            reference=str(workspace / "llama_ref") if architecture == "llama" else "auto",
        )
        summary = run(config)
        assert summary["forward"] == ("packed" if packing else "naive")
        losses[packing] = [m["loss"] for m in read_metrics(tmp_path / str(packing) / "run")]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--learning_rate", "-1"], "learning_rate: must be > 0; got -1"),
        (["--loss_params.beta", "0"], "loss: dpo.beta must be > 0; got 0"),
        (["--loss", "dpoo"], "loss: unknown loss 'dpoo'"),
        (["--batch_size", "two"], "batch_size: expected int; got 'two'"),
        (["--learning_rat", "1e-5"], "unknown config key 'learning_rat' (did you mean 'learning_rate'?)"),
        (["--data", "missing.jsonl"], "data: no such file: missing.jsonl"),
        (["--lr_scheduler", "step"], "lr_scheduler: must be one of linear, cosine, constant; got 'step'"),
        (["--model", ""], "model: required"),
        (
            ["--attention_kernel", "flash"],
            "attention_kernel: must be one of auto, segments, varlen, flex, dense; got 'flash'",
        ),
        (["--logit_chunk_tokens", "-1"], "logit_chunk_tokens: must be >= 0; got -1"),
    ],
)
def test_config_errors_name_the_key(workspace, overrides, message):
    args = ["--model", str(workspace / "llama"), "--data", str(workspace / "pairs.jsonl")] + overrides
    with pytest.raises(ValueError) as error:
        load_config(None, args)
    assert message in str(error.value)


def test_cli_config_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "train", "--model", "./nope", "--data", "x.jsonl"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "dpolab train: error: data: no such file: x.jsonl"


TRL_LOSSES = [
    ("sigmoid", {}),
    ("hinge", {}),
    ("ipo", {}),
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", {}),
    ("robust", {"label_smoothing": 0.1}),
    ("bco_pair", {}),
    ("sppo_hard", {}),
    ("aot", {}),
    ("aot_unpaired", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("discopop", {}),
    ("sft", {}),
    ("sigmoid_norm", {}),
]


def compare_first_step_with_trl(workspace, tmp_path, loss_type: str, extra: dict, engine_extra: dict | None = None):
    """Same tiny model, reference, data, batch and hyper-parameters: the first logged step agrees to 1e-4."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpolab.losses import objective_from_trl

    rows = PAIRS[:8]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    beta = 0.2
    engine_extra = engine_extra or {}
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        loss_type=[loss_type],
        beta=beta,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        **extra,
        **engine_extra,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(workspace / "llama"),
            ref_model=AutoModelForCausalLM.from_pretrained(workspace / "llama_ref"),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(workspace / "llama"),
        )
        trainer.train()
    theirs = trainer.state.log_history[0]

    # The dpolab loss that computes TRL's, with its parameters, as a config.
    (term,) = objective_from_trl(loss_type=[loss_type], beta=beta, **extra).terms
    spec, _, params = term
    config = base(
        workspace,
        tmp_path,
        data=str(tmp_path / "pairs.jsonl"),
        reference=str(workspace / "llama_ref"),
        loss=spec.name,
        loss_params=dict(params),
        batch_size=8,
        max_steps=1,
        save_model=False,
        tensorboard=False,
        **engine_extra,
    )
    run(config)
    (ours,) = read_metrics(tmp_path / "run")
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-4, rel=1e-4)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        if key.startswith("rewards") and spec.name == "sft":
            continue  # TRL logs β·log-ratio for sft; dpolab's sft has no reference, its rewards are log-probs
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4, rel=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("loss_type, extra", TRL_LOSSES, ids=[name for name, _ in TRL_LOSSES])
def test_first_step_equals_trl_dpo_trainer(workspace, tmp_path, loss_type, extra):
    compare_first_step_with_trl(workspace, tmp_path, loss_type, extra)


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine_extra",
    [{"ld_alpha": 0.5}, {"ld_alpha": 0.0}, {"use_weighting": True}],
    ids=["ld_alpha=0.5", "ld_alpha=0", "wpo"],
)
def test_first_step_equals_trl_with_ld_dpo_and_wpo(workspace, tmp_path, engine_extra):
    compare_first_step_with_trl(workspace, tmp_path, "sigmoid", {}, engine_extra)


def test_a_model_that_cannot_take_the_mask_falls_back_to_the_naive_path(workspace, tmp_path):
    """Bloom builds ALiBi biases from a 2D mask: the packed forward fails and the trainer says so."""
    from transformers import BloomConfig, BloomForCausalLM

    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    BloomForCausalLM(
        BloomConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            n_layer=2,
            n_head=4,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        )
    ).save_pretrained(tmp_path / "bloom")
    tokenizer.save_pretrained(tmp_path / "bloom")
    summary = run(base(workspace, tmp_path, model=str(tmp_path / "bloom"), save_model=False, tensorboard=False))
    assert summary["forward"] == "naive"
    assert "the packed forward failed" in summary["fallback_reason"]
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 3 and all(loss == loss for loss in losses)


def test_a_kernel_asked_for_by_name_that_cannot_run_is_an_error_with_its_reason(workspace, tmp_path):
    """flex has no backward on CPU: named explicitly, the run stops before training instead of taking another path."""
    with pytest.raises(ValueError, match="attention_kernel: flex: the packed forward failed .*backward on CPU"):
        run(base(workspace, tmp_path, attention_kernel="flex", save_model=False, tensorboard=False))


@pytest.mark.parametrize(
    "options",
    [
        {"gradient_checkpointing": True, "logit_chunk_tokens": 7},
        {"attention_kernel": "dense"},
        {"attention_kernel": "varlen", "gradient_checkpointing": True},
    ],
)
def test_engine_options_take_the_same_steps(workspace, tmp_path, options):
    """Checkpointing, the chunked head and the dense and varlen kernels change memory and speed, not the training."""
    losses = {}
    for name, extra in (("default", {}), ("options", options)):
        summary = run(base(workspace, tmp_path / name, save_model=False, tensorboard=False, **extra))
        assert summary["attention_kernel"] == extra.get("attention_kernel", "segments")
        losses[name] = [m["loss"] for m in read_metrics(tmp_path / name / "run")]
    assert losses["options"] == pytest.approx(losses["default"], rel=1e-5, abs=1e-6)


def test_bf16_autocast_runs_on_cpu(workspace, tmp_path):
    summary = run(base(workspace, tmp_path, mixed_precision="bf16", save_model=False, tensorboard=False))
    assert summary["forward"] == "packed"
    first = read_metrics(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(0.6931, abs=2e-2)  # policy = reference at step 1: ≈ log 2 in bf16


def test_docs_list_every_config_key():
    import dataclasses
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    for item in dataclasses.fields(TrainConfig):
        assert f"| `{item.name}` |" in text, f"docs/training.md does not document {item.name}"


def test_lora_reference_is_the_base_model_with_the_adapter_disabled(workspace, tmp_path):
    """LoRA's B matrices start at zero, so at step 1 the policy *is* the reference: log-ratios are 0."""
    config = base(
        workspace,
        tmp_path,
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        max_steps=3,
        tensorboard=False,
    )
    summary = run(config)
    metrics = read_metrics(tmp_path / "run")
    assert metrics[0]["logratio/chosen"] == pytest.approx(0, abs=1e-6)
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2
    assert abs(metrics[-1]["logratio/chosen"]) > 1e-5  # the adapter trained
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").exists()
    assert summary["forward"] == "packed"


def test_ld_alpha_weights_tokens_past_the_shorter_completion_of_each_pair():
    """LD-DPO by hand from per-token values: the first min(|y_w|, |y_l|) tokens weigh 1, the rest α."""
    from dpolab.engine.logps import naive_token_logps
    from dpolab.train.preference import token_weight_fn
    from tests.engine.test_logps import build, random_pairs

    model = build("llama", "sdpa", torch.float64)
    pairs = random_pairs(6, seed=3)
    with torch.no_grad():
        tokens = naive_token_logps(model, pairs, 0)
    weighted = tokens.sums(token_weight_fn(TrainConfig(model="m", data="d", ld_alpha=0.25))(tokens))
    for i, pair in enumerate(pairs):
        shared = min(len(pair.chosen_ids), len(pair.rejected_ids))
        for branch in (0, 1):
            values = tokens.values[tokens.sequence == 2 * i + branch]
            expected = values[:shared].sum() + 0.25 * values[shared:].sum()
            assert float(weighted[i, branch]) == pytest.approx(float(expected), abs=1e-10)
    assert any(len(p.chosen_ids) != len(p.rejected_ids) for p in pairs)  # the weights do change something
    assert not torch.allclose(weighted, tokens.sums())


@pytest.mark.parametrize("extra", [{"ld_alpha": 0.3}, {"use_weighting": True}], ids=["ld_alpha", "wpo"])
def test_ld_dpo_and_wpo_take_the_same_steps_on_the_naive_path(workspace, tmp_path, extra):
    """The weights come from per-token values both paths produce, so a model that cannot pack still gets them."""
    losses = {}
    for packing in (True, False):
        config = base(workspace, tmp_path / str(packing), packing=packing, save_model=False, tensorboard=False, **extra)
        run(config)
        losses[packing] = [m["loss"] for m in read_metrics(tmp_path / str(packing) / "run")]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
    plain = base(workspace, tmp_path / "plain", save_model=False, tensorboard=False)
    run(plain)
    assert [m["loss"] for m in read_metrics(tmp_path / "plain" / "run")] != pytest.approx(losses[True], rel=1e-4)


def test_the_data_order_covers_each_epoch_once_and_splits_it_across_processes():
    """Steps never cross an epoch; 2 processes see exactly the one-process micro-batches, split in two."""
    from dpolab.train.data_order import BatchStream, steps_per_epoch

    one = BatchStream(57, 8, seed=3, accumulation=2)
    shares = [BatchStream(57, 4, seed=3, rank=r, processes=2, accumulation=2) for r in (0, 1)]
    per_epoch = steps_per_epoch(57, 4, 2, 2)
    assert per_epoch == steps_per_epoch(57, 8, 1, 2) == 4  # micro-batches 8 × 7 + 1, in steps of 2
    for epoch in range(3):
        seen = []
        for _ in range(per_epoch):
            step = one.next_step()
            split = [s.next_step() for s in shares]
            assert {b.epoch for b in step} == {epoch}
            for micro, batch in enumerate(step):
                assert split[0][micro].global_ids == batch.global_ids == split[1][micro].global_ids
                real = [i for share in split if share[micro].real for i in share[micro].ids]
                assert sorted(real) == sorted(batch.ids)
                seen += batch.ids
        assert sorted(seen) == list(range(57))
    state = one.state_dict()
    again = BatchStream(57, 8, seed=3, accumulation=2)
    again.load_state_dict(state)
    assert [b.global_ids for b in again.next_step()] == [b.global_ids for b in one.next_step()]


def test_epochs_train_each_pair_epochs_times(workspace, tmp_path):
    """57 pairs, batch 4 × accumulation 2: three epochs are 171 pairs and the epoch logged never passes 3."""
    rows = PAIRS * 3
    data = tmp_path / "57.jsonl"
    data.write_text(
        "\n".join(json.dumps({**r, "prompt": f"{i}: {r['prompt']}"}) for i, r in enumerate(rows[:57])) + "\n"
    )
    config = base(
        workspace, tmp_path, data=str(data), max_steps=None, epochs=3, gradient_accumulation_steps=2,
        save_model=False, tensorboard=False, monitor={"enabled": False},
    )  # fmt: skip
    summary = run(config)
    assert summary["pairs_seen"] == 171 and summary["steps"] == 24
    assert max(m["epoch"] for m in read_metrics(tmp_path / "run")) == 3


@pytest.mark.parametrize(
    "architecture, dropout", [("llama", {"attention_dropout": 0.5}), ("gpt2", {"attn_pdrop": 0.5, "resid_pdrop": 0.5})]
)
def test_disable_dropout_also_turns_off_attention_dropout(architecture, dropout):
    """Llama-style attention keeps its dropout as a float, not an nn.Dropout: training-mode forwards must
    agree once dropout is disabled, and differ before."""
    from dpolab.train.models import disable_dropout
    from tests.tiny import tiny_causal_lm

    model = tiny_causal_lm(architecture, 64, attention="eager", **dropout).train()
    tokens = torch.arange(3, 40)[None]

    def logits():
        with torch.no_grad():
            return model(tokens).logits

    assert not torch.equal(logits(), logits())
    disable_dropout(model)
    assert torch.equal(logits(), logits())
