"""Held-out evaluation, one skeleton for every recipe: each process a shard of the held-out items, the recipe's forward
without gradients, the metrics reduced over every process and logged with the prefix ``eval/``; and the periodic
lm-evaluation-harness evaluation of ``eval_harness:``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpolab.train.config import TrainConfig
from dpolab.train.data_order import shard_batches
from dpolab.train.lifecycle import Run
from dpolab.train.run_folder import RunFolder
from dpolab.train.step import Forward, add_sums, reduced_means


def evaluate(
    s: Run,
    step: int,
    count: int,
    forward: Callable[[list[int], bool], Forward],
    headline: dict[str, str],
    reduce: Callable[[list], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Held-out metrics of ``count`` items at ``step`` (prefix ``eval/``), written to the log; {} without items.

    ``forward(ids, real)``: the recipe's forward of those held-out items without gradients (``real`` False: a
    stand-in that only keeps this process in step with the others; its values are not counted, but it must return
    every metric name). ``reduce``: as in :func:`dpolab.train.step.train_step`. ``headline``: the metrics for the
    log line, by name → label.
    """
    if not count:
        return {}
    accelerator = s.accelerator
    s.model.eval()
    sums: dict[str, float] = {}
    counted, kept = 0, []
    with torch.no_grad():
        for ids, real in shard_batches(
            count, s.config.batch_size, accelerator.process_index, accelerator.num_processes
        ):
            with accelerator.autocast():
                out = forward(ids, real)
            add_sums(sums, out.metrics, real)
            if real:
                counted += len(ids)
                kept.append(out.kept)
    s.model.train()
    values = reduced_means(accelerator, sums, counted)
    if reduce is not None:
        values.update(reduce(kept))
    values = {f"eval/{name}": value for name, value in values.items()}
    s.folder.log.write(step, values)
    shown = ", ".join(
        f"{label} {values[f'eval/{name}']:.4f}" for name, label in headline.items() if f"eval/{name}" in values
    )
    s.folder.log.info(f"eval at step {step}: {shown}")
    return values


def harness_evaluator(config: TrainConfig, accelerator, folder: RunFolder, tokenizer):
    """The lm-evaluation-harness evaluator of ``eval_harness:`` (:mod:`dpolab.train.harness_eval`), or None."""
    if not config.eval_harness:
        return None
    from dpolab.train.harness_eval import HarnessEvaluator

    return HarnessEvaluator(config.eval_harness, accelerator, folder, tokenizer)
