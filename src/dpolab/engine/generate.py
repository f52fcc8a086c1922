"""Batched text generation from a Hugging Face causal LM: greedy or sampled, N candidates per prompt.

Prompts are sorted by length and left-padded in batches (so a batch wastes little padding); results
come back in the input order. Greedy decoding gives, per prompt, the same tokens as generating that
prompt alone without padding (tested). Used by the quickstart's accuracy evaluation and by
``dpolab data sample``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    num_return_sequences: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    add_special_tokens: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """For each prompt, ``num_return_sequences`` completions (text after the prompt, special tokens removed).

    ``progress(n)`` is called after each batch with the number of prompts it finished. Sampling is
    seeded per batch (``seed`` + the index of the batch's first prompt in length order), so the same
    call gives the same candidates. ``add_special_tokens=False`` for prompts already rendered with a
    chat template (which writes its own BOS).
    """
    if max_new_tokens < 1 or batch_size < 1 or num_return_sequences < 1:
        raise ValueError("max_new_tokens, batch_size and num_return_sequences must be >= 1")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
    if not do_sample and num_return_sequences > 1:
        raise ValueError("greedy decoding gives one completion per prompt; set do_sample for more")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    encoded = [tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"] for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[list[str]] = [[] for _ in prompts]
    try:
        for start in range(0, len(order), batch_size):
            ids = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in ids)
            input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in ids], device=device)
            attention = torch.tensor(
                [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in ids], device=device
            )
            options = dict(do_sample=do_sample, num_return_sequences=num_return_sequences)
            if do_sample:
                options.update(temperature=temperature, top_p=top_p, top_k=0)
                torch.manual_seed(seed + start)
            else:  # no sampling settings from the model's generation_config may leak in
                options.update(temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **options,
                )
            texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            for offset, index in enumerate(ids):
                results[index] = texts[offset * num_return_sequences : (offset + 1) * num_return_sequences]
            if progress is not None:
                progress(len(ids))
    finally:
        model.train(was_training)
    return results
