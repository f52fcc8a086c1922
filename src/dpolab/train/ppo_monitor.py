"""The 3D monitor on RLHF-PPO runs (``dpolab ppo``): held-out pair likelihoods, the policy's own samples, alarms.

The 3D-properties paper (§4) argues that RLHF does not show DPO's drastic drop, degradation and dispersion.
PPO never reads a preference pair, so to check that claim rather than assume it, the monitor measures, on
pairs the run does not train on (``monitor.pairs``: e.g. the preference runs' held-out pairs):

- every step, after the update: r = log π_θ − log π_ref (sums over the completion, nats) of the chosen and of
  the rejected completions — ``monitor/logratio_{chosen,rejected}_{mean,p10,p50,p90}``,
  ``monitor/chosen_below_reference``, ``monitor/margin`` (mean r_w − r_l) and ``monitor/log10_prob_ratio_p50``,
  the values preference training logs from its batch (:mod:`dpolab.train.monitor`);
- at step 1, every ``probe_steps`` steps and the last step: the per-token likelihoods
  ``monitor/probe_{chosen,rejected}_logp``, and one response per probe prompt (the pairs' prompts, else the
  held-out prompts, else the first training prompts) sampled from the policy at temperature 1 (at most
  ``sample_tokens``), scored per token under the policy and the reference — ``monitor/sample_logp_policy``,
  ``monitor/sample_logp_reference``, ``monitor/sample_logratio``, ``monitor/sample_entropy``.

The alarms are preference training's (:func:`dpolab.train.monitor.check_alarms`), on these values: the
windows count steps, and the per-step log-ratios come from a fixed probe set (less noisy than a batch).
Without ``monitor.pairs`` only the sample probe runs and no alarm can fire (each reads the pairs).

Every process runs the same probes on the same pairs and prompts through the wrapped model, so FSDP's
collective forwards stay in step and the values are one process's; the sampler draws from its own seeded
generators and nothing here touches the gradients, so a run with the monitor trains exactly as one without.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpolab.data.formats import load_examples
from dpolab.data.tokenize import TokenizedPair, tokenize_pairs
from dpolab.engine.policy_value import Rollout, mix
from dpolab.settings import MonitorSettings
from dpolab.train.monitor import Monitor, quantiles

PROBE_STREAM = 2**63 - 1  # the sample probe's seeds: mix(seed, step, PROBE_STREAM, i), apart from the rollouts'

# The alarms' words for a policy trained on rewards, not on these pairs.
DESCRIPTIONS = {
    "degradation": "the held-out chosen log-ratio keeps falling while the margin grows: the policy is leaving "
    "the chosen answers",
    "drastic_drop": "the held-out rejected log-prob falls far faster than the chosen one rises",
    "dispersion": "the likelihood of the held-out data falls while the policy's own samples become more likely",
}
REMEDIES = {
    "degradation": "raise ppo.kl_coef, lower the learning rate, or stop earlier (see the log-ratio curves)",
    "drastic_drop": "raise ppo.kl_coef or lower the learning rate",
    "dispersion": "raise ppo.kl_coef, lower the learning rate, or stop earlier (see the probe curves)",
}


@dataclass
class PPOProbes:
    """What the monitor reads on a PPO run, fixed at setup."""

    settings: MonitorSettings
    monitor: Monitor
    pairs: list[TokenizedPair]
    reference: torch.Tensor | None  # (pairs, 2): Σ log π_ref of chosen and rejected
    prompts: list[tuple[int, ...]]  # the sample probe's prompts


def load_pairs(config, tokenizer, log) -> list[TokenizedPair]:
    """The first ``probe_pairs`` usable pairs of ``monitor.pairs`` (none without it), tokenised as the run's data."""
    settings = config.monitor
    if not settings.enabled or not settings.pairs:
        return []
    examples, bad_rows = load_examples(settings.pairs, "train", config.on_bad_rows, config.max_row_bytes)
    if bad_rows:
        log.info(f"monitor.pairs: skipped {len(bad_rows)} bad rows (first: {bad_rows[0]})")
    limits = dict(max_prompt_length=config.max_prompt_length, truncation_mode=config.truncation_mode)
    pairs, report = tokenize_pairs(tokenizer, examples, config.max_length, **limits)
    if not pairs:
        raise ValueError(f"monitor.pairs: {settings.pairs}: no usable pairs after tokenisation ({report.lines()[0]})")
    log.info(f"monitor: {min(len(pairs), settings.probe_pairs)} held-out pairs from {settings.pairs}")
    return pairs[: settings.probe_pairs]


def pair_sums(s, model, pairs: list[TokenizedPair], mode: str = "train") -> torch.Tensor:
    """(pairs, 2) Σ_t log π(y_t | x, y_<t) of chosen and rejected under ``model`` (T = 1), a batch at a time."""
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), s.config.batch_size):
            with s.accelerator.autocast():
                tokens = s.rollouts.token_pass(
                    model, pairs[start : start + s.config.batch_size], mode=mode, temperature=1.0
                )
            out.append(tokens.dense(tokens.logps).sum(1).view(-1, 2).float())
    return torch.cat(out)


def reference_sums(s, pairs: list[TokenizedPair]) -> torch.Tensor:
    """The pairs under the reference: the frozen copy, or the policy with its LoRA adapter off."""
    if s.reference is not None:
        return pair_sums(s, s.reference, pairs)
    return pair_sums(s, s.accelerator.unwrap_model(s.model), pairs, mode="reference")


def setup(s, pairs: list[TokenizedPair], prompt_fallback: list[tuple[int, ...]]) -> PPOProbes | None:
    """The monitor of ``s.config.monitor`` (None when disabled) on ``pairs`` (:func:`load_pairs`), with their
    reference log-probs; the sample probe's prompts are the pairs', else ``prompt_fallback``."""
    settings = s.config.monitor
    if not settings.enabled:
        return None
    reference = reference_sums(s, pairs) if pairs else None
    prompts = [p.prompt_ids for p in pairs] or prompt_fallback
    monitor = Monitor(settings, DESCRIPTIONS, REMEDIES)
    return PPOProbes(settings, monitor, pairs, reference, prompts[: settings.sample_prompts])


def pair_metrics(policy: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Preference training's per-step monitor values, from (pairs, 2) sums under the policy and the reference."""
    chosen, rejected = policy[:, 0] - reference[:, 0], policy[:, 1] - reference[:, 1]
    return {
        **quantiles(chosen, "monitor/logratio_chosen"),
        **quantiles(rejected, "monitor/logratio_rejected"),
        "monitor/chosen_below_reference": float((chosen < 0).float().mean()),
        "monitor/margin": float((chosen - rejected).mean()),
        "monitor/log10_prob_ratio_p50": float((policy[:, 0] - policy[:, 1]).median()) / math.log(10),
    }


def sample_metrics(s, step: int, prompts: list[tuple[int, ...]]) -> dict[str, float]:
    """One response per prompt from the policy (T = 1, top-p 1), scored per token under policy and reference."""
    accelerator = s.accelerator
    unwrapped = accelerator.unwrap_model(s.model)
    unwrapped.eval()
    seeds = [mix(s.config.seed, step, PROBE_STREAM, i) for i in range(len(prompts))]
    sampling = {"max_new_tokens": s.probes.settings.sample_tokens, "temperature": 1.0, "top_p": 1.0}
    with accelerator.autocast():
        samples = s.rollouts.generate(prompts, seeds, **sampling)
    items = [Rollout(prompt, (sample.ids,)) for prompt, sample in zip(prompts, samples, strict=True)]
    with torch.no_grad(), accelerator.autocast():
        policy = s.rollouts.token_pass(unwrapped, items, entropy=True, temperature=1.0)
        scorer, mode = (s.reference, "train") if s.reference is not None else (unwrapped, "reference")
        reference = s.rollouts.token_pass(scorer, items, mode=mode, temperature=1.0)
    unwrapped.train()
    lengths = policy.branch_lengths[:, 0].float()
    policy_mean = float((policy.dense(policy.logps).sum(1).float() / lengths).mean())
    reference_mean = float((policy.dense(reference.logps).sum(1).float() / lengths).mean())
    return {
        "monitor/sample_logp_policy": policy_mean,
        "monitor/sample_logp_reference": reference_mean,
        "monitor/sample_logratio": policy_mean - reference_mean,
        "monitor/sample_entropy": float(policy.entropy.float().mean()),
        "monitor/sample_tokens": float(lengths.mean()),
    }


def step_metrics(s, step: int) -> dict[str, float]:
    """The monitor's values after this step's update (probes at step 1, every ``probe_steps`` and the last)."""
    probes = s.probes
    values = {}
    probe_steps = probes.settings.probe_steps
    probing = probe_steps > 0 and (step == 1 or step % probe_steps == 0 or step == s.total_steps)
    if probes.pairs:
        policy = pair_sums(s, s.accelerator.unwrap_model(s.model), probes.pairs)
        values.update(pair_metrics(policy, probes.reference))
        if probing:
            lengths = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in probes.pairs]).float()
            per_token = (policy / lengths).mean(0)
            values["monitor/probe_chosen_logp"] = float(per_token[0])
            values["monitor/probe_rejected_logp"] = float(per_token[1])
    if probing and probes.prompts:
        values.update(sample_metrics(s, step, probes.prompts))
    if probing:
        probes.monitor.record_probe(step, values)
    return values
