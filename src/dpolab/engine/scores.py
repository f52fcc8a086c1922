"""Scalar scores of sequences under a model with a one-output head (a reward model, a value model).

The score of a sequence (a prompt and one branch) is the head's output at the sequence's **last
token** (the EOS that tokenisation appends). :func:`packed_scores` is the fast path: one forward over
the prefix-shared rows of :mod:`dpolab.data.packing`, so chosen and rejected share one pass over their
prompt, with the score read at ``branch_end_positions``. :func:`naive_scores` is the reference: one
right-padded row per sequence. Both call the model's own ``forward`` (DDP, FSDP and PEFT hooks run) and
read the head's output with a forward hook on the head module (``score`` in Hugging Face's
``*ForSequenceClassification``), not the model's pooled ``logits``: Hugging Face pools at the last
token that is not the pad token, which is the token *before* the EOS when pad = EOS; dpolab always
reads the last token, whatever the pad token.

:func:`scores_fallback_reason` checks that the two paths agree on a model's first items, so a recipe
falls back to the naive path, saying why, when a model cannot take the packed mask.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from dpolab.data.packing import Item, pack
from dpolab.engine.attention import Kernel, packed_inputs
from dpolab.engine.logps import _at_least_fp32, padded_rows, run_both_paths

HEAD_NAMES = ("score", "classifier")  # the one-output head of Hugging Face's sequence classifiers


def score_head(model) -> torch.nn.Module:
    """The scalar head of a sequence classifier, through DDP/FSDP/PEFT wrappers (the outermost module named
    ``score`` or ``classifier``: under PEFT that is the wrapper that routes to the trained copy)."""
    found = [(name, module) for name, module in model.named_modules() if name.split(".")[-1] in HEAD_NAMES]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no score head (a module named {' or '.join(HEAD_NAMES)}); "
            "load the model as a sequence classifier with one label"
        )
    return min(found, key=lambda pair: pair[0].count("."))[1]


@contextmanager
def recorded_head_output(model):
    """While active, every output of the score head is appended to the yielded list (with its graph)."""
    outputs: list[torch.Tensor] = []

    def record(module, args, output):  # noqa: ARG001 - hook signature
        outputs.append(output)

    handle = score_head(model).register_forward_hook(record)
    try:
        yield outputs
    finally:
        handle.remove()


def _single_output(outputs: list[torch.Tensor], rows: int, length: int) -> torch.Tensor:
    if len(outputs) != 1 or tuple(outputs[0].shape[:2]) != (rows, length) or outputs[0].shape[-1] != 1:
        shapes = [tuple(o.shape) for o in outputs]
        raise ValueError(
            f"the score head did not run once over every position with one output (outputs {shapes}, expected "
            f"({rows}, {length}, 1)); a reward model needs num_labels = 1"
        )
    return outputs[0][..., 0]


def packed_scores(
    model, items: list[Item], ids: list[int], row_tokens: int, pad_token_id: int, device, kernel: Kernel = "dense"
) -> torch.Tensor:
    """Scores (items, branches) from one forward over prefix-shared packed rows (``kernel``: :mod:`dpolab.engine.attention`)."""
    batch = pack(items, ids, row_tokens, pad_token_id).to(device)
    inputs = packed_inputs(model, batch, kernel)
    with recorded_head_output(model) as outputs:
        model(**inputs, use_cache=False)
    rows, length = batch.input_ids.shape
    flat = _single_output(outputs, rows, length).reshape(-1)
    return _at_least_fp32(flat[batch.branch_end_positions]).view(batch.num_items, batch.num_branches)


def naive_scores(model, items: list[Item], pad_token_id: int, device=None) -> torch.Tensor:
    """Reference: one right-padded row per (prompt, branch); the score at each row's last real token."""
    input_ids, attention = padded_rows(items, pad_token_id, device)
    with recorded_head_output(model) as outputs:
        model(input_ids=input_ids, attention_mask=attention, use_cache=False)
    every = _single_output(outputs, *input_ids.shape)
    rows = torch.arange(input_ids.shape[0], device=every.device)
    scores = every[rows, attention.sum(1).to(every.device) - 1]
    return _at_least_fp32(scores).view(len(items), len(items[0].branches))


@dataclass
class ScoreEngine:
    """How a recipe computes scores: the packed path (the default) or the naive one, with its settings."""

    row_tokens: int
    pad_token_id: int
    device: torch.device
    naive: bool = False
    kernel: Kernel = "dense"

    def scores(self, model, items: list[Item], ids: list[int]) -> torch.Tensor:
        """Scores (items, branches) of ``items`` (their data-set indices ``ids``) under ``model``."""
        if self.naive:
            return naive_scores(model, items, self.pad_token_id, self.device)
        return packed_scores(model, items, ids, self.row_tokens, self.pad_token_id, self.device, self.kernel)


def scores_fallback_reason(model, items: list[Item], engine: ScoreEngine, dtype: torch.dtype, autocast=nullcontext):
    """Compare packed and naive scores on a few items (:func:`~dpolab.engine.logps.run_both_paths`); the
    reason to fall back, or None if they agree."""
    sample = items[: min(4, len(items))]
    results, failure = run_both_paths(
        model,
        lambda: engine.scores(model, sample, list(range(len(sample)))),
        lambda: naive_scores(model, sample, engine.pad_token_id, engine.device),
        autocast,
    )
    if failure:
        return failure
    fast, slow = results
    worst = float((fast - slow).abs().max())
    scale = max(1.0, float(slow.abs().max()))
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    if worst > tolerance * scale:
        return f"packed and naive scores differ by {worst:.2g} (tolerance {tolerance:g} × {scale:.3g})"
    return None
