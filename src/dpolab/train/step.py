"""The optimiser step every recipe takes: AdamW and its schedule; :func:`train_step`, which runs a step's
micro-batches through the recipe's forward and scales each one's loss so that P processes compute the one-process
gradient; the clip; a non-finite batch never applied; the step's metrics reduced over every process; the running
throughput; the monitor's alarms.

Why the scaling is right: a step of ``A`` micro-batches, micro-batch m holding G_m items over every process, has the
one-process loss Σ_m (1 / (A·G_m)) Σ_{i ∈ m} ℓ_i (gradient accumulation of micro-batch means). Process r backpropagates
Σ_{i ∈ its share of m} ℓ_i × P / (A·G_m); DDP and FSDP average the P gradients, (1/P) Σ_r, which gives the same sum. A
process with no item in a micro-batch runs a stand-in forward (so every process joins the same collectives) and
backpropagates it × 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch

from dpolab.train.config import TrainConfig
from dpolab.train.data_order import MicroBatch
from dpolab.train.distributed import any_across, gather_rows, sum_across
from dpolab.train.lifecycle import Run
from dpolab.train.metrics import MetricsLog


def lr_lambda(config: TrainConfig, total_steps: int):
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:  # Hugging Face's convention: linear from 0 at step 0
            return step / max(1, warmup)
        if config.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1 - progress)

    return factor


def build_optimizer(config: TrainConfig, model, steps: int):
    """AdamW over the trainable parameters and the warmup + decay schedule (not yet prepared)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps))


def gradient_norm(accelerator, parameters, max_norm: float | None) -> float:
    """The global gradient norm (over every process and shard), clipped to ``max_norm`` when given."""
    return float(accelerator.clip_grad_norm_(parameters, max_norm if max_norm is not None else math.inf))


def optimizer_step(s: Run, step: int, finite: bool, rows: list[int]) -> tuple[float, float, str | None]:
    """Clip, then step — or skip a non-finite batch (naming its data rows) — schedule, zero the gradients.

    ``s`` is a recipe's setup (accelerator, config, optimizer, scheduler, parameters, counters, folder).
    Returns (gradient norm before clipping, learning rate of this step, why the run must stop or None). A
    non-finite batch is never applied; when the run must stop for it, the step still completes as a skipped
    one, so the recipe checkpoints it (:func:`nonfinite_stop`) and a resume continues after the bad batch.
    """
    grad_norm = gradient_norm(s.accelerator, s.parameters, s.config.max_grad_norm)
    learning_rate = s.scheduler.get_last_lr()[0]
    finite = not any_across(s.accelerator, not finite)
    stop = None
    if finite and math.isfinite(grad_norm):
        s.optimizer.step()
    else:  # never let NaN/inf reach the weights (or a checkpoint)
        what = "loss" if not finite else "gradient norm"
        every_row = sorted(gather_rows(s.accelerator, torch.tensor(rows, dtype=torch.long)).tolist())
        message = f"step {step}: non-finite {what} in the batch of data rows {every_row}"
        s.counters.nonfinite_skipped += 1
        if not s.config.skip_nonfinite:
            stop = message
        elif s.counters.nonfinite_skipped > s.config.max_nonfinite:
            stop = (
                f"{message}; {s.counters.nonfinite_skipped} non-finite batches, more than "
                f"max_nonfinite={s.config.max_nonfinite}"
            )
        else:
            s.folder.log.info(f"skipped {message}")
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return grad_norm, learning_rate, stop


def throughput(s: Run, items: int, tokens: int, unit: str) -> dict[str, float]:
    """Add this process's step counts to the global counters; the run-level rates (``unit`` = pairs or examples)."""
    item_total, token_total = sum_across(s.accelerator, [items, tokens])
    s.counters.items_seen += int(item_total)
    s.counters.tokens_seen += int(token_total)
    s.counters.tick()
    elapsed = s.counters.elapsed_seconds
    return {
        f"{unit}_per_second": s.counters.items_seen / elapsed,
        "tokens_per_second": s.counters.tokens_seen / elapsed,
        unit: s.counters.items_seen,
        "tokens": s.counters.tokens_seen,
        "elapsed_seconds": elapsed,
        "nonfinite_skipped": s.counters.nonfinite_skipped,
    }


def add_sums(sums: dict[str, float], values: dict[str, torch.Tensor], real: bool = True) -> None:
    """Accumulate per-item metric values into per-name sums; a stand-in batch (``real=False``) adds zeros, so
    every process holds the same names for :func:`reduced_means`."""
    for name, value in values.items():
        sums[name] = sums.get(name, 0.0) + (float(value.float().sum()) if real else 0.0)


def reduced_means(accelerator, sums: dict[str, float], count: int) -> dict[str, float]:
    """Σ over every process of each sum, divided by the items on every process (names agree across processes)."""
    names = sorted(sums)
    totals = sum_across(accelerator, [sums[n] for n in names] + [float(count)])
    return {name: total / totals[-1] for name, total in zip(names, totals, strict=False)} if totals[-1] else {}


def alarm_stop(accelerator, log: MetricsLog, new_alarms: list[dict], on_alarm: str) -> str | None:
    """Log this step's new alarms; with ``on_alarm: stop``, the alarm that stops the run, agreed by every
    process (a stop decided on one alone would leave the others waiting in a collective), else None."""
    for alarm in new_alarms:
        log.alarm(alarm)
    if any_across(accelerator, bool(new_alarms) and on_alarm == "stop"):
        return new_alarms[0]["alarm"] if new_alarms else "an alarm on another process"
    return None


@dataclass
class Forward:
    """One micro-batch through a recipe: the per-item losses the step backpropagates, the per-item values it logs."""

    losses: torch.Tensor  # (B,) with any per-item weights; a NaN/inf anywhere stops or skips the step (never applied)
    metrics: dict[str, torch.Tensor]  # per-item values, each averaged over the step's items on every process
    kept: object = None  # what the recipe keeps of each real micro-batch (the monitor's rows, the score extremes)


@dataclass
class StepResult:
    metrics: dict[str, float]  # the step's means over every process, then grad_norm, learning_rate, epoch, throughput
    nonfinite: str | None  # why the run must stop after a non-finite batch, or None
    kept: list = field(default_factory=list)  # ``Forward.kept`` of this process's real micro-batches


class Item(Protocol):
    """What the step reads of a training item (a ``TokenizedPair``, a ``TokenizedSequence``)."""

    row: int  # its data row, named when its batch is not finite
    unique_tokens: int  # its tokens, each counted once (a shared prompt once), for the throughput


def train_step(
    s: Run,
    step: int,
    items: Sequence[Item],
    forward: Callable[[MicroBatch], Forward],
    unit: str,
    reduce: Callable[[list], dict[str, float]] | None = None,
) -> StepResult:
    """One optimiser step: the next micro-batches of the data order through ``forward`` (under autocast; gradients
    synchronised on the last one only), each loss scaled by P / (items of the step over every process) and
    backpropagated; then :func:`optimizer_step`. ``reduce``: the recipe's own reduction of the kept values (called
    on every process: it may be a collective), added after the means. ``unit``: what an item is (pairs, examples)."""
    accelerator, processes = s.accelerator, s.accelerator.num_processes
    sums: dict[str, float] = {}
    count = tokens = 0
    rows, kept, finite = [], [], True
    batches = s.stream.next_step()
    for micro, batch in enumerate(batches):
        last = micro == len(batches) - 1
        with nullcontext() if last else accelerator.no_sync(s.model), accelerator.autocast():
            out = forward(batch)
            share = processes / (len(batch.global_ids) * len(batches))
            accelerator.backward(out.losses.sum() * share * float(batch.real))
        finite = finite and bool(torch.isfinite(out.losses).all())
        add_sums(sums, out.metrics, batch.real)
        if batch.real:
            count += len(batch.ids)
            tokens += sum(items[i].unique_tokens for i in batch.ids)
            rows += [items[i].row for i in batch.ids]
            kept.append(out.kept)
    grad_norm, learning_rate, nonfinite = optimizer_step(s, step, finite, rows)
    metrics = reduced_means(accelerator, sums, count)
    if reduce is not None:
        metrics.update(reduce(kept))
    metrics.update(grad_norm=grad_norm, learning_rate=learning_rate, epoch=batch.epoch + 1)
    metrics.update(throughput(s, count, tokens, unit))
    return StepResult(metrics, nonfinite, kept)
