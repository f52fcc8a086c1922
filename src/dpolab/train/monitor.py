"""The 3D monitor: drastic drop, degradation and dispersion (3D-properties paper §3; Smaug §3), while training runs.

Every step it logs, from the batch already computed (no extra model pass):

- ``monitor/logratio_{chosen,rejected}_{mean,p10,p50,p90}``: r = log π_θ − log π_ref per pair (nats);
- ``monitor/chosen_below_reference``: share of pairs with r_w < 0 (the Smaug failure: chosen likelihood falls);
- ``monitor/{chosen,rejected}_slope``: least-squares slope of the mean log-ratio over the last ``window``
  steps (nats per step), and ``monitor/drop_ratio`` = −rejected slope / |chosen slope|;
- ``monitor/grad_logp_{chosen,rejected}``: mean |∂L/∂log π_w| and |∂L/∂log π_l| per pair;
- ``monitor/log10_prob_ratio_p50``: median log10(π_w/π_l), the probability-space gradient ratio
  |∂L/∂π_l| / |∂L/∂π_w| of DPO (PAPERS.md §2, Corollary 1).

Every ``probe_steps`` steps, on a fixed probe set (the eval pairs, else the first training pairs):

- ``monitor/param_grad_norm_{chosen,rejected}``: ‖∇_θ‖ of the chosen term Σ (∂L/∂log π_w)·log π_w and of
  the rejected term, separately (two extra backward passes);
- ``monitor/probe_{chosen,rejected}_logp``: per-token mean log-likelihood of the probe completions;
- ``monitor/sample_logp_{policy,reference}``, ``monitor/sample_entropy``: for the probe prompts, responses
  sampled from the policy, scored per token under the policy and the reference, and the policy's token
  entropy while sampling.

Under ``dpolab ppo`` there are no training pairs: :mod:`dpolab.train.ppo_monitor` computes the per-step
log-ratios on the held-out pairs of ``monitor.pairs`` instead (with ``monitor/margin`` = mean r_w − r_l for the
margin), and the sample probe as above, so the same alarms watch RLHF runs.

The alarms (:func:`check_alarms`) read a plain trajectory, so the same rules run live, offline in the
report, and on toy-lab runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from dpolab.settings import MonitorSettings

REMEDIES = {
    "degradation": "try loss: dpop (e.g. lam: 50), sft_weight > 0, or flex with a lower beta_rejected",
    "drastic_drop": "lower beta_rejected with loss: flex, add sft_weight, or use on-policy pairs (dpolab data)",
    "dispersion": "add sft_weight, use dpop, lower the learning rate, or stop earlier (see the probe curves)",
}
DESCRIPTIONS = {
    "degradation": "the chosen log-ratio keeps falling while the margin grows: training is unlearning the chosen answers",
    "drastic_drop": "the rejected log-prob falls far faster than the chosen one rises",
    "dispersion": "the likelihood of the data falls while the policy's own samples become more likely",
}


def slope(values: list[float]) -> float:
    """Least-squares slope per step of the values (0 for fewer than 2)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    numerator = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return numerator / sum((i - mean_x) ** 2 for i in range(n))


@dataclass
class Trajectory:
    """What the alarms read: per-step means, and probe values at probe steps."""

    steps: list[int] = field(default_factory=list)
    chosen_logratio: list[float] = field(default_factory=list)
    rejected_logratio: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    chosen_below_reference: list[float] = field(default_factory=list)
    probe_steps: list[int] = field(default_factory=list)
    probe_data_logp: list[float] = field(default_factory=list)  # per token, held-out chosen completions
    probe_sample_logp: list[float] = field(default_factory=list)  # per token, the policy's own samples
    peak_chosen_window_mean: float = -math.inf  # best window mean of chosen_logratio so far (kept by check_alarms)


def check_alarms(
    trajectory: Trajectory, config: MonitorSettings, fired: set[str], descriptions=DESCRIPTIONS, remedies=REMEDIES
) -> list[dict]:
    """New alarms at the trajectory's last step (each fires once; ``fired`` is updated); ``descriptions`` and
    ``remedies``: the words for each kind (PPO runs have their own, :mod:`dpolab.train.ppo_monitor`)."""
    alarms = []
    step = trajectory.steps[-1] if trajectory.steps else 0
    w = config.window
    if len(trajectory.steps) >= w:
        chosen = trajectory.chosen_logratio[-w:]
        rejected = trajectory.rejected_logratio[-w:]
        margin = trajectory.margin[-w:]
        # Window means, not single steps: a batch of a few pairs is noisy.
        chosen_now = sum(chosen) / w
        trajectory.peak_chosen_window_mean = max(trajectory.peak_chosen_window_mean, chosen_now)
        below_share = sum(trajectory.chosen_below_reference[-w:]) / w
        below = chosen_now < config.degradation_logratio and below_share >= config.degradation_share
        off_peak = trajectory.peak_chosen_window_mean - chosen_now
        if (
            "degradation" not in fired
            and (below or off_peak >= config.degradation_drop)
            and slope(chosen) < 0
            and slope(margin) > 0
        ):
            alarms.append(
                (
                    "degradation",
                    f"mean chosen log-ratio {chosen_now:.2f} nats over the last {w} steps ({off_peak:.2f} below "
                    f"its best) and falling ({slope(chosen):.3g}/step), "
                    f"{100 * below_share:.0f}% of pairs below the reference, "
                    f"margin rising ({slope(margin):.3g}/step)",
                )
            )
        fall = rejected[0] - rejected[-1]
        change = abs(chosen[-1] - chosen[0])
        if (
            "drastic_drop" not in fired
            and fall >= config.drop_min_fall
            and fall >= config.drop_ratio * max(change, 1e-9)
        ):
            alarms.append(
                (
                    "drastic_drop",
                    f"over the last {w} steps the rejected log-ratio fell {fall:.2f} nats "
                    f"while the chosen one moved {chosen[-1] - chosen[0]:+.2f} "
                    f"({fall / max(change, 1e-9):.1f}×)",
                )
            )
    probes = len(trajectory.probe_sample_logp)
    if "dispersion" not in fired and probes >= 2 and probes == len(trajectory.probe_data_logp):
        data, samples = trajectory.probe_data_logp, trajectory.probe_sample_logp
        best = max(range(probes), key=data.__getitem__)  # the data was most likely here
        data_change, sample_change = data[-1] - data[best], samples[-1] - samples[best]
        if data_change <= -config.dispersion_change and sample_change >= config.dispersion_change:
            alarms.append(
                (
                    "dispersion",
                    f"held-out data log-likelihood {data_change:+.3f} since its best "
                    f"(step {trajectory.probe_steps[best]}), policy samples {sample_change:+.3f}",
                )
            )
    out = []
    for kind, evidence in alarms:
        fired.add(kind)
        out.append(
            {"step": step, "alarm": kind, "message": f"{descriptions[kind]} ({evidence})", "remedy": remedies[kind]}
        )
    return out


def quantiles(values: torch.Tensor, prefix: str) -> dict[str, float]:
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {
        f"{prefix}_mean": float(values.mean()),
        f"{prefix}_p10": float(q[0]),
        f"{prefix}_p50": float(q[1]),
        f"{prefix}_p90": float(q[2]),
    }


class Monitor:
    """Per-step statistics and alarms; probes are run by the trainer through :meth:`record_probe`."""

    def __init__(self, config: MonitorSettings, descriptions=DESCRIPTIONS, remedies=REMEDIES) -> None:
        self.config = config
        self.descriptions, self.remedies = descriptions, remedies
        self.trajectory = Trajectory()
        self.fired: set[str] = set()
        self.alarms: list[dict] = []

    def step_metrics(self, objective, inputs) -> dict[str, float]:
        """Statistics of one step's pairs (all micro-batches concatenated)."""
        if inputs.reference_chosen_logps is None:
            return {}
        chosen_ratio = (inputs.policy_chosen_logps - inputs.reference_chosen_logps).detach()
        rejected_ratio = (inputs.policy_rejected_logps - inputs.reference_rejected_logps).detach()
        leaves = [
            inputs.policy_chosen_logps.detach().requires_grad_(True),
            inputs.policy_rejected_logps.detach().requires_grad_(True),
        ]
        detached = type(inputs)(
            leaves[0],
            leaves[1],
            inputs.reference_chosen_logps,
            inputs.reference_rejected_logps,
            inputs.chosen_lengths,
            inputs.rejected_lengths,
        )
        with torch.enable_grad():
            out = objective(detached)
            grads = torch.autograd.grad(out.losses.sum(), leaves, allow_unused=True)
        grad_w, grad_l = (torch.zeros_like(leaves[0]) if g is None else g for g in grads)
        metrics = {
            **quantiles(chosen_ratio, "monitor/logratio_chosen"),
            **quantiles(rejected_ratio, "monitor/logratio_rejected"),
        }
        metrics["monitor/chosen_below_reference"] = float((chosen_ratio < 0).float().mean())
        metrics["monitor/grad_logp_chosen"] = float(grad_w.abs().mean())
        metrics["monitor/grad_logp_rejected"] = float(grad_l.abs().mean())
        log10_ratio = (inputs.policy_chosen_logps - inputs.policy_rejected_logps).detach() / math.log(10)
        metrics["monitor/log10_prob_ratio_p50"] = float(log10_ratio.median())
        return metrics

    def update(self, step: int, metrics: dict[str, float]) -> list[dict]:
        """Add one step; return the alarms that fire now (also adds slopes to ``metrics``)."""
        if "monitor/logratio_chosen_mean" not in metrics:
            return []
        t = self.trajectory
        t.steps.append(step)
        t.chosen_logratio.append(metrics["monitor/logratio_chosen_mean"])
        t.rejected_logratio.append(metrics["monitor/logratio_rejected_mean"])
        # PPO has no pair loss: its margin is the probe pairs' mean r_w − r_l (nats)
        t.margin.append(metrics["monitor/margin"] if "monitor/margin" in metrics else metrics["rewards/margins"])
        t.chosen_below_reference.append(metrics["monitor/chosen_below_reference"])
        w = self.config.window
        metrics["monitor/chosen_slope"] = slope(t.chosen_logratio[-w:])
        metrics["monitor/rejected_slope"] = slope(t.rejected_logratio[-w:])
        metrics["monitor/drop_ratio"] = -metrics["monitor/rejected_slope"] / max(
            abs(metrics["monitor/chosen_slope"]), 1e-9
        )
        new = check_alarms(t, self.config, self.fired, self.descriptions, self.remedies)
        self.alarms += new
        return new

    def record_probe(self, step: int, probe: dict[str, float]) -> None:
        if "monitor/probe_chosen_logp" in probe:
            self.trajectory.probe_steps.append(step)
            self.trajectory.probe_data_logp.append(probe["monitor/probe_chosen_logp"])
            if "monitor/sample_logp_policy" in probe:
                self.trajectory.probe_sample_logp.append(probe["monitor/sample_logp_policy"])

    # Stateful: the checkpointer saves and restores the monitor itself (its trajectory, fired alarms and alarms)
    def state_dict(self) -> dict:
        return {"trajectory": asdict(self.trajectory), "fired": sorted(self.fired), "alarms": self.alarms}

    def load_state_dict(self, state: dict) -> None:
        self.trajectory = Trajectory(**state["trajectory"])
        self.fired = set(state["fired"])
        self.alarms = list(state["alarms"])
