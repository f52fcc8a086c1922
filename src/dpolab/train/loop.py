"""``dpolab train``: preference optimisation of any Hugging Face causal LM.

:func:`run` is the whole recipe in one function: load → tokenise → reference pass (cached) → the
loop (forward, loss, backward, step, log, eval) → save. The building blocks it calls are small and
tested on their own (data/, engine/, losses.py).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from dpolab.data.formats import PreferenceExample, load_examples
from dpolab.data.packing import pack
from dpolab.data.tokenize import TokenizedPair, tokenize_pairs
from dpolab.engine.logps import SequenceLogps, naive_logps, packed_logps, reduce_tokens
from dpolab.engine.reference import (
    cache_key,
    cached_reference_logps,
    compute_reference_logps,
    pairs_fingerprint,
    weights_fingerprint,
)
from dpolab.losses import PreferenceLogps, objective_from_config
from dpolab.train.checkpoint import config_differences, load_checkpoint, save_checkpoint
from dpolab.train.config import TrainConfig
from dpolab.train.guard import (
    NonFiniteError,
    TrainingInterrupted,
    catch_stop_signals,
    prepare_output_dir,
)
from dpolab.train.metrics import MetricsLog, progress_bar
from dpolab.train.monitor import Monitor, monitor_config
from dpolab.train.probes import gradient_split_and_likelihood, sample_probe


def _mixed_precision(config: TrainConfig) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def load_model_and_tokenizer(config: TrainConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        config.tokenizer or config.model, trust_remote_code=config.trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(
        config.model,
        dtype=dtype,
        trust_remote_code=config.trust_remote_code,
        use_safetensors=None if config.allow_pickle else True,
    )
    return model, tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def split_eval(examples: list[PreferenceExample], config: TrainConfig):
    if config.eval_data:
        return examples, load_examples(config.eval_data, config.data_split, config.on_bad_rows, config.task == "sft")[0]
    if config.eval_fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    held = max(1, round(len(examples) * config.eval_fraction))
    held_out = set(order[:held])
    return [e for i, e in enumerate(examples) if i not in held_out], [examples[i] for i in sorted(held_out)]


def concatenate(parts: list[PreferenceLogps]) -> PreferenceLogps:
    """One PreferenceLogps for a whole step (all micro-batches), detached."""

    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat([v.detach() for v in values])

    return PreferenceLogps(*(cat(name) for name in PreferenceLogps.__dataclass_fields__))


def wpo_weights(batch, logps: SequenceLogps) -> torch.Tensor:
    """WPO (Zhou et al. 2024, Eq. 2): exp(mean token (log p − log Σ_v p_v²)) of chosen × rejected, no gradient."""
    with torch.no_grad():
        aligned = logps.token_logps.detach() - logps.token_log_sum_sq
        chosen, rejected = reduce_tokens(batch, aligned)
        return torch.exp(chosen / batch.chosen_lengths) * torch.exp(rejected / batch.rejected_lengths)


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


def check_packing(
    model, pairs: list[TokenizedPair], config: TrainConfig, pad_token_id: int, device, dtype, autocast=nullcontext
) -> str | None:
    """Compare packed and naive log-probs on a few pairs; the reason to fall back, or None if they agree."""
    sample = pairs[: min(4, len(pairs))]
    batch = pack(sample, list(range(len(sample))), config.row_tokens, pad_token_id).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            fast = packed_logps(model, batch)
            slow = naive_logps(model, sample, pad_token_id, device)
    except Exception as error:  # noqa: BLE001 - any failure of the custom mask means: use the naive path
        model.train(was_training)
        return f"the packed forward failed ({type(error).__name__}: {error})"
    model.train(was_training)
    tokens = (batch.chosen_lengths + batch.rejected_lengths).float()
    per_token = ((fast.chosen - slow.chosen).abs() + (fast.rejected - slow.rejected).abs()) / tokens
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    worst = float(per_token.max())
    if worst > tolerance:
        return f"packed and naive log-probs differ by {worst:.2g} nats per token (tolerance {tolerance:g})"
    return None


def _reset_single_process_accelerate_state() -> None:
    """Accelerate keeps one process-wide state; let a second ``run`` in one process (a notebook, the
    tests) choose its own mixed precision. Never touched under ``accelerate launch``."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)


def run(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    """Train with ``config``; returns the final summary (also written to output_dir/summary.json).

    ``resume``: ``"latest"`` or a checkpoint folder, to continue a stopped run exactly. ``overwrite``:
    replace a finished or unfinished run in ``output_dir``. Raises :class:`TrainingInterrupted` after
    SIGINT/SIGTERM (a checkpoint is written first) and :class:`NonFiniteError` on NaN/inf.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.validate()
    start_time = time.perf_counter()
    set_seed(config.seed)
    _reset_single_process_accelerate_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_mixed_precision(config))
    device = accelerator.device
    dtype = config.dtype if config.dtype == "auto" else getattr(torch, config.dtype)
    out = Path(config.output_dir)
    lock, resume_from = prepare_output_dir(out, resume, overwrite, accelerator.is_main_process)
    if resume_from is not None:
        saved = json.loads((resume_from / "state.json").read_text())["config"]
        changed = config_differences(saved, config.to_dict())
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} → {config.to_dict().get(k)!r}" for k in changed)
            lock.release()
            raise ValueError(
                f"cannot resume {resume_from}: the config changed in keys that change the result "
                f"({details}); use a new output_dir or --overwrite"
            )
    log = MetricsLog(out, tensorboard=config.tensorboard, main=accelerator.is_main_process)
    log.info(
        f"dpolab train → {out} ({device.type}, {str(dtype).removeprefix('torch.')}, {accelerator.num_processes} process(es))"
    )

    # --- data -------------------------------------------------------------------------------
    sft = config.task == "sft"
    examples, bad_rows = load_examples(config.data, config.data_split, config.on_bad_rows, sft)
    for reason in bad_rows[:10]:
        log.info(f"skipped {reason}")
    if len(bad_rows) > 10:
        log.info(f"skipped {len(bad_rows) - 10} more bad rows")
    examples, eval_examples = split_eval(examples, config)
    model, tokenizer = load_model_and_tokenizer(config, dtype)
    dtype = model.dtype
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, dtype)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs, report = tokenize_pairs(tokenizer, examples, config.max_length)
    eval_pairs, eval_report = (
        tokenize_pairs(tokenizer, eval_examples, config.max_length) if eval_examples else ([], None)
    )
    for line in report.lines():
        log.info(f"data: {line}")
    if eval_report:
        log.info(f"eval data: {eval_report.lines()[0]}")
    if not pairs:
        raise ValueError(f"{config.data}: no usable pairs after tokenisation ({'; '.join(report.lines())})")
    (out / "data_report.json").write_text(json.dumps({**report.as_dict(), "bad_rows": bad_rows}, indent=2))
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    # --- model, objective, reference --------------------------------------------------------
    objective = objective_from_config(
        config.loss, config.loss_weights, config.loss_params, config.sft_weight, config.sft_reduction
    )
    monitor_settings = monitor_config(config.monitor)
    monitor = Monitor(monitor_settings) if monitor_settings.enabled and objective.needs_reference else None
    probing = monitor is not None and monitor_settings.probe_steps > 0
    sampling = probing and monitor_settings.sample_prompts > 0
    if config.disable_dropout:
        disable_dropout(model)
    reference_model = None
    if objective.needs_reference and config.reference != "none":
        if config.reference == "auto":
            reference_model = None if config.lora else copy.deepcopy(model)
        else:
            from transformers import AutoModelForCausalLM

            reference_model = AutoModelForCausalLM.from_pretrained(
                config.reference,
                dtype=dtype,
                trust_remote_code=config.trust_remote_code,
                use_safetensors=None if config.allow_pickle else True,
            )
        if reference_model is not None and config.disable_dropout:
            disable_dropout(reference_model)
    elif objective.needs_reference:
        raise ValueError(f"loss {config.loss!r} needs reference log-probs but reference is 'none'")
    if config.lora:
        from peft import LoraConfig, get_peft_model

        lora = dict(config.lora)
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.pop("r", 16),
                lora_alpha=lora.pop("alpha", 32),
                lora_dropout=lora.pop("dropout", 0.0),
                task_type="CAUSAL_LM",
                **lora,
            ),
        )
    model.to(device)
    fallback = None if config.packing else "packing: false in the config"
    fallback = fallback or check_packing(
        model, pairs, config, pad_token_id, device, compute_dtype, accelerator.autocast
    )
    if fallback:
        log.info(f"using the naive forward (two padded rows per pair): {fallback}")
        if config.ld_alpha is not None or config.use_weighting:
            raise ValueError(
                f"ld_alpha and use_weighting need the packed forward, which this model cannot take: {fallback}"
            )

    reference_chosen = reference_rejected = None
    eval_reference = (None, None)
    reference_start = time.perf_counter()
    if objective.needs_reference:
        ref_module = reference_model.to(device) if reference_model is not None else model
        adapter_off = model.disable_adapter if (config.lora and reference_model is None) else nullcontext

        def reference_for(subset: list[TokenizedPair], name: str):
            settings = {
                "ld_alpha": config.ld_alpha,
                "dtype": str(compute_dtype),
                "row_tokens": config.row_tokens,
                "forward": "naive" if fallback else "packed",
            }
            with adapter_off():
                key = cache_key(weights_fingerprint(ref_module), pairs_fingerprint(subset), settings)
                with progress_bar(
                    config.progress and accelerator.is_main_process, f"reference log-probs ({name})", len(subset)
                ) as advance:
                    return cached_reference_logps(
                        config.cache_dir,
                        key,
                        lambda: compute_reference_logps(
                            ref_module,
                            subset,
                            config.batch_size,
                            config.row_tokens,
                            pad_token_id,
                            device,
                            ld_alpha=config.ld_alpha,
                            autocast=accelerator.autocast,
                            naive=bool(fallback),
                            progress=advance,
                        ),
                    )

        reference_chosen, reference_rejected, hit = reference_for(pairs, "train")
        log.info(f"reference log-probs: {'reused from cache' if hit else 'computed and cached'} in {config.cache_dir}")
        if eval_pairs:
            eval_reference = reference_for(eval_pairs, "eval")[:2]
        # Cached: the reference model is not needed while training, unless the monitor scores samples with it.
        if not (sampling and reference_model is not None):
            reference_model = None
        del ref_module
    reference_seconds = time.perf_counter() - reference_start

    # --- optimiser and schedule -------------------------------------------------------------
    pairs_per_step = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    steps_per_epoch = max(1, math.ceil(len(pairs) / pairs_per_step))
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    def micro_batches():
        """Endless stream of this process's micro-batches; a new seeded shuffle every epoch."""
        epoch = 0
        while True:
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
            order = order[accelerator.process_index :: accelerator.num_processes]
            for start in range(0, len(order), config.batch_size):
                ids = order[start : start + config.batch_size]
                yield epoch, ids
            epoch += 1

    def forward(ids: list[int], subset: list[TokenizedPair], reference: tuple) -> tuple:
        batch = pack([subset[i] for i in ids], ids, config.row_tokens, pad_token_id).to(device)
        with accelerator.autocast():
            if fallback:
                logps = naive_logps(model, [subset[i] for i in ids], pad_token_id, device)
            else:
                logps = packed_logps(model, batch, ld_alpha=config.ld_alpha, with_log_sum_sq=config.use_weighting)
        inputs = PreferenceLogps(
            logps.chosen.float(),
            logps.rejected.float(),
            None if reference[0] is None else reference[0][ids].to(device),
            None if reference[1] is None else reference[1][ids].to(device),
            batch.chosen_lengths,
            None if sft else batch.rejected_lengths,
        )
        result = objective(inputs)
        losses = result.losses
        if config.use_weighting and not fallback:
            losses = losses * wpo_weights(batch, logps)
        return losses, inputs, result, batch

    def pair_metrics(inputs: PreferenceLogps, result, losses) -> dict[str, torch.Tensor]:
        if sft:  # no rejected side: the loss, the completion log-probs and the NLL
            return {"loss": losses.detach(), "logps/chosen": inputs.policy_chosen_logps.detach(), **result.terms}
        metrics = {
            "loss": losses.detach(),
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
        metrics.update({name: value for name, value in result.terms.items()})
        return metrics

    def evaluate(step: int) -> dict:
        if not eval_pairs:
            return {}
        model.eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for start in range(0, len(eval_pairs), config.batch_size):
                ids = list(range(start, min(start + config.batch_size, len(eval_pairs))))
                losses, inputs, result, _ = forward(ids, eval_pairs, eval_reference)
                for name, value in pair_metrics(inputs, result, losses).items():
                    sums[name] = sums.get(name, 0.0) + float(value.float().sum())
        model.train()
        values = {f"eval/{name}": total / len(eval_pairs) for name, total in sums.items()}
        log.write(step, values)
        details = ", ".join(
            f"{name.split('/')[-1]} {values[f'eval/{name}']:.4f}"
            for name in ("loss", "rewards/accuracies", "rewards/margins")
            if f"eval/{name}" in values
        )
        log.info(f"eval at step {step}: {details}")
        return values

    # --- the monitor's probe set: the eval pairs if any, else the first training pairs --------------
    if probing:
        if eval_pairs:
            probe_pairs = eval_pairs[: monitor_settings.probe_pairs]
            probe_reference = tuple(None if r is None else r[: len(probe_pairs)] for r in eval_reference)
        else:
            probe_pairs = pairs[: monitor_settings.probe_pairs]
            probe_reference = (reference_chosen[: len(probe_pairs)], reference_rejected[: len(probe_pairs)])
        probe_prompts = [p.prompt_ids for p in probe_pairs[: monitor_settings.sample_prompts]]
        lora_reference = config.lora and reference_model is None

    def run_probes(step: int) -> dict[str, float]:
        unwrapped = accelerator.unwrap_model(model)
        values = gradient_split_and_likelihood(
            unwrapped,
            objective,
            probe_pairs,
            probe_reference,
            config.row_tokens,
            pad_token_id,
            device,
            accelerator.autocast,
            naive=bool(fallback),
        )
        if sampling:
            values.update(
                sample_probe(
                    unwrapped,
                    reference_model,
                    probe_prompts,
                    monitor_settings.sample_tokens,
                    pad_token_id,
                    tokenizer.eos_token_id,
                    config.seed + step,
                    device,
                    reference_context=unwrapped.disable_adapter if lora_reference else nullcontext,
                )
            )
        monitor.record_probe(step, values)
        return values

    # --- resume, signals -------------------------------------------------------------------
    model.train()
    stream = micro_batches()
    tokens_seen = pairs_seen = nonfinite_skipped = 0
    first_step, elapsed_before = 1, 0.0
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer, scheduler)
        for _ in range(state["micro_batches"]):
            next(stream)  # the data order is a pure function of (seed, epoch): skip what was consumed
        first_step = state["step"] + 1
        pairs_seen, tokens_seen = state["pairs_seen"], state["tokens_seen"]
        nonfinite_skipped, elapsed_before = state["nonfinite_skipped"], state["elapsed_seconds"]
        log.truncate_after(state["step"])
        if monitor is not None and state.get("monitor"):
            monitor.load_state(state["monitor"])
        log.info(f"resumed from {resume_from} (step {state['step']} of {total_steps})")
    micro_batches_consumed = (first_step - 1) * config.gradient_accumulation_steps

    def checkpoint(step: int) -> Path | None:
        if not accelerator.is_main_process:
            return None
        trainer_state = {
            "micro_batches": micro_batches_consumed,
            "pairs_seen": pairs_seen,
            "tokens_seen": tokens_seen,
            "nonfinite_skipped": nonfinite_skipped,
            "elapsed_seconds": elapsed,
            "total_steps": total_steps,
            "config": config.to_dict(),
        }
        return save_checkpoint(
            out, step, accelerator.unwrap_model(model), optimizer, scheduler, trainer_state, config.keep_checkpoints
        )

    # --- the loop ---------------------------------------------------------------------------
    stopped_by_alarm = None
    total_steps_done = total_steps
    train_start = time.perf_counter()
    elapsed = elapsed_before
    last_eval: dict = {}
    metrics: dict = {}
    with (
        catch_stop_signals() as stop,
        progress_bar(
            config.progress and accelerator.is_main_process, "training", total_steps, show_metrics=True
        ) as advance,
    ):
        advance(0, completed=first_step - 1)
        for step in range(first_step, total_steps + 1):
            sums: dict[str, float] = {}
            step_pairs = step_tokens = 0
            step_rows: list[int] = []
            step_inputs: list[PreferenceLogps] = []
            finite = True
            for micro in range(config.gradient_accumulation_steps):
                epoch, ids = next(stream)
                micro_batches_consumed += 1
                sync = micro == config.gradient_accumulation_steps - 1
                with nullcontext() if sync else accelerator.no_sync(model):
                    losses, inputs, result, batch = forward(ids, pairs, (reference_chosen, reference_rejected))
                    finite = finite and bool(torch.isfinite(losses).all())
                    accelerator.backward(losses.mean() / config.gradient_accumulation_steps)
                for name, value in pair_metrics(inputs, result, losses).items():
                    sums[name] = sums.get(name, 0.0) + float(value.float().sum())
                step_pairs += len(ids)
                step_tokens += batch.real_tokens
                step_rows += [pairs[i].row for i in ids]
                step_inputs.append(inputs)
            if config.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(parameters, config.max_grad_norm))
            else:
                grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])))
            learning_rate = scheduler.get_last_lr()[0]
            if finite and math.isfinite(grad_norm):
                optimizer.step()
            else:  # never let NaN/inf reach the weights (or a checkpoint)
                what = "loss" if not finite else "gradient norm"
                message = f"step {step}: non-finite {what} in the batch of data rows {sorted(step_rows)}"
                nonfinite_skipped += 1
                if not config.skip_nonfinite:
                    raise NonFiniteError(message + " (set skip_nonfinite: true to skip such batches)")
                if nonfinite_skipped > config.max_nonfinite:
                    raise NonFiniteError(
                        f"{message}; {nonfinite_skipped} non-finite batches, more than "
                        f"max_nonfinite={config.max_nonfinite}"
                    )
                log.info(f"skipped {message}")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            pairs_seen += step_pairs
            tokens_seen += step_tokens
            elapsed = elapsed_before + time.perf_counter() - train_start
            metrics = {name: total / step_pairs for name, total in sums.items()}
            metrics.update(
                {
                    "grad_norm": grad_norm,
                    "learning_rate": learning_rate,
                    "epoch": epoch + 1,
                    "pairs_per_second": pairs_seen / elapsed,
                    "tokens_per_second": tokens_seen / elapsed,
                    "pairs": pairs_seen,
                    "tokens": tokens_seen,
                    "elapsed_seconds": elapsed,
                    "nonfinite_skipped": nonfinite_skipped,
                }
            )
            new_alarms = []
            if monitor is not None:
                metrics.update(monitor.step_metrics(objective, concatenate(step_inputs)))
                if probing and (step == 1 or step % monitor_settings.probe_steps == 0):
                    metrics.update(run_probes(step))
                new_alarms = monitor.update(step, metrics)
            if step % config.logging_steps == 0 or step == total_steps or new_alarms:
                log.write(step, metrics)
            for alarm in new_alarms:
                log.alarm(alarm)
            shown = ("loss", "rewards/margins", "rewards/accuracies")
            advance(1, **{name.split("/")[-1]: metrics[name] for name in shown if name in metrics})
            if new_alarms and monitor_settings.on_alarm == "stop":
                stopped_by_alarm = new_alarms[0]["alarm"]
            if config.eval_steps and step % config.eval_steps == 0 and step != total_steps:
                last_eval = evaluate(step)
            periodic = config.checkpoint_steps and step % config.checkpoint_steps == 0
            if periodic or step == total_steps or stop.signal or stopped_by_alarm:
                saved = checkpoint(step)
            if stopped_by_alarm:
                log.info(
                    f"stopping after step {step}: alarm {stopped_by_alarm} with monitor.on_alarm: stop; "
                    f"checkpoint: {saved}"
                )
                total_steps_done = step
                break
            if stop.signal:
                log.info(
                    f"stopped by {stop.name} after step {step}; checkpoint: {saved}\n"
                    f"resume with: dpolab train {out / 'config.yaml'} --resume"
                )
                raise TrainingInterrupted(stop.signal)
    last_eval = evaluate(total_steps_done) or last_eval

    # --- save -------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if config.save_model and accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(out / "model", safe_serialization=True)
        tokenizer.save_pretrained(out / "model")
    summary = {
        "steps": total_steps_done,
        "stopped_by_alarm": stopped_by_alarm,
        "alarms": monitor.alarms if monitor else [],
        "resumed_from": str(resume_from) if resume_from else None,
        "nonfinite_skipped": nonfinite_skipped,
        "pairs_seen": pairs_seen,
        "tokens_seen": tokens_seen,
        "train_seconds": elapsed,
        "total_seconds": time.perf_counter() - start_time,
        "reference_seconds": reference_seconds,
        "forward": "naive" if fallback else "packed",
        "fallback_reason": fallback,
        "final": metrics,
        "eval": last_eval,
        "data": {**report.as_dict(), "bad_rows_skipped": len(bad_rows)},
    }
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(
        f"done: {total_steps} steps, {pairs_seen} pairs in {summary['train_seconds']:.1f} s "
        f"({pairs_seen / summary['train_seconds']:.1f} pairs/s); outputs in {out}"
    )
    log.close()
    lock.release()
    return summary
