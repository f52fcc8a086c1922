"""Batched text generation from a Hugging Face causal LM: greedy or sampled, N candidates per prompt.

Prompts are sorted by length and left-padded in batches (so a batch wastes little padding); results
come back in the input order. Greedy decoding gives, per prompt, the same tokens as generating that
prompt alone without padding (tested). Used by the quickstart's accuracy evaluation and by
``dpolab data sample``.

:func:`sample_responses` is the token-level sampler of RLHF rollouts (``dpolab ppo``): token ids in and out
(no re-tokenisation between sampling and scoring), one generator per row (a prompt's sample does not depend
on its batch), temperature and top-p, EOS handling, and a lock-step mode for collective (FSDP) forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


# --- token-level sampling for RLHF rollouts -----------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A generated response: its token ids up to and including the first EOS, and whether it reached one."""

    ids: tuple[int, ...]
    finished: bool  # False: cut at max_new_tokens without an EOS


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` (rows, vocab) restricted to each row's smallest set of most likely tokens whose mass reaches
    ``top_p`` (Holtzman et al. 2020), renormalised; the most likely token is always kept."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row by inverting the row's CDF at its uniform draw in [0, 1)."""
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1).to(cdf.dtype), right=True)[:, 0]
    return picked.clamp(max=probs.shape[-1] - 1)


def sample_responses(
    forward: Callable,
    prompts: list[tuple[int, ...]],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    device,
    seeds: list[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    keep_going: Callable[[bool], bool] | None = None,
) -> list[Sample]:
    """One response per prompt (token ids), in one left-padded batch with a KV cache.

    ``forward``: a causal LM's call (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values``,
    ``use_cache``) → an output with ``logits`` and ``past_key_values``. ``seeds``: one per prompt: row i draws
    its tokens from its own generator, so a prompt's response does not depend on which prompts share its
    batch or its process (a run on several processes samples what one process would). ``seeds=None``:
    greedy. ``keep_going(still_generating)``: for collective forwards (FSDP), every process steps until the
    answer is False on all of them.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if seeds is not None and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(s) for s in seeds] if seeds is not None else None
    responses: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    past, step_ids = None, input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            output = forward(
                input_ids=step_ids, attention_mask=attention, position_ids=positions, past_key_values=past,
                use_cache=True,
            )  # fmt: skip
            past = output.past_key_values
            logits = output.logits[:, -1].float()
            if generators is None:
                tokens = logits.argmax(-1)
            else:
                probs = nucleus(torch.softmax(logits / temperature, dim=-1), top_p)
                uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
                tokens = draw(probs.double(), uniforms.to(probs.device))
            for row, token in enumerate(tokens.tolist()):
                if not finished[row]:
                    responses[row].append(token)
                    finished[row] = token == eos_token_id
            still = not all(finished)
            if not (keep_going(still) if keep_going is not None else still):
                break
            step_ids = tokens[:, None]
            attention = torch.cat([attention, attention.new_ones(len(prompts), 1)], dim=1)
            positions = positions[:, -1:] + 1
    return [Sample(tuple(ids), done) for ids, done in zip(responses, finished, strict=True)]
