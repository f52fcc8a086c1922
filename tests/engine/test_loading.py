"""The one loader: a missing local folder is named (never tried on the hub); pickle-only weights are refused."""

from __future__ import annotations

import pytest
import torch

from dpolab.engine.loading import load_model, load_tokenizer, looks_local
from tests.tiny import save_tiny_model


def test_missing_local_folders_are_named(tmp_path):
    for name in ("./no-such-model", str(tmp_path / "missing"), "a/b/c"):
        assert looks_local(name)
        with pytest.raises(ValueError, match=f"model: no such folder: {name}"):
            load_model(name)
        with pytest.raises(ValueError, match=f"tokenizer: no such folder: {name}"):
            load_tokenizer(name)
    assert not looks_local("Qwen/Qwen2-0.5B")  # a hub id stays a hub id


def test_pickle_only_folders_are_refused_unless_allowed(tmp_path):
    from transformers import AutoModelForCausalLM

    directory = save_tiny_model(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(directory)
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"has only pickle \(.bin\) weights"):
        load_model(directory)
    loaded = load_model(directory, allow_pickle=True, dtype=torch.float32)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert load_tokenizer(tmp_path / "m").eos_token is not None  # a Path is a local folder too
