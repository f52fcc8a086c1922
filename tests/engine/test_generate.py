"""Batched, left-padded generation equals generating each prompt alone; sampling is seeded."""

from __future__ import annotations

import pytest
import torch

from dpolab.engine.generate import generate
from tests.tiny import tiny_llama, tiny_tokenizer

PROMPTS = [
    "two plus two is",
    "Natalia sold clips to 48 of her friends in April, and then",
    "The answer is",
    "Human: how do I bake bread? Assistant:",
    "three times three",
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = tiny_tokenizer()
    # A larger init spread makes the random model's next-token choices far from ties.
    return tiny_llama(tokenizer, seed=3, initializer_range=0.5, dtype=torch.float64), tokenizer


def test_batched_greedy_equals_one_prompt_at_a_time_without_padding(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    for prompt, (completion,) in zip(PROMPTS, batched, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            alone = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        assert completion == tokenizer.decode(alone[0, ids.shape[1] :], skip_special_tokens=True)
    assert sum(len(c[0]) for c in batched) > 0  # not all empty: the comparison says something


def test_sampling_is_seeded_and_returns_n_candidates_in_input_order(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    options = dict(max_new_tokens=8, do_sample=True, num_return_sequences=4, batch_size=2, temperature=1.0)
    first = generate(model, tokenizer, PROMPTS, seed=5, **options)
    assert [len(c) for c in first] == [4] * len(PROMPTS)
    assert first == generate(model, tokenizer, PROMPTS, seed=5, **options)
    assert first != generate(model, tokenizer, PROMPTS, seed=6, **options)
    # Order is the input order although batches are formed by prompt length.
    reversed_prompts = generate(model, tokenizer, PROMPTS[::-1], max_new_tokens=8, batch_size=2)
    assert reversed_prompts[::-1] == generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2)


def test_bad_settings_are_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="greedy"):
        generate(model, tokenizer, PROMPTS, num_return_sequences=2)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tokenizer, PROMPTS, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=0)
