"""The preference recipe (``dpolab train``): any loss of :mod:`dpolab.losses` on prompt/chosen/rejected pairs.

Read :func:`train` top to bottom: the setup (from the blocks of :mod:`dpolab.train`; the reference pass and LD-DPO's
token weights are this recipe's own), then the loop — a step of micro-batches through :func:`forward_pairs`
(:func:`dpolab.train.step.train_step`), the 3D monitor, log, evaluate, checkpoint (:class:`dpolab.train.loop.Loop`)
— then save.
One pair goes data/ (tokenise, pack) → engine/ (token log-probs) → losses.py (the objective) → here.

On P processes each optimiser step sees the same pairs as one process with ``batch_size × P``; each
process scales its summed loss by P / (pairs in the global micro-batch), so the gradient that DDP or
FSDP averages equals the one-process gradient. Metrics are sums over every process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from dpolab.console import progress_bar
from dpolab.data.formats import load_examples
from dpolab.data.packing import Item
from dpolab.data.tokenize import TokenizedPair, tokenize_pairs
from dpolab.engine.logps import LogpEngine, TokenLogps
from dpolab.engine.reference import (
    cache_key,
    compute_reference_logps,
    items_fingerprint,
    load_cached,
    store_cached,
    weights_fingerprint,
)
from dpolab.losses import LossOutput, Objective, PreferenceLogps, objective_from_config, wpo_pair_weights
from dpolab.settings import MonitorSettings
from dpolab.train import evaluation
from dpolab.train.accelerator import compute_dtype
from dpolab.train.config import TrainConfig
from dpolab.train.data_order import MicroBatch, prepare_data, shard_batches, total_steps
from dpolab.train.distributed import broadcast_object, gather_rows
from dpolab.train.lifecycle import Run, run_state
from dpolab.train.loop import Loop, start_run
from dpolab.train.metrics import MetricsLog
from dpolab.train.models import apply_lora, choose_engine, compile_layers, load_policy, load_reference
from dpolab.train.monitor import Monitor
from dpolab.train.probes import gradient_split_and_likelihood, sample_probe
from dpolab.train.run_folder import RunFolder, announce
from dpolab.train.step import Forward, build_optimizer, train_step

HEADLINE = {"loss": "loss", "rewards/accuracies": "accuracies", "rewards/margins": "margins"}  # the eval log line
BAR = ("loss", "rewards/margins", "rewards/accuracies")  # the progress bar
LOGPS_COLUMNS = (
    6  # policy chosen, policy rejected, reference chosen, reference rejected, chosen tokens, rejected tokens
)


@dataclass
class PairForward:
    """One micro-batch through the policy and the objective."""

    losses: torch.Tensor  # (B,) per-pair, with WPO's weights
    inputs: PreferenceLogps
    result: LossOutput


def forward_pairs(
    s: Setup,
    model,
    pairs: list[TokenizedPair],
    ids: list[int],
    reference: torch.Tensor | None,
    batch_mean_chosen_length: torch.Tensor | None = None,
) -> PairForward:
    """Policy log-probs of ``pairs[ids]`` (LD-DPO token weights applied), the objective, WPO's pair weights."""
    use_weighting, token_weights = s.config.use_weighting, s.token_weights
    tokens = s.engine.token_logps(model, [pairs[i] for i in ids], ids, with_log_sum_sq=use_weighting)
    raw_sums = tokens.sums(token_weights(tokens) if token_weights else None).float()
    # A blown-up policy gives NaN/inf log-probs, which the objective's input check refuses: compute on finite
    # stand-ins (the same values when finite), then poison the losses (+ 0 × Σ raw: NaN if any is not finite,
    # exactly 0 otherwise, no host sync) so the loop's non-finite guard stops or skips, naming step and rows.
    sums = torch.nan_to_num(raw_sums, nan=0.0, posinf=0.0, neginf=0.0)
    lengths = tokens.branch_lengths
    reference_ids = None if reference is None else reference[ids].to(sums.device)
    inputs = PreferenceLogps(
        sums[:, 0],
        sums[:, 1],
        None if reference_ids is None else reference_ids[:, 0],
        None if reference_ids is None else reference_ids[:, 1],
        lengths[:, 0],
        lengths[:, 1],
        batch_mean_chosen_length,
    )
    result = s.objective(inputs)
    losses = result.losses
    if use_weighting:
        aligned = TokenLogps(tokens.values.detach() - tokens.log_sum_sq, tokens.sequence, tokens.index, lengths).sums()
        losses = losses * wpo_pair_weights(aligned[:, 0], aligned[:, 1], lengths[:, 0], lengths[:, 1])
    return PairForward(losses + 0.0 * raw_sums.detach().sum(), inputs, result)


def pair_metrics(forward: PairForward) -> dict[str, torch.Tensor]:
    """Per-pair values to log (each averaged over the step's pairs)."""
    inputs, result = forward.inputs, forward.result
    metrics = {
        "loss": forward.losses.detach(),
        "logps/chosen": inputs.policy_chosen_logps.detach(),
        "logps/rejected": inputs.policy_rejected_logps.detach(),
        "rewards/chosen": result.chosen_rewards,
        "rewards/rejected": result.rejected_rewards,
        "rewards/margins": result.chosen_rewards - result.rejected_rewards,
        "rewards/accuracies": (result.chosen_rewards > result.rejected_rewards).float(),
    }
    if inputs.reference_chosen_logps is not None:
        metrics["logratio/chosen"] = inputs.policy_chosen_logps.detach() - inputs.reference_chosen_logps
        metrics["logratio/rejected"] = inputs.policy_rejected_logps.detach() - inputs.reference_rejected_logps
    metrics.update(result.terms)
    return metrics


def logps_rows(inputs: PreferenceLogps) -> torch.Tensor:
    columns = [inputs.policy_chosen_logps, inputs.policy_rejected_logps]
    if inputs.reference_chosen_logps is not None:
        columns += [inputs.reference_chosen_logps, inputs.reference_rejected_logps]
    else:
        columns += [torch.zeros_like(columns[0])] * 2
    columns += [inputs.chosen_lengths.to(columns[0].dtype), inputs.rejected_lengths.to(columns[0].dtype)]
    return torch.stack([c.detach().float() for c in columns], 1)


def logps_from_rows(rows: torch.Tensor, has_reference: bool) -> PreferenceLogps:
    return PreferenceLogps(
        rows[:, 0],
        rows[:, 1],
        rows[:, 2] if has_reference else None,
        rows[:, 3] if has_reference else None,
        rows[:, 4].long(),
        rows[:, 5].long(),
    )


def pair_forward(s: Setup, pairs: list[TokenizedPair], ids: list[int], reference, mean_chosen_length) -> Forward:
    """:func:`forward_pairs` as the shared step and evaluation read it; kept: the monitor's rows."""
    out = forward_pairs(s, s.model, pairs, ids, reference, mean_chosen_length)
    return Forward(out.losses, pair_metrics(out), logps_rows(out.inputs) if s.monitor is not None else None)


def forward_step(s: Setup, batch: MicroBatch) -> Forward:
    """A training micro-batch; batch_token_mean reductions divide by the mean chosen length of the *global* one."""
    lengths = torch.tensor([len(s.pairs[i].chosen_ids) for i in batch.global_ids])
    return pair_forward(s, s.pairs, batch.ids, s.reference, lengths.float().mean().to(s.accelerator.device))


def evaluate(s: Setup, step: int) -> dict:
    """Held-out metrics (prefix ``eval/``), each process a shard, reduced."""
    # batch_token_mean reductions: token-weighted over the whole held-out set, however it is split
    lengths = torch.tensor([len(p.chosen_ids) for p in s.eval_pairs], dtype=torch.float32)
    mean_chosen_length = lengths.mean().to(s.accelerator.device) if s.eval_pairs else None

    def forward(ids: list[int], real: bool) -> Forward:
        return pair_forward(s, s.eval_pairs, ids, s.eval_reference, mean_chosen_length)

    return evaluation.evaluate(s, step, len(s.eval_pairs), forward, HEADLINE)


def monitor_step(s: Setup, step: int, metrics: dict, kept: list[torch.Tensor]) -> list[dict]:
    """The 3D monitor after a step: its metrics over every process's pairs (added to ``metrics``), the probes when
    due; the new alarms."""
    rows = gather_rows(s.accelerator, torch.cat(kept) if kept else torch.zeros(0, LOGPS_COLUMNS))
    metrics.update(s.monitor.step_metrics(s.objective, logps_from_rows(rows, s.reference is not None)))
    probe_steps = s.monitor_settings.probe_steps
    if probe_steps > 0 and (step == 1 or step % probe_steps == 0):
        metrics.update(run_probes(s, step))
    return s.monitor.update(step, metrics)


def run_probes(s: Setup, step: int) -> dict[str, float]:
    values = gradient_split_and_likelihood(
        s.accelerator, s.model, s.objective, s.probe_pairs, s.probe_reference, s.engine
    )
    blown_up = math.isnan(values["monitor/param_grad_norm_chosen"])  # agreed by every process
    if s.monitor_settings.sample_prompts > 0 and not blown_up:
        unwrapped = s.accelerator.unwrap_model(s.model)
        lora_reference = bool(s.config.lora) and s.reference_model is None
        values.update(
            sample_probe(
                unwrapped,
                s.reference_model,
                [p.prompt_ids for p in s.probe_pairs[: s.monitor_settings.sample_prompts]],
                s.monitor_settings.sample_tokens,
                s.engine.pad_token_id,
                s.tokenizer.eos_token_id,
                s.config.seed + step,
                s.accelerator.device,
                reference_context=unwrapped.disable_adapter if lora_reference else nullcontext,
                # under FSDP every token is a collective forward: processes keep generating until all are done
                synced=s.accelerator.distributed_type.value == "FSDP",
            )
        )
    s.monitor.record_probe(step, values)
    return values


def token_weight_fn(config: TrainConfig):
    """LD-DPO token weights as a function of a micro-batch's token log-probs (None without ``ld_alpha``)."""
    if config.ld_alpha is None:
        return None
    from dpolab.losses import ld_dpo_token_weights

    def weights(tokens: TokenLogps) -> torch.Tensor:
        shared = tokens.branch_lengths.min(dim=1).values[tokens.sequence // tokens.branch_lengths.shape[1]]
        return ld_dpo_token_weights(tokens.index, shared, config.ld_alpha)

    return weights


def reference_pass(
    accelerator,
    module,
    items: list[Item],
    engine: LogpEngine,
    config: TrainConfig,
    name: str,
    settings: dict,
    token_weights=None,
    adapter_off=nullcontext,
    log: MetricsLog | None = None,
) -> torch.Tensor:
    """Reference log-probs of every item, (items, branches): read from the cache, or computed — each process
    a shard — gathered, and cached by the main process."""
    with adapter_off():
        key = cache_key(weights_fingerprint(accelerator.unwrap_model(module)), items_fingerprint(items), settings)
        hit = broadcast_object(accelerator, load_cached(config.cache_dir, key) is not None)
        if hit:
            values = load_cached(config.cache_dir, key)
        else:
            batches = shard_batches(len(items), config.batch_size, accelerator.process_index, accelerator.num_processes)
            rows = []
            show = config.progress and accelerator.is_main_process
            with progress_bar(show, f"reference log-probs ({name})", len(batches)) as advance:
                for ids, real in batches:
                    sums = compute_reference_logps(
                        module, items, ids, len(ids), engine, token_weights, accelerator.autocast
                    )
                    if real:
                        # float64: item indices stay exact far beyond float32's 2^24
                        index = torch.tensor(ids, dtype=torch.float64)[:, None]
                        rows.append(torch.cat([index, sums.double()], dim=1))
                    advance()
            local = torch.cat(rows) if rows else torch.zeros(0, 1 + len(items[0].branches), dtype=torch.float64)
            gathered = gather_rows(accelerator, local).cpu()
            values = torch.empty(len(items), len(items[0].branches), dtype=torch.float32)
            values[gathered[:, 0].long()] = gathered[:, 1:].float()
            if accelerator.is_main_process:
                store_cached(config.cache_dir, key, values)
            accelerator.wait_for_everyone()
    if log is not None:
        log.info(
            f"reference log-probs ({name}): {'reused from cache' if hit else 'computed and cached'} in {config.cache_dir}"
        )
    return values


@dataclass
class Setup(Run):
    """Everything the loop reads, built by :func:`setup`."""

    objective: Objective
    token_weights: Callable[[TokenLogps], torch.Tensor] | None  # LD-DPO's, or None
    pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    reference: torch.Tensor | None
    eval_reference: torch.Tensor | None
    reference_model: torch.nn.Module | None
    monitor: Monitor | None
    monitor_settings: MonitorSettings
    probe_pairs: list[TokenizedPair]
    probe_reference: torch.Tensor | None
    reference_seconds: float


def setup(config: TrainConfig, accelerator, folder: RunFolder) -> Setup:
    """Data, policy, objective, reference log-probs, optimiser, data order, checkpointer: the recipe's setup."""
    announce(folder, accelerator, config, "train")
    data = prepare_data(config, accelerator, folder, load_examples, tokenize_pairs)
    tokenizer, pad_token_id = data.tokenizer, data.pad_token_id
    model = load_policy(config)
    dtype = compute_dtype(accelerator, model.dtype)
    pairs, eval_pairs, log = data.items, data.eval_items, folder.log

    objective = objective_from_config(
        config.loss, config.loss_weights, config.loss_params, config.sft_weight, config.sft_reduction
    )
    settings = config.monitor
    monitor = Monitor(settings) if settings.enabled and objective.needs_reference else None
    sampling = monitor is not None and settings.probe_steps > 0 and settings.sample_prompts > 0
    if objective.needs_reference and config.reference == "none":
        raise ValueError(f"loss {config.loss!r} needs reference log-probs but reference is 'none'")
    reference_model = load_reference(config, model) if objective.needs_reference else None
    if config.lora:
        model = apply_lora(model, config.lora)
    model.to(accelerator.device)
    engine, fallback = choose_engine(config, model, pairs, pad_token_id, accelerator, dtype, log)
    compile_layers(config, model, log)

    steps = total_steps(config, len(pairs), accelerator.num_processes)
    optimizer, scheduler = build_optimizer(config, model, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    reference = eval_reference = None
    token_weights = token_weight_fn(config)  # LD-DPO: the same weights for policy and reference
    reference_start = time.perf_counter()
    if objective.needs_reference:
        module = reference_model.to(accelerator.device) if reference_model is not None else model
        adapter_off = accelerator.unwrap_model(model).disable_adapter if reference_model is None else nullcontext
        cache_settings = {
            "ld_alpha": config.ld_alpha,
            "dtype": str(dtype),
            "row_tokens": config.row_tokens,
            "forward": "naive" if fallback else f"packed/{engine.kernel}",
        }
        reference = reference_pass(
            accelerator, module, pairs, engine, config, "train", cache_settings, token_weights, adapter_off, log
        )
        if eval_pairs:
            eval_reference = reference_pass(
                accelerator, module, eval_pairs, engine, config, "eval", cache_settings, token_weights, adapter_off, log
            )
        if not sampling:  # cached: the reference model is needed while training only to score the monitor's samples
            reference_model = None
    reference_seconds = time.perf_counter() - reference_start

    # The monitor's probe set: the eval pairs if any, else the first training pairs.
    probe_source, probe_values = (eval_pairs, eval_reference) if eval_pairs else (pairs, reference)
    probe_pairs = probe_source[: settings.probe_pairs] if monitor is not None else []
    probe_reference = None if probe_values is None else probe_values[: len(probe_pairs)]

    state = run_state(config, accelerator, folder, model, pairs)
    if monitor is not None:
        state["checkpointer"].register("monitor", monitor)
    return Setup(
        config=config, accelerator=accelerator, folder=folder, model=model, tokenizer=tokenizer,
        optimizer=optimizer, scheduler=scheduler, engine=engine, fallback=fallback, total_steps=steps,
        data_report=data.report, objective=objective, token_weights=token_weights, pairs=pairs,
        eval_pairs=eval_pairs, reference=reference, eval_reference=eval_reference, reference_model=reference_model,
        monitor=monitor, monitor_settings=settings, probe_pairs=probe_pairs, probe_reference=probe_reference,
        reference_seconds=reference_seconds, **state,
    )  # fmt: skip


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    """Train with ``config``; returns the summary (also written to output_dir/summary.json).

    ``resume``: ``"latest"`` or a checkpoint folder, to continue a stopped run exactly (same number of
    processes). ``overwrite``: replace a run in ``output_dir``. Raises :class:`TrainingInterrupted`
    after SIGINT/SIGTERM (a checkpoint is written first) and :class:`NonFiniteError` on NaN/inf.
    """
    with start_run(config, resume, overwrite, setup) as s:
        loop = Loop(s, "train", partial(evaluate, s))
        with loop:
            for step in loop.steps():
                result = train_step(s, step, s.pairs, partial(forward_step, s), "pairs")
                metrics, alarms = result.metrics, []
                if s.monitor is not None:
                    alarms = monitor_step(s, step, metrics, result.kept)
                shown = {name.split("/")[-1]: metrics[name] for name in BAR if name in metrics}
                on_alarm = s.monitor_settings.on_alarm if s.monitor is not None else None
                loop.record(step, metrics, shown, alarms, on_alarm)
                loop.end_step(step, result.nonfinite)
        return loop.finish(
            "pairs", stopped_by_alarm=loop.stopped_by_alarm,
            alarms=s.monitor.alarms if s.monitor else [],
            monitor=s.monitor.state_dict() if s.monitor else None,
            reference_seconds=s.reference_seconds,
        )  # fmt: skip
