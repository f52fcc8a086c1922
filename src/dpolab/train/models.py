"""The models of a run, through the one loader (:mod:`dpolab.engine.loading`): the policy, a scorer with a one-output
head (reward and value models), a reference, LoRA adapters; the forward path each uses (packed with the attention
kernel that passes the start-up check, or naive); compilation and gradient checkpointing; the final save.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch

from dpolab.data.packing import Item
from dpolab.engine import attention
from dpolab.engine.attention import Kernel
from dpolab.engine.loading import load_model, read_model_config
from dpolab.engine.logps import LogpEngine, packing_fallback_reason
from dpolab.settings import LoraSettings
from dpolab.train.config import TrainConfig
from dpolab.train.metrics import MetricsLog


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
