"""The SFT recipe (``dpolab sft``): negative log-likelihood of the completion tokens only.

Read :func:`train` top to bottom: the setup (from the blocks of :mod:`dpolab.train`), then the loop — a step of
micro-batches through :func:`forward_examples` (:func:`dpolab.train.step.train_step`), log, evaluate, checkpoint
(:class:`dpolab.train.loop.Loop`) — then save. An
example goes data/ (``SFTExample`` → ``TokenizedSequence``, one branch per item when packed) →
engine/ (token log-probs) → :func:`dpolab.losses.nll` → here.

The loss is ``loss_params.reduction`` of the ``sft`` loss: ``batch_token_mean`` (the default of
``dpolab sft``: every completion token of the global micro-batch weighs the same, as Hugging Face's
masked cross-entropy), ``token_mean`` or ``sum``. On P processes the token count of the *global*
micro-batch normalises every process's share, so the result equals one process's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from dpolab.data.formats import load_sft_examples
from dpolab.data.tokenize import TokenizedSequence, tokenize_sft
from dpolab.losses import nll
from dpolab.train import evaluation
from dpolab.train.accelerator import compute_dtype
from dpolab.train.config import TrainConfig
from dpolab.train.data_order import MicroBatch, prepare_data, total_steps
from dpolab.train.lifecycle import Run, run_state
from dpolab.train.loop import Loop, start_run
from dpolab.train.models import apply_lora, choose_engine, compile_layers, load_policy
from dpolab.train.run_folder import RunFolder, announce
from dpolab.train.step import Forward, build_optimizer, train_step


@dataclass
class Setup(Run):
    """Everything the loop reads, built by :func:`setup`."""

    reduction: str
    examples: list[TokenizedSequence]
    eval_examples: list[TokenizedSequence]


def forward_examples(s: Setup, examples: list[TokenizedSequence], ids: list[int], mean_length: torch.Tensor) -> Forward:
    """The NLL of ``examples[ids]`` under ``s.reduction`` (``mean_length``: the completion length that
    ``batch_token_mean`` divides by) and the values to log: the loss, the completion log-prob (nats), its per-token
    mean."""
    tokens = s.engine.token_logps(s.model, [examples[i] for i in ids], ids)
    logps = tokens.sums()[:, 0].float()
    lengths = tokens.branch_lengths[:, 0]
    losses = nll(logps, lengths, s.reduction, mean_length)
    metrics = {
        "loss": losses.detach(),
        "logps/completion": logps.detach(),
        "logps/completion_per_token": logps.detach() / lengths.to(logps.dtype),
    }
    return Forward(losses, metrics)


def forward_step(s: Setup, batch: MicroBatch) -> Forward:
    """A training micro-batch; ``batch_token_mean`` divides by the mean completion length of the *global* one."""
    lengths = torch.tensor([len(s.examples[i].completion_ids) for i in batch.global_ids], dtype=torch.float32)
    return forward_examples(s, s.examples, batch.ids, lengths.mean().to(s.accelerator.device))


def evaluate(s: Setup, step: int) -> dict:
    """Held-out loss and log-probs (prefix ``eval/``), each process a shard, reduced."""
    # token mean over the whole held-out set, whatever the batching
    lengths = torch.tensor([len(e.completion_ids) for e in s.eval_examples], dtype=torch.float32)
    mean_length = lengths.mean().to(s.accelerator.device) if s.eval_examples else None

    def forward(ids: list[int], real: bool) -> Forward:
        return forward_examples(s, s.eval_examples, ids, mean_length)

    return evaluation.evaluate(s, step, len(s.eval_examples), forward, {"loss": "loss"})


def setup(config: TrainConfig, accelerator, folder: RunFolder) -> Setup:
    """Data, policy, optimiser, data order, checkpointer: the recipe's setup."""
    announce(folder, accelerator, config, "sft")
    data = prepare_data(config, accelerator, folder, load_sft_examples, tokenize_sft)
    model = load_policy(config)
    dtype = compute_dtype(accelerator, model.dtype)
    items, log = data.items, folder.log

    if config.lora:
        model = apply_lora(model, config.lora)
    model.to(accelerator.device)
    engine, fallback = choose_engine(config, model, items, data.pad_token_id, accelerator, dtype, log)
    compile_layers(config, model, log)
    steps = total_steps(config, len(items), accelerator.num_processes)
    optimizer, scheduler = build_optimizer(config, model, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    return Setup(
        config=config, accelerator=accelerator, folder=folder, model=model, tokenizer=data.tokenizer,
        optimizer=optimizer, scheduler=scheduler, engine=engine, fallback=fallback, total_steps=steps,
        data_report=data.report, reduction=config.sft_reduction, examples=items, eval_examples=data.eval_items,
        **run_state(config, accelerator, folder, model, items),
    )  # fmt: skip


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    """Supervised fine-tuning with ``config``; returns the summary (also written to output_dir/summary.json).

    ``resume`` and ``overwrite`` as in :func:`dpolab.train.preference.train`.
    """
    with start_run(config, resume, overwrite, setup) as s:
        loop = Loop(s, "sft", partial(evaluate, s))
        with loop:
            for step in loop.steps():
                result = train_step(s, step, s.examples, partial(forward_step, s), "examples")
                loop.record(step, result.metrics, shown={"loss": result.metrics.get("loss", float("nan"))})
                loop.end_step(step, result.nonfinite)
        return loop.finish("examples")
