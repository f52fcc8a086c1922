"""Models load whole or not at all (issue 30): a missing, unexpected or reshaped tensor, absent weight files or
shards, a tokenizer past the model's vocabulary, and a LoRA adapter folder given as the model. And transformers'
own load report and progress bars stay out of pipes.

Every broken folder is a real one: a tiny model saved by transformers, then edited with safetensors' own
``save_file`` or by deleting files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpolab.cli import main
from dpolab.engine.loading import load_model, load_tokenizer
from tests.tiny import save_tiny_model, tiny_causal_lm, tiny_tokenizer

PAIRS = [{"prompt": f"Q: {a} plus {a}? A:", "chosen": f" {2 * a}", "rejected": f" {2 * a + 1}"} for a in range(6)]
ANSI = "\x1b["


def rewrite_weights(folder: Path, edit) -> None:
    """``model.safetensors`` of ``folder`` rewritten with ``edit(tensors)`` applied."""
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- tensors -----------------------------------------------------------------------------------------------


def drop_one(tensors: dict) -> None:
    del tensors["model.layers.1.mlp.down_proj.weight"]


def drop_layer(tensors: dict) -> None:
    for name in [n for n in tensors if n.startswith("model.layers.1.")]:
        del tensors[name]


def add_one(tensors: dict) -> None:
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(4, 32)


def reshape_one(tensors: dict) -> None:
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)


@pytest.mark.parametrize(
    "edit, message",
    [
        (drop_one, r"1 tensor missing from the checkpoint \(model\.layers\.1\.mlp\.down_proj\.weight\)"),
        (drop_layer, r"9 tensors missing from the checkpoint \(model\.layers\.1\.\S+, .* and 4 more\)"),
        (add_one, r"1 tensor in the checkpoint that the model has no place for \(model\.layers\.0\.mlp\.extra\.weight\)"),
        (reshape_one, r"1 tensor of another shape \(model\.layers\.0\.mlp\.up_proj\.weight \[65, 32\] in the "
                      r"checkpoint, \[64, 32\] in the model\)"),
    ],
    ids=["one-missing", "a-layer-missing", "unexpected", "another-shape"],
)  # fmt: skip
def test_a_checkpoint_that_does_not_fit_its_architecture_is_refused_naming_the_tensors(tmp_path, edit, message):
    folder = Path(save_tiny_model(tmp_path / "m"))
    rewrite_weights(folder, edit)
    with pytest.raises(
        ValueError, match=rf"^model: {re.escape(str(folder))} does not load whole as LlamaForCausalLM: {message}"
    ):
        load_model(folder)


def test_tied_weights_are_not_missing_but_a_dropped_tied_source_is(tmp_path):
    """GPT-2 saves its tied LM head once (as the embedding): that loads; without the embedding it does not."""
    folder = Path(save_tiny_model(tmp_path / "gpt2", architecture="gpt2"))
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    model = load_model(folder)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    rewrite_weights(folder, lambda tensors: tensors.pop("transformer.wte.weight"))
    tied = r"lm_head\.weight, transformer\.wte\.weight"  # the head has nothing to be tied to: both are missing
    with pytest.raises(ValueError, match=rf"2 tensors missing from the checkpoint \({tied}\)"):
        load_model(folder)


def test_a_causal_lm_loads_as_a_classifier_only_with_new_head_which_is_named(tmp_path):
    from dpolab.eval.judges import RewardModelJudge

    folder = Path(save_tiny_model(tmp_path / "m"))
    # Without new_head (the reward-model judge: a reward model must bring its trained head) it is refused.
    with pytest.raises(ValueError, match=r"missing from the checkpoint \(score\.weight\)"):
        RewardModelJudge(str(folder))
    with pytest.raises(ValueError, match=r"1 tensor missing from the checkpoint \(score\.weight\); 1 tensor in the "
                                         r"checkpoint that the model has no place for \(lm_head\.weight\)"):  # fmt: skip
        load_model(folder, "sequence_classification", num_labels=1)
    notes: list[str] = []
    model = load_model(folder, "sequence_classification", num_labels=1, new_head=True, note=notes.append)
    assert model.score.weight.shape == (1, 32)
    assert notes == [
        f"model: new score.weight (not in {folder}: initialised at random); lm_head.weight of the checkpoint unused"
    ]
    # The exception is the head only: a backbone tensor missing is still refused.
    rewrite_weights(folder, drop_one)
    with pytest.raises(ValueError, match=r"^model: .* 1 tensor missing from the checkpoint \(model\.layers\.1\.mlp"):
        load_model(folder, "sequence_classification", num_labels=1, new_head=True)


# --- files -------------------------------------------------------------------------------------------------


def test_a_folder_with_only_config_json_names_the_files_it_lacks(tmp_path):
    folder = tmp_path / "only-config"
    folder.mkdir()
    shutil.copy(save_tiny_model(tmp_path / "m") + "/config.json", folder)
    with pytest.raises(ValueError, match=rf"^model: {re.escape(str(folder))} has no weights: it lacks model\.safetensors \(or "
                                         r"model\.safetensors\.index\.json and its shards\)$"):  # fmt: skip
        load_model(folder)
    with pytest.raises(ValueError, match=r"lacks model\.safetensors .* or pytorch_model\.bin \(or "
                                         r"pytorch_model\.bin\.index\.json and its shards\)$"):  # fmt: skip
        load_model(folder, allow_pickle=True)
    with pytest.raises(
        ValueError, match=rf"^tokenizer: {re.escape(str(folder))} has no tokenizer files: it lacks tokenizer\.json"
    ):
        load_tokenizer(folder)


def test_a_sharded_folder_missing_shards_names_each(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "m"))
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 3
    assert torch.equal(load_model(folder).lm_head.weight, model.lm_head.weight)  # whole, it loads
    for shard in shards[1:3]:
        (folder / shard).unlink()
    with pytest.raises(ValueError, match=rf"^model: {re.escape(str(folder))} lacks 2 shards of the {len(shards)} that "
                                         rf"model\.safetensors\.index\.json names: {shards[1]}, {shards[2]}$"):  # fmt: skip
        load_model(folder)


# --- the vocabulary ----------------------------------------------------------------------------------------


def test_training_refuses_a_tokenizer_larger_than_the_models_vocabulary_before_any_step(tmp_path, capsys, monkeypatch):
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) == 400
    model = tiny_causal_lm("llama", 300, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "small", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "small")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = fingerprint(tmp_path)
    out = tmp_path / "outputs" / "run"
    words = ["train", "--model", tmp_path / "small", "--data", tmp_path / "pairs.jsonl", "--output_dir", out]
    words += ["--max_steps", "1", "--batch_size", "2", "--progress", "false", "--tensorboard", "false"]
    words += ["--cache_dir", tmp_path / "outputs" / "cache"]
    assert main([str(word) for word in words]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        f"tokenizer: {tmp_path / 'small'} has 400 tokens, but the model {tmp_path / 'small'} has 300 embedding rows"
        in err
    )
    assert not (out / "metrics.jsonl").exists() or "loss" not in (out / "metrics.jsonl").read_text()  # no step ran
    assert not (out / "model").exists()
    assert {k: v for k, v in fingerprint(tmp_path).items() if not k.startswith("outputs")} == before


# --- LoRA adapter folders ----------------------------------------------------------------------------------


def save_adapter(base: str, folder: Path) -> None:
    """A real peft LoRA adapter on ``base`` with non-zero weights (peft's default B = 0 would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder)


def test_an_adapter_folder_loads_as_its_base_with_the_adapter_merged(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_tiny_model(tmp_path / "base")
    save_adapter(base, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "config.json").exists()
    model = load_model(tmp_path / "adapter", dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not [name for name, _ in model.named_parameters() if "lora" in name]  # merged: a plain model
    assert all(parameter.requires_grad for parameter in model.parameters())  # trainable, as a loaded model is
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    ids = torch.tensor([[1, 5, 9, 20, 33, 120, 301]])
    expected, plain = logits(reference, ids), logits(AutoModelForCausalLM.from_pretrained(base), ids)
    assert (expected - plain).abs().max() > 1e-2  # the adapter changes the model: the comparison says something
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    # Its tokenizer: the base's, while the adapter folder has none of its own; then its own.
    assert load_tokenizer(tmp_path / "adapter").get_vocab() == load_tokenizer(base).get_vocab()
    own = tiny_tokenizer(vocab_size=300)
    assert own.get_vocab() != load_tokenizer(base).get_vocab()
    own.save_pretrained(tmp_path / "adapter")
    assert load_tokenizer(tmp_path / "adapter").get_vocab() == own.get_vocab()


def test_lora_training_from_an_adapter_folder_saves_an_adapter_on_that_folder(tmp_path, capsys):
    """``--model ADAPTER --lora ...``: fresh adapters on the merged model; the new adapter names the adapter folder
    as its base, so loading it gives base + first adapter + second adapter, not the bare base + second."""
    from peft import PeftModel

    base = save_tiny_model(tmp_path / "base")
    save_adapter(base, tmp_path / "adapter")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    out = tmp_path / "run"
    words = ["train", "--model", tmp_path / "adapter", "--data", tmp_path / "pairs.jsonl", "--output_dir", out]
    words += ["--max_steps", "2", "--batch_size", "2", "--learning_rate", "1e-2", "--progress", "false"]
    words += ["--tensorboard", "false", "--cache_dir", tmp_path / "cache", "--lora", "{r: 4, target_modules: [q_proj]}"]
    assert main([str(word) for word in words]) == 0, capsys.readouterr().err[-2000:]
    saved = json.loads((out / "model" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 20, 33, 120, 301]])
    first = load_model(tmp_path / "adapter", dtype=torch.float32)
    expected = logits(PeftModel.from_pretrained(first, out / "model").eval(), ids)
    assert (expected - logits(load_model(tmp_path / "adapter", dtype=torch.float32), ids)).abs().max() > 1e-4
    torch.testing.assert_close(
        logits(load_model(out / "model", dtype=torch.float32), ids), expected, atol=1e-5, rtol=1e-5
    )


def test_an_adapter_folder_whose_base_is_gone_is_refused_naming_both(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    save_adapter(base, tmp_path / "adapter")
    shutil.rmtree(base)
    adapter = re.escape(str(tmp_path / "adapter"))
    pattern = (
        rf"^model: {adapter} is a LoRA adapter on {re.escape(base)} \(base_model_name_or_path in its "
        r"adapter_config\.json\), and there is no such folder"
    )
    with pytest.raises(ValueError, match=pattern):
        load_model(tmp_path / "adapter")
    with pytest.raises(ValueError, match=pattern.replace("model:", "tokenizer:")):
        load_tokenizer(tmp_path / "adapter")


def test_an_adapter_missing_a_tensor_is_refused_naming_it(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    save_adapter(base, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[name]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    adapter = re.escape(str(tmp_path / "adapter"))
    with pytest.raises(
        ValueError, match=rf"adapter in {adapter} does not load whole on {re.escape(base)}: 1 tensor missing \({name}\)"
    ):
        load_model(tmp_path / "adapter")


# --- what reaches a pipe -----------------------------------------------------------------------------------


def test_loading_prints_no_transformers_bar_or_report_into_a_pipe(tmp_path):
    """From Python, outside any dpolab command: the loader itself keeps transformers' noise out."""
    folder = save_tiny_model(tmp_path / "m")
    script = (
        "from dpolab.engine.loading import load_model, load_tokenizer\n"
        f"load_model({folder!r}); load_tokenizer({folder!r})\n"
        f"load_model({folder!r}, 'sequence_classification', num_labels=1, new_head=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "Loading weights" not in result.stderr and "LOAD REPORT" not in result.stderr, result.stderr[-2000:]
    assert ANSI not in result.stderr
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_reward_model_from_a_causal_lm_names_its_new_head_and_prints_no_load_table(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "rm", "--model", folder, "--data", str(tmp_path / "pairs.jsonl"),
         "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--batch_size", "2", "--progress", "false",
         "--tensorboard", "false", "--save_model", "false"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"model: new score.weight (not in {folder}: initialised at random); lm_head.weight of the checkpoint unused"
        in result.stderr
    )
    assert "with a new one-output score head" in result.stderr
    assert ANSI not in result.stderr and "LOAD REPORT" not in result.stderr and "Loading weights" not in result.stderr
