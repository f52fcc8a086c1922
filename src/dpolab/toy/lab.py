"""The categorical-policy toy lab of the 3D-properties paper (§3.2), with every dpolab loss.

Step 1 trains a three-layer MLP (one-hot prompt → 10 response logits) on a scenario's target
distributions and freezes a copy as the reference. Step 2 trains it on preference pairs
(prompt i, chosen i, a rejected drawn uniformly from 4–7 at every step) with any
:mod:`dpolab.losses` objective, or, for the reward-model path, fits a Bradley–Terry reward model on
the same pairs and then maximises E_π[r] − β·KL(π‖π_ref) with the *exact* gradient (10 responses
can be enumerated, so no sampling and no PPO ratio clipping are needed).

Every step records the probabilities of chosen, rejected and unseen responses, and the gradients
∂L/∂π_w and ∂L/∂π_l of PAPERS.md §2.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dpolab.losses import Objective, PreferenceLogps, objective_from_config, reward_model
from dpolab.outputs import atomic_path, write_json, write_jsonl
from dpolab.toy.scenarios import NUM_PROMPTS, NUM_RESPONSES, REJECTED, UNSEEN, Scenario, load_scenario

RLHF = "rlhf"  # the reward-model + KL-regularised policy-optimisation path
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class ToyConfig:
    """Everything a toy run depends on. Defaults are the settings of docs/toy.md."""

    scenario: str = "1"
    """Preset ``1``–``4`` or a YAML/JSON scenario file (see dpolab.toy.scenarios)."""
    loss: str | list[str] = "dpo"
    """Any dpolab loss name (or a list, for a weighted sum), or ``rlhf`` for reward model + policy optimisation."""
    loss_params: dict = field(default_factory=dict)
    """Parameters of the loss(es), e.g. ``{"beta": 0.1}``; unknown keys are an error."""
    loss_weights: list[float] | None = None
    """Weights when ``loss`` is a list."""
    sft_weight: float = 0.0
    """α of the SFT term added to the loss (3D paper Eq. 7)."""
    steps: int = 1000
    """Preference-training steps (Step 2)."""
    learning_rate: float = 1e-3
    """Learning rate of Step 2 (the policy's optimiser)."""
    optimizer: str = "adam"
    """Step 2's optimiser: ``adam`` (the paper's) or ``sgd`` (plain gradient descent, no momentum: the
    step is the gradient itself, so Corollary 1's imbalance acts unscaled; it needs a larger learning rate)."""
    hidden_size: int = 64
    """Width of the two hidden layers of the MLP."""
    sft_learning_rate: float = 1e-2
    """Adam learning rate of Step 1."""
    sft_max_steps: int = 5000
    """Step 1 stops here even if the tolerance is not reached (then it says so)."""
    sft_tolerance: float = 1e-4
    """Step 1 stops when the mean KL(target ‖ π) over prompts is below this (nats)."""
    seed: int = 0
    """Seeds initialisation and the rejected draws; a run is deterministic for a given seed."""
    reward_steps: int = 300
    """rlhf only: reward-model training steps."""
    reward_learning_rate: float = 1e-2
    """rlhf only: Adam learning rate of the reward model."""
    kl_beta: float = 0.1
    """rlhf only: β of the KL penalty to the reference."""

    def validate(self) -> None:
        for key in ("steps", "sft_max_steps", "reward_steps", "hidden_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "hidden_size" else 0):
                raise ValueError(f"{key} must be a non-negative integer; got {value!r}")
        for key in ("learning_rate", "sft_learning_rate", "sft_tolerance", "reward_learning_rate", "kl_beta"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{key} must be a number > 0; got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if isinstance(self.sft_weight, bool) or not isinstance(self.sft_weight, (int, float)) or self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0; got {self.sft_weight!r}")
        load_scenario(self.scenario)
        if self.loss != RLHF:
            self.objective()

    def objective(self) -> Objective:
        return objective_from_config(self.loss, self.loss_weights, self.loss_params, sft_weight=self.sft_weight)

    @property
    def label(self) -> str:
        if self.loss == RLHF:
            return f"RM + RLHF (β_KL={self.kl_beta:g})"
        name = self.loss if isinstance(self.loss, str) else "+".join(self.loss)
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.loss_params.items())
        sft = f" + {self.sft_weight:g}·SFT" if self.sft_weight else ""
        return f"{name}{f' ({params})' if params else ''}{sft}"


class ToyPolicy(torch.nn.Module):
    """Three-layer MLP: one-hot prompt (4) → hidden → hidden → 10 response logits."""

    def __init__(self, hidden_size: int = 64) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(NUM_PROMPTS, hidden_size),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden_size, hidden_size),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden_size, NUM_RESPONSES),
        )

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the 10 responses for each prompt index, shape (B, 10)."""
        one_hot = F.one_hot(prompts, NUM_PROMPTS).to(self.layers[0].weight.dtype)
        return self.layers(one_hot).log_softmax(-1)


ALL_PROMPTS = torch.arange(NUM_PROMPTS)


def train_sft(policy: ToyPolicy, targets: torch.Tensor, config: ToyConfig) -> dict:
    """Step 1: soft-label cross-entropy to the targets until mean KL(target ‖ π) < tolerance."""
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.sft_learning_rate)
    entropy = -(targets * targets.clamp_min(1e-300).log()).sum(-1)
    kl = float("inf")
    steps_taken = 0
    while steps_taken < config.sft_max_steps:
        steps_taken += 1
        log_probs = policy(ALL_PROMPTS)
        cross_entropy = -(targets * log_probs).sum(-1)
        kl = float((cross_entropy - entropy).mean().detach())
        if kl < config.sft_tolerance:
            break
        optimizer.zero_grad()
        cross_entropy.mean().backward()
        optimizer.step()
    return {"sft_steps": steps_taken, "sft_kl": kl, "sft_converged": kl < config.sft_tolerance}


def probabilities_record(log_probs: torch.Tensor) -> dict:
    """Per-prompt and averaged probabilities of chosen, rejected, unseen and the data's responses."""
    probs = log_probs.exp()
    chosen = probs[ALL_PROMPTS, ALL_PROMPTS]
    rejected = probs[:, list(REJECTED)]
    unseen = probs[:, list(UNSEEN)].sum(-1)
    data = chosen + rejected.sum(-1)
    return {
        "chosen_prob": float(chosen.mean()),
        "rejected_prob": float(rejected.mean()),  # mean over prompts of the mean over the 4 rejected
        # The same in log space, where it does not underflow (π_l reaches 1e-300 and below).
        "rejected_logp": float(log_probs[:, list(REJECTED)].mean()),
        "rejected_mass": float(rejected.sum(-1).mean()),
        "unseen_mass": float(unseen.mean()),
        "data_mass": float(data.mean()),
        "other_mass": float((1 - data).mean()),
        "chosen_prob_per_prompt": [float(v) for v in chosen],
        "rejected_prob_per_prompt": [float(v) for v in rejected.mean(-1)],
        "unseen_mass_per_prompt": [float(v) for v in unseen],
    }


def draw_rejected(generator: random.Random) -> torch.Tensor:
    return torch.tensor([generator.choice(REJECTED) for _ in range(NUM_PROMPTS)])


def _gradient_record(
    dloss_dlogp_w: torch.Tensor, dloss_dlogp_l: torch.Tensor, pi_w: torch.Tensor, pi_l: torch.Tensor
) -> dict:
    # ∂L/∂π = (∂L/∂log π) / π, per pair (each pair's own loss, not the batch mean).
    grad_w = (dloss_dlogp_w / pi_w).abs()
    grad_l = (dloss_dlogp_l / pi_l).abs()
    ratio = grad_l / grad_w.clamp_min(1e-300)
    return {
        "grad_chosen": float(grad_w.mean()),
        "grad_rejected": float(grad_l.mean()),
        "grad_ratio": float(ratio.mean()),
        "grad_logp_chosen": float(dloss_dlogp_w.abs().mean()),
        "grad_logp_rejected": float(dloss_dlogp_l.abs().mean()),
    }


def train_preference(policy: ToyPolicy, reference: ToyPolicy, config: ToyConfig, record) -> None:
    """Step 2 with a dpolab objective: full batch of 4 pairs per step, fresh rejected draws."""
    objective = config.objective()
    optimizer = OPTIMIZERS[config.optimizer](policy.parameters(), lr=config.learning_rate)
    generator = random.Random(config.seed)
    with torch.no_grad():
        reference_log_probs = reference(ALL_PROMPTS)
    ones = torch.ones(NUM_PROMPTS, dtype=torch.long)
    for step in range(config.steps + 1):
        rejected = draw_rejected(generator)
        log_probs = policy(ALL_PROMPTS)
        chosen_logps = log_probs[ALL_PROMPTS, ALL_PROMPTS]
        rejected_logps = log_probs[ALL_PROMPTS, rejected]
        # Leaves of the loss graph, so the per-pair ∂L/∂log π can be read off exactly.
        chosen_leaf = chosen_logps.detach().requires_grad_(True)
        rejected_leaf = rejected_logps.detach().requires_grad_(True)
        logps = PreferenceLogps(
            chosen_leaf,
            rejected_leaf,
            reference_log_probs[ALL_PROMPTS, ALL_PROMPTS],
            reference_log_probs[ALL_PROMPTS, rejected],
            ones,
            ones,
        )
        try:
            out = objective(logps)
        except ValueError as error:  # the objective refuses non-finite log-probs: the policy has blown up
            raise ToyDiverged(step, str(error)) from None
        # A loss may not depend on one side at all (sft has no rejected term): its gradient is then zero.
        gradients = torch.autograd.grad(out.losses.sum(), (chosen_leaf, rejected_leaf), allow_unused=True)
        dloss_dlogp_w, dloss_dlogp_l = (torch.zeros_like(chosen_leaf) if g is None else g for g in gradients)
        entry = {"step": step, "loss": float(out.losses.mean().detach())}
        entry["margin"] = float((out.chosen_rewards - out.rejected_rewards).mean())
        entry.update(probabilities_record(log_probs.detach()))
        entry.update(
            _gradient_record(dloss_dlogp_w, dloss_dlogp_l, chosen_logps.detach().exp(), rejected_logps.detach().exp())
        )
        for name, value in out.terms.items():
            entry[name] = float(value.mean())
        record(entry)
        if step == config.steps:
            break
        # Chain rule through the leaves: the batch loss is the mean of the per-pair losses.
        optimizer.zero_grad()
        torch.autograd.backward(
            (chosen_logps, rejected_logps), (dloss_dlogp_w / NUM_PROMPTS, dloss_dlogp_l / NUM_PROMPTS)
        )
        optimizer.step()


class ToyRewardModel(torch.nn.Module):
    """r_φ(x, y): an MLP from the one-hot prompt to a scalar reward for each of the 10 responses."""

    def __init__(self, hidden_size: int = 64) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(NUM_PROMPTS, hidden_size), torch.nn.ReLU(), torch.nn.Linear(hidden_size, NUM_RESPONSES)
        )

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        return self.layers(F.one_hot(prompts, NUM_PROMPTS).to(self.layers[0].weight.dtype))


def train_rlhf(policy: ToyPolicy, reference: ToyPolicy, config: ToyConfig, record, reward_record) -> None:
    """Reward model on the same pairs, then exact-gradient maximisation of E_π[r] − β KL(π ‖ π_ref)."""
    generator = random.Random(config.seed)
    reward = ToyRewardModel(config.hidden_size).to(next(policy.parameters()).dtype)
    reward_optimizer = torch.optim.Adam(reward.parameters(), lr=config.reward_learning_rate)
    for step in range(config.reward_steps + 1):
        rejected = draw_rejected(generator)
        scores = reward(ALL_PROMPTS)
        chosen_scores = scores[ALL_PROMPTS, ALL_PROMPTS].detach().requires_grad_(True)
        rejected_scores = scores[ALL_PROMPTS, rejected].detach().requires_grad_(True)
        out = reward_model(chosen_scores, rejected_scores)
        grad_w, grad_l = torch.autograd.grad(out.losses.sum(), (chosen_scores, rejected_scores))
        with torch.no_grad():
            all_scores = reward(ALL_PROMPTS)
            chosen_all = all_scores[ALL_PROMPTS, ALL_PROMPTS]
            accuracy = (chosen_all[:, None] > all_scores[:, list(REJECTED)]).double().mean()
        reward_record(
            {
                "step": step,
                "loss": float(out.losses.mean().detach()),
                "reward_accuracy": float(accuracy),
                "grad_reward_chosen": float(grad_w.abs().mean()),
                "grad_reward_rejected": float(grad_l.abs().mean()),
            }
        )
        if step == config.reward_steps:
            break
        reward_optimizer.zero_grad()
        torch.autograd.backward(
            (scores[ALL_PROMPTS, ALL_PROMPTS], scores[ALL_PROMPTS, rejected]),
            (grad_w / NUM_PROMPTS, grad_l / NUM_PROMPTS),
        )
        reward_optimizer.step()

    with torch.no_grad():
        rewards = reward(ALL_PROMPTS)
        reference_log_probs = reference(ALL_PROMPTS)
    optimizer = OPTIMIZERS[config.optimizer](policy.parameters(), lr=config.learning_rate)
    for step in range(config.steps + 1):
        log_probs = policy(ALL_PROMPTS)
        probs = log_probs.exp()
        kl = (probs * (log_probs - reference_log_probs)).sum(-1)
        objective = (probs * rewards).sum(-1) - config.kl_beta * kl
        loss = -objective.mean()
        # ∂L/∂π(y) of the KL-regularised objective, by response: −(r(y) − β(log π/π_ref + 1)) / B.
        grad_prob = -(rewards - config.kl_beta * (log_probs.detach() - reference_log_probs + 1))
        rejected_grad = grad_prob[:, list(REJECTED)].abs().mean(-1)
        entry = {
            "step": step,
            "loss": float(loss.detach()),
            "kl": float(kl.mean().detach()),
            "expected_reward": float((probs * rewards).sum(-1).mean().detach()),
        }
        entry["margin"] = float((rewards[ALL_PROMPTS, ALL_PROMPTS][:, None] - rewards[:, list(REJECTED)]).mean())
        entry.update(probabilities_record(log_probs.detach()))
        entry.update(
            {
                "grad_chosen": float(grad_prob[ALL_PROMPTS, ALL_PROMPTS].abs().mean()),
                "grad_rejected": float(rejected_grad.mean()),
                "grad_ratio": float(
                    (rejected_grad / grad_prob[ALL_PROMPTS, ALL_PROMPTS].abs().clamp_min(1e-300)).mean()
                ),
            }
        )
        record(entry)
        if step == config.steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@dataclass
class ToyRun:
    """A finished run: its config, Step-1 facts, per-step metrics, and the reward-model phase if any."""

    config: ToyConfig
    scenario: Scenario
    sft: dict
    metrics: list[dict]
    reward_metrics: list[dict] = field(default_factory=list)

    def series(self, key: str) -> list[float]:
        return [entry[key] for entry in self.metrics]

    def summary(self) -> dict:
        chosen = self.series("chosen_prob")
        peak_step = max(range(len(chosen)), key=chosen.__getitem__)
        ratios = [r for r in self.series("grad_ratio") if math.isfinite(r)]
        first, last = self.metrics[0], self.metrics[-1]
        outside = [1 - value for value in self.series("data_mass")]
        result = {
            "label": self.config.label,
            "loss": self.config.loss if isinstance(self.config.loss, str) else "+".join(self.config.loss),
            "scenario": self.scenario.name,
            "initial_chosen_prob": first["chosen_prob"],
            "peak_chosen_prob": chosen[peak_step],
            "peak_step": self.metrics[peak_step]["step"],
            "final_chosen_prob": last["chosen_prob"],
            "initial_rejected_prob": first["rejected_prob"],
            "final_rejected_prob": last["rejected_prob"],
            "initial_unseen_mass": first["unseen_mass"],
            "final_unseen_mass": last["unseen_mass"],
            "initial_data_mass": first["data_mass"],
            "final_data_mass": last["data_mass"],
            "initial_grad_ratio": first["grad_ratio"],
            "max_grad_ratio": max(ratios) if ratios else float("nan"),
            "final_grad_ratio": last["grad_ratio"],
            "steps": last["step"],
            # Changes, not end values: what the 3D properties predict, whatever the starting point.
            "chosen_fall_from_peak": chosen[peak_step] - last["chosen_prob"],
            "chosen_change": last["chosen_prob"] - first["chosen_prob"],
            "rejected_logp_change": last["rejected_logp"] - first["rejected_logp"],
            "unseen_mass_change": last["unseen_mass"] - first["unseen_mass"],
            "outside_mass_change": outside[-1] - outside[0],
            "outside_mass_rise_from_min": outside[-1] - min(outside),
        }
        if self.reward_metrics:
            result["final_reward_accuracy"] = self.reward_metrics[-1]["reward_accuracy"]
        return result

    def save(self, directory: str | Path) -> Path:
        """Write config.json, metrics.jsonl, metrics.csv, summary.json (and reward_metrics.jsonl)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(
            directory / "config.json",
            {"kind": "toy", **asdict(self.config), "sft": self.sft, "targets": self.scenario.targets},
        )
        write_jsonl(directory / "metrics.jsonl", self.metrics)
        if self.reward_metrics:
            write_jsonl(directory / "reward_metrics.jsonl", self.reward_metrics)
        scalar_keys = [k for k, v in self.metrics[0].items() if not isinstance(v, list)]
        with atomic_path(directory / "metrics.csv") as temporary, open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=scalar_keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.metrics)
        write_json(directory / "summary.json", self.summary())
        return directory


_REFERENCE_CACHE: dict[tuple, tuple[dict, dict]] = {}


def prepare_reference(config: ToyConfig, scenario: Scenario) -> tuple[ToyPolicy, dict]:
    """Step 1, memoised per (scenario targets, sizes, seed, Step-1 settings): many runs share one reference."""
    key = (
        scenario.targets,
        config.hidden_size,
        config.seed,
        config.sft_learning_rate,
        config.sft_max_steps,
        config.sft_tolerance,
    )
    if key not in _REFERENCE_CACHE:
        torch.manual_seed(config.seed)
        policy = ToyPolicy(config.hidden_size).double()
        sft = train_sft(policy, scenario.tensor(), config)
        _REFERENCE_CACHE[key] = ({k: v.clone() for k, v in policy.state_dict().items()}, sft)
    state, sft = _REFERENCE_CACHE[key]
    policy = ToyPolicy(config.hidden_size).double()
    policy.load_state_dict(state)
    return policy, dict(sft)


class ToyDiverged(ValueError):
    """Step 2 left finite numbers: the message names the step and the quantities (usually a learning rate too
    large for the optimiser)."""

    def __init__(self, step: int, detail: str) -> None:
        self.step = step
        super().__init__(
            f"the toy run diverged at step {step}: {detail}; lower the learning rate (--lr) or use --optimizer adam"
        )


# ∂L/∂π = (∂L/∂log π) / π is infinite once a rejected probability underflows to 0 in float64, which is the 3D
# paper's unbounded ratio at its limit, not a divergence: these three may be ±inf (null in JSON), never NaN.
UNBOUNDED = frozenset({"grad_chosen", "grad_rejected", "grad_ratio"})


def _non_finite(entry: dict) -> list[str]:
    """The recorded quantities of one step that are NaN or ±inf (lists included); ±inf is allowed in
    :data:`UNBOUNDED`."""
    bad = []
    for key, value in entry.items():
        values = value if isinstance(value, list) else [value]
        floats = [v for v in values if isinstance(v, float)]
        if any(math.isnan(v) for v in floats) or (key not in UNBOUNDED and any(math.isinf(v) for v in floats)):
            bad.append(key)
    return bad


def run_toy(config: ToyConfig) -> ToyRun:
    """Run Step 1 (or reuse it) and Step 2; deterministic for a given config. A step whose recorded quantities
    are not all finite stops the run with :class:`ToyDiverged` (its numbers would be nulls in every output)."""
    config.validate()
    scenario = load_scenario(config.scenario)
    policy, sft = prepare_reference(config, scenario)
    reference, _ = prepare_reference(config, scenario)
    reference.requires_grad_(False)
    torch.manual_seed(config.seed)
    metrics: list[dict] = []
    reward_metrics: list[dict] = []

    def record(entry: dict) -> None:
        bad = _non_finite(entry)
        if bad:
            shown = ", ".join(f"{key} = {entry[key]}" for key in bad[:4] if not isinstance(entry[key], list))
            raise ToyDiverged(entry.get("step", len(metrics)), shown or f"{', '.join(bad)} not finite")
        metrics.append(entry)

    if config.loss == RLHF:
        train_rlhf(policy, reference, config, record, reward_metrics.append)
    else:
        train_preference(policy, reference, config, record)
    return ToyRun(config, scenario, sft, metrics, reward_metrics)
