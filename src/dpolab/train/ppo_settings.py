"""The ``ppo:`` settings of ``dpolab ppo``: one dataclass; keys are its field names, checked before anything loads.

docs/rlhf.md lists every field (``python -m dpolab.train.ppo_settings`` prints the table).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from dpolab.eval.judges import rules_problem
from dpolab.losses import KL_ESTIMATORS


@dataclass
class PPOSettings:
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


def field_docs() -> dict[str, str]:
    from dpolab.train.config import attribute_docs

    return attribute_docs(PPOSettings)


def reward_problem(reward: dict) -> str | None:
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
    if "rules" in reward:
        return rules_problem(reward["rules"], "reward.rules")
    return None


def ppo_settings(values: dict) -> PPOSettings:
    """The ``ppo:`` mapping as :class:`PPOSettings`; ``ValueError`` naming the key (``ppo.…``) when it is wrong."""
    from dpolab.train.config import nested_settings

    settings = nested_settings(PPOSettings, values, "ppo", "a PPO setting", "docs/rlhf.md")
    problem = reward_problem(settings.reward)
    if problem:
        raise ValueError(f"ppo.{problem}")
    checks = {
        "samples_per_prompt": settings.samples_per_prompt >= 1,
        "max_new_tokens": settings.max_new_tokens >= 1,
        "temperature": settings.temperature > 0,
        "top_p": 0 < settings.top_p <= 1,
        "kl_coef": settings.kl_coef >= 0,
        "ppo_epochs": settings.ppo_epochs >= 1,
        "minibatches": settings.minibatches >= 1,
        "clip_range": settings.clip_range > 0,
        "value_clip_range": settings.value_clip_range > 0,
        "value_coef": settings.value_coef >= 0,
        "entropy_coef": settings.entropy_coef >= 0,
        "gamma": 0 <= settings.gamma <= 1,
        "lam": 0 <= settings.lam <= 1,
        "sample_steps": settings.sample_steps >= 1,
        "samples_logged": settings.samples_logged >= 0,
    }
    for key, good in checks.items():
        if not good:
            raise ValueError(f"ppo.{key}: out of range; got {getattr(settings, key)!r} (see docs/rlhf.md)")
    choices = {"advantage": ("gae", "rloo"), "kl_estimator": KL_ESTIMATORS, "kl_in": ("reward", "loss")}
    for key, allowed in choices.items():
        if getattr(settings, key) not in allowed:
            raise ValueError(f"ppo.{key}: must be one of {', '.join(allowed)}; got {getattr(settings, key)!r}")
    if settings.missing_eos_penalty is not None and not math.isfinite(settings.missing_eos_penalty):
        raise ValueError("ppo.missing_eos_penalty: must be a finite number or null")
    if settings.advantage == "rloo" and settings.samples_per_prompt < 2:
        raise ValueError("ppo.samples_per_prompt: advantage rloo needs at least 2 samples per prompt")
    if settings.advantage == "gae" and settings.value_model == "none":
        raise ValueError("ppo.value_model: advantage gae needs a critic (head or a model directory); none is for rloo")
    if settings.advantage == "rloo" and settings.value_model == "head":
        settings.value_model = "none"  # the default head has nothing to learn without GAE
    if settings.advantage == "rloo" and settings.value_model != "none":
        raise ValueError("ppo.value_model: advantage rloo uses no critic; leave value_model out (or none)")
    return settings


def markdown_table() -> str:
    docs = field_docs()
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for item in dataclasses.fields(PPOSettings):
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else repr(default)
        lines.append(f"| `{item.name}` | `{shown}` | {docs[item.name].replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
