"""The building blocks every training recipe (``sft.py``, ``preference.py``, ``reward.py``) is made of.

Each is a plain function or a small class with ``state_dict``/``load_state_dict``: the accelerator,
the run folder (lock, resume decision, log), the policy and its reference, the forward path, the
sharded and cached reference pass, the optimiser and schedule, and the data order. A recipe calls
them in its setup and then runs its own loop; nothing here knows which method is being trained.

Distributed from the start: the data order is cut into *global* micro-batches of
``batch_size × processes`` items and each process takes every ``processes``-th one, so a run on P
processes sees the same items per optimiser step as one process with ``batch_size × P``.
"""

from __future__ import annotations

import copy
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from dpolab.console import progress_bar
from dpolab.data.formats import DataError, where
from dpolab.data.packing import Item
from dpolab.engine import attention
from dpolab.engine.attention import Kernel
from dpolab.engine.loading import check_vocabulary, load_model, load_tokenizer, read_model_config
from dpolab.engine.logps import LogpEngine, TokenLogps, packing_fallback_reason
from dpolab.engine.reference import (
    cache_key,
    compute_reference_logps,
    items_fingerprint,
    load_cached,
    store_cached,
    weights_fingerprint,
)
from dpolab.outputs import write_json, write_text
from dpolab.settings import LoraSettings
from dpolab.train.checkpoint import Checkpointer, check_process_count, config_differences, verify_checkpoint
from dpolab.train.config import TrainConfig, upgrade_saved_config
from dpolab.train.distributed import any_across, broadcast_object, gather_rows, record_peers, sum_across
from dpolab.train.guard import NonFiniteError, RunLock, TrainingInterrupted, prepare_output_dir
from dpolab.train.metrics import MetricsLog

# --- the accelerator -------------------------------------------------------------------------


def _reset_single_process_accelerate_state() -> None:
    """Accelerate keeps one process-wide state; let a second run in one process (a notebook, the tests)
    choose its own mixed precision. Never touched under ``accelerate launch``/``torchrun``."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)


def make_accelerator(config: TrainConfig):
    """An ``Accelerator`` for this launch: one process, or what ``accelerate launch``/``torchrun`` set up."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    _reset_single_process_accelerate_state()
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # The scheduler steps once per optimiser step (accelerate would otherwise step it once per process).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=precision, step_scheduler_with_optimizer=False
    )
    if _fsdp_requested_on_cpu(accelerator):
        _switch_to_fsdp(accelerator)
    set_seed(config.seed)
    record_peers(accelerator)  # while every process is alive: a survivor can then name the one that died
    return accelerator


def _fsdp_requested_on_cpu(accelerator) -> bool:
    import os

    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    return asked and accelerator.distributed_type == DistributedType.MULTI_CPU


def _switch_to_fsdp(accelerator) -> None:
    """accelerate sets up FSDP on accelerators only; on CPU it silently falls back to DDP. Torch's FSDP2
    (``fully_shard``) runs on gloo, so dpolab switches accelerate's state to FSDP with the plugin that
    ``accelerate launch --use_fsdp`` described (its environment variables). FSDP2 only: tested on 2 CPU
    processes (tests/train/test_distributed.py)."""
    import os

    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError("FSDP on CPU needs FSDP2: add --fsdp_version 2 to accelerate launch (or fsdp_version: 2)")
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def compute_dtype(accelerator, weights_dtype: torch.dtype) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, weights_dtype)


# --- the run folder ----------------------------------------------------------------------------


@dataclass
class RunFolder:
    """``output_dir`` for one run: locked by the main process, the checkpoint to resume (if any), the log."""

    path: Path
    resume_from: Path | None
    log: MetricsLog
    lock: RunLock | None = None
    closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Release the lock and close the log; safe to call twice (every exit path calls it)."""
        if self.closed:
            return
        self.closed = True
        self.log.close()
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_run(config: TrainConfig, accelerator, resume: str | None, overwrite: bool) -> RunFolder:
    """Lock ``output_dir`` and decide what happens to an earlier run there; the main process decides for all."""
    out = Path(config.output_dir)
    decision: dict = {}
    lock = None
    if accelerator.is_main_process:
        try:
            lock, resume_from = prepare_output_dir(out, resume, overwrite)
            if resume_from is not None:
                state = verify_checkpoint(resume_from)
                # Here, before the data is read and tokenised: a refusal after minutes of work helps nobody.
                check_process_count(resume_from, state, accelerator.num_processes, out)
                saved = upgrade_saved_config(state.get("config", {}))
                changed = config_differences(saved, config.to_dict())
                if changed:
                    details = ", ".join(f"{k}: {saved.get(k)!r} → {config.to_dict().get(k)!r}" for k in changed)
                    raise ValueError(
                        f"cannot resume {resume_from}: the config changed in keys that change the result "
                        f"({details}); use a new output_dir or --overwrite"
                    )
            decision = {"resume_from": None if resume_from is None else str(resume_from)}
        except Exception as error:  # noqa: BLE001 - every process must hear of it, or the others wait forever
            if lock is not None:
                lock.release()
            decision = {"error": str(error), "type": type(error).__name__, "usage": isinstance(error, ValueError)}
    decision = broadcast_object(accelerator, decision)
    if "error" in decision:
        if decision["usage"]:
            raise ValueError(decision["error"])
        raise RuntimeError(f"{decision['type']}: {decision['error']}")
    accelerator.wait_for_everyone()
    try:
        log = MetricsLog(out, tensorboard=config.tensorboard, main=accelerator.is_main_process)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    resume_from = Path(decision["resume_from"]) if decision["resume_from"] else None
    return RunFolder(out, resume_from, log, lock)


def write_run_inputs(folder: RunFolder, accelerator, config: TrainConfig, data_report: dict) -> None:
    if accelerator.is_main_process:
        write_json(folder.path / "data_report.json", data_report, note=folder.log.info)
        write_text(folder.path / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


def log_skipped_rows(log: MetricsLog, bad_rows: list[str]) -> None:
    for reason in bad_rows[:10]:
        log.info(f"skipped {reason}")
    if len(bad_rows) > 10:
        log.info(f"skipped {len(bad_rows) - 10} more bad rows")


@dataclass
class Data:
    """A recipe's tokenised training and held-out items, and what happened to the rows."""

    items: list
    eval_items: list
    report: dict  # counts for summary.json
    tokenizer: object
    pad_token_id: int


def announce(folder: RunFolder, accelerator, config: TrainConfig, command: str) -> None:
    folder.log.info(
        f"dpolab {command} → {folder.path} ({accelerator.device.type}, {config.dtype}, "
        f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value.lower()})"
    )


def prepare_data(config: TrainConfig, accelerator, folder: RunFolder, load, tokenize) -> Data:
    """Load (``load``: file → examples, bad rows), hold out, tokenise (``tokenize``), report; refuse empty data.

    Runs before any model loads, so bad data fails fast.
    """
    log = folder.log
    examples, bad_rows = load(config.data, config.data_split, config.on_bad_rows, config.max_row_bytes)
    log_skipped_rows(log, bad_rows)
    examples, eval_examples = split_eval(examples, config, load)
    tokenizer = load_tokenizer(config.tokenizer or config.model, config.trust_remote_code)
    limits = dict(max_prompt_length=config.max_prompt_length, truncation_mode=config.truncation_mode)
    items, report = _tokenize_named(tokenize, tokenizer, examples, config.data, config.max_length, limits)
    eval_source = config.eval_data or config.data
    eval_items, eval_report = (
        _tokenize_named(tokenize, tokenizer, eval_examples, eval_source, config.max_length, limits)
        if eval_examples
        else ([], None)
    )
    for line in report.lines():
        log.info(f"data: {line}")
    if eval_report:
        log.info(f"eval data: {eval_report.lines()[0]}")
    if not items:
        raise ValueError(f"{config.data}: no usable {report.unit} after tokenisation ({'; '.join(report.lines())})")
    # the model's config (no weights read yet) sets its embedding rows: an id past them fails here, not mid-run
    check_vocabulary(read_model_config(config.model, config.trust_remote_code), tokenizer, config.model,
                     config.tokenizer or config.model)  # fmt: skip
    write_run_inputs(folder, accelerator, config, {**report.as_dict(), "bad_rows": bad_rows})
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Data(items, eval_items, {**report.as_dict(), "bad_rows_skipped": len(bad_rows)}, tokenizer, pad_token_id)


def _tokenize_named(tokenize, tokenizer, examples: list, source: str, max_length, limits: dict):
    """``tokenize``, with a row it refuses (a chat template that fails on it) named by file, line and row."""
    try:
        return tokenize(tokenizer, examples, max_length, **limits)
    except DataError as error:
        if error.row is None:
            raise
        line = next((example.line for example in examples if example.row == error.row), None)
        detail = str(error).removeprefix(f"row {error.row}: ")
        raise DataError(f"{where(source, error.row, line)}: {detail}", row=error.row) from None


def split_eval(examples: list, config: TrainConfig, load) -> tuple[list, list]:
    """(training examples, held-out examples): ``eval_data`` loaded with ``load``, or a seeded ``eval_fraction``."""
    if config.eval_data:
        return examples, load(config.eval_data, config.data_split, config.on_bad_rows, config.max_row_bytes)[0]
    if config.eval_fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    held = max(1, round(len(examples) * config.eval_fraction))
    if held >= len(examples):
        raise ValueError(
            f"eval_fraction: {config.eval_fraction} of {len(examples)} usable rows holds out {held}, leaving none to "
            "train on; lower eval_fraction, give eval_data, or add rows"
        )
    held_out = set(order[:held])
    return [e for i, e in enumerate(examples) if i not in held_out], [examples[i] for i in sorted(held_out)]


# --- models --------------------------------------------------------------------------------------


def disable_dropout(model: torch.nn.Module) -> None:
    """Every ``nn.Dropout`` to p = 0, and the attention dropout that Hugging Face's Llama-style attention
    modules keep as a float (``attention_dropout``, passed to the attention function while training)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_policy(config: TrainConfig):
    """The model to train, through the one loader, dropout off if asked."""
    dtype = None if config.dtype == "auto" else getattr(torch, config.dtype)
    model = load_model(config.model, "causal_lm", dtype, config.trust_remote_code, config.allow_pickle)
    if config.disable_dropout:
        disable_dropout(model)
    enable_gradient_checkpointing(config, model)
    return model


def load_scalar_model(config: TrainConfig, pad_token_id: int, log: MetricsLog | None = None):
    """A model with a one-output score head: a sequence classifier with one label as it is, or any causal LM
    checkpoint with a new head (seeded random init, as Hugging Face's ``from_pretrained(num_labels=1)``).
    A classifier with more labels is refused: a reward has one."""
    dtype = None if config.dtype == "auto" else getattr(torch, config.dtype)
    model_config = read_model_config(config.model, config.trust_remote_code)
    architectures = model_config.architectures or []
    classifier = any(name.endswith("ForSequenceClassification") for name in architectures)
    if classifier and model_config.num_labels != 1:
        raise ValueError(
            f"model: {config.model} is a sequence classifier with {model_config.num_labels} labels; a reward model "
            "has one output (num_labels: 1). Start from its base causal LM, or a one-label classifier"
        )
    torch.manual_seed(config.seed)  # the new head's init, the same on every process
    model = load_model(
        config.model, "sequence_classification", dtype, config.trust_remote_code, config.allow_pickle, num_labels=1,
        new_head=not classifier, note=log.info if log is not None else None,
    )  # fmt: skip
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id  # Hugging Face's pooling needs it for batches of more than one
    if log is not None and not classifier:
        log.info(f"model: {', '.join(architectures) or 'the checkpoint'} with a new one-output score head")
    if config.disable_dropout:
        disable_dropout(model)
    enable_gradient_checkpointing(config, model)
    return model


def load_reference(config: TrainConfig, model):
    """The frozen reference: a copy of the initial policy, another model, or None (LoRA: the adapter disabled)."""
    if config.reference == "auto":
        return None if config.lora else copy.deepcopy(model)
    reference = load_model(
        config.reference, "causal_lm", model.dtype, config.trust_remote_code, config.allow_pickle, what="reference"
    )
    policy_vocabulary = model.get_output_embeddings().weight.shape[0]
    reference_vocabulary = reference.get_output_embeddings().weight.shape[0]
    if policy_vocabulary != reference_vocabulary:
        raise ValueError(
            f"reference: {config.reference} has {reference_vocabulary} output tokens but the model has "
            f"{policy_vocabulary}; the reference must share the policy's tokenizer"
        )
    if config.disable_dropout:
        disable_dropout(reference)
    return reference.eval()


def apply_lora(model, lora: LoraSettings, task_type: str = "CAUSAL_LM"):
    """The model with LoRA adapters; ``task_type="SEQ_CLS"`` (reward models) also trains the score head whole."""
    from peft import LoraConfig, get_peft_model

    try:
        return get_peft_model(model, LoraConfig(task_type=task_type, **lora.peft_kwargs()))
    except (ValueError, TypeError) as error:  # e.g. target_modules that the model does not have
        raise ValueError(f"lora: {' '.join(str(error).split())}") from None


def choose_engine(config: TrainConfig, model, items: list[Item], pad_token_id: int, accelerator, dtype, log):
    """The packed path with the first attention kernel that this model takes and that agrees with the naive
    path on a few items (and the chunked LM head if asked and possible), else the naive path."""
    engine = LogpEngine(
        config.row_tokens, pad_token_id, accelerator.device, logit_chunk_tokens=config.logit_chunk_tokens
    )
    return _packed_or_naive(config, engine, packing_fallback_reason, model, items, accelerator, dtype, log)


def choose_score_engine(config: TrainConfig, model, items: list[Item], pad_token_id: int, accelerator, dtype, log):
    """As :func:`choose_engine`, for models with a score head (:mod:`dpolab.engine.scores`)."""
    from dpolab.engine.scores import ScoreEngine, scores_fallback_reason

    engine = ScoreEngine(config.row_tokens, pad_token_id, accelerator.device)
    return _packed_or_naive(config, engine, scores_fallback_reason, model, items, accelerator, dtype, log)


def candidate_kernels(setting: str, device: torch.device) -> list[Kernel]:
    """The attention kernels to try, in order: the configured one, or for ``auto`` flex and varlen (CUDA),
    segments, dense. On CPU varlen has no fused kernel (its reference loop would only repeat segments' work)."""
    if setting != "auto":
        return [setting]
    fused = ["flex"] if device.type == "cuda" and attention.flex_available() else []
    if device.type == "cuda":
        fused.append("varlen")
    return [*fused, "segments", "dense"]


def _packed_or_naive(config: TrainConfig, engine, fallback_reason, model, items, accelerator, dtype, log):
    """(``engine`` with its kernel, None) on the packed path, or (``engine`` set to naive, why) when packing is off
    or no kernel agrees with the naive path. Each kernel not taken is logged with its reason."""
    if not config.packing:
        return _naive(engine, "packing: false in the config", log)
    refused: list[str] = []
    for kernel in candidate_kernels(config.attention_kernel, accelerator.device):
        engine.kernel = kernel
        reason = fallback_reason(model, items, engine, dtype, accelerator.autocast)
        if reason and getattr(engine, "logit_chunk_tokens", 0) > 0:
            engine.logit_chunk_tokens = 0
            if fallback_reason(model, items, engine, dtype, accelerator.autocast) is None:
                log.info(f"logit_chunk_tokens: the LM head runs unchunked: {reason}")
                reason = None
            else:
                engine.logit_chunk_tokens = config.logit_chunk_tokens
        if reason is None:
            taken = f"attention kernel {kernel}" + (f" (not {'; '.join(refused)})" if refused else "")
            log.info(f"packed forward: {taken}")
            return engine, None
        refused.append(f"{kernel}: {reason}")
        attention.uninstall(model)
    if config.attention_kernel != "auto":  # asked for by name: say why it cannot run rather than run another
        raise ValueError(f"attention_kernel: {refused[0]}; use auto to take the first kernel that works")
    return _naive(engine, "; ".join(refused), log)


def _naive(engine, reason: str, log):
    log.info(f"using the naive forward (one padded row per sequence): {reason}")
    engine.naive = True
    return engine, reason


def compile_layers(config: TrainConfig, model, log) -> None:
    """``torch.compile`` each decoder layer in place when ``compile`` (the classes Hugging Face lists in
    ``_no_split_modules``): the LM head hooks and the attention layout stay outside the compiled code."""
    if not config.compile:
        return
    from transformers import PreTrainedModel

    names = {name for m in model.modules() if isinstance(m, PreTrainedModel) for name in (m._no_split_modules or [])}
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"compile: {type(model).__name__} lists no decoder layer class (_no_split_modules)")
    for layer in layers:
        layer.compile(dynamic=True)
    log.info(f"compile: {len(layers)} {type(layers[0]).__name__} layers compiled on first use")


def enable_gradient_checkpointing(config: TrainConfig, model) -> None:
    """Hugging Face's non-reentrant activation checkpointing when ``gradient_checkpointing`` (non-reentrant:
    no input that requires grad is needed, so LoRA and frozen embeddings work)."""
    if not config.gradient_checkpointing:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    settings = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.20's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)


def save_final_model(accelerator, model, tokenizer, directory: Path) -> None:
    """Safetensors weights in Hugging Face format (a LoRA run: the adapter), from the full state on the main process."""
    state = accelerator.get_state_dict(model)  # gathers sharded (FSDP) weights; every process must call it
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        # A LoRA run never resizes the embeddings (a tokenizer larger than them is refused): peft's "auto" would
        # look for the base's config to find out, and warn when the base is itself an adapter folder.
        extra = {"save_embedding_layers": False} if hasattr(unwrapped, "peft_config") else {}
        # Written beside, then renamed into place: a failure half-way leaves no half-written model folder.
        from safetensors import SafetensorError

        from dpolab.train.checkpoint import CheckpointWriteError

        temporary = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        try:
            unwrapped.save_pretrained(temporary, state_dict=state, safe_serialization=True, **extra)
            tokenizer.save_pretrained(temporary)
        except (OSError, RuntimeError, SafetensorError) as error:  # a full disk
            shutil.rmtree(temporary, ignore_errors=True)
            detail = " ".join(str(error).split())[:200]
            raise CheckpointWriteError(f"cannot write the final model in {directory} ({detail}); is the disk full? "
                                       "The checkpoints are untouched") from None  # fmt: skip
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(temporary, directory)
    accelerator.wait_for_everyone()


# --- sharding and the reference pass ---------------------------------------------------------


def shard_batches(count: int, batch_size: int, rank: int, processes: int) -> list[tuple[list[int], bool]]:
    """This process's batches over items 0..count−1 (every ``processes``-th item), as (ids, real).

    Every process gets the same number of batches, so forwards that are collective (FSDP) stay in step:
    a process that runs out repeats item 0 in a batch marked ``real=False`` whose results are ignored.
    """
    mine = list(range(rank, count, processes))
    per_process = math.ceil(count / processes)
    batches = [(mine[i : i + batch_size], True) for i in range(0, len(mine), batch_size)]
    while len(batches) < math.ceil(per_process / batch_size):
        batches.append(([0], False))
    return batches


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


# --- optimisation ----------------------------------------------------------------------------


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


def steps_per_epoch(items: int, batch_size: int, processes: int, accumulation: int) -> int:
    """Optimiser steps in one pass: an epoch's last step takes the micro-batches left, never the next epoch's."""
    return math.ceil(math.ceil(items / (batch_size * processes)) / accumulation)


def total_steps(config: TrainConfig, items: int, processes: int) -> int:
    per_epoch = steps_per_epoch(items, config.batch_size, processes, config.gradient_accumulation_steps)
    return config.max_steps or max(1, math.ceil(config.epochs * per_epoch))


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


# --- stateful pieces of a run ----------------------------------------------------------------


@dataclass
class MicroBatch:
    epoch: int
    global_ids: list[int]  # every item of this micro-batch, on all processes together
    ids: list[int]  # this process's share (item 0 as a stand-in when the share is empty: see ``real``)
    real: bool  # False: this process has no item in the micro-batch and runs a stand-in forward


class BatchStream:
    """The data order: a seeded shuffle per epoch cut into global micro-batches of ``batch_size × processes``,
    grouped into optimiser steps of up to ``accumulation`` micro-batches that never cross an epoch's end.

    Process r takes items r, r + P, … of each global micro-batch. The order is a pure function of (seed,
    epoch), so the position (steps consumed) is the whole state.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, rank: int = 0, processes: int = 1, accumulation: int = 1
    ) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.processes, self.accumulation = rank, processes, accumulation
        self.consumed = 0
        self._iterator = self._generate()

    def _generate(self):
        epoch = 0
        width = self.batch_size * self.processes
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
            micro_batches = []
            for start in range(0, len(order), width):
                global_ids = order[start : start + width]
                mine = global_ids[self.rank :: self.processes]
                micro_batches.append(MicroBatch(epoch, global_ids, mine or global_ids[:1], bool(mine)))
            for start in range(0, len(micro_batches), self.accumulation):
                yield micro_batches[start : start + self.accumulation]
            epoch += 1

    def next_step(self) -> list[MicroBatch]:
        """The micro-batches of the next optimiser step."""
        self.consumed += 1
        return next(self._iterator)

    def state_dict(self) -> dict:
        return {"steps": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = 0
        self._iterator = self._generate()
        for _ in range(state["steps"]):
            self.next_step()


@dataclass
class Counters:
    """Running totals of a run (global, over every process)."""

    items_seen: int = 0
    tokens_seen: int = 0
    nonfinite_skipped: int = 0
    elapsed_seconds: float = 0.0
    _started: float = field(default_factory=time.perf_counter, repr=False)
    _elapsed_before: float = field(default=0.0, repr=False)

    def start_clock(self) -> None:
        """Count time from now on, on top of what earlier runs of this output_dir counted."""
        self._elapsed_before, self._started = self.elapsed_seconds, time.perf_counter()

    def tick(self) -> None:
        self.elapsed_seconds = self._elapsed_before + time.perf_counter() - self._started

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("items_seen", "tokens_seen", "nonfinite_skipped", "elapsed_seconds")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self.start_clock()


class DataIdentity:
    """The fingerprint of the tokenised training items: resuming on changed data (same path, other contents, or
    another tokenizer) is refused instead of continuing as if nothing changed."""

    def __init__(self, items: list, source: str) -> None:
        self.fingerprint, self.source = items_fingerprint(items), source

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"cannot resume: the training data {self.source} is not what the checkpoint was trained on (its "
                "tokenised rows differ: the file or the tokenizer changed); use a new output_dir or --overwrite"
            )


def alarm_stop(accelerator, log: MetricsLog, new_alarms: list[dict], on_alarm: str) -> str | None:
    """Log this step's new alarms; with ``on_alarm: stop``, the alarm that stops the run, agreed by every
    process (a stop decided on one alone would leave the others waiting in a collective), else None."""
    for alarm in new_alarms:
        log.alarm(alarm)
    if any_across(accelerator, bool(new_alarms) and on_alarm == "stop"):
        return new_alarms[0]["alarm"] if new_alarms else "an alarm on another process"
    return None


def token_weight_fn(config: TrainConfig):
    """LD-DPO token weights as a function of a micro-batch's token log-probs (None without ``ld_alpha``)."""
    if config.ld_alpha is None:
        return None
    from dpolab.losses import ld_dpo_token_weights

    def weights(tokens: TokenLogps) -> torch.Tensor:
        shared = tokens.branch_lengths.min(dim=1).values[tokens.sequence // tokens.branch_lengths.shape[1]]
        return ld_dpo_token_weights(tokens.index, shared, config.ld_alpha)

    return weights


# --- what every recipe's loop reads ------------------------------------------------------------


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


# --- the end of every optimiser step -----------------------------------------------------------


def optimizer_step(s, step: int, finite: bool, rows: list[int]) -> tuple[float, float, str | None]:
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


def nonfinite_stop(s, reason: str, saved: Path, command: str) -> NonFiniteError:
    """The error that ends a run on a non-finite batch, naming it and the checkpoint written after it."""
    config_file = s.folder.path / "config.yaml"
    if not s.config.skip_nonfinite:
        hint = f"to skip such batches: dpolab {command} {config_file} --resume --skip_nonfinite true"
    else:
        hint = f"to allow more: dpolab {command} {config_file} --resume --max_nonfinite N"
    return NonFiniteError(f"{reason}; the batch was not applied; checkpoint: {saved}; {hint}")


def throughput(s, items: int, tokens: int, unit: str) -> dict[str, float]:
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


def resume(s, log) -> int:
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


def checkpoint_step(s, step: int, stop, nonfinite: str | None, command: str, force: bool = False):
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


def interrupted(s, step: int, stop, saved: Path | None, command: str) -> TrainingInterrupted:
    """Log where a signalled run stopped and how to resume it; the exception that ends it."""
    s.folder.log.info(
        f"stopped by {stop.name or 'a signal to another process'} after step {step}; checkpoint: {saved}\n"
        f"resume with: dpolab {command} {s.folder.path / 'config.yaml'} --resume"
    )
    return TrainingInterrupted(stop.signal or 15)


def harness_evaluator(config: TrainConfig, accelerator, folder: RunFolder, tokenizer):
    """The lm-evaluation-harness evaluator of ``eval_harness:`` (:mod:`dpolab.train.harness_eval`), or None."""
    if not config.eval_harness:
        return None
    from dpolab.train.harness_eval import HarnessEvaluator

    return HarnessEvaluator(config.eval_harness, accelerator, folder, tokenizer)


def finish_run(s, steps: int, unit: str, start_time: float, metrics: dict, last_eval: dict, **extra) -> dict:
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
        "total_seconds": time.perf_counter() - start_time,
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


def write_summary(folder: RunFolder, accelerator, summary: dict) -> None:
    if accelerator.is_main_process:
        write_json(folder.path / "summary.json", summary, note=folder.log.info)
