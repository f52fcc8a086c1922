"""``dpolab train`` configuration: one dataclass; YAML keys and CLI flags are its field names.

Unknown keys, wrong types and impossible values fail with one line naming the key, before any model
is loaded. docs/training.md lists every field (generated from the docstrings below).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    task: str = "preference"
    """``preference`` (pairs: prompt, chosen, rejected) or ``sft`` (prompt + completion, or messages; `dpolab sft` sets it)."""

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
    lora: dict | None = None
    """LoRA via peft (``pip install dpolab[peft]``), e.g. ``{r: 16, alpha: 32, dropout: 0.05, target_modules: [q_proj, v_proj]}``."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 in policy and reference (log-probs of the same text then agree)."""

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
    max_length: int | None = 1024
    """Most tokens in prompt + one completion. Longer completions are truncated; pairs whose prompt alone reaches it are dropped. Both are counted and reported."""

    # --- loss ------------------------------------------------------------------------------
    loss: str | list[str] = "dpo"
    """A loss from ``dpolab losses``, or a list for a weighted sum (TRL's loss_type list)."""
    loss_weights: list[float] | None = None
    """Weights of the losses in ``loss``; default 1 each."""
    loss_params: dict = field(default_factory=dict)
    """Parameters of the losses, e.g. ``{beta: 0.1}`` or ``{beta: 0.3, lam: 50}``; unknown names are an error."""
    sft_weight: float = 0.0
    """α of the SFT term α·NLL(chosen) added to the loss (3D paper Eq. 7)."""
    sft_reduction: str = "token_mean"
    """How the SFT term reduces over tokens: ``token_mean``, ``sum`` or ``batch_token_mean``."""
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
    row_tokens: int = 512
    """Token budget of one packed row: several pairs share a row up to this many tokens (a longer pair gets a row of its own). Attention is dense within a row, so its cost grows with the square of the row length: 512 was 2.1× faster per step than 2048 on the benchmark's 5M model (docs/performance.md); 256 suits the quickstart's tiny one."""
    packing: bool = True
    """Prefix-shared packed forward; false forces the naive path (one padded row per sequence)."""

    # --- monitoring ---------------------------------------------------------------------------
    monitor: dict = field(default_factory=dict)
    """The 3D monitor (docs/monitor.md): ``{enabled: true, window: 20, probe_steps: 50, probe_pairs: 8, sample_prompts: 4, sample_tokens: 32, on_alarm: warn, …thresholds}``; ``{enabled: false}`` turns it off."""

    # --- outputs ---------------------------------------------------------------------------
    output_dir: str = "runs/dpo"
    """Run directory: config, metrics.jsonl, TensorBoard events, final model."""
    logging_steps: int = 1
    """Write metrics every N optimiser steps."""
    eval_steps: int | None = None
    """Evaluate on the held-out pairs every N steps (and at the end); default: only at the end."""
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
    """Show progress bars (reference pass and training)."""

    # ------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Types, ranges and files; ``ValueError`` naming the key. Loads no model."""
        for key in ("model", "data"):
            if not getattr(self, key):
                raise ValueError(f"{key}: required")
        hints = typing.get_type_hints(TrainConfig)
        for item in dataclasses.fields(self):
            _check_type(item.name, getattr(self, item.name), hints[item.name])
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
        for key in ("max_steps", "eval_steps", "max_length", "max_grad_norm", "checkpoint_steps"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{key}: must be > 0 or null; got {value!r}")
        for key in ("weight_decay", "warmup_steps", "sft_weight", "max_nonfinite"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0; got {getattr(self, key)!r}")
        for key in ("warmup_ratio", "adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key}: must lie in [0, 1); got {getattr(self, key)!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: must lie in [0, 1); got {self.eval_fraction!r}")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ValueError(f"ld_alpha: must lie in [0, 1]; got {self.ld_alpha!r}")
        choices = {
            "lr_scheduler": ("linear", "cosine", "constant"),
            "dtype": ("auto", "float32", "bfloat16", "float16"),
            "sft_reduction": ("token_mean", "sum", "batch_token_mean"),
            "on_bad_rows": ("error", "skip"),
            "task": ("preference", "sft"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        for key in ("data", "eval_data"):
            value = getattr(self, key)
            if value and _looks_like_path(value) and not Path(value).exists():
                raise ValueError(f"{key}: file not found: {value}")
        if _looks_like_path(self.model) and not Path(self.model).exists():
            raise ValueError(f"model: directory not found: {self.model}")
        self._check_output_apart_from_inputs()
        from dpolab.losses import objective_from_config
        from dpolab.train.monitor import monitor_config

        monitor_config(self.monitor)
        names = [self.loss] if isinstance(self.loss, str) else list(self.loss)
        if self.task == "sft" and names != ["sft"]:
            raise ValueError(f"loss: task sft trains with loss: sft; got {self.loss!r}")

        try:
            objective_from_config(self.loss, self.loss_weights, self.loss_params, self.sft_weight, self.sft_reduction)
        except ValueError as error:
            raise ValueError(f"loss: {error}") from None

    def _check_output_apart_from_inputs(self) -> None:
        """``output_dir`` may neither be, contain, nor lie inside an input: ``--overwrite`` or a new run
        would then delete or overwrite the model, the data or the cache it reads."""
        out = Path(self.output_dir).expanduser().resolve()
        inputs = {"model": self.model, "tokenizer": self.tokenizer, "data": self.data, "eval_data": self.eval_data}
        if self.reference not in ("auto", "none"):
            inputs["reference"] = self.reference
        inputs["cache_dir"] = self.cache_dir
        for key, value in inputs.items():
            if not value or (key != "cache_dir" and not Path(value).expanduser().exists()):
                continue  # a hub id or an unset key
            path = Path(value).expanduser().resolve()
            if path == out or out in path.parents:
                raise ValueError(
                    f"output_dir {self.output_dir} contains the {key} ({value}); a run there could overwrite or "
                    "delete it: choose an output_dir outside every input"
                )
            if path in out.parents:
                raise ValueError(
                    f"output_dir {self.output_dir} is inside the {key} ({value}); choose an output_dir outside "
                    "every input"
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _looks_like_path(value: str) -> bool:
    return (
        value.startswith((".", "/", "~"))
        or Path(value).suffix in (".jsonl", ".json", ".parquet", ".csv")
        or value.count("/") > 1
    )


def _check_type(key: str, value: object, hint) -> None:
    """A small runtime check of the annotated type: str, int, float, bool, list, dict, Optional, unions."""
    options = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None))
        else (hint,)
    )
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return
        if origin is bool and isinstance(value, bool):
            return
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if origin in (str, list, dict) and isinstance(value, origin):
            return
    names = " or ".join(getattr(o, "__name__", str(o)).replace("NoneType", "null") for o in options)
    raise ValueError(f"{key}: expected {names}; got {value!r}")


def field_docs() -> dict[str, str]:
    """Field name → its docstring (the attribute docstrings in this file's source)."""
    source = inspect.getsource(TrainConfig)
    tree = ast.parse(source)
    docs = {}
    body = tree.body[0].body
    for current, following in zip(body, body[1:], strict=False):
        if (
            isinstance(current, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[current.target.id] = following.value.value
    return docs


def load_config(
    path: str | None = None, overrides: list[str] | None = None, defaults: dict | None = None
) -> TrainConfig:
    """YAML file (safe loader) plus ``--key value`` overrides (values parsed as YAML, ``--a.b v`` sets a nested key)."""
    data: dict = {}
    if path:
        file = Path(path)
        if not file.exists():
            raise ValueError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML: {error}") from None
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
            if not tokens:
                raise ValueError(f"--{key}: missing value")
            inline = tokens.pop(0)
        value = yaml.safe_load(inline)
        key = key.replace("-", "_")
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"--{key}: {parent} is not a mapping")
        target[leaf] = value
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown config key {unknown[0]!r}{hint}")
    hints = typing.get_type_hints(TrainConfig)
    for key, value in data.items():
        # YAML 1.1 reads "1e-5" (no dot) as a string; accept it where a float is expected.
        if isinstance(value, str) and float in (typing.get_args(hints[key]) or (hints[key],)):
            try:
                data[key] = float(value)
            except ValueError:
                pass
    config = TrainConfig(**data)
    config.validate()
    return config


def markdown_table() -> str:
    """The "Every key" table of docs/training.md: ``python -m dpolab.train.config``."""
    docs = field_docs()
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for item in dataclasses.fields(TrainConfig):
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        if default is None:
            shown = "`null`"
        elif isinstance(default, str):
            shown = f"`{default}`" if default else "(required)"
        else:
            shown = f"`{default!r}`"
        meaning = docs[item.name].replace("|", "\\|")
        lines.append(f"| `{item.name}` | {shown} | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
