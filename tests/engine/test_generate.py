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


# --- sample_responses: the token-level sampler of PPO rollouts ------------------------------------


def encoded(tokenizer, prompts):
    return [tuple(tokenizer(p)["input_ids"]) for p in prompts]


def test_greedy_sample_responses_equal_hugging_face_generate(model_and_tokenizer):
    from dpolab.engine.generate import sample_responses

    model, tokenizer = model_and_tokenizer
    prompts = encoded(tokenizer, PROMPTS)
    samples = sample_responses(model, prompts, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, device="cpu")  # fmt: skip
    for prompt, sample in zip(prompts, samples, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()  # fmt: skip
        if tokenizer.eos_token_id in alone:
            alone = alone[: alone.index(tokenizer.eos_token_id) + 1]
        assert list(sample.ids) == alone
        assert sample.finished == (alone[-1] == tokenizer.eos_token_id)


def test_a_prompts_sample_depends_on_its_seed_not_on_its_batch(model_and_tokenizer):
    """Row i draws from its own generator: the same (prompt, seed) gives the same response alone, in another
    order, or beside other prompts — what lets a run on several processes sample what one process would."""
    from dpolab.engine.generate import sample_responses

    model, tokenizer = model_and_tokenizer
    prompts = encoded(tokenizer, PROMPTS)
    options = dict(max_new_tokens=8, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   device="cpu", temperature=1.3, top_p=0.9)  # fmt: skip
    seeds = [11, 12, 13, 14, 15]
    together = sample_responses(model, prompts, seeds=seeds, **options)
    reversed_order = sample_responses(model, prompts[::-1], seeds=seeds[::-1], **options)[::-1]
    alone = [sample_responses(model, [p], seeds=[s], **options)[0] for p, s in zip(prompts, seeds, strict=True)]
    assert together == reversed_order == alone
    assert together != sample_responses(model, prompts, seeds=[21, 22, 23, 24, 25], **options)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampled_tokens_follow_the_tempered_nucleus(model_and_tokenizer, temperature, top_p):
    """10,000 first tokens of one prompt: their frequencies match softmax(logits / T) restricted to the top-p
    nucleus (total variation < 0.03 over the tokens of probability > 1% and the rest as one bin), and no token
    outside the nucleus is ever drawn."""
    from dpolab.engine.generate import nucleus, sample_responses

    model, tokenizer = model_and_tokenizer
    prompt = encoded(tokenizer, ["two plus two is"])[0]
    draws = 10000
    samples = sample_responses(model, [prompt] * draws, max_new_tokens=1, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, device="cpu", seeds=list(range(draws)),
                               temperature=temperature, top_p=top_p)  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    expected = nucleus(torch.softmax(logits / temperature, -1)[None], top_p)[0]
    counts = torch.bincount(torch.tensor([s.ids[0] for s in samples]), minlength=len(expected)).double()
    assert float(counts[expected == 0].sum()) == 0
    likely = expected > 0.01
    observed = torch.cat([counts[likely] / draws, (counts[~likely].sum() / draws)[None]])
    wanted = torch.cat([expected[likely].double(), expected[~likely].double().sum()[None]])
    assert 0.5 * float((observed - wanted).abs().sum()) < 0.03
    assert int(likely.sum()) >= 3  # a spread distribution: the comparison says something
