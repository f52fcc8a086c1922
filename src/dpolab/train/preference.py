"""The preference recipe (``dpolab train``): any loss of :mod:`dpolab.losses` on prompt/chosen/rejected pairs.

Read :func:`train` top to bottom: set up (blocks from :mod:`dpolab.train.blocks`), then the loop —
micro-batches (forward, loss, backward), clip, step, log, monitor, evaluate, checkpoint — then save.
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

import torch

from dpolab.console import progress_bar
from dpolab.data.formats import load_examples
from dpolab.data.tokenize import TokenizedPair, tokenize_pairs
from dpolab.engine.logps import TokenLogps
from dpolab.losses import LossOutput, Objective, PreferenceLogps, objective_from_config, wpo_pair_weights
from dpolab.settings import MonitorSettings
from dpolab.train import blocks
from dpolab.train.config import TrainConfig
from dpolab.train.distributed import gather_rows
from dpolab.train.guard import catch_stop_signals
from dpolab.train.monitor import Monitor
from dpolab.train.probes import gradient_split_and_likelihood, sample_probe

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


def evaluate(s: Setup, step: int) -> dict:
    """Held-out metrics (prefix ``eval/``), each process a shard, reduced."""
    if not s.eval_pairs:
        return {}
    s.model.eval()
    sums: dict[str, float] = {}
    count = 0
    batches = blocks.shard_batches(
        len(s.eval_pairs), s.config.batch_size, s.accelerator.process_index, s.accelerator.num_processes
    )
    # batch_token_mean reductions: token-weighted over the whole held-out set, however it is split
    mean_chosen_length = torch.tensor([len(p.chosen_ids) for p in s.eval_pairs], dtype=torch.float32).mean()
    with torch.no_grad():
        for ids, real in batches:
            with s.accelerator.autocast():
                forward = forward_pairs(
                    s, s.model, s.eval_pairs, ids, s.eval_reference, mean_chosen_length.to(s.accelerator.device)
                )
            blocks.add_sums(sums, pair_metrics(forward), real)
            count += len(ids) if real else 0
    s.model.train()
    values = {f"eval/{name}": value for name, value in blocks.reduced_means(s.accelerator, sums, count).items()}
    s.folder.log.write(step, values)
    details = ", ".join(
        f"{name.split('/')[-1]} {values[f'eval/{name}']:.4f}"
        for name in ("loss", "rewards/accuracies", "rewards/margins")
        if f"eval/{name}" in values
    )
    s.folder.log.info(f"eval at step {step}: {details}")
    return values


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


@dataclass
class Setup(blocks.Run):
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


def setup(config: TrainConfig, accelerator, folder: blocks.RunFolder) -> Setup:
    """Data, policy, objective, reference log-probs, optimiser, data order, checkpointer: the recipe's setup."""
    blocks.announce(folder, accelerator, config, "train")
    data = blocks.prepare_data(config, accelerator, folder, load_examples, tokenize_pairs)
    tokenizer, pad_token_id = data.tokenizer, data.pad_token_id
    model = blocks.load_policy(config)
    dtype = blocks.compute_dtype(accelerator, model.dtype)
    pairs, eval_pairs, log = data.items, data.eval_items, folder.log

    objective = objective_from_config(
        config.loss, config.loss_weights, config.loss_params, config.sft_weight, config.sft_reduction
    )
    settings = config.monitor
    monitor = Monitor(settings) if settings.enabled and objective.needs_reference else None
    sampling = monitor is not None and settings.probe_steps > 0 and settings.sample_prompts > 0
    if objective.needs_reference and config.reference == "none":
        raise ValueError(f"loss {config.loss!r} needs reference log-probs but reference is 'none'")
    reference_model = blocks.load_reference(config, model) if objective.needs_reference else None
    if config.lora:
        model = blocks.apply_lora(model, config.lora)
    model.to(accelerator.device)
    engine, fallback = blocks.choose_engine(config, model, pairs, pad_token_id, accelerator, dtype, log)
    blocks.compile_layers(config, model, log)

    steps = blocks.total_steps(config, len(pairs), accelerator.num_processes)
    optimizer, scheduler = blocks.build_optimizer(config, model, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    reference = eval_reference = None
    token_weights = blocks.token_weight_fn(config)  # LD-DPO: the same weights for policy and reference
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
        reference = blocks.reference_pass(
            accelerator, module, pairs, engine, config, "train", cache_settings, token_weights, adapter_off, log
        )
        if eval_pairs:
            eval_reference = blocks.reference_pass(
                accelerator, module, eval_pairs, engine, config, "eval", cache_settings, token_weights, adapter_off, log
            )
        if not sampling:  # cached: the reference model is needed while training only to score the monitor's samples
            reference_model = None
    reference_seconds = time.perf_counter() - reference_start

    # The monitor's probe set: the eval pairs if any, else the first training pairs.
    probe_source, probe_values = (eval_pairs, eval_reference) if eval_pairs else (pairs, reference)
    probe_pairs = probe_source[: settings.probe_pairs] if monitor is not None else []
    probe_reference = None if probe_values is None else probe_values[: len(probe_pairs)]

    state = blocks.run_state(config, accelerator, folder, model, pairs)
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
        stopped_by_alarm, last_eval, metrics, steps_done, evaluated_at = None, {}, {}, s.total_steps, 0
        show = config.progress and accelerator.is_main_process
        with catch_stop_signals() as stop, progress_bar(show, "training", s.total_steps, show_metrics=True) as bar:
            bar(0, completed=first_step - 1)
            for step in range(first_step, s.total_steps + 1):
                sums: dict[str, float] = {}
                step_pairs = step_tokens = 0
                step_rows, step_logps, finite = [], [], True
                step_batches = s.stream.next_step()
                for micro, batch in enumerate(step_batches):
                    global_lengths = torch.tensor([len(s.pairs[i].chosen_ids) for i in batch.global_ids])
                    last = micro == len(step_batches) - 1
                    with nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
                        forward = forward_pairs(
                            s, model, s.pairs, batch.ids, s.reference,
                            global_lengths.float().mean().to(accelerator.device),
                        )  # fmt: skip
                        # Σ local losses × P / (pairs in the global micro-batch): DDP's average is the global mean.
                        share = processes / (len(batch.global_ids) * len(step_batches))
                        accelerator.backward(forward.losses.sum() * share * float(batch.real))
                    finite = finite and bool(torch.isfinite(forward.losses).all())
                    blocks.add_sums(sums, pair_metrics(forward), batch.real)
                    if batch.real:
                        step_pairs += len(batch.ids)
                        step_tokens += sum(s.pairs[i].unique_tokens for i in batch.ids)
                        step_rows += [s.pairs[i].row for i in batch.ids]
                        step_logps.append(logps_rows(forward.inputs))
                grad_norm, learning_rate, nonfinite = blocks.optimizer_step(s, step, finite, step_rows)

                metrics = blocks.reduced_means(accelerator, sums, step_pairs)
                metrics.update(grad_norm=grad_norm, learning_rate=learning_rate, epoch=batch.epoch + 1)
                metrics.update(blocks.throughput(s, step_pairs, step_tokens, "pairs"))
                new_alarms = []
                if s.monitor is not None:
                    rows = gather_rows(accelerator, torch.cat(step_logps) if step_logps else torch.zeros(0, 6))
                    metrics.update(s.monitor.step_metrics(s.objective, logps_from_rows(rows, s.reference is not None)))
                    probe_steps = s.monitor_settings.probe_steps
                    if probe_steps > 0 and (step == 1 or step % probe_steps == 0):
                        metrics.update(run_probes(s, step))
                    new_alarms = s.monitor.update(step, metrics)
                if step % config.logging_steps == 0 or step == s.total_steps or new_alarms:
                    log.write(step, metrics)
                stopped_by_alarm = blocks.alarm_stop(accelerator, log, new_alarms, s.monitor_settings.on_alarm)
                bar(
                    1,
                    **{
                        k.split("/")[-1]: metrics[k]
                        for k in ("loss", "rewards/margins", "rewards/accuracies")
                        if k in metrics
                    },
                )
                if config.eval_steps and step % config.eval_steps == 0 and step != s.total_steps:
                    last_eval, evaluated_at = evaluate(s, step), step
                if harness and harness.periodic(step) and step != s.total_steps:
                    harness.evaluate(step, model)
                saved, signalled = blocks.checkpoint_step(
                    s, step, stop, nonfinite, "train", force=bool(stopped_by_alarm)
                )
                if stopped_by_alarm:
                    log.info(
                        f"stopping after step {step}: alarm {stopped_by_alarm} with monitor.on_alarm: stop; checkpoint: {saved}"
                    )
                    steps_done = step
                    break
                if signalled:
                    raise blocks.interrupted(s, step, stop, saved, "train")
        if evaluated_at != steps_done:  # an alarm stop right after a periodic evaluation: not twice
            last_eval = evaluate(s, steps_done) or last_eval
        harness_values = harness.evaluate(steps_done, model) if harness else None

        return blocks.finish_run(
            s, steps_done, "pairs", start_time, metrics, last_eval, harness=harness_values,
            stopped_by_alarm=stopped_by_alarm,
            alarms=s.monitor.alarms if s.monitor else [],
            monitor=s.monitor.state_dict() if s.monitor else None,
            reference_seconds=s.reference_seconds,
        )  # fmt: skip
