"""Per-sequence log-probabilities of chosen and rejected completions from a causal LM.

:func:`packed_logps` is the fast path: one forward over prefix-shared, padding-free rows
(:mod:`dpolab.data.packing`), the LM head and log-softmax at completion positions only.
:func:`naive_logps` is the reference: two right-padded rows per pair (prompt+chosen, prompt+rejected),
the model's own full forward. Tests check the two agree to ≤ 1e-5 (fp32); the trainer checks them
on its first batch and falls back to the naive path, saying why, if a model cannot take the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpolab.data.packing import PackedBatch
from dpolab.data.tokenize import TokenizedPair


@dataclass
class SequenceLogps:
    """Per-pair sums (``chosen``, ``rejected``) and, when asked for, the per-token values."""

    chosen: torch.Tensor  # (B,)
    rejected: torch.Tensor  # (B,)
    token_logps: torch.Tensor | None = None  # (n,) in PackedBatch target order
    token_log_sum_sq: torch.Tensor | None = None  # (n,) log Σ_v p(v)² at each target position (WPO)


def backbone_and_head(model):
    """The transformer body and the output projection of a causal LM (PEFT-wrapped or not)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, inner.base_model_prefix, None)
    if body is None:
        raise ValueError(f"{type(inner).__name__} has no backbone at .{inner.base_model_prefix}")
    return inner, body, inner.get_output_embeddings()


def _logits_at(model, hidden: torch.Tensor) -> torch.Tensor:
    inner, _, head = backbone_and_head(model)
    logits = head(hidden)
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return _at_least_fp32(logits)


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Log-softmax in at least fp32 (bf16 logits lose ~2 digits); fp64 stays fp64."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def ld_weights(batch: PackedBatch, ld_alpha: float | None) -> torch.Tensor | None:
    """LD-DPO token weights (Liu et al. 2024): tokens past the shorter completion's length count α.

    The shared length is min(|y_w|, |y_l|) per pair; TRL's ``ld_alpha``.
    """
    if ld_alpha is None:
        return None
    shared = torch.minimum(batch.chosen_lengths, batch.rejected_lengths)[batch.target_pair]
    beyond = batch.target_index >= shared
    weights = torch.ones(batch.target_ids.shape, device=batch.target_ids.device)
    return weights.masked_fill(beyond, ld_alpha)


def reduce_tokens(batch: PackedBatch, token_values: torch.Tensor, weights: torch.Tensor | None = None):
    """Sum per-token values into per-pair (chosen, rejected) sums."""
    if weights is not None:
        token_values = token_values * weights
    totals = torch.zeros(2 * batch.num_pairs, dtype=token_values.dtype, device=token_values.device)
    slot = batch.target_pair * 2 + (~batch.target_is_chosen).long()
    totals = totals.index_add(0, slot, token_values)
    return totals[0::2], totals[1::2]


def packed_logps(
    model, batch: PackedBatch, ld_alpha: float | None = None, with_tokens: bool = False, with_log_sum_sq: bool = False
) -> SequenceLogps:
    """One forward over the packed rows; the LM head runs only where a completion token is predicted."""
    _, body, _ = backbone_and_head(model)
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(batch.input_ids.device.type):
        dtype = torch.get_autocast_dtype(batch.input_ids.device.type)
    hidden = body(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask(dtype),
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch.predict_positions]
    log_probs = torch.log_softmax(_logits_at(model, hidden), dim=-1)
    token_logps = log_probs.gather(1, batch.target_ids[:, None])[:, 0]
    chosen, rejected = reduce_tokens(batch, token_logps, ld_weights(batch, ld_alpha))
    log_sum_sq = torch.logsumexp(2 * log_probs.detach(), dim=-1) if with_log_sum_sq else None
    return SequenceLogps(chosen, rejected, token_logps if with_tokens or with_log_sum_sq else None, log_sum_sq)


def naive_logps(model, pairs: list[TokenizedPair], pad_token_id: int, device=None) -> SequenceLogps:
    """Reference implementation: separate right-padded rows, the model's full forward and logits."""
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    completion = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    if device is not None:
        input_ids, attention = input_ids.to(device), attention.to(device)
    logits = _at_least_fp32(model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits)
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:, None])[..., 0]
    sums = []
    for i, row in enumerate(rows):
        end = len(row) - 1  # log_probs[t] is the log-prob of token t + 1
        sums.append(log_probs[i, end - completion[i] : end].sum())
    totals = torch.stack(sums)
    return SequenceLogps(totals[: len(pairs)], totals[len(pairs) :])
