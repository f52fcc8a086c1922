"""Tiny local models and tokenizers for tests: random init from a config, a BPE trained on the spot.

Nothing here downloads anything.
"""

from __future__ import annotations

import torch

from dpolab.data.tokenizer import train_bpe_tokenizer

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns 12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "The answer is 72. The answer is 10. The answer is 5.",
    "two plus two is four and three times three is nine",
    "Human: how do I bake bread? Assistant: mix flour, water, salt and yeast, then bake.",
]


def tiny_tokenizer(vocab_size: int = 400):
    return train_bpe_tokenizer(CORPUS * 4, vocab_size)


def tiny_causal_lm(
    architecture: str,
    vocab_size: int,
    seed: int = 0,
    dtype=torch.float32,
    attention: str = "sdpa",
    initializer_range: float = 0.02,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    **extra,
):
    """A 2-layer, width-32 Llama, Qwen2, Mistral, Gemma-2 or GPT-2 with random weights, in eval mode.

    ``extra``: more config settings (e.g. Mistral's ``sliding_window``)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    special = dict(pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=eos_token_id)
    torch.manual_seed(seed)
    if architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            initializer_range=initializer_range,
            attn_implementation=attention,
            **special,
            **extra,
        )
        model = GPT2LMHeadModel(config)
    else:
        config_class, model_class = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
            "gemma2": (Gemma2Config, Gemma2ForCausalLM),
        }[architecture]
        if architecture == "gemma2":  # Gemma-2's default head size is 256; keep the model tiny
            extra = {"head_dim": 8, "query_pre_attn_scalar": 8, **extra}
        config = config_class(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=initializer_range,
            attn_implementation=attention,
            **special,
            **extra,
        )
        model = model_class(config)
    return model.to(dtype).eval()


def tiny_llama(tokenizer, seed: int, initializer_range: float = 0.02, dtype=torch.float64):
    return tiny_causal_lm(
        "llama",
        len(tokenizer),
        seed,
        dtype,
        initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def save_tiny_model(directory, seed: int = 0, architecture: str = "llama"):
    """A random-init tiny causal LM and its tokenizer saved in HF format (what `from_pretrained` loads)."""
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(
        architecture, len(tokenizer), seed, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return str(directory)


def sequence_logps(model, input_ids, attention_mask, completion_mask):
    """Naive per-sequence log-probs: one full forward, log-softmax everywhere, sum over completion tokens.

    ``completion_mask[b, t]`` is 1 where token t of row b belongs to the completion.
    Returns (summed log-probs, completion token counts).
    """
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    token_logps = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:, None])[..., 0]
    mask = completion_mask[:, 1:].to(token_logps.dtype)
    return (token_logps * mask).sum(1), completion_mask[:, 1:].sum(1)


def tiny_scalar_model(architecture: str, vocab_size: int, seed: int = 0, dtype=torch.float32, pad_token_id: int = 0):
    """The same tiny model with a one-output score head (Hugging Face's ``*ForSequenceClassification``), eval mode."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_causal_lm(architecture, vocab_size, seed, dtype, pad_token_id=pad_token_id).config
    config.num_labels = 1
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).to(dtype).eval()
    with torch.no_grad():  # scores of order 1, not ~0.02: equalities on near-zero values would say little
        model.score.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    return model


def digit_tokenizer():
    """A word-level tokenizer of 15 tokens (specials, ``say``, ``:``, the ten digits): a random model's first
    token is the right digit about 1 time in 15, so a reward for it is seen from the first rollouts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "say", ":"] + [str(d) for d in range(10)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()  # words joined with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_digit_task(directory) -> dict[str, str]:
    """The verifiable task of the PPO tests: "say D :" → answer with the digit D. A random-init tiny Llama with
    :func:`digit_tokenizer`, the ten prompts (with their ``answer``) and ten pairs, saved under ``directory``."""
    import json
    from pathlib import Path

    directory = Path(directory)
    tokenizer = digit_tokenizer()
    model = tiny_causal_lm(
        "llama", len(tokenizer), 0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model.save_pretrained(directory / "model", safe_serialization=True)
    tokenizer.save_pretrained(directory / "model")
    rows = [{"prompt": f"say {d} :", "answer": str(d)} for d in range(10)]
    (directory / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # held-out pairs for the 3D monitor: the named digit (chosen) against the next one (rejected)
    pairs = [{"prompt": f"say {d} :", "chosen": f" {d}", "rejected": f" {(d + 1) % 10}"} for d in range(10)]
    (directory / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return {"model": str(directory / "model"), "data": str(directory / "prompts.jsonl"),
            "pairs": str(directory / "pairs.jsonl")}  # fmt: skip
