"""The reward-model recipe (``dpolab rm``): the Bradley–Terry loss on a scalar score of each completion.

Read :func:`train` top to bottom: the setup (from the blocks of :mod:`dpolab.train`), then the loop — a step of
micro-batches through :func:`forward_pairs` (:func:`dpolab.train.step.train_step`), log, evaluate, checkpoint
(:class:`dpolab.train.loop.Loop`) — then save. A pair
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

from dataclasses import dataclass
from functools import partial

import torch

from dpolab.data.formats import load_examples
from dpolab.data.tokenize import TokenizedPair, tokenize_pairs
from dpolab.engine.scores import ScoreEngine
from dpolab.losses import get_loss, reward_model
from dpolab.train import evaluation
from dpolab.train.accelerator import compute_dtype
from dpolab.train.config import TrainConfig
from dpolab.train.data_order import MicroBatch, prepare_data, total_steps
from dpolab.train.distributed import max_across
from dpolab.train.lifecycle import Run, run_state
from dpolab.train.loop import NO_MODEL, Loop, start_run
from dpolab.train.models import apply_lora, choose_score_engine, compile_layers, load_scalar_model
from dpolab.train.run_folder import RunFolder, announce
from dpolab.train.step import Forward, build_optimizer, train_step

HEADLINE = {"loss": "loss", "rewards/accuracies": "accuracy", "rewards/margins": "margin"}


@dataclass
class Setup(Run):
    """Everything the loop reads, built by :func:`setup`."""

    center_coefficient: float
    pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]


def margins(pairs: list[TokenizedPair], ids: list[int], device) -> torch.Tensor | None:
    """The ``margin`` column of ``pairs[ids]`` (0 where a row has none); None when no pair has one."""
    values = [pairs[i].margin for i in ids]
    if all(value is None for value in values):
        return None
    return torch.tensor([0.0 if value is None else value for value in values], device=device)


def forward_pairs(s: Setup, pairs: list[TokenizedPair], ids: list[int]) -> Forward:
    """Scores of chosen and rejected of ``pairs[ids]`` (one packed pass), the per-pair loss and the values to log
    (rewards are the raw scores r(x, y)); kept: [max score, −min score], for :func:`extremes`."""
    engine: ScoreEngine = s.engine
    raw = engine.scores(s.model, [pairs[i] for i in ids], ids)
    # A blown-up model gives NaN/inf scores, which the loss's input check refuses: compute on finite stand-ins,
    # then poison the losses (+ 0 × Σ raw: NaN if any is not finite, no host sync) for the loop's non-finite guard.
    scores = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
    result = reward_model(scores[:, 0], scores[:, 1], margins(pairs, ids, scores.device), s.center_coefficient)
    losses = result.losses + 0.0 * raw.detach().sum()
    scored = raw.detach()
    chosen, rejected = scored[:, 0], scored[:, 1]
    metrics = {
        "loss": losses.detach(),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/mean": (chosen + rejected) / 2,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "reward_centring": result.terms["reward_centring"],
    }
    return Forward(losses, metrics, kept=[float(scored.max()), float(-scored.min())])


def extremes(accelerator, kept: list[list[float]]) -> dict[str, float]:
    """``rewards/max`` and ``rewards/min`` over every process's real micro-batches (a collective)."""
    top, negated_bottom = max_across(accelerator, [max([k[i] for k in kept], default=-float("inf")) for i in (0, 1)])
    return {"rewards/max": top, "rewards/min": -negated_bottom}


def forward_step(s: Setup, batch: MicroBatch) -> Forward:
    return forward_pairs(s, s.pairs, batch.ids)


def evaluate(s: Setup, step: int) -> dict:
    """Held-out metrics (prefix ``eval/``), each process a shard, reduced."""

    def forward(ids: list[int], real: bool) -> Forward:
        return forward_pairs(s, s.eval_pairs, ids)

    return evaluation.evaluate(s, step, len(s.eval_pairs), forward, HEADLINE, partial(extremes, s.accelerator))


def setup(config: TrainConfig, accelerator, folder: RunFolder) -> Setup:
    """Data, the model with its score head, optimiser, data order, checkpointer: the recipe's setup."""
    announce(folder, accelerator, config, "rm")
    data = prepare_data(config, accelerator, folder, load_examples, tokenize_pairs)
    tokenizer, pad_token_id = data.tokenizer, data.pad_token_id
    model = load_scalar_model(config, pad_token_id, folder.log)
    dtype = compute_dtype(accelerator, model.dtype)
    pairs = data.items
    margins_given = sum(p.margin is not None for p in pairs)
    if margins_given:
        folder.log.info(f"data: {margins_given} of {len(pairs)} pairs have a margin (the others: 0)")

    if config.lora:
        model = apply_lora(model, config.lora, task_type="SEQ_CLS")
    model.to(accelerator.device)
    engine, fallback = choose_score_engine(config, model, pairs, pad_token_id, accelerator, dtype, folder.log)
    compile_layers(config, model, folder.log)
    steps = total_steps(config, len(pairs), accelerator.num_processes)
    optimizer, scheduler = build_optimizer(config, model, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    center_coefficient = float(get_loss("reward_model").check_params(config.loss_params)["center_coefficient"])

    return Setup(
        config=config, accelerator=accelerator, folder=folder, model=model, tokenizer=tokenizer,
        optimizer=optimizer, scheduler=scheduler, engine=engine, fallback=fallback, total_steps=steps,
        data_report=data.report, center_coefficient=center_coefficient, pairs=pairs, eval_pairs=data.eval_items,
        **run_state(config, accelerator, folder, model, pairs),
    )  # fmt: skip


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    """Train a reward model with ``config``; returns the summary (also written to output_dir/summary.json).

    ``resume`` and ``overwrite`` as in :func:`dpolab.train.preference.train`.
    """
    with start_run(config, resume, overwrite, setup) as s:
        loop = Loop(s, "rm", partial(evaluate, s), harness_model=NO_MODEL)
        with loop:
            for step in loop.steps():
                forward = partial(forward_step, s)
                result = train_step(s, step, s.pairs, forward, "pairs", partial(extremes, s.accelerator))
                metrics = result.metrics
                loop.record(step, metrics, shown={"loss": metrics["loss"], "accuracy": metrics["rewards/accuracies"]})
                loop.end_step(step, result.nonfinite)
        return loop.finish("pairs")
