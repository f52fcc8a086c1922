"""``dpolab train`` configuration: one dataclass; YAML keys and CLI flags are its field names.

Unknown keys, wrong types and impossible values fail with one line naming the key, before any model
is loaded. docs/training.md lists every field (generated from the docstrings below).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dpolab import safe_yaml
from dpolab.data.formats import MAX_ROW_BYTES, check_max_row_bytes, looks_like_path, looks_local
from dpolab.settings import (
    EvalHarnessSettings,
    LoraSettings,
    MonitorSettings,
    PPOSettings,
    attribute_docs,
    check_type,
    dotted_keys,
    eval_harness_settings,
    lora_settings,
    monitor_settings,
    ppo_settings,
    yaml_floats,
)
from dpolab.train.registry import RECIPES


@dataclass
class TrainConfig:
    task: str = "preference"
    """``preference`` (pairs: prompt, chosen, rejected), ``sft`` (prompt + completion, or messages; `dpolab sft` sets it), ``reward`` (a reward model on pairs; `dpolab rm` sets it) or ``ppo`` (RLHF-PPO on prompts; `dpolab ppo` sets it)."""

    # --- model -----------------------------------------------------------------------------
    model: str = ""
    """Policy to train: a local Hugging Face directory or a hub id (loaded with AutoModelForCausalLM). Required."""
    tokenizer: str | None = None
    """Tokenizer directory or id; default: the model's."""
    reference: str = "auto"
    """``auto``: a frozen copy of the initial policy (with LoRA: the base model, adapter disabled) when the loss needs a reference, none otherwise; ``none``; or a path/id of another model."""
    dtype: str = "float32"
    """Weights dtype: ``float32`` (master weights, the default), ``bfloat16`` or ``float16`` (halves memory; no fp32 master copy), or ``auto`` (the checkpoint's)."""
    mixed_precision: str = "auto"
    """Autocast of forward passes: ``auto`` (bf16 where the GPU supports it, else off), ``no``, ``bf16``, ``fp16``."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off unless you trust the source."""
    lora: LoraSettings | None = None
    """LoRA via peft (``pip install dpolab[peft]``), e.g. ``{r: 16, alpha: 32, dropout: 0.05, target_modules: [q_proj, v_proj]}``; any other field of peft's LoraConfig by its own name (:class:`dpolab.settings.LoraSettings`)."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 in policy and reference (log-probs of the same text then agree): each ``nn.Dropout`` and the ``attention_dropout`` of Llama-style attention modules."""

    # --- data ------------------------------------------------------------------------------
    data: str = ""
    """Training pairs: .jsonl/.json/.parquet/.csv file or a datasets id (see docs/training.md for formats). Required."""
    data_split: str = "train"
    """Split name for a datasets id or a JSON mapping of splits."""
    eval_data: str | None = None
    """Held-out pairs for periodic evaluation (file or id); or use ``eval_fraction``."""
    eval_fraction: float = 0.0
    """Fraction of ``data`` held out for evaluation (seeded split) when ``eval_data`` is not given."""
    on_bad_rows: str = "error"
    """``error``: refuse data with bad rows (empty prompt or completion, missing fields), naming up to ten; ``skip``: leave them out and report how many."""
    max_row_bytes: int = MAX_ROW_BYTES
    """Largest row of ``data``/``eval_data`` in bytes (4 MiB); a longer row is a bad row, refused by its line before it is parsed or tokenised (memory stays bounded). Raise it for very long pairs."""
    max_length: int | None = 1024
    """Most tokens in prompt + one completion. A prompt that leaves the completions fewer than min(longest completion, max_length // 2) tokens is cut per ``truncation_mode``; completions still too long are truncated at the end. Every cut and drop is counted and reported."""
    max_prompt_length: int | None = None
    """Most tokens in the prompt: a longer prompt is cut to it per ``truncation_mode`` (then max_length − it are left for the completion). Must be smaller than max_length; ``null``: no separate cap."""
    truncation_mode: str = "keep_end"
    """How a prompt too long is cut, on tokens (after the chat template): ``keep_end`` keeps its last tokens, the end of a long dialogue (a leading BOS stays); ``keep_start`` its first; ``drop`` drops the pair instead when the prompt alone reaches max_length or exceeds max_prompt_length."""

    # --- loss ------------------------------------------------------------------------------
    loss: str | list[str] = "dpo"
    """A loss from ``dpolab losses``, or a list for a weighted sum (TRL's loss_type list)."""
    loss_weights: list[float] | None = None
    """Weights of the losses in ``loss``; default 1 each."""
    loss_params: dict = field(default_factory=dict)
    """Parameters of the losses, e.g. ``{beta: 0.1}`` or ``{beta: 0.3, lam: 50}``; unknown names are an error."""
    sft_weight: float = 0.0
    """α of the SFT term α·NLL(chosen) added to the loss (3D paper Eq. 7)."""
    sft_reduction: str = "batch_token_mean"
    """How the SFT NLL reduces over tokens, wherever it is (the ``sft_weight`` term, the ``sft`` loss, ``dpolab sft``): ``batch_token_mean`` (the token-weighted mean over the batch, TRL's), ``token_mean`` (each completion's mean, then the batch mean) or ``sum``."""
    ld_alpha: float | None = None
    """LD-DPO: weight of completion tokens beyond the shorter completion's length, in [0, 1] (TRL's ld_alpha)."""
    use_weighting: bool = False
    """WPO: weight each pair by exp(mean token (log p − log Σ p²)) of chosen times rejected (TRL's use_weighting)."""

    # --- optimisation ----------------------------------------------------------------------
    learning_rate: float = 1e-6
    """AdamW peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.999
    """AdamW β2."""
    adam_epsilon: float = 1e-8
    """AdamW ε."""
    lr_scheduler: str = "linear"
    """``linear`` (decay to 0), ``cosine`` or ``constant``, after warmup."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent in linear warmup from 0."""
    warmup_steps: int = 0
    """Warmup steps; overrides ``warmup_ratio`` when > 0."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; ``null`` to disable."""
    batch_size: int = 8
    """Pairs per micro-batch (per process)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimiser step; pairs per step = batch_size × this × processes. A step never crosses an epoch's end: the last step of an epoch takes the micro-batches left."""
    epochs: float = 1.0
    """Passes over the training pairs (may be fractional)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (overrides ``epochs``)."""
    seed: int = 42
    """Seeds model init of anything random, data order and the eval split."""
    row_tokens: int = 2048
    """Token budget of one packed row: several pairs share a row up to this many tokens (a longer pair gets a row of its own); rows are balanced so padding is small. With the ``segments``, ``varlen`` and ``flex`` attention kernels a row costs what its pairs cost, whatever its length; with ``dense``, attention grows with the square of the row length (docs/performance.md)."""
    packing: bool = True
    """Prefix-shared packed forward; false forces the naive path (one padded row per sequence)."""
    attention_kernel: str = "auto"
    """Attention over packed rows (docs/training.md#the-forward): ``segments`` (each pair's own attention, any device), ``varlen`` (each pair's branches as causal sequences through one variable-length kernel: flash-attn or PyTorch's varlen_attn on CUDA, a reference loop elsewhere), ``flex`` (a FlexAttention block mask; CUDA), ``dense`` (a 4D mask through the model's kernel), or ``auto``: flex then varlen on CUDA, else segments, then dense, then the naive path, each checked on the first pairs with the reason logged."""
    logit_chunk_tokens: int = 0
    """The LM head's log-softmax over this many completion tokens at a time, recomputed in backward: memory O(chunk × vocabulary) instead of O(tokens × vocabulary). With a 131k vocabulary, 256 cut a run's peak RSS from 5.6 to 2.5 GB (0.44×) at the same speed; with a 4k one it looked slower (docs/performance.md), so 0 (all tokens at once) stays the default: set 256 for large vocabularies."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of keeping them (Hugging Face's non-reentrant checkpointing): activation memory for about one more forward of time (CPU benchmark: peak RSS 1,050 → 813 MiB, step +23%). TRL's DPOConfig turns it on by default."""
    compile: bool = False
    """``torch.compile`` each decoder layer (dynamic shapes; the first steps pay the compilation). Off by default: over 32 steps on CPU it made training slower, compilation included (docs/performance.md)."""

    # --- RLHF-PPO ---------------------------------------------------------------------------
    ppo: PPOSettings | None = None
    """Settings of ``dpolab ppo`` (docs/rlhf.md, :class:`dpolab.settings.PPOSettings`): ``{reward: {judge: math}, value_model: head, advantage: gae, samples_per_prompt: 1, max_new_tokens: 64, kl_coef: 0.05, ppo_epochs: 4, …}``. ``batch_size`` is then prompts per process per rollout."""

    # --- monitoring ---------------------------------------------------------------------------
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    """The 3D monitor (docs/monitor.md, :class:`dpolab.settings.MonitorSettings`): ``{enabled: true, window: 20, probe_steps: 50, probe_pairs: 8, sample_prompts: 4, sample_tokens: 32, on_alarm: warn, …thresholds}``; ``{enabled: false}`` turns it off. Task ppo: ``pairs: FILE`` of held-out preference pairs for its likelihood probes."""

    # --- outputs ---------------------------------------------------------------------------
    output_dir: str = "runs/dpo"
    """Run directory: config, metrics.jsonl, TensorBoard events, final model."""
    logging_steps: int = 1
    """Write metrics every N optimiser steps."""
    eval_steps: int | None = None
    """Evaluate on the held-out pairs every N steps (and at the end); default: only at the end."""
    eval_harness: EvalHarnessSettings | None = None
    """lm-evaluation-harness on the policy in memory during training (docs/evaluation.md#during-training, :class:`dpolab.settings.EvalHarnessSettings`): ``{tasks: [gsm8k_plain], every: 100, data_dir: DIR, limit: 200, num_fewshot: 0, …}``; every N steps and at the end, into harness.jsonl, metrics, TensorBoard and the report. Needs the eval extra; not under FSDP."""
    save_model: bool = True
    """Save the final model and tokenizer (safetensors, HF format) to output_dir/model."""
    tensorboard: bool = True
    """Write TensorBoard events to output_dir/tensorboard (needs the tensorboard package)."""
    checkpoint_steps: int | None = None
    """Write a checkpoint every N steps (always one at the end and on SIGINT/SIGTERM)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (at least 1: the final one is always kept)."""
    skip_nonfinite: bool = False
    """On NaN/inf in the loss or gradients: false stops the run naming the step and data rows; true skips the batch (no update) and counts it."""
    max_nonfinite: int = 10
    """With skip_nonfinite, stop after this many skipped batches."""
    allow_pickle: bool = False
    """Allow loading model weights from pickle files (.bin); off, only safetensors are read."""
    cache_dir: str = "~/.cache/dpolab"
    """Where reference log-probs are cached across runs."""
    progress: bool = True
    """Show progress (reference pass and training): a live bar on a terminal, plain periodic lines in a pipe or CI."""
    threads: int | None = None
    """Torch CPU threads of this process; default: ``OMP_NUM_THREADS`` if set, else the cores ÷ the processes of this run on the machine, else every core. Set 1 for each of several runs sharing a small machine."""

    # ------------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        # The nested sections are read once, here, into their typed settings (a mapping from YAML or the CLI,
        # or settings already): every later use reads fields, never the mapping again.
        if self.lora is not None:
            self.lora = lora_settings(self.lora)
        self.monitor = monitor_settings(self.monitor)
        if self.ppo is not None:
            self.ppo = ppo_settings(self.ppo) if self.ppo or isinstance(self.ppo, PPOSettings) else None
        if self.eval_harness is not None:
            self.eval_harness = eval_harness_settings(self.eval_harness) if self.eval_harness else None

    def validate(self) -> None:
        """Types, ranges and files; ``ValueError`` naming the key. Loads no model."""
        for key in ("model", "data"):
            if not getattr(self, key):
                raise ValueError(f"{key}: required")
        hints = typing.get_type_hints(TrainConfig)
        for item in dataclasses.fields(self):
            check_type(item.name, getattr(self, item.name), hints[item.name])
        positive = (
            "learning_rate",
            "batch_size",
            "gradient_accumulation_steps",
            "epochs",
            "row_tokens",
            "logging_steps",
            "adam_epsilon",
            "keep_checkpoints",
        )
        for key in positive:
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be > 0; got {getattr(self, key)!r}")
        for key in (
            "max_steps",
            "eval_steps",
            "max_length",
            "max_prompt_length",
            "max_grad_norm",
            "checkpoint_steps",
            "threads",
        ):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{key}: must be > 0 or null; got {value!r}")
        if None not in (self.max_prompt_length, self.max_length) and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length: must be smaller than max_length ({self.max_length}) to leave room for a "
                f"completion; got {self.max_prompt_length!r}"
            )
        for key in ("weight_decay", "warmup_steps", "sft_weight", "max_nonfinite", "logit_chunk_tokens"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0; got {getattr(self, key)!r}")
        for key in ("warmup_ratio", "adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key}: must lie in [0, 1); got {getattr(self, key)!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: must lie in [0, 1); got {self.eval_fraction!r}")
        check_max_row_bytes(self.max_row_bytes)
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ValueError(f"ld_alpha: must lie in [0, 1]; got {self.ld_alpha!r}")
        choices = {
            "lr_scheduler": ("linear", "cosine", "constant"),
            "dtype": ("auto", "float32", "bfloat16", "float16"),
            "sft_reduction": ("token_mean", "sum", "batch_token_mean"),
            "on_bad_rows": ("error", "skip"),
            "task": tuple(RECIPES),
            "mixed_precision": ("auto", "no", "bf16", "fp16"),
            "truncation_mode": ("keep_end", "keep_start", "drop"),
            "attention_kernel": ("auto", "segments", "varlen", "flex", "dense"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed: must lie in [0, 2**32); got {self.seed!r}")
        for key in ("data", "eval_data"):
            value = getattr(self, key)
            if value and looks_local(value) and not Path(value).expanduser().exists():
                raise ValueError(f"{key}: no such file: {value}")
        folders = {"model": self.model, "tokenizer": self.tokenizer}
        if self.reference not in ("auto", "none"):
            folders["reference"] = self.reference
        for key, value in folders.items():
            if value and looks_like_path(value) and not Path(value).expanduser().is_dir():
                raise ValueError(f"{key}: no such folder: {value}")
        for key in ("output_dir", "cache_dir"):
            _check_writable_folder(key, getattr(self, key))
        self._check_output_apart_from_inputs()
        from dpolab.losses import objective_from_config

        pairs = self.monitor.pairs
        if pairs is not None and self.task != "ppo":
            raise ValueError(
                "monitor.pairs: read by task ppo only (preference training probes its own eval pairs: eval_data)"
            )
        if pairs is not None and looks_local(pairs) and not Path(pairs).expanduser().exists():
            raise ValueError(f"monitor.pairs: no such file: {pairs}")
        if self.eval_harness:
            if self.task == "reward":
                raise ValueError("eval_harness: evaluates a language model; task reward trains a scorer")
            from dpolab.train.harness_eval import check_files

            check_files(self.eval_harness)
        names = [self.loss] if isinstance(self.loss, str) else list(self.loss)
        if self.task == "sft" and names != ["sft"]:
            raise ValueError(f"loss: task sft trains with loss: sft; got {self.loss!r}")
        if self.task == "reward":
            self._check_reward_task(names)
            return
        if self.task == "ppo":
            self._check_ppo_task(names)
            return
        if self.ppo is not None:
            raise ValueError("ppo: settings of dpolab ppo (task: ppo); not used by this task")
        if "reward_model" in names:
            raise ValueError("loss: reward_model trains a reward model: use dpolab rm (task: reward)")

        try:
            objective_from_config(self.loss, self.loss_weights, self.loss_params, self.sft_weight, self.sft_reduction)
        except ValueError as error:
            raise ValueError(f"loss: {error}") from None

    def _refuse_preference_keys(self, task: str, **also: bool) -> None:
        """A task that trains on no pair log-probs: the preference loss's keys set here are an error naming the key."""
        not_used = {
            "sft_weight": self.sft_weight != 0,
            "ld_alpha": self.ld_alpha is not None,
            "use_weighting": self.use_weighting,
            "loss_weights": self.loss_weights is not None,
            **also,
        }
        for key, set_here in not_used.items():
            if set_here:
                raise ValueError(f"{key}: not used by task {task}")

    def _check_reward_task(self, names: list[str]) -> None:
        """``task: reward`` trains with the Bradley–Terry loss only, on scores: the log-prob options do not apply."""
        from dpolab.losses import get_loss

        if names != ["reward_model"]:
            raise ValueError(f"loss: task reward trains with loss: reward_model; got {self.loss!r}")
        self._refuse_preference_keys(
            "reward (a reward model scores sequences; no log-probs)", reference=self.reference not in ("auto", "none")
        )
        if not isinstance(self.loss_params, dict):
            raise ValueError("loss_params: task reward takes one mapping, e.g. {center_coefficient: 0.01}")
        try:
            get_loss("reward_model").check_params(self.loss_params)
        except ValueError as error:
            raise ValueError(f"loss_params: {error}") from None

    def _check_ppo_task(self, names: list[str]) -> None:
        """``task: ppo`` trains on prompts with the PPO objective of the ``ppo:`` settings: no preference loss keys."""
        from dpolab.eval.judges import rules_problem

        if names != ["ppo"]:
            raise ValueError(f"loss: task ppo trains with the PPO objective (loss: ppo); got {self.loss!r}")
        self._refuse_preference_keys(
            "ppo (its settings are under ppo:, docs/rlhf.md)", loss_params=bool(self.loss_params)
        )
        if self.reference == "none":
            raise ValueError("reference: PPO needs a reference for its KL term: auto (the initial policy) or a model")
        settings = self.ppo if self.ppo is not None else ppo_settings({})  # no ppo: names the missing reward
        if "rules" in settings.reward:
            problem = rules_problem(settings.reward["rules"], "reward.rules")
            if problem:
                raise ValueError(f"ppo.{problem}")
        for key, value in (("reward.model", settings.reward.get("model")), ("value_model", settings.value_model)):
            if (
                value
                and value not in ("head", "none")
                and looks_like_path(value)
                and not Path(value).expanduser().is_dir()
            ):
                raise ValueError(f"ppo.{key}: no such folder: {value}")

    def _check_output_apart_from_inputs(self) -> None:
        """``output_dir`` may neither be, contain, nor lie inside an input: ``--overwrite`` or a new run
        would then delete or overwrite the model, the data or the cache it reads."""
        from dpolab.outputs import RUN_FILES, check_output

        inputs = {"model": self.model, "tokenizer": self.tokenizer, "data": self.data, "eval_data": self.eval_data}
        if self.reference not in ("auto", "none"):
            inputs["reference"] = self.reference
        inputs["cache_dir"] = self.cache_dir
        # the nested settings' files too: ppo.reward.model, ppo.value_model, monitor.pairs, eval_harness.data…
        sections = self.to_dict()
        for key, value in dotted_keys({k: sections[k] for k in ("ppo", "monitor", "eval_harness")}).items():
            if isinstance(value, str) and value and Path(value).expanduser().exists():
                inputs[key] = value
        writes = RUN_FILES["train"] | {"samples.jsonl", "harness.jsonl"}
        check_output(self.output_dir, "train", inputs, "output_dir", writes=writes)

    def to_dict(self) -> dict:
        """The config as YAML writes it: the typed sections as mappings (lora's other fields at its top level)."""
        values = dataclasses.asdict(self)
        if self.lora is not None:
            values["lora"] = self.lora.to_dict()
        return values

    def with_absolute_paths(self) -> TrainConfig:
        """A copy whose local paths (model, tokenizer, reference, data, eval data, cache, output folder) are
        absolute, so the config.yaml a run writes resumes from any working directory. Hub ids stay as they are."""
        changes = {}
        for key in ("model", "tokenizer", "reference", "data", "eval_data", "cache_dir", "output_dir"):
            value = getattr(self, key)
            if not value or (key == "reference" and value in ("auto", "none")):
                continue
            local = key in ("cache_dir", "output_dir") or (
                looks_local if key in ("data", "eval_data") else looks_like_path
            )(value)
            if local:
                changes[key] = str(Path(value).expanduser().absolute())
        if self.ppo is not None:  # the reward model and the critic are inputs too
            reward = dict(self.ppo.reward)
            if isinstance(reward.get("model"), str) and looks_like_path(reward["model"]):
                reward["model"] = str(Path(reward["model"]).expanduser().absolute())
            critic = self.ppo.value_model
            if critic not in ("head", "none") and looks_like_path(critic):
                critic = str(Path(critic).expanduser().absolute())
            changes["ppo"] = dataclasses.replace(self.ppo, reward=reward, value_model=critic)
        if self.eval_harness is not None:
            from dpolab.train.harness_eval import absolute_paths

            changes["eval_harness"] = absolute_paths(self.eval_harness)
        pairs = self.monitor.pairs
        if pairs is not None and looks_local(pairs):  # the PPO monitor's held-out pairs
            changes["monitor"] = dataclasses.replace(self.monitor, pairs=str(Path(pairs).expanduser().absolute()))
        return dataclasses.replace(self, **changes)


def _check_writable_folder(key: str, value: str) -> None:
    """``value`` is a folder, or can be made one: neither it nor a parent is a file, and its nearest existing
    ancestor is writable."""
    path = Path(value).expanduser()
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                where = "is a file" if ancestor == path else f"cannot be made: {ancestor} is a file"
                raise ValueError(f"{key}: {value} {where}")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise ValueError(f"{key}: {value} is not writable (no write permission on {ancestor})")
            return


def field_docs() -> dict[str, str]:
    """Field name → its docstring (the attribute docstrings in this file's source)."""
    return attribute_docs(TrainConfig)


def load_config(
    path: str | None = None, overrides: list[str] | None = None, defaults: dict | None = None
) -> TrainConfig:
    """YAML file (safe loader) plus ``--key value`` overrides (values parsed as YAML, ``--a.b v`` sets a nested key)."""
    data: dict = {}
    if path:
        file = Path(path)
        if not file.exists():
            raise ValueError(f"config: no such file: {path}")
        if not file.is_file():
            raise ValueError(f"config: {path} is not a file")
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"config: cannot read {path}: {error}") from None
        data = safe_yaml.load(text, path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
    data = {**(defaults or {}), **data}
    tokens = list(overrides or [])
    while tokens:
        flag = tokens.pop(0)
        if not flag.startswith("--"):
            raise ValueError(f"expected --key value, got {flag!r}")
        key, _, inline = flag[2:].partition("=")
        if not inline:
            # A value never starts with "--" (negative numbers have one dash): "--beta --max_steps 3" lacks beta's.
            if not tokens or tokens[0].startswith("--"):
                raise ValueError(f"--{key}: missing value")
            inline = tokens.pop(0)
        value = safe_yaml.load(inline, f"--{key}")
        key = key.replace("-", "_")
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"--{key}: {parent} is not a mapping")
        target[leaf] = value
    data = translate_trl_names(data)
    data = one_sft_reduction(data)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = NOT_NEEDED.get(key) or (f"did you mean {close[0]!r}?" if close else "")
        raise ValueError(f"unknown config key {key!r}" + (f" ({hint})" if hint else "") + "; see dpolab train --keys")
    hints = typing.get_type_hints(TrainConfig)
    for key, value in data.items():
        data[key] = yaml_floats(value, hints[key])
    config = TrainConfig(**data)
    config.validate()
    return config


# TRL's DPOConfig / TrainingArguments names with the same meaning here: name → (dpolab key, value map or None).
TRL_NAMES: dict[str, tuple[str, dict | None]] = {
    "loss_type": ("loss", None),
    "per_device_train_batch_size": ("batch_size", None),
    "num_train_epochs": ("epochs", None),
    "lr_scheduler_type": ("lr_scheduler", None),
    "model_name_or_path": ("model", None),
    "save_steps": ("checkpoint_steps", None),
    "save_total_limit": ("keep_checkpoints", None),
    "bf16": ("mixed_precision", {True: "bf16", False: "no"}),
    "fp16": ("mixed_precision", {True: "fp16", False: "no"}),
    "center_rewards_coefficient": ("loss_params.center_coefficient", None),
}

# Names of TRL options that have no key here, with why.
NOT_NEEDED = {
    "precompute_ref_log_probs": "dpolab always computes the reference log-probs once, before training, and caches them",
    "per_device_eval_batch_size": "evaluation uses batch_size",
    "rpo_alpha": "use sft_weight (the 3D paper's α·NLL(chosen)); TRL's rpo_alpha normalises differently",
    "report_to": "dpolab writes metrics.jsonl and, with tensorboard: true, TensorBoard events",
    "dataset_name": "use data (a file or a datasets id)",
    "eval_strategy": "use eval_steps",
    "save_strategy": "use checkpoint_steps",
    "logging_strategy": "use logging_steps",
}


def translate_trl_names(data: dict) -> dict:
    """``data`` with TRL's names replaced by dpolab's (a one-line note each on stderr); a clash is an error."""
    import sys

    data = dict(data)
    for name, (key, values) in TRL_NAMES.items():
        if name not in data:
            continue
        value = data.pop(name)
        if values is not None:
            if value not in values:
                raise ValueError(f"{name}: expected one of {', '.join(map(str, values))}; got {value!r}")
            if value is False and key in data:
                continue  # bf16: false next to an explicit mixed_precision says nothing more
            value = values[value]
        *parents, leaf = key.split(".")
        target = data
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"{name}: {parent} is not a mapping")
        if leaf in target and target[leaf] != value:
            raise ValueError(f"{name} (TRL's name for {key}) = {value!r} conflicts with {key} = {target[leaf]!r}")
        target[leaf] = value
        print(f"note: TRL's {name} is {key} in dpolab (using {key}: {value})", file=sys.stderr)
    if "beta" in data:
        data = _translate_trl_beta(data)
    return data


def _translate_trl_beta(data: dict) -> dict:
    """TRL's ``beta`` into the parameter each loss reads it as (:func:`dpolab.losses.trl_beta_keys`: ``beta``,
    ``tau`` for IPO, none for ``sft``), as :func:`dpolab.losses.objective_from_trl` does."""
    import sys

    from dpolab.losses import get_loss

    value = data.pop("beta")
    loss = data.get("loss", "dpo")
    names = [loss] if isinstance(loss, str) else list(loss) if isinstance(loss, list) else []
    params = data.get("loss_params")
    per_loss = isinstance(params, list)
    targets = params if per_loss else [params if isinstance(params, dict) else {}] * len(names)
    if per_loss and len(targets) != len(names):
        return {**data, "beta": value}  # the loss_params check names the mismatch
    written = []
    for name, target in zip(names, targets, strict=True):
        key = get_loss(name).trl_beta if isinstance(name, str) else None
        if key is None:
            continue
        if key in target and target[key] != value:
            raise ValueError(f"beta (TRL's name for loss_params.{key} of {name}) = {value!r} conflicts with "
                             f"loss_params.{key} = {target[key]!r}")  # fmt: skip
        target[key] = value
        written.append(f"loss_params.{key}")
    data["loss_params"] = targets if per_loss else (targets[0] if targets else {})
    shown = ", ".join(dict.fromkeys(written)) or "nothing: no loss reads it"
    print(f"note: TRL's beta is {shown} in dpolab (using {value})", file=sys.stderr)
    return data


def one_sft_reduction(data: dict) -> dict:
    """``loss_params.reduction`` of the ``sft`` loss, the key before there was one for every SFT NLL, is
    ``sft_reduction`` (a note on stderr); both at once, disagreeing, is an error."""
    import sys

    params = data.get("loss_params")
    if not (isinstance(params, dict) and "reduction" in params and data.get("loss") == "sft"):
        return data
    data = {**data, "loss_params": {k: v for k, v in params.items() if k != "reduction"}}
    value = params["reduction"]
    if "sft_reduction" in data and data["sft_reduction"] != value:
        raise ValueError(
            f"loss_params.reduction ({value!r}) and sft_reduction ({data['sft_reduction']!r}) disagree; "
            "sft_reduction is the one key: drop loss_params.reduction"
        )
    print(f"note: loss_params.reduction is sft_reduction in dpolab (using sft_reduction: {value})", file=sys.stderr)
    return {**data, "sft_reduction": value}


def upgrade_saved_config(saved: dict) -> dict:
    """A checkpoint's config as this version writes it, so that resuming compares like with like.

    - The nested sections as their typed settings write them (every field, defaults included): a checkpoint
      from before typed settings holds only the keys its run was given (``monitor: {}``; ``ppo: {}`` off task
      ppo, now null).
    - Before one ``sft_reduction`` key, ``dpolab sft`` read ``loss_params.reduction`` and ignored
      ``sft_reduction``.

    A section that does not read (a checkpoint of an incompatible version) is left as it was: the resume then
    names it as changed."""
    saved = dict(saved)
    params = saved.get("loss_params")
    if saved.get("task") == "sft" and isinstance(params, dict) and "reduction" in params:
        saved["loss_params"] = {key: value for key, value in params.items() if key != "reduction"}
        saved["sft_reduction"] = params["reduction"]
    readers = {"lora": lora_settings, "monitor": monitor_settings, "ppo": ppo_settings,
               "eval_harness": eval_harness_settings}  # fmt: skip
    for key, read in readers.items():
        value = saved.get(key)
        if key in ("ppo", "eval_harness", "lora") and not value:
            saved[key] = None
            continue
        try:
            settings = read(value)
        except ValueError:
            continue
        saved[key] = settings.to_dict() if key == "lora" else dataclasses.asdict(settings)
    return saved


def default_text(item: dataclasses.Field) -> str:
    """A field's default as a YAML reader would write it; ``(required)`` for the empty required strings."""
    default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
    if default is None:
        return "null"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, str):
        return default or "(required)"
    if dataclasses.is_dataclass(default):
        return "{}"  # a section of typed settings, each at its own default (they are listed with the section)
    return repr(default)


def key_groups() -> list[tuple[str, list[dataclasses.Field]]]:
    """The fields under the ``# --- group ---`` comments of :class:`TrainConfig`, in order."""
    source = inspect.getsource(TrainConfig).splitlines()
    fields = {item.name: item for item in dataclasses.fields(TrainConfig)}
    groups: list[tuple[str, list[dataclasses.Field]]] = [("task", [])]
    for line in source:
        stripped = line.strip()
        if stripped.startswith("# ---") and stripped.strip("# -"):
            groups.append((stripped.strip("# -"), []))
        name = stripped.split(":", 1)[0]
        if name in fields and ":" in stripped and not stripped.startswith(("#", '"')):
            groups[-1][1].append(fields.pop(name))
    return [(title, items) for title, items in groups if items]


def keys_help(width: int = 100) -> str:
    """``dpolab train --keys``: every key by group, with its default and meaning."""
    import textwrap

    docs = field_docs()
    lines = ["Config keys (YAML keys or --key value flags; nested: --loss_params.beta 0.3):"]
    for title, items in key_groups():
        lines.append(f"\n{title}:")
        for item in items:
            lines.append(f"  {item.name} (default: {default_text(item)})")
            meaning = " ".join(docs[item.name].replace("``", "").split())
            lines += textwrap.wrap(meaning, max(width - 6, 40), initial_indent="      ", subsequent_indent="      ")
    lines.append(
        "\nTRL's names are accepted where the meaning is the same: "
        + ", ".join(f"{name} → {key}" for name, (key, _) in TRL_NAMES.items())
        + "."
    )
    return "\n".join(lines)


def keys_summary() -> str:
    """The short list under ``dpolab train --help``: names and defaults by group."""
    lines = ["config keys (default in brackets; meanings: dpolab train --keys, docs/training.md):"]
    for title, items in key_groups():
        line = f"  {title}:"
        for index, item in enumerate(items):
            entry = f" {item.name} [{default_text(item)}]" + ("," if index < len(items) - 1 else "")
            if len(line) + len(entry) > 96:  # an entry is never split across lines
                lines.append(line)
                line = "     "
            line += entry
        lines.append(line)
    return "\n".join(lines)


def keys_table() -> str:
    """The "Every key" table of docs/training.md: ``python -m dpolab.train.config``."""
    docs = field_docs()
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for item in dataclasses.fields(TrainConfig):
        shown = default_text(item)
        shown = shown if shown == "(required)" else f"`{shown}`"
        meaning = docs[item.name].replace("|", "\\|")
        lines.append(f"| `{item.name}` | {shown} | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(keys_table())
