"""The reward-model recipe (``dpolab rm``): the Bradley–Terry loss on a scalar score of each completion.

Read :func:`train` top to bottom: set up (blocks from :mod:`dpolab.train.blocks`), then the loop —
micro-batches (forward, loss, backward), clip, step, log, evaluate, checkpoint — then save. A pair
goes data/ (tokenise, pack: [prompt | chosen | rejected], one pass for both) → engine/ (the score head
at the last token of each branch, :mod:`dpolab.engine.scores`) → :func:`dpolab.losses.reward_model`
→ here.

The loss of a pair is −log σ(r(x, y_w) − r(x, y_l) − m) + c·(r(x, y_w) + r(x, y_l))² (Ouyang et al.
2022; 3D paper Eq. 3), with the row's ``margin`` column as m (0 where absent) and
``loss_params.center_coefficient`` as c (TRL's ``center_rewards_coefficient``). On P processes each
process scales its summed loss by P / (pairs in the global micro-batch), so the gradient that DDP or
FSDP averages equals the one-process gradient (TRL's mean over the batch). Metrics are sums over every
process; ``rewards/min`` and ``rewards/max`` are extremes over every process.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dpolab.console import progress_bar
from dpolab.data.formats import load_examples
from dpolab.data.tokenize import TokenizedPair, tokenize_pairs
from dpolab.engine.scores import ScoreEngine
from dpolab.losses import LossOutput, get_loss, reward_model
from dpolab.train import blocks
from dpolab.train.config import TrainConfig
from dpolab.train.distributed import max_across
from dpolab.train.guard import catch_stop_signals


@dataclass
class Setup(blocks.Run):
    """Everything the loop reads, built by :func:`setup`."""

    center_coefficient: float
    pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]


@dataclass
class ScoreForward:
    """One micro-batch through the score head and the Bradley–Terry loss."""

    losses: torch.Tensor  # (B,)
    scores: torch.Tensor  # (B, 2): chosen, rejected (detached)
    result: LossOutput


def margins(pairs: list[TokenizedPair], ids: list[int], device) -> torch.Tensor | None:
    """The ``margin`` column of ``pairs[ids]`` (0 where a row has none); None when no pair has one."""
    values = [pairs[i].margin for i in ids]
    if all(value is None for value in values):
        return None
    return torch.tensor([0.0 if value is None else value for value in values], device=device)


def forward_pairs(s: Setup, model, pairs: list[TokenizedPair], ids: list[int]) -> ScoreForward:
    """Scores of chosen and rejected of ``pairs[ids]`` (one packed pass) and the per-pair loss."""
    engine: ScoreEngine = s.engine
    raw = engine.scores(model, [pairs[i] for i in ids], ids)
    # A blown-up model gives NaN/inf scores, which the loss's input check refuses: compute on finite stand-ins,
    # then poison the losses (+ 0 × Σ raw: NaN if any is not finite, no host sync) for the loop's non-finite guard.
    scores = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
    result = reward_model(scores[:, 0], scores[:, 1], margins(pairs, ids, scores.device), s.center_coefficient)
    return ScoreForward(result.losses + 0.0 * raw.detach().sum(), raw.detach(), result)


def pair_metrics(forward: ScoreForward) -> dict[str, torch.Tensor]:
    """Per-pair values to log (each averaged over the step's pairs). Rewards are the raw scores r(x, y)."""
    chosen, rejected = forward.scores[:, 0], forward.scores[:, 1]
    return {
        "loss": forward.losses.detach(),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/mean": (chosen + rejected) / 2,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "reward_centring": forward.result.terms["reward_centring"],
    }


def extremes(forward: ScoreForward) -> list[float]:
    """[max score, −min score] of a micro-batch, for :func:`max_across`."""
    return [float(forward.scores.max()), float(-forward.scores.min())]


def reduced_extremes(accelerator, running: list[float]) -> dict[str, float]:
    """``rewards/max`` and ``rewards/min`` over every process's micro-batches."""
    top, negated_bottom = max_across(accelerator, running)
    return {"rewards/max": top, "rewards/min": -negated_bottom}


def evaluate(s: Setup, step: int) -> dict:
    """Held-out metrics (prefix ``eval/``), each process a shard, reduced."""
    if not s.eval_pairs:
        return {}
    s.model.eval()
    sums: dict[str, float] = {}
    count, running = 0, [-float("inf"), -float("inf")]
    batches = blocks.shard_batches(
        len(s.eval_pairs), s.config.batch_size, s.accelerator.process_index, s.accelerator.num_processes
    )
    with torch.no_grad():
        for ids, real in batches:
            with s.accelerator.autocast():
                forward = forward_pairs(s, s.model, s.eval_pairs, ids)
            blocks.add_sums(sums, pair_metrics(forward), real)
            if real:
                count += len(ids)
                running = [max(a, b) for a, b in zip(running, extremes(forward), strict=True)]
    s.model.train()
    values = blocks.reduced_means(s.accelerator, sums, count)
    values.update(reduced_extremes(s.accelerator, running))
    values = {f"eval/{name}": value for name, value in values.items()}
    s.folder.log.write(step, values)
    s.folder.log.info(
        f"eval at step {step}: loss {values['eval/loss']:.4f}, accuracy {values['eval/rewards/accuracies']:.4f}, "
        f"margin {values['eval/rewards/margins']:.4f}"
    )
    return values


def setup(config: TrainConfig, accelerator, folder: blocks.RunFolder) -> Setup:
    """Data, the model with its score head, optimiser, data order, checkpointer: the recipe's setup."""
    blocks.announce(folder, accelerator, config, "rm")
    data = blocks.prepare_data(config, accelerator, folder, load_examples, tokenize_pairs)
    tokenizer, pad_token_id = data.tokenizer, data.pad_token_id
    model = blocks.load_scalar_model(config, pad_token_id, folder.log)
    dtype = blocks.compute_dtype(accelerator, model.dtype)
    pairs = data.items
    margins_given = sum(p.margin is not None for p in pairs)
    if margins_given:
        folder.log.info(f"data: {margins_given} of {len(pairs)} pairs have a margin (the others: 0)")

    if config.lora:
        model = blocks.apply_lora(model, config.lora, task_type="SEQ_CLS")
    model.to(accelerator.device)
    engine, fallback = blocks.choose_score_engine(config, model, pairs, pad_token_id, accelerator, dtype, folder.log)
    blocks.compile_layers(config, model, folder.log)
    steps = blocks.total_steps(config, len(pairs), accelerator.num_processes)
    optimizer, scheduler = blocks.build_optimizer(config, model, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    center_coefficient = float(get_loss("reward_model").check_params(config.loss_params)["center_coefficient"])

    return Setup(
        config=config, accelerator=accelerator, folder=folder, model=model, tokenizer=tokenizer,
        optimizer=optimizer, scheduler=scheduler, engine=engine, fallback=fallback, total_steps=steps,
        data_report=data.report, center_coefficient=center_coefficient, pairs=pairs, eval_pairs=data.eval_items,
        **blocks.run_state(config, accelerator, folder, model, pairs),
    )  # fmt: skip


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    """Train a reward model with ``config``; returns the summary (also written to output_dir/summary.json).

    ``resume`` and ``overwrite`` as in :func:`dpolab.train.preference.train`.
    """
    config.validate()
    config = config.with_absolute_paths()  # config.yaml and checkpoints then resume from any directory
    start_time = time.perf_counter()
    accelerator = blocks.make_accelerator(config)
    with blocks.open_run(config, accelerator, resume, overwrite) as folder:
        s = setup(config, accelerator, folder)
        log, model, processes = folder.log, s.model, accelerator.num_processes
        first_step = blocks.resume(s, log)
        model.train()
        last_eval, metrics = {}, {}
        show = config.progress and accelerator.is_main_process
        with catch_stop_signals() as stop, progress_bar(show, "training", s.total_steps, show_metrics=True) as bar:
            bar(0, completed=first_step - 1)
            for step in range(first_step, s.total_steps + 1):
                sums: dict[str, float] = {}
                step_pairs = step_tokens = 0
                step_rows, finite, running = [], True, [-float("inf"), -float("inf")]
                step_batches = s.stream.next_step()
                for micro, batch in enumerate(step_batches):
                    last = micro == len(step_batches) - 1
                    with nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
                        forward = forward_pairs(s, model, s.pairs, batch.ids)
                        # Σ local losses × P / (pairs in the global micro-batch): DDP's average is the global mean.
                        share = processes / (len(batch.global_ids) * len(step_batches))
                        accelerator.backward(forward.losses.sum() * share * float(batch.real))
                    finite = finite and bool(torch.isfinite(forward.losses).all())
                    blocks.add_sums(sums, pair_metrics(forward), batch.real)
                    if batch.real:
                        step_pairs += len(batch.ids)
                        step_tokens += sum(s.pairs[i].unique_tokens for i in batch.ids)
                        step_rows += [s.pairs[i].row for i in batch.ids]
                        running = [max(a, b) for a, b in zip(running, extremes(forward), strict=True)]
                grad_norm, learning_rate, nonfinite = blocks.optimizer_step(s, step, finite, step_rows)

                metrics = blocks.reduced_means(accelerator, sums, step_pairs)
                metrics.update(reduced_extremes(accelerator, running))
                metrics.update(grad_norm=grad_norm, learning_rate=learning_rate, epoch=batch.epoch + 1)
                metrics.update(blocks.throughput(s, step_pairs, step_tokens, "pairs"))
                if step % config.logging_steps == 0 or step == s.total_steps:
                    log.write(step, metrics)
                bar(1, loss=metrics["loss"], accuracy=metrics["rewards/accuracies"])
                if config.eval_steps and step % config.eval_steps == 0 and step != s.total_steps:
                    last_eval = evaluate(s, step)
                saved, signalled = blocks.checkpoint_step(s, step, stop, nonfinite, "rm")
                if signalled:
                    raise blocks.interrupted(s, step, stop, saved, "rm")
        last_eval = evaluate(s, s.total_steps) or last_eval

        return blocks.finish_run(s, s.total_steps, "pairs", start_time, metrics, last_eval)
