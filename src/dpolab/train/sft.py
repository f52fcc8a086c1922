"""The SFT recipe (``dpolab sft``): negative log-likelihood of the completion tokens only.

Read :func:`train` top to bottom: set up (blocks from :mod:`dpolab.train.blocks`), then the loop —
micro-batches (forward, loss, backward), clip, step, log, evaluate, checkpoint — then save. An
example goes data/ (``SFTExample`` → ``TokenizedSequence``, one branch per item when packed) →
engine/ (token log-probs) → :func:`dpolab.losses.nll` → here.

The loss is ``loss_params.reduction`` of the ``sft`` loss: ``batch_token_mean`` (the default of
``dpolab sft``: every completion token of the global micro-batch weighs the same, as Hugging Face's
masked cross-entropy), ``token_mean`` or ``sum``. On P processes the token count of the *global*
micro-batch normalises every process's share, so the result equals one process's.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dpolab.console import progress_bar
from dpolab.data.formats import load_sft_examples
from dpolab.data.tokenize import TokenizedSequence, tokenize_sft
from dpolab.engine.logps import LogpEngine
from dpolab.losses import nll
from dpolab.train import blocks
from dpolab.train.config import TrainConfig
from dpolab.train.guard import catch_stop_signals


@dataclass
class Setup(blocks.Run):
    """Everything the loop reads, built by :func:`setup`."""

    reduction: str
    examples: list[TokenizedSequence]
    eval_examples: list[TokenizedSequence]


def forward_examples(
    model, engine: LogpEngine, reduction: str, examples: list[TokenizedSequence], ids: list[int], mean_length
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example NLL under ``reduction``, summed completion log-probs) of ``examples[ids]``."""
    tokens = engine.token_logps(model, [examples[i] for i in ids], ids)
    logps = tokens.sums()[:, 0].float()
    return nll(logps, tokens.branch_lengths[:, 0], reduction, mean_length), logps


def example_metrics(losses: torch.Tensor, logps: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example values to log: the loss, the completion log-prob (nats) and its per-token mean."""
    return {
        "loss": losses.detach(),
        "logps/completion": logps.detach(),
        "logps/completion_per_token": logps.detach() / lengths.to(logps.dtype),
    }


def evaluate(s: Setup, step: int) -> dict:
    """Held-out loss and log-probs (prefix ``eval/``), each process a shard, reduced."""
    if not s.eval_examples:
        return {}
    s.model.eval()
    sums: dict[str, float] = {}
    count = 0
    lengths = torch.tensor([len(e.completion_ids) for e in s.eval_examples], dtype=torch.float32)
    batches = blocks.shard_batches(
        len(s.eval_examples), s.config.batch_size, s.accelerator.process_index, s.accelerator.num_processes
    )
    with torch.no_grad():
        for ids, real in batches:
            with s.accelerator.autocast():
                # token mean over the whole held-out set, whatever the batching
                losses, logps = forward_examples(s.model, s.engine, s.reduction, s.eval_examples, ids, lengths.mean())
            blocks.add_sums(sums, example_metrics(losses, logps, lengths[ids]), real)
            count += len(ids) if real else 0
    s.model.train()
    values = {f"eval/{name}": value for name, value in blocks.reduced_means(s.accelerator, sums, count).items()}
    s.folder.log.write(step, values)
    s.folder.log.info(f"eval at step {step}: loss {values.get('eval/loss', float('nan')):.4f}")
    return values


def setup(config: TrainConfig, accelerator, folder: blocks.RunFolder) -> Setup:
    """Data, policy, optimiser, data order, checkpointer: the recipe's setup."""
    blocks.announce(folder, accelerator, config, "sft")
    data = blocks.prepare_data(config, accelerator, folder, load_sft_examples, tokenize_sft)
    tokenizer, pad_token_id = data.tokenizer, data.pad_token_id
    model = blocks.load_policy(config)
    dtype = blocks.compute_dtype(accelerator, model.dtype)
    items, log = data.items, folder.log

    if config.lora:
        model = blocks.apply_lora(model, config.lora)
    model.to(accelerator.device)
    engine, fallback = blocks.choose_engine(config, model, items, pad_token_id, accelerator, dtype, log)
    blocks.compile_layers(config, model, log)
    steps = blocks.total_steps(config, len(items), accelerator.num_processes)
    optimizer, scheduler = blocks.build_optimizer(config, model, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    return Setup(
        config=config, accelerator=accelerator, folder=folder, model=model, tokenizer=tokenizer,
        optimizer=optimizer, scheduler=scheduler, engine=engine, fallback=fallback, total_steps=steps,
        data_report=data.report, reduction=sft_reduction(config), examples=items, eval_examples=data.eval_items,
        **blocks.run_state(config, accelerator, folder, model, items),
    )  # fmt: skip


def sft_reduction(config: TrainConfig) -> str:
    return config.sft_reduction


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    """Supervised fine-tuning with ``config``; returns the summary (also written to output_dir/summary.json).

    ``resume`` and ``overwrite`` as in :func:`dpolab.train.preference.train`.
    """
    config.validate()
    config = config.with_absolute_paths()  # config.yaml and checkpoints then resume from any directory
    start_time = time.perf_counter()
    accelerator = blocks.make_accelerator(config)
    with blocks.open_run(config, accelerator, resume, overwrite) as folder:
        s = setup(config, accelerator, folder)
        harness = blocks.harness_evaluator(config, accelerator, folder, s.tokenizer)
        log, model, processes = folder.log, s.model, accelerator.num_processes
        first_step = blocks.resume(s, log)
        model.train()
        last_eval, metrics = {}, {}
        show = config.progress and accelerator.is_main_process
        with catch_stop_signals() as stop, progress_bar(show, "training", s.total_steps, show_metrics=True) as bar:
            bar(0, completed=first_step - 1)
            for step in range(first_step, s.total_steps + 1):
                sums: dict[str, float] = {}
                step_examples = step_tokens = 0
                step_rows, finite = [], True
                step_batches = s.stream.next_step()
                for micro, batch in enumerate(step_batches):
                    global_lengths = torch.tensor([len(s.examples[i].completion_ids) for i in batch.global_ids])
                    last = micro == len(step_batches) - 1
                    with nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
                        losses, logps = forward_examples(
                            model, s.engine, s.reduction, s.examples, batch.ids,
                            global_lengths.float().mean().to(accelerator.device),
                        )  # fmt: skip
                        # Σ local losses × P / (examples in the global micro-batch): DDP's average is the global mean.
                        share = processes / (len(batch.global_ids) * len(step_batches))
                        accelerator.backward(losses.sum() * share * float(batch.real))
                    finite = finite and bool(torch.isfinite(losses).all())
                    lengths = torch.tensor([len(s.examples[i].completion_ids) for i in batch.ids])
                    blocks.add_sums(sums, example_metrics(losses, logps, lengths.to(logps.device)), batch.real)
                    if batch.real:
                        step_examples += len(batch.ids)
                        step_tokens += sum(s.examples[i].unique_tokens for i in batch.ids)
                        step_rows += [s.examples[i].row for i in batch.ids]
                grad_norm, learning_rate, nonfinite = blocks.optimizer_step(s, step, finite, step_rows)

                metrics = blocks.reduced_means(accelerator, sums, step_examples)
                metrics.update(grad_norm=grad_norm, learning_rate=learning_rate, epoch=batch.epoch + 1)
                metrics.update(blocks.throughput(s, step_examples, step_tokens, "examples"))
                if step % config.logging_steps == 0 or step == s.total_steps:
                    log.write(step, metrics)
                bar(1, loss=metrics.get("loss", float("nan")))
                if config.eval_steps and step % config.eval_steps == 0 and step != s.total_steps:
                    last_eval = evaluate(s, step)
                if harness and harness.periodic(step) and step != s.total_steps:
                    harness.evaluate(step, model)
                saved, signalled = blocks.checkpoint_step(s, step, stop, nonfinite, "sft")
                if signalled:
                    raise blocks.interrupted(s, step, stop, saved, "sft")
        last_eval = evaluate(s, s.total_steps) or last_eval
        harness_values = harness.evaluate(s.total_steps, model) if harness else None

        return blocks.finish_run(s, s.total_steps, "examples", start_time, metrics, last_eval, harness=harness_values)
