"""Typed settings: the nested sections of a training config (``lora:``, ``monitor:``, ``ppo:``, ``eval_harness:``)
as dataclasses, and the one way every settings mapping is read.

Each section is parsed once, when the config is loaded (:func:`parse`): a mapping, known keys only (an unknown
one is named with the closest known one), each value of its annotated type, then the section's own ``check``
of values and combinations. Errors are one ``ValueError`` naming ``section.key``. The YAML keys are the field
names, and every field has a docstring (``dpolab train --keys``, docs/training.md and docs/rlhf.md list them).

This module imports nothing of dpolab's: the recipes, the sweep and the report read it; it reads none of them.
Checks that need another layer (a rule file's rules, an evaluation's data files) are made by the config
(:meth:`dpolab.train.config.TrainConfig.validate`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field

# --- reading a mapping into a dataclass ----------------------------------------------------------------------


def parse(cls, values: object, key: str, noun: str, docs: str):
    """The ``key:`` mapping as the settings dataclass ``cls``: a mapping, known fields only (an unknown one is
    named with the closest known one), each of its annotated type (numbers YAML reads as strings, "1e-5",
    accepted as floats), then ``cls.check(settings, key)`` when the class has one. ``ValueError`` naming
    ``key.field``; ``noun`` says what a field is ("a PPO setting"), ``docs`` where they are described."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"{key}: expected a mapping of settings ({docs}); got {values!r}")
    known = [item.name for item in dataclasses.fields(cls)]
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key}.{name}: not {noun}{hint}; see {docs}")
    hints = typing.get_type_hints(cls)
    values = {name: yaml_floats(value, hints[name]) for name, value in values.items()}
    for name, value in values.items():
        check_type(f"{key}.{name}", value, hints[name])
    settings = cls(**values)
    if hasattr(settings, "check"):
        settings.check(key)
    return settings


def _options(hint) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def yaml_floats(value: object, hint) -> object:
    """``value`` with the numbers YAML 1.1 reads as strings ("1e-5", "-1e-9": no dot) made floats wherever
    ``hint`` expects a float, list elements included (``loss_weights: [1, 1e-9]``)."""
    options = _options(hint)
    if isinstance(value, str) and float in options:
        try:
            return float(value)
        except ValueError:
            return value
    lists = [typing.get_args(o)[0] for o in options if typing.get_origin(o) is list and typing.get_args(o)]
    if isinstance(value, list) and lists:
        return [yaml_floats(item, lists[0]) for item in value]
    return value


def check_type(key: str, value: object, hint) -> None:
    """A small runtime check of the annotated type: str, int, float, bool, list[...], dict, Optional, unions.

    Floats must be finite (``.inf`` and ``.nan`` parse as YAML floats); list elements are checked too.
    """
    options = _options(hint)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return
        if origin is bool and isinstance(value, bool):
            return
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{key}: must be a finite number; got {value!r}")
            return
        if origin is list and isinstance(value, list):
            (element,) = typing.get_args(option) or (object,)
            for index, item in enumerate(value):
                if element is not object:
                    check_type(f"{key}[{index}]", item, element)
            return
        if origin in (str, dict) and isinstance(value, origin):
            return
        if dataclasses.is_dataclass(origin) and isinstance(value, (dict, origin)):
            return  # a nested section: parsed by its own class
    names = " or ".join(type_name(o) for o in options)
    raise ValueError(f"{key}: expected {names}; got {value!r}")


def type_name(option) -> str:
    if typing.get_origin(option) is list:
        return f"list of {type_name(typing.get_args(option)[0])}"
    return "null" if option is type(None) else getattr(option, "__name__", str(option))


def attribute_docs(cls) -> dict[str, str]:
    """Field name → its docstring (the string under each annotated attribute of a dataclass's source)."""
    tree = ast.parse(inspect.getsource(cls))
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


def default_of(item: dataclasses.Field):
    return item.default if item.default is not dataclasses.MISSING else item.default_factory()


def markdown_table(cls) -> str:
    """| key | default | meaning | of a settings dataclass, from its field docstrings."""
    docs = attribute_docs(cls)
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for item in dataclasses.fields(cls):
        default = default_of(item)
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else repr(default)
        lines.append(f"| `{item.name}` | `{shown}` | {docs.get(item.name, '').replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def dotted_keys(config: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys (``{"loss_params.beta": 0.1}``), the values as they are; an empty
    mapping stays a value."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _positive(key: str, value: object, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise ValueError(f"{key}: must be a {'non-negative' if zero else 'positive'} integer; got {value!r}")


# --- lora: ---------------------------------------------------------------------------------------------------

LORA_SHORT_NAMES = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}


@dataclass
class LoraSettings:
    """``lora:`` — LoRA adapters through peft (``pip install 'dpolab[peft]'``)."""

    r: int = 16
    """The adapters' rank."""
    alpha: float = 32
    """The adapters' scale numerator (peft's ``lora_alpha``); the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input (peft's ``lora_dropout``), in [0, 1)."""
    target_modules: str | list[str] | None = None
    """The modules that get adapters (a name, a list, or peft's default for the architecture)."""
    options: dict = field(default_factory=dict)
    """Any other field of peft's ``LoraConfig``, by its own name (written at the top level of ``lora:``)."""

    def check(self, key: str = "lora") -> None:
        _positive(f"{key}.r", self.r)
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{key}.{name}: must be a number; got {value!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{key}.dropout: must lie in [0, 1); got {self.dropout!r}")
        targets = self.target_modules
        if targets is not None and not (
            isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
        ):
            raise ValueError(f"{key}.target_modules: expected a name or a list of names; got {targets!r}")

    def peft_kwargs(self) -> dict:
        """Keyword arguments of peft's ``LoraConfig``."""
        kwargs = {"r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout, **self.options}
        if self.target_modules is not None:
            kwargs["target_modules"] = self.target_modules
        return kwargs

    def to_dict(self) -> dict:
        """The ``lora:`` mapping as it is written (the other LoraConfig fields at the top level)."""
        written = {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, **self.options}
        if self.target_modules is not None:
            written["target_modules"] = self.target_modules
        return written


def lora_settings(values: object, key: str = "lora") -> LoraSettings:
    """``lora:`` as :class:`LoraSettings`: ``r``, ``alpha``, ``dropout``, ``target_modules``, and any other field of
    peft's ``LoraConfig`` by its own name. ``ValueError`` naming the key otherwise."""
    if isinstance(values, LoraSettings):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"{key}: expected a mapping of LoRA settings, e.g. {{r: 16, alpha: 32}}; got {values!r}")
    try:
        from peft import LoraConfig

        allowed = {f.name for f in dataclasses.fields(LoraConfig)} - {"task_type", "peft_type"}
    except ImportError:
        raise ValueError(f"{key}: needs peft (pip install 'dpolab[peft]')") from None
    named, options = {}, {}
    for name, value in values.items():
        full = LORA_SHORT_NAMES.get(name, name)
        if not isinstance(name, str) or full not in allowed:
            close = difflib.get_close_matches(str(name), [*LORA_SHORT_NAMES, *sorted(allowed)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key}.{name}: not a LoRA setting{hint}; see peft's LoraConfig")
        if name in ("r", "alpha", "dropout", "target_modules"):
            named[name] = value
        elif full in ("lora_alpha", "lora_dropout"):
            named[{"lora_alpha": "alpha", "lora_dropout": "dropout"}[full]] = value
        else:
            options[name] = value
    settings = LoraSettings(**named, options=options)
    settings.check(key)
    return settings


# --- monitor: ------------------------------------------------------------------------------------------------


@dataclass
class MonitorSettings:
    """``monitor:`` — the 3D monitor (docs/monitor.md). Thresholds are in nats (per sequence unless noted)."""

    enabled: bool = True
    """Watch the run (preference losses with a reference, and dpolab ppo); false turns it off."""
    window: int = 20
    """Steps of the slopes and of the alarm windows."""
    probe_steps: int = 50
    """Run the gradient-split and dispersion probes every N steps (0: off)."""
    probe_pairs: int = 8
    """Held-out pairs the probes read."""
    sample_prompts: int = 4
    """Prompts sampled for the dispersion probe (0: no sampling, and no reference model kept in memory)."""
    sample_tokens: int = 32
    """Tokens per sample of the dispersion probe."""
    degradation_logratio: float = -1.0
    """Alarm (a), degradation: the mean chosen log-ratio r_w below this …"""
    degradation_share: float = 0.5
    """… with at least this share of pairs below the reference, …"""
    degradation_drop: float = 0.25
    """… or r_w's window mean this far below its best so far."""
    drop_ratio: float = 5.0
    """Alarm (b), drastic drop: the rejected log-ratio falls at least this many times the chosen one's change over the window …"""
    drop_min_fall: float = 2.0
    """… and by at least this many nats."""
    dispersion_change: float = 0.05
    """Alarm (c), dispersion: the data probe down from its best and the samples' log-prob up since then, each by this (nats per token)."""
    on_alarm: str = "warn"
    """``warn``: log the alarm and go on; ``stop``: checkpoint and stop at the first alarm."""
    pairs: str | None = None
    """Task ppo: held-out preference pairs (a file or data set) the probes read."""

    def check(self, key: str = "monitor") -> None:
        if self.on_alarm not in ("warn", "stop"):
            raise ValueError(f"{key}.on_alarm: must be warn or stop; got {self.on_alarm!r}")
        if self.pairs is not None and not self.pairs:
            raise ValueError(f"{key}.pairs: must be a file or data set of preference pairs; got {self.pairs!r}")
        for name in ("window", "probe_pairs", "sample_tokens"):
            _positive(f"{key}.{name}", getattr(self, name))
        for name in ("probe_steps", "sample_prompts"):
            _positive(f"{key}.{name}", getattr(self, name), zero=True)


def monitor_settings(values: object) -> MonitorSettings:
    return parse(MonitorSettings, {} if values is None else values, "monitor", "a monitor setting", "docs/monitor.md")


# --- eval_harness: -------------------------------------------------------------------------------------------


@dataclass
class EvalHarnessSettings:
    """``eval_harness:`` — lm-evaluation-harness tasks during training (docs/evaluation.md#during-training)."""

    tasks: list[str] = field(default_factory=list)
    """Task shapes to evaluate (docs/evaluation.md: arc, hellaswag, mmlu, truthfulqa_mc1, truthfulqa_mc2, winogrande, gsm8k, gsm8k_plain)."""
    every: int | None = None
    """Evaluate every N optimiser steps, and always at the end; null: only at the end."""
    data_dir: str | None = None
    """A folder with ``<task>/test.jsonl`` (or validation) and a few-shot ``<task>/train.jsonl`` (or dev), as for ``dpolab eval harness --data-dir``."""
    data: dict = field(default_factory=dict)
    """Task → evaluation file, instead of ``data_dir`` for that task."""
    fewshot_data: dict = field(default_factory=dict)
    """Task → file of few-shot examples."""
    num_fewshot: int | dict = 0
    """Few-shot examples per prompt: one count for every task, or task → count (others 0)."""
    limit: int | None = None
    """Only the first N documents of each task (an evaluation inside training should be short)."""
    batch_size: int = 8
    """Harness batch size."""
    max_new_tokens: int = 256
    """Longest generation of the generating tasks (gsm8k, gsm8k_plain)."""

    def check(self, key: str = "eval_harness") -> None:
        if not self.tasks:
            raise ValueError(f"{key}.tasks: required, a list of task names (e.g. [gsm8k_plain, arc])")
        for name in ("every", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{key}.{name}: must be >= 1 or null; got {value!r}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{key}.{name}: must be >= 1; got {getattr(self, name)!r}")


def eval_harness_settings(values: object) -> EvalHarnessSettings:
    """The ``eval_harness:`` mapping as settings; ``ValueError`` naming the key (``eval_harness.…``)."""
    docs = "docs/evaluation.md#during-training"
    return parse(EvalHarnessSettings, values, "eval_harness", "an eval_harness setting", docs)


# --- ppo: ----------------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class PPOSettings:
    """``ppo:`` — the settings of ``dpolab ppo`` (docs/rlhf.md)."""

    reward: dict = field(default_factory=dict)
    """Where the reward of a response comes from, exactly one of: ``{model: DIR}`` a reward model (a one-label sequence classifier, e.g. from ``dpolab rm``; the score at the last token of prompt + response + EOS); ``{judge: math}`` 1 when the response's final answer (``#### N``, ``A: N`` or ``\\boxed{}``) equals the row's ``answer`` by math-verify, else 0; ``{rules: [...]}`` the share of format rules passed (lines, words, words_per_line, rhyme, keywords, regex, contains_answer: docs/evaluation.md#rules), e.g. ``{type: regex, pattern: P}`` (``{answer}`` in P stands for the row's answer, escaped) or ``{type: lines, min: 4, max: 4}``."""
    value_model: str = "head"
    """The critic: ``head`` (a linear value head on the policy's last hidden state, zero-initialised), a model directory (a separate critic: a causal LM gets a new one-output head, a reward model keeps its own), or ``none`` (only with ``advantage: rloo``)."""
    advantage: str = "gae"
    """``gae``: generalised advantage estimation with the critic (Schulman et al. 2016); ``rloo``: REINFORCE leave-one-out over ``samples_per_prompt`` ≥ 2 responses of each prompt, no critic (Ahmadian et al. 2024)."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt in each rollout (k); they share one packed pass over the prompt."""
    max_new_tokens: int = 64
    """Most tokens in a response; a response cut here has no EOS (see ``missing_eos_penalty``)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are of the same tempered policy, so the ratio is of what was sampled."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: the whole distribution)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the reward of a response cut at max_new_tokens without an EOS (TRL's missing_eos_penalty)."""
    kl_coef: float = 0.05
    """β of the KL to the frozen reference (the initial policy; with LoRA the adapter switched off)."""
    kl_estimator: str = "k1"
    """Per-token KL estimate: ``k1`` = log π − log π_ref, ``k2`` = ½(log π − log π_ref)², ``k3`` = (ρ − 1) − log ρ with ρ = π_ref/π (Schulman 2020)."""
    kl_in: str = "reward"
    """``reward``: −β·KL on every response token's reward (Ziegler et al. 2019; Ouyang et al. 2022); ``loss``: + β·KL (of the current policy, with its gradient) in the loss (as GRPO)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    minibatches: int = 1
    """Optimiser steps per pass: the rollout batch (batch_size × processes prompts) is cut into this many."""
    clip_range: float = 0.2
    """ε of the clipped surrogate: ratios outside [1 − ε, 1 + ε] give no gradient."""
    value_clip_range: float = 0.2
    """ε of the clipped value loss: V moves at most this far from its rollout value per batch."""
    value_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus (−coef × mean token entropy in the loss)."""
    gamma: float = 1.0
    """Discount γ of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    whiten_rewards: bool = False
    """Scale the per-token rewards of each rollout batch to unit variance (mean kept) before the advantages."""
    whiten_advantages: bool = True
    """Shift and scale the advantages of each rollout batch to zero mean and unit variance (over every process)."""
    sample_steps: int = 10
    """Log the first prompts of the rollout, their responses and rewards every N steps (samples.jsonl)."""
    samples_logged: int = 4
    """How many responses to log each time."""

    def check(self, key: str = "ppo") -> None:
        problem = reward_problem(self.reward)
        if problem:
            raise ValueError(f"{key}.{problem}")
        checks = {
            "samples_per_prompt": self.samples_per_prompt >= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1,
            "kl_coef": self.kl_coef >= 0,
            "ppo_epochs": self.ppo_epochs >= 1,
            "minibatches": self.minibatches >= 1,
            "clip_range": self.clip_range > 0,
            "value_clip_range": self.value_clip_range > 0,
            "value_coef": self.value_coef >= 0,
            "entropy_coef": self.entropy_coef >= 0,
            "gamma": 0 <= self.gamma <= 1,
            "lam": 0 <= self.lam <= 1,
            "sample_steps": self.sample_steps >= 1,
            "samples_logged": self.samples_logged >= 0,
        }
        for name, good in checks.items():
            if not good:
                raise ValueError(f"{key}.{name}: out of range; got {getattr(self, name)!r} (see docs/rlhf.md)")
        choices = {"advantage": ("gae", "rloo"), "kl_estimator": KL_ESTIMATORS, "kl_in": ("reward", "loss")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{key}.{name}: must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.advantage == "rloo" and self.samples_per_prompt < 2:
            raise ValueError(f"{key}.samples_per_prompt: advantage rloo needs at least 2 samples per prompt")
        if self.advantage == "gae" and self.value_model == "none":
            raise ValueError(
                f"{key}.value_model: advantage gae needs a critic (head or a model directory); none is for rloo"
            )
        if self.advantage == "rloo" and self.value_model == "head":
            self.value_model = "none"  # the default head has nothing to learn without GAE
        if self.advantage == "rloo" and self.value_model != "none":
            raise ValueError(f"{key}.value_model: advantage rloo uses no critic; leave value_model out (or none)")


def reward_problem(reward: dict) -> str | None:
    """Why ``ppo.reward`` is not one reward source, or None (the rules themselves are checked by the config)."""
    sources = [key for key in ("model", "judge", "rules") if key in reward]
    if len(sources) != 1:
        return (
            "reward: give exactly one reward source: {model: DIR} (a reward model), {judge: math} or "
            f"{{rules: [...]}}; got {reward or 'none'!r}"
        )
    unknown = sorted(set(reward) - {sources[0]})
    if unknown:
        return f"reward.{unknown[0]}: not a setting (reward takes one of model, judge, rules)"
    if "judge" in reward and reward["judge"] != "math":
        return f"reward.judge: the judge a PPO reward can use here is math; got {reward['judge']!r}"
    if "model" in reward and (not isinstance(reward["model"], str) or not reward["model"]):
        return f"reward.model: expected a model directory; got {reward['model']!r}"
    return None


def ppo_settings(values: object) -> PPOSettings:
    """The ``ppo:`` mapping as :class:`PPOSettings`; ``ValueError`` naming the key (``ppo.…``) when it is wrong."""
    return parse(PPOSettings, {} if values is None else values, "ppo", "a PPO setting", "docs/rlhf.md")


if __name__ == "__main__":  # the tables of docs/rlhf.md and docs/monitor.md
    import sys

    print(markdown_table({"ppo": PPOSettings, "monitor": MonitorSettings, "eval_harness": EvalHarnessSettings,
                          "lora": LoraSettings}[sys.argv[1] if len(sys.argv) > 1 else "ppo"]))  # fmt: skip
