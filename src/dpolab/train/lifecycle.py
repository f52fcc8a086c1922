"""The run every recipe's loop reads (:class:`Run`: the accelerator, the run folder, the model, the optimiser, the data
order, the counters, the checkpointer) and its course: the components registered once with the checkpointer, the
resume that restores them, the checkpoint at the end of each step, the stop on a signal or a non-finite batch, and
the end (the final model and ``summary.json``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpolab.engine.logps import LogpEngine
from dpolab.train.checkpoint import Checkpointer
from dpolab.train.config import TrainConfig
from dpolab.train.data_order import BatchStream
from dpolab.train.distributed import any_across
from dpolab.train.guard import NonFiniteError, TrainingInterrupted
from dpolab.train.models import save_final_model
from dpolab.train.run_folder import RunFolder, write_summary
from dpolab.train.state import Counters, DataIdentity


@dataclass
class Run:
    """The pieces every recipe's loop reads; a recipe's ``Setup`` adds its own (its items, objective, …)."""

    config: TrainConfig
    accelerator: object
    folder: RunFolder
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    parameters: list
    engine: LogpEngine  # or a ScoreEngine (reward models)
    fallback: str | None
    stream: BatchStream
    counters: Counters
    checkpointer: Checkpointer
    total_steps: int
    data_report: dict
    started: float = field(default_factory=time.perf_counter, init=False)  # the run's start (set by ``start_run``)


def run_state(config: TrainConfig, accelerator, folder: RunFolder, model, items: list, stream=None) -> dict:
    """The data order, the counters and the checkpointer with every common component registered (the data
    position, the data's fingerprint, the counters), as keyword arguments for a recipe's ``Setup``.
    ``stream``: a recipe's own data order (any :class:`Stateful` with ``next_step``); default a :class:`BatchStream`."""
    stream = stream or BatchStream(
        len(items), config.batch_size, config.seed, accelerator.process_index, accelerator.num_processes,
        config.gradient_accumulation_steps,
    )  # fmt: skip
    counters = Counters()
    checkpointer = Checkpointer(accelerator, folder.path, config.keep_checkpoints, model, bool(config.lora))
    checkpointer.register("data", stream)
    checkpointer.register("data_identity", DataIdentity(items, config.data))
    checkpointer.register("counters", counters)
    return {
        "stream": stream,
        "counters": counters,
        "checkpointer": checkpointer,
        "parameters": [p for p in model.parameters() if p.requires_grad],
    }


def resume(s: Run, log) -> int:
    """Restore every registered component from the run folder's checkpoint; the first step to run."""
    first_step = 1
    if s.folder.resume_from is not None:
        first_step = s.checkpointer.load(s.folder.resume_from)["step"] + 1
        saved_step, eval_steps = first_step - 1, s.config.eval_steps
        # An evaluation at the checkpoint's step came after it (and is redone) unless it was a periodic one:
        # the final evaluation of a finished run, or of a run stopped by an alarm.
        periodic = bool(eval_steps) and saved_step % eval_steps == 0 and saved_step != s.total_steps
        log.truncate_after(saved_step, final=not periodic)
        log.info(f"resumed from {s.folder.resume_from} (step {first_step - 1} of {s.total_steps})")
    s.counters.start_clock()
    return first_step


def checkpoint_step(s: Run, step: int, stop, nonfinite: str | None, command: str, force: bool = False):
    """The end of every recipe's optimiser step: agree across processes on a stop signal; checkpoint when due
    (every ``checkpoint_steps``, the last step, a signal, a non-finite batch, or ``force``: the recipe stops
    here); raise :func:`nonfinite_stop` after a non-finite batch. Returns (the checkpoint written or None,
    whether a signal asks to stop: the recipe raises :func:`interrupted` once it has handled its own stops)."""
    signalled = any_across(s.accelerator, bool(stop.signal))
    periodic = s.config.checkpoint_steps and step % s.config.checkpoint_steps == 0
    saved = None
    if periodic or step == s.total_steps or signalled or nonfinite or force:
        saved = s.checkpointer.save(step, s.config.to_dict())
    if nonfinite:
        raise nonfinite_stop(s, nonfinite, saved, command)
    return saved, signalled


def interrupted(s: Run, step: int, stop, saved: Path | None, command: str) -> TrainingInterrupted:
    """Log where a signalled run stopped and how to resume it; the exception that ends it."""
    s.folder.log.info(
        f"stopped by {stop.name or 'a signal to another process'} after step {step}; checkpoint: {saved}\n"
        f"resume with: dpolab {command} {s.folder.path / 'config.yaml'} --resume"
    )
    return TrainingInterrupted(stop.signal or 15)


def nonfinite_stop(s: Run, reason: str, saved: Path, command: str) -> NonFiniteError:
    """The error that ends a run on a non-finite batch, naming it and the checkpoint written after it."""
    config_file = s.folder.path / "config.yaml"
    if not s.config.skip_nonfinite:
        hint = f"to skip such batches: dpolab {command} {config_file} --resume --skip_nonfinite true"
    else:
        hint = f"to allow more: dpolab {command} {config_file} --resume --max_nonfinite N"
    return NonFiniteError(f"{reason}; the batch was not applied; checkpoint: {saved}; {hint}")


def finish_run(s: Run, steps: int, unit: str, metrics: dict, last_eval: dict, **extra) -> dict:
    """The end every recipe shares: save the final model, write summary.json (common keys, then the recipe's
    ``extra``), log the done line. ``unit``: what a step trains on (pairs, examples)."""
    folder, accelerator, counters = s.folder, s.accelerator, s.counters
    if s.config.save_model:
        save_final_model(accelerator, s.model, s.tokenizer, folder.path / "model")
    summary = {
        "steps": steps,
        **{key: extra.pop(key) for key in list(extra) if key in ("stopped_by_alarm", "alarms", "monitor")},
        "resumed_from": str(folder.resume_from) if folder.resume_from else None,
        "processes": accelerator.num_processes,
        "distributed": accelerator.distributed_type.value.lower(),
        "nonfinite_skipped": counters.nonfinite_skipped,
        f"{unit}_seen": counters.items_seen,
        "tokens_seen": counters.tokens_seen,
        "train_seconds": counters.elapsed_seconds,
        "total_seconds": time.perf_counter() - s.started,
        **extra,
        "forward": "naive" if s.fallback else "packed",
        "attention_kernel": None if s.fallback else s.engine.kernel,
        "fallback_reason": s.fallback,
        "final": metrics,
        "eval": last_eval,
        "data": s.data_report,
    }
    write_summary(folder, accelerator, summary)
    seconds = summary["train_seconds"]
    folder.log.info(
        f"done: {steps} steps, {counters.items_seen} {unit} in {seconds:.1f} s "
        f"({counters.items_seen / max(seconds, 1e-9):.1f} {unit}/s); outputs in {folder.path}"
    )
    return summary
