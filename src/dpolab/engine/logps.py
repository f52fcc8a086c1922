"""Per-token and per-sequence log-probabilities of completions under a causal LM.

The unit is a *sequence*: a prompt followed by one completion (a branch). A preference pair is an item
with two sequences that share the prompt (chosen, rejected); an SFT example is an item with one.

:func:`packed_token_logps` is the fast path: one forward over prefix-shared, padding-free rows
(:mod:`dpolab.data.packing`). It calls the model's own ``forward`` — so DDP, FSDP and PEFT wrappers run
their hooks — and keeps the LM head off every position that predicts no completion token with a
forward pre-hook on the output embedding that selects those positions (any softcapping after the head
still runs, inside the model). :func:`naive_token_logps` is the reference: one right-padded row per
sequence, the model's full forward and logits. Both return :class:`TokenLogps` in the same layout;
tests check they agree to ≤ 1e-5 (fp32), and :func:`packing_fallback_reason` checks it on a model's
first batch so the trainer can fall back to the naive path, saying why, if a model cannot take the
packed mask.

Objective-specific token weights (LD-DPO, WPO) are not applied here: they live with the losses
(:mod:`dpolab.losses`); :meth:`TokenLogps.sums` takes any weights.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from dpolab.data.packing import Item, PackedBatch, pack


@dataclass
class TokenLogps:
    """Log-probs of every completion token of a micro-batch, and where each token belongs."""

    values: torch.Tensor  # (n,) log π(token | prefix), at least fp32
    sequence: torch.Tensor  # (n,) sequence number: item × branches + branch
    index: torch.Tensor  # (n,) position of the token within its completion (0-based)
    branch_lengths: torch.Tensor  # (items, branches) completion token counts
    log_sum_sq: torch.Tensor | None = None  # (n,) log Σ_v π(v | prefix)², detached; when asked for (WPO)
    # (n,) each, detached, when asked for (Min-K%++): the mean and standard deviation of log π(v | prefix)
    # over v ~ π(· | prefix), i.e. E_v[log π(v)] = −entropy and sqrt(E_v[log π(v)²] − E_v[log π(v)]²)
    moments: tuple[torch.Tensor, torch.Tensor] | None = None

    def sums(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Σ over each sequence's tokens of (weight ×) log-prob, shape (items, branches)."""
        values = self.values if weights is None else self.values * weights
        items, branches = self.branch_lengths.shape
        totals = torch.zeros(items * branches, dtype=values.dtype, device=values.device)
        return totals.index_add(0, self.sequence, values).view(items, branches)


def output_head(model) -> torch.nn.Module:
    """The output projection of a causal LM, through DDP/FSDP/PEFT/compile wrappers."""
    inner = model
    while not hasattr(inner, "get_output_embeddings") and hasattr(inner, "module"):
        inner = inner.module  # DistributedDataParallel and similar containers
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings (get_output_embeddings() is None)")
    return head


@contextmanager
def head_only_at(model, positions: torch.Tensor):
    """While active, the LM head sees only the hidden states at ``positions`` (flat row × column indices).

    Yields a list that records each call's input shape, so the caller can check the head ran exactly once.
    """
    head = output_head(model)
    calls: list[tuple[int, ...]] = []

    def select(module, args, kwargs):  # noqa: ARG001 - hook signature
        hidden = args[0]
        calls.append(tuple(hidden.shape))
        return (hidden.reshape(-1, hidden.shape[-1])[positions][None], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Log-softmax in at least fp32 (bf16 logits lose ~2 digits); fp64 stays fp64."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _mask_dtype(model, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def _gather(log_probs: torch.Tensor, targets: torch.Tensor, with_log_sum_sq: bool):
    values = log_probs.gather(-1, targets[..., None])[..., 0]
    log_sum_sq = torch.logsumexp(2 * log_probs.detach(), dim=-1) if with_log_sum_sq else None
    return values, log_sum_sq


def _moments(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = log_probs.detach()
    probs = log_probs.exp()
    mean = (probs * log_probs).sum(-1)
    variance = (probs * (log_probs - mean[..., None]).square()).sum(-1)  # centred: no cancellation
    return mean, variance.clamp_min(0).sqrt()


def packed_token_logps(
    model, batch: PackedBatch, with_log_sum_sq: bool = False, with_moments: bool = False
) -> TokenLogps:
    """One forward of the (possibly wrapped) model over the packed rows; the LM head only where a target is predicted."""
    device = batch.input_ids.device
    with head_only_at(model, batch.predict_positions) as calls:
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask(_mask_dtype(model, device)),
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits
    expected = int(batch.predict_positions.shape[0])
    if len(calls) != 1 or logits.shape[:2] != (1, expected):
        raise ValueError(
            f"the model's forward did not project the selected positions through its output embeddings "
            f"(head calls {calls}, logits {tuple(logits.shape)}, expected (1, {expected}, vocab))"
        )
    log_probs = torch.log_softmax(_at_least_fp32(logits[0]), dim=-1)
    values, log_sum_sq = _gather(log_probs, batch.target_ids, with_log_sum_sq)
    moments = _moments(log_probs) if with_moments else None
    return TokenLogps(values, batch.target_sequence, batch.target_index, batch.branch_lengths, log_sum_sq, moments)


def padded_rows(items: list[Item], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask): one right-padded row per (prompt, branch) sequence, in sequence order."""
    rows = [item.prompt_ids + ids for item in items for ids in item.branches]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
    if device is not None:
        input_ids, attention = input_ids.to(device), attention.to(device)
    return input_ids, attention


def naive_token_logps(
    model, items: list[Item], pad_token_id: int, device=None, with_log_sum_sq: bool = False, with_moments: bool = False
) -> TokenLogps:
    """Reference implementation: one right-padded row per (prompt, branch), the model's full forward and logits."""
    input_ids, attention = padded_rows(items, pad_token_id, device)
    logits = _at_least_fp32(model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits)
    # log_probs[s, t] is the log-prob of token t + 1 of row s
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    values, log_sum_sq = _gather(log_probs, input_ids[:, 1:], with_log_sum_sq)
    rows_at, columns, sequence, index, lengths = naive_positions(items, input_ids.device)
    moments = None
    if with_moments:
        mean, std = _moments(log_probs)
        moments = (mean[rows_at, columns], std[rows_at, columns])
    return TokenLogps(
        values[rows_at, columns],
        sequence,
        index,
        lengths,
        None if log_sum_sq is None else log_sum_sq[rows_at, columns],
        moments,
    )


def naive_positions(items: list[Item], device) -> tuple[torch.Tensor, ...]:
    """For the rows of :func:`padded_rows`: (row, column) of the output that predicts each completion token,
    the token's sequence number and index within its completion, and the (items, branches) lengths."""
    rows_at, columns, sequence, index = [], [], [], []
    for s, (prompt_length, n) in enumerate((len(item.prompt_ids), len(ids)) for item in items for ids in item.branches):
        rows_at += [s] * n
        columns += range(prompt_length - 1, prompt_length - 1 + n)
        sequence += [s] * n
        index += range(n)
    lengths = [[len(ids) for ids in item.branches] for item in items]
    return tuple(torch.tensor(v, dtype=torch.long, device=device) for v in (rows_at, columns, sequence, index, lengths))


@dataclass
class LogpEngine:
    """How a recipe computes log-probs: the packed path (the default) or the naive one, with its settings."""

    row_tokens: int
    pad_token_id: int
    device: torch.device
    naive: bool = False

    def token_logps(
        self, model, items: list[Item], ids: list[int], with_log_sum_sq: bool = False, with_moments: bool = False
    ) -> TokenLogps:
        """Token log-probs of ``items`` (their data-set indices ``ids``) under ``model``."""
        if self.naive:
            return naive_token_logps(model, items, self.pad_token_id, self.device, with_log_sum_sq, with_moments)
        batch = pack(items, ids, self.row_tokens, self.pad_token_id).to(self.device)
        return packed_token_logps(model, batch, with_log_sum_sq, with_moments)


def packing_fallback_reason(
    model, items: list[Item], engine: LogpEngine, dtype: torch.dtype, autocast=nullcontext
) -> str | None:
    """Compare packed and naive log-probs on a few items; the reason to fall back, or None if they agree."""
    sample = items[: min(4, len(items))]
    ids = list(range(len(sample)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            fast = LogpEngine(engine.row_tokens, engine.pad_token_id, engine.device).token_logps(model, sample, ids)
            slow = naive_token_logps(model, sample, engine.pad_token_id, engine.device)
    except Exception as error:  # noqa: BLE001 - any failure of the custom mask means: use the naive path
        return f"the packed forward failed ({type(error).__name__}: {error})"
    finally:
        model.train(was_training)
    per_token = (fast.sums() - slow.sums()).abs().sum(1) / fast.branch_lengths.sum(1).to(fast.values.dtype)
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    worst = float(per_token.max())
    if worst > tolerance:
        return f"packed and naive log-probs differ by {worst:.2g} nats per token (tolerance {tolerance:g})"
    return None
