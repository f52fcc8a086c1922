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
from dpolab.engine.attention import Kernel, packed_inputs


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


class ChunkedTargetLogps(torch.autograd.Function):
    """log π(target | prefix) from the LM head's input, ``chunk`` tokens at a time: memory O(chunk × vocab).

    Forward keeps only the log-normaliser of each token; backward recomputes each chunk's logits. The
    logits are computed in the dtype the head itself would use (autocast's, if on) and normalised in at
    least fp32, as the unchunked path does; backward casts to that same dtype, so both paths round alike.
    d log p_t / d logits = onehot(t) − softmax, times the incoming gradient.
    Also returns, detached, log Σ_v π(v)² (WPO) and the mean and standard deviation of log π(v) over
    v ~ π (Min-K%++) when asked: empty tensors otherwise.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, with_log_sum_sq: bool, with_moments: bool):
        n = hidden.shape[0]
        outputs = {"values": [], "log_normaliser": [], "log_sum_sq": [], "mean": [], "std": []}
        compute_dtype = None
        for start in range(0, n, chunk):
            logits = torch.nn.functional.linear(hidden[start : start + chunk], weight, bias)
            compute_dtype = logits.dtype
            logits = _at_least_fp32(logits)
            log_normaliser = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(-1, targets[start : start + chunk, None])[:, 0]
            outputs["values"].append(target_logits - log_normaliser)
            outputs["log_normaliser"].append(log_normaliser)
            if with_log_sum_sq or with_moments:
                log_probs = logits - log_normaliser[:, None]
            if with_log_sum_sq:
                outputs["log_sum_sq"].append(torch.logsumexp(2 * log_probs, dim=-1))
            if with_moments:
                mean, std = _moments(log_probs)
                outputs["mean"].append(mean)
                outputs["std"].append(std)
        empty = hidden.new_empty(0, dtype=torch.float32 if hidden.dtype != torch.float64 else torch.float64)
        joined = {name: torch.cat(parts) if parts else empty for name, parts in outputs.items()}
        ctx.save_for_backward(hidden, weight, bias, targets, joined["log_normaliser"])
        ctx.chunk, ctx.compute_dtype = chunk, compute_dtype
        extras = (joined["log_sum_sq"], joined["mean"], joined["std"])
        ctx.mark_non_differentiable(*extras)
        return (joined["values"], *extras)

    @staticmethod
    def backward(ctx, grad_values, *_):
        hidden, weight, bias, targets, log_normaliser = ctx.saved_tensors
        dtype = ctx.compute_dtype or hidden.dtype
        weight_c = weight.to(dtype)
        bias_c = None if bias is None else bias.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=log_normaliser.dtype, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        grad_bias = (
            torch.zeros(bias.shape, dtype=log_normaliser.dtype, device=bias.device)
            if bias is not None and ctx.needs_input_grad[2]
            else None
        )
        for start in range(0, hidden.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            hidden_c = hidden[start:stop].to(dtype)
            logits = _at_least_fp32(torch.nn.functional.linear(hidden_c, weight_c, bias_c))
            grad = grad_values[start:stop, None].to(logits.dtype)
            # In place on this chunk's own logits: one [chunk × vocab] buffer at a time.
            grad_logits = logits.sub_(log_normaliser[start:stop, None]).exp_().mul_(-grad)
            grad_logits.scatter_add_(-1, targets[start:stop, None], grad)
            grad_logits = grad_logits.to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_logits @ weight_c
            if grad_weight is not None:
                if grad_weight.dtype == dtype:
                    grad_weight.addmm_(grad_logits.T, hidden_c)  # no [vocab × hidden] temporary
                else:
                    grad_weight += (grad_logits.T @ hidden_c).to(grad_weight.dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).to(grad_bias.dtype)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def chunk_refusal(model) -> str | None:
    """Why the chunked head cannot replace this model's LM head (None: it can)."""
    head = output_head(model)
    if type(head) is not torch.nn.Linear:
        return f"the output embeddings are a {type(head).__name__}, not a plain Linear"
    return None


@contextmanager
def chunked_head_at(
    model, positions: torch.Tensor, targets: torch.Tensor, chunk: int, with_log_sum_sq: bool, with_moments: bool
):
    """While active, the LM head returns log π(target) at ``positions`` as (1, n, 1), computed chunk by chunk.

    The head runs on an empty slice (so DDP/FSDP see it used); a forward hook then replaces its output.
    Yields a dict that receives the output tensor and the detached extras; the caller checks the model
    returned that very tensor (a model that transforms its logits after the head, e.g. softcapping,
    cannot use this path)."""
    head = output_head(model)
    record: dict = {}

    def select(module, args, kwargs):  # noqa: ARG001 - hook signature
        hidden = args[0]
        record["hidden"] = hidden.reshape(-1, hidden.shape[-1])[positions]
        record["calls"] = record.get("calls", 0) + 1
        return (hidden[:, :0], *args[1:]), kwargs

    def replace(module, args, kwargs, output):  # noqa: ARG001 - hook signature
        values, log_sum_sq, mean, std = ChunkedTargetLogps.apply(
            record["hidden"], module.weight, module.bias, targets, chunk, with_log_sum_sq, with_moments
        )
        record["output"] = values[None, :, None]
        record["log_sum_sq"] = log_sum_sq if with_log_sum_sq else None
        record["moments"] = (mean, std) if with_moments else None
        return record["output"]

    handles = [
        head.register_forward_pre_hook(select, with_kwargs=True),
        head.register_forward_hook(replace, with_kwargs=True),
    ]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Log-softmax in at least fp32 (bf16 logits lose ~2 digits); fp64 stays fp64."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


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
    model,
    batch: PackedBatch,
    with_log_sum_sq: bool = False,
    with_moments: bool = False,
    kernel: Kernel = "dense",
    logit_chunk_tokens: int = 0,
) -> TokenLogps:
    """One forward of the (possibly wrapped) model over the packed rows; the LM head only where a target is predicted.

    ``kernel``: how attention runs over the rows (:mod:`dpolab.engine.attention`). ``logit_chunk_tokens`` > 0:
    the head's log-softmax runs that many tokens at a time (:class:`ChunkedTargetLogps`) instead of on
    all of them at once."""
    inputs = packed_inputs(model, batch, kernel)
    expected = int(batch.predict_positions.shape[0])
    if logit_chunk_tokens > 0:
        if refusal := chunk_refusal(model):
            raise ValueError(f"the chunked log-softmax cannot be used: {refusal}")
        with chunked_head_at(
            model, batch.predict_positions, batch.target_ids, logit_chunk_tokens, with_log_sum_sq, with_moments
        ) as record:
            logits = model(**inputs, use_cache=False).logits
        if record.get("calls") != 1 or logits is not record.get("output"):
            raise ValueError(
                "the model's forward did not return its output embeddings' result unchanged "
                f"(head calls {record.get('calls', 0)}); the chunked log-softmax cannot be used"
            )
        values = logits[0, :, 0]
        return TokenLogps(
            values,
            batch.target_sequence,
            batch.target_index,
            batch.branch_lengths,
            record["log_sum_sq"],
            record["moments"],
        )
    with head_only_at(model, batch.predict_positions) as calls:
        logits = model(**inputs, use_cache=False).logits
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
    """How a recipe computes log-probs: the packed path (the default) or the naive one, with its settings.

    ``kernel``: the attention kernel over packed rows (:mod:`dpolab.engine.attention`);
    ``logit_chunk_tokens``: > 0 runs the LM head's log-softmax that many tokens at a time."""

    row_tokens: int
    pad_token_id: int
    device: torch.device
    naive: bool = False
    kernel: Kernel = "dense"
    logit_chunk_tokens: int = 0

    def token_logps(
        self, model, items: list[Item], ids: list[int], with_log_sum_sq: bool = False, with_moments: bool = False
    ) -> TokenLogps:
        """Token log-probs of ``items`` (their data-set indices ``ids``) under ``model``."""
        if self.naive:
            return naive_token_logps(model, items, self.pad_token_id, self.device, with_log_sum_sq, with_moments)
        batch = pack(items, ids, self.row_tokens, self.pad_token_id).to(self.device)
        return packed_token_logps(model, batch, with_log_sum_sq, with_moments, self.kernel, self.logit_chunk_tokens)


def run_both_paths(model, fast, slow, autocast=nullcontext):
    """``((fast(), slow()), None)`` with the model in eval mode, or ``(None, why)`` when the fast path fails.

    ``fast`` runs with gradients and a backward to the first trainable parameter (so every layer is
    crossed, and ``.grad`` is untouched): a kernel with no backward on this device is refused here, not
    at the first training step. ``slow`` (the naive path) runs without gradients."""
    was_training = model.training
    model.eval()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad][:1]
    try:
        with autocast():
            fast_values = fast()
            if trainable:
                torch.autograd.grad(fast_values.sum(), trainable, allow_unused=True)
            with torch.no_grad():
                slow_values = slow()
    except Exception as error:  # noqa: BLE001 - any failure of the packed path means: use another path
        return None, f"the packed forward failed ({type(error).__name__}: {' '.join(str(error).split())[:300]})"
    finally:
        model.train(was_training)
    return (fast_values.detach(), slow_values), None


def packing_fallback_reason(
    model, items: list[Item], engine: LogpEngine, dtype: torch.dtype, autocast=nullcontext
) -> str | None:
    """Compare ``engine``'s packed log-probs with the naive ones on a few items (:func:`run_both_paths`);
    why to fall back, or None. The naive side runs one item at a time: its full logits ([rows × length ×
    vocab]) would otherwise set the run's peak memory with a large vocabulary."""
    sample = items[: min(4, len(items))]
    results, failure = run_both_paths(
        model,
        lambda: engine.token_logps(model, sample, list(range(len(sample)))).sums(),
        lambda: torch.cat(
            [naive_token_logps(model, [item], engine.pad_token_id, engine.device).sums() for item in sample]
        ),
        autocast,
    )
    if failure:
        return failure
    fast, slow = results
    tokens = torch.tensor([sum(len(ids) for ids in item.branches) for item in sample], device=fast.device)
    worst = float(((fast - slow).abs().sum(1) / tokens.to(fast.dtype)).max())
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    if worst > tolerance:
        return f"packed and naive log-probs differ by {worst:.2g} nats per token (tolerance {tolerance:g})"
    return None


def item_token_logps(
    model, items: list[Item], engine: LogpEngine, batch_size: int = 16, with_moments: bool = False, progress=None
) -> list[list[tuple[torch.Tensor, ...]]]:
    """Per item, per branch: its completion tokens' log-probs in order (CPU float64), in eval mode, no grad.

    Each branch's entry is ``(values,)``, or ``(values, mean, std)`` with ``with_moments`` (see
    :class:`TokenLogps`). The evaluation tools' entry point (``dpolab eval tokens``, contamination)."""
    results: list[list[tuple[torch.Tensor, ...]]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                out = engine.token_logps(
                    model, chunk, list(range(start, start + len(chunk))), with_moments=with_moments
                )
                tensors = (out.values, *(out.moments if with_moments else ()))
                branches = out.branch_lengths.shape[1]
                for item in range(len(chunk)):
                    per_branch = []
                    for branch in range(branches):
                        selected = out.sequence == item * branches + branch
                        order = out.index[selected].argsort()
                        per_branch.append(tuple(t[selected][order].double().cpu() for t in tensors))
                    results.append(per_branch)
                if progress is not None:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    return results
