"""Preference losses as pure functions of per-sequence log-probabilities.

Every loss takes a :class:`PreferenceLogps` (policy and reference log-probs of the chosen and the
rejected completion, summed over completion tokens, plus the completion token counts) and returns a
:class:`LossOutput` (per-pair losses, the implicit rewards, and named auxiliary terms for logging).

Notation (see ``docs/losses.md``): ``r_w = log π_θ(y_w|x) − log π_ref(y_w|x)``, ``r_l`` likewise,
``h = r_w − r_l``; σ is the sigmoid. Each function's docstring gives its formula and its source.

This module imports only torch, so the toy lab, the trainer and the tests share one implementation.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceLogps:
    """Per-sequence log-probabilities of one batch of B preference pairs.

    All tensors have shape ``(B,)``. Log-probs are *summed* over the completion tokens; the
    length-normalised losses divide by ``chosen_lengths`` / ``rejected_lengths`` themselves.

    Attributes:
        policy_chosen_logps: log π_θ(y_w|x).
        policy_rejected_logps: log π_θ(y_l|x).
        reference_chosen_logps: log π_ref(y_w|x); ``None`` for the reference-free losses.
        reference_rejected_logps: log π_ref(y_l|x); ``None`` for the reference-free losses.
        chosen_lengths: number of completion tokens of y_w (needed by length-normalised losses).
        rejected_lengths: number of completion tokens of y_l.
        batch_mean_chosen_length: the mean of ``chosen_lengths`` over the *global* batch, a scalar, for
            the ``batch_token_mean`` reductions when a batch is split across processes (each process then
            normalises by the same count, so the result equals one process's); ``None``: this batch's mean.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    reference_chosen_logps: Tensor | None = None
    reference_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    batch_mean_chosen_length: Tensor | None = None

    def fields(self) -> dict[str, Tensor | None]:
        """The per-pair tensors, shape (B,) each."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "batch_mean_chosen_length"}

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for bad shapes, dtypes or non-finite values."""
        expected = self.policy_chosen_logps.shape if torch.is_tensor(self.policy_chosen_logps) else None
        for name, value in self.fields().items():
            if value is None:
                continue
            if not torch.is_tensor(value):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() != 1:
                raise ValueError(f"{name} must have shape (B,), got {tuple(value.shape)}")
            if value.shape != expected:
                raise ValueError(f"{name} has shape {tuple(value.shape)} but policy_chosen_logps has {tuple(expected)}")
            if not torch.is_floating_point(value) and not name.endswith("_lengths"):
                raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                row = int((~finite).nonzero()[0, 0])
                raise ValueError(f"{name} is not finite at row {row}: {float(value[row].detach())}")
            if name.endswith("_lengths") and bool((value <= 0).any()):
                row = int((value <= 0).nonzero()[0, 0])
                raise ValueError(f"{name} must be positive, got {float(value[row])} at row {row}")
        if (self.reference_chosen_logps is None) != (self.reference_rejected_logps is None):
            raise ValueError("give both reference_chosen_logps and reference_rejected_logps, or neither")

    # -- derived quantities, used by several losses ------------------------------------------

    def require_reference(self, loss: str) -> tuple[Tensor, Tensor]:
        if self.reference_chosen_logps is None or self.reference_rejected_logps is None:
            raise ValueError(f"loss {loss!r} needs reference_chosen_logps and reference_rejected_logps")
        return self.reference_chosen_logps, self.reference_rejected_logps

    def require_lengths(self, loss: str) -> tuple[Tensor, Tensor]:
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(f"loss {loss!r} needs chosen_lengths and rejected_lengths (completion token counts)")
        dtype = self.policy_chosen_logps.dtype
        return self.chosen_lengths.to(dtype), self.rejected_lengths.to(dtype)

    def logratios(self, loss: str) -> tuple[Tensor, Tensor]:
        """(r_w, r_l): policy minus reference log-probs of chosen and rejected."""
        reference_chosen, reference_rejected = self.require_reference(loss)
        return self.policy_chosen_logps - reference_chosen, self.policy_rejected_logps - reference_rejected


@dataclass
class LossOutput:
    """What every loss returns.

    Attributes:
        losses: per-pair losses, shape ``(B,)``, differentiable. The batch loss is their mean.
        chosen_rewards: implicit reward of y_w per pair, detached (β·r_w for the DPO family).
        rejected_rewards: implicit reward of y_l per pair, detached.
        terms: named per-pair auxiliary quantities for logging, detached (e.g. ``dpop_penalty``).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


def _output(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, **terms: Tensor) -> LossOutput:
    return LossOutput(
        losses=losses,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        terms={name: value.detach() for name, value in terms.items()},
    )


# ---------------------------------------------------------------------------------------------
# f-divergence scores (Wang et al. 2023, "Beyond Reverse KL", as exposed by TRL's f_divergence_type)
# ---------------------------------------------------------------------------------------------

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_score(logratio: Tensor, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Tensor:
    """Map a log-ratio log(π_θ/π_ref) = log t to f'(t) for the chosen f-divergence.

    reverse_kl: log t (standard DPO). forward_kl: 1 − 1/t. js_divergence: log 2 + log σ(log t).
    alpha_divergence: (t^(α−1) − 1)/(α − 1), with (α−1)·log t clamped at 80 (11 in fp16) so exp stays
    finite; α = 1 is the reverse-KL limit.
    """
    if f_divergence == "reverse_kl":
        return logratio
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return logratio
        clamp_max = 11.0 if logratio.dtype == torch.float16 else 80.0
        exponent = torch.clamp((f_alpha - 1.0) * logratio, max=clamp_max)
        return (torch.exp(exponent) - 1.0) / (f_alpha - 1.0)
    raise ValueError(f"f_divergence must be one of {', '.join(F_DIVERGENCES)}; got {f_divergence!r}")


def _scores(
    chosen_logratio: Tensor, rejected_logratio: Tensor, f_divergence: str, f_alpha: float
) -> tuple[Tensor, Tensor]:
    return (
        f_divergence_score(chosen_logratio, f_divergence, f_alpha),
        f_divergence_score(rejected_logratio, f_divergence, f_alpha),
    )


def _smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """−(1−ε) log σ(z) − ε log σ(−z): the logistic loss with labels flipped with probability ε."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def nll(
    logps: Tensor, lengths: Tensor | None, reduction: str = "token_mean", batch_mean_length: Tensor | None = None
) -> Tensor:
    """Per-sequence negative log-likelihood −log π_θ(y|x) of summed log-probs ``logps``, reduced per ``reduction``.

    ``sum``: −log π_θ(y|x). ``token_mean``: −log π_θ(y|x) / |y| (each sequence's own token mean).
    ``batch_token_mean``: −log π_θ(y|x) / mean_batch(|y|), whose batch mean is the token-weighted mean
    over every token of the batch (TRL's ``sft`` loss and ORPO's NLL); ``batch_mean_length`` overrides
    mean_batch(|y|) when the batch is split across processes.
    """
    if reduction == "sum":
        return -logps
    if lengths is None:
        raise ValueError(f"reduction {reduction!r} needs the completion token counts")
    if reduction == "token_mean":
        return -logps / lengths.to(logps.dtype)
    if reduction == "batch_token_mean":
        mean = lengths.to(logps.dtype).mean() if batch_mean_length is None else batch_mean_length.to(logps.dtype)
        return -logps / mean
    raise ValueError(f"reduction must be one of sum, token_mean, batch_token_mean; got {reduction!r}")


def _nll(logps: PreferenceLogps, reduction: str, loss: str) -> Tensor:
    """Per-pair negative log-likelihood of the chosen completion under the policy (see :func:`nll`)."""
    if reduction != "sum" and logps.chosen_lengths is None:  # SFT needs only the chosen side's counts
        raise ValueError(f"loss {loss!r} (reduction={reduction!r}) needs chosen_lengths (completion token counts)")
    return nll(logps.policy_chosen_logps, logps.chosen_lengths, reduction, logps.batch_mean_chosen_length)


# ---------------------------------------------------------------------------------------------
# Token and pair weights that change the objective (applied to the log-probs before the loss)
# ---------------------------------------------------------------------------------------------


def ld_dpo_token_weights(token_index: Tensor, shared_length: Tensor, alpha: float) -> Tensor:
    """LD-DPO (Liu et al. 2024, length desensitisation; TRL's ``ld_alpha``): weight 1 for the first ``shared_length`` tokens
    of a completion, α beyond.

    ``token_index``: each token's position in its completion; ``shared_length``: min(|y_w|, |y_l|) of the
    token's pair. log π is then Σ_{t<ℓ} log p_t + α Σ_{t≥ℓ} log p_t for policy and reference alike.
    """
    ones = torch.ones(token_index.shape, device=token_index.device)
    return ones.masked_fill(token_index >= shared_length, alpha)


def wpo_pair_weights(
    chosen_aligned: Tensor, rejected_aligned: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """WPO (Zhou et al. 2024, Eq. 2; TRL's ``use_weighting``): w = exp(mean_t a_t(y_w)) · exp(mean_t a_t(y_l)),
    detached.

    ``*_aligned``: Σ_t (log p_t − log Σ_v p_v²) over each completion's tokens, the log-prob aligned to the
    policy's own sampling distribution. Each pair's loss is multiplied by w.
    """
    with torch.no_grad():
        return torch.exp(chosen_aligned / chosen_lengths) * torch.exp(rejected_aligned / rejected_lengths)


# ---------------------------------------------------------------------------------------------
# The losses of the two papers
# ---------------------------------------------------------------------------------------------


def dpo(
    logps: PreferenceLogps, beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha: float = 0.5
) -> LossOutput:
    """DPO: L = −log σ(β (r_w − r_l)).

    Rafailov et al. 2023, Eq. 7; 3D-properties paper Eq. 5. With ``f_divergence`` the log-ratios are
    replaced by f'(π_θ/π_ref) (f-DPO). Gradients (3D paper §3.1, Corollary 1), u = β h:
    ∂L/∂π_w = −β(1 − σ(u))/π_w, ∂L/∂π_l = β(1 − σ(u))/π_l, so |∂L/∂π_l| / |∂L/∂π_w| = π_w/π_l.
    TRL name: ``sigmoid``.
    """
    chosen_logratio, rejected_logratio = logps.logratios("dpo")
    chosen_score, rejected_score = _scores(chosen_logratio, rejected_logratio, f_divergence, f_alpha)
    losses = -F.logsigmoid(beta * (chosen_score - rejected_score))
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio)


def dpop(logps: PreferenceLogps, beta: float = 0.1, lam: float = 50.0) -> LossOutput:
    """DPO-Positive: L = −log σ(β (r_w − r_l − λ·max(0, −r_w))).

    Pal et al. 2024 (Smaug), the DPOP loss (PAPERS.md §1). The penalty max(0, log π_ref(y_w|x) −
    log π_θ(y_w|x)) sits *inside* the sigmoid (the authors' corrected version). Where r_w < 0 the
    coefficient on log π_w is β(1 + λ): the chosen side dominates until π_w is back above its
    reference value; where r_w ≥ 0 it is exactly DPO. Smaug used β = 0.3, λ = 50.
    Logged term: ``dpop_penalty`` = max(0, −r_w).

    The max is ``relu``, whose gradient at 0 is 0; ``clamp(min=0)`` passes gradient 1 there, and r_w = 0
    exactly is every pair's value at the first step (policy = reference), which would then push the chosen
    side with β(1 + λ) instead of DPO's β.
    """
    chosen_logratio, rejected_logratio = logps.logratios("dpop")
    penalty = torch.relu(-chosen_logratio)
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio - lam * penalty))
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio, dpop_penalty=penalty)


def flex(logps: PreferenceLogps, beta_chosen: float = 0.1, beta_rejected: float = 0.1) -> LossOutput:
    """Flexible-β DPO: L = −log σ(β_w r_w − β_l r_l).

    3D-properties paper §3.3 and App. B.2.1. ∂L/∂π_w = −β_w(1 − σ(u))/π_w, ∂L/∂π_l = β_l(1 − σ(u))/π_l:
    a lower β_rejected slows the fall of π(y_l). Equals DPO when β_w = β_l.
    """
    chosen_logratio, rejected_logratio = logps.logratios("flex")
    losses = -F.logsigmoid(beta_chosen * chosen_logratio - beta_rejected * rejected_logratio)
    return _output(losses, beta_chosen * chosen_logratio, beta_rejected * rejected_logratio)


def ipo(
    logps: PreferenceLogps,
    tau: float = 0.1,
    length_normalized: bool = True,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """IPO: L = (h − 1/(2τ))².

    Azar et al. 2024, Eq. 17; 3D-properties paper Eq. 8 (τ = 0.1 there). ``length_normalized=True``
    (TRL's ``ipo``, the default) divides each log-ratio by its completion's token count;
    ``False`` is the paper's sum form. ∂L/∂log π_w = 2(h − 1/(2τ)) = −∂L/∂log π_l (sum form): bounded,
    zero at the target margin h = 1/(2τ). TRL passes τ as ``beta``; rewards are logged as τ·r.
    """
    chosen_logratio, rejected_logratio = logps.logratios("ipo")
    chosen_score, rejected_score = _scores(chosen_logratio, rejected_logratio, f_divergence, f_alpha)
    if length_normalized:
        chosen_lengths, rejected_lengths = logps.require_lengths("ipo (length_normalized=True)")
        chosen_score, rejected_score = chosen_score / chosen_lengths, rejected_score / rejected_lengths
    losses = (chosen_score - rejected_score - 1 / (2 * tau)) ** 2
    return _output(losses, tau * chosen_logratio, tau * rejected_logratio)


def slic(logps: PreferenceLogps, delta: float = 1.0, reg_weight: float = 0.1, reduction: str = "sum") -> LossOutput:
    """SLiC-HF: L = max(0, δ − log π_θ(y_w|x) + log π_θ(y_l|x)) − λ_reg·log π_θ(y_w|x).

    Zhao et al. 2023 (calibration hinge on the policy's own log-probs, no reference, plus a
    regulariser on the chosen / SFT target). ``reduction`` applies to the regulariser: ``sum``
    (the paper's sequence log-likelihood) or ``token_mean``. Rewards are the policy log-probs.
    Logged terms: ``slic_hinge``, ``nll``.
    """
    hinge_term = torch.relu(delta - logps.policy_chosen_logps + logps.policy_rejected_logps)
    nll = _nll(logps, reduction, "slic")
    return _output(
        hinge_term + reg_weight * nll,
        logps.policy_chosen_logps,
        logps.policy_rejected_logps,
        slic_hinge=hinge_term,
        nll=nll,
    )


def hinge(
    logps: PreferenceLogps, beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha: float = 0.5
) -> LossOutput:
    """Hinge (TRL's SLiC-style ``hinge``): L = max(0, 1 − β h). Zhao et al. 2023 with the DPO log-ratios."""
    chosen_logratio, rejected_logratio = logps.logratios("hinge")
    chosen_score, rejected_score = _scores(chosen_logratio, rejected_logratio, f_divergence, f_alpha)
    losses = torch.relu(1 - beta * (chosen_score - rejected_score))
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio)


def robust(
    logps: PreferenceLogps,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """Robust DPO: L = [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε).

    Chowdhury et al. 2024, Eq. 4: an unbiased loss when labels are flipped with probability ε ∈ [0, 0.5).
    """
    chosen_logratio, rejected_logratio = logps.logratios("robust")
    chosen_score, rejected_score = _scores(chosen_logratio, rejected_logratio, f_divergence, f_alpha)
    logits = beta * (chosen_score - rejected_score)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    losses = (clean - flipped) / (1 - 2 * label_smoothing)
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio)


def cdpo(
    logps: PreferenceLogps,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """Conservative DPO: L = −(1−ε) log σ(βh) − ε log σ(−βh).

    Mitchell 2023 ("A note on DPO with noisy preferences"): DPO with label smoothing ε ∈ [0, 0.5).
    The loss no longer goes to zero as h → ∞, so it stops pushing once the margin is large.
    """
    chosen_logratio, rejected_logratio = logps.logratios("cdpo")
    chosen_score, rejected_score = _scores(chosen_logratio, rejected_logratio, f_divergence, f_alpha)
    losses = _smoothed_sigmoid_loss(beta * (chosen_score - rejected_score), label_smoothing)
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio)


def sft(logps: PreferenceLogps, reduction: str = "batch_token_mean") -> LossOutput:
    """SFT on the chosen completion: L = −log π_θ(y_w|x), reduced per ``reduction``.

    ``batch_token_mean`` (default): the token-weighted mean over the batch, TRL's ``sft`` loss type and
    its SFTTrainer's loss. ``token_mean``: each pair's NLL divided by its own token count. ``sum``: the
    sequence NLL, for which ∂L/∂π_w = −1/π_w (3D paper Eq. 7). Combine it with any loss through
    ``sft_weight`` (the reduction is then ``sft_reduction``, with the same default).
    """
    nll = _nll(logps, reduction, "sft")
    return _output(nll, logps.policy_chosen_logps, logps.policy_rejected_logps, nll=nll)


# ---------------------------------------------------------------------------------------------
# Beyond the papers: TRL's loss types, with TRL's names
# ---------------------------------------------------------------------------------------------


def exo_pair(
    logps: PreferenceLogps,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """EXO (pairwise): L = KL(q ‖ p) with q = softmax over {y_w, y_l} of β·(log π_θ − log π_ref) and
    p = (1 − ε, ε): L = σ(βh)(log σ(βh) − log(1−ε)) + σ(−βh)(log σ(−βh) − log ε).

    Ji et al. 2024, Eq. 16. ε must lie in (0, 1); the paper recommends 1e-3.
    """
    chosen_logratio, rejected_logratio = logps.logratios("exo_pair")
    chosen_score, rejected_score = _scores(chosen_logratio, rejected_logratio, f_divergence, f_alpha)
    logits = beta * (chosen_score - rejected_score)
    losses = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-label_smoothing)) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - math.log(label_smoothing)
    )
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio)


def nca_pair(logps: PreferenceLogps, beta: float = 0.1) -> LossOutput:
    """NCA (pairwise): L = −log σ(β r_w) − ½ log σ(−β r_w) − ½ log σ(−β r_l). Chen et al. 2024, Eq. 11."""
    chosen_logratio, rejected_logratio = logps.logratios("nca_pair")
    chosen_reward, rejected_reward = beta * chosen_logratio, beta * rejected_logratio
    losses = -F.logsigmoid(chosen_reward) - 0.5 * F.logsigmoid(-chosen_reward) - 0.5 * F.logsigmoid(-rejected_reward)
    return _output(losses, chosen_reward, rejected_reward)


def bco_pair(logps: PreferenceLogps, beta: float = 0.1) -> LossOutput:
    """BCO (pairwise, without the running reward shift): L = −log σ(β r_w) − log σ(−β r_l). Jung et al. 2024."""
    chosen_logratio, rejected_logratio = logps.logratios("bco_pair")
    chosen_reward, rejected_reward = beta * chosen_logratio, beta * rejected_logratio
    losses = -F.logsigmoid(chosen_reward) - F.logsigmoid(-rejected_reward)
    return _output(losses, chosen_reward, rejected_reward)


def sppo_hard(logps: PreferenceLogps, beta: float = 0.1) -> LossOutput:
    """SPPO with hard labels: L = (r_w − 1/(2β))² + (r_l + 1/(2β))². Wu et al. 2024, Eq. 4.7 with P ∈ {0, 1}."""
    chosen_logratio, rejected_logratio = logps.logratios("sppo_hard")
    losses = (chosen_logratio - 0.5 / beta) ** 2 + (rejected_logratio + 0.5 / beta) ** 2
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio)


def aot(logps: PreferenceLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT (paired): distributional alignment via optimal transport over the batch. Melnyk et al. 2024.

    δ = sort_batch(log π_θ(y_w) − log π_θ(y_l)) − sort_batch(log π_ref(y_w) − log π_ref(y_l));
    L = −(1−ε) log σ(βδ) − ε log σ(−βδ). The i-th loss belongs to the i-th *quantile*, not to pair i.
    """
    reference_chosen, reference_rejected = logps.require_reference("aot")
    policy_margin, _ = torch.sort(logps.policy_chosen_logps - logps.policy_rejected_logps, dim=0)
    reference_margin, _ = torch.sort(reference_chosen - reference_rejected, dim=0)
    losses = _smoothed_sigmoid_loss(beta * (policy_margin - reference_margin), label_smoothing)
    chosen_logratio, rejected_logratio = logps.logratios("aot")
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio)


def aot_unpaired(logps: PreferenceLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT (unpaired): δ = sort_batch(r_w) − sort_batch(r_l); L = −(1−ε) log σ(βδ) − ε log σ(−βδ).

    Melnyk et al. 2024. As for ``aot``, losses are per quantile, not per pair.
    """
    chosen_logratio, rejected_logratio = logps.logratios("aot_unpaired")
    chosen_sorted, _ = torch.sort(chosen_logratio, dim=0)
    rejected_sorted, _ = torch.sort(rejected_logratio, dim=0)
    losses = _smoothed_sigmoid_loss(beta * (chosen_sorted - rejected_sorted), label_smoothing)
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio)


def apo_zero(logps: PreferenceLogps, beta: float = 0.1) -> LossOutput:
    """APO-zero: L = (1 − σ(β r_w)) + σ(β r_l). D'Oosterlinck et al. 2024, Eq. 7.

    For chosen outputs better than the model's own: raises chosen, lowers rejected likelihood.
    """
    chosen_logratio, rejected_logratio = logps.logratios("apo_zero")
    losses = 1 - torch.sigmoid(beta * chosen_logratio) + torch.sigmoid(beta * rejected_logratio)
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio)


def apo_down(logps: PreferenceLogps, beta: float = 0.1) -> LossOutput:
    """APO-down: L = σ(β r_w) + 1 − σ(β (r_w − r_l)). D'Oosterlinck et al. 2024, Eq. 8.

    For chosen outputs worse than the model's own: lowers both, the rejected more.
    """
    chosen_logratio, rejected_logratio = logps.logratios("apo_down")
    losses = torch.sigmoid(beta * chosen_logratio) + 1 - torch.sigmoid(beta * (chosen_logratio - rejected_logratio))
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio)


def discopop(
    logps: PreferenceLogps,
    beta: float = 0.1,
    tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): with z = βh and m = σ(z/τ),
    L = (1 − m)·(−log σ(z)) + m·exp(−z). Chris Lu et al. 2024, Eq. 5; τ = 0.05 recommended.
    """
    chosen_logratio, rejected_logratio = logps.logratios("discopop")
    chosen_score, rejected_score = _scores(chosen_logratio, rejected_logratio, f_divergence, f_alpha)
    logits = beta * (chosen_score - rejected_score)
    modulation = torch.sigmoid(logits / tau)
    losses = (1 - modulation) * -F.logsigmoid(logits) + modulation * torch.exp(-logits)
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio)


def sigmoid_norm(
    logps: PreferenceLogps, beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha: float = 0.5
) -> LossOutput:
    """Length-normalised DPO: L = −log σ(β (r_w/|y_w| − r_l/|y_l|)). TRL ``sigmoid_norm``."""
    chosen_logratio, rejected_logratio = logps.logratios("sigmoid_norm")
    chosen_score, rejected_score = _scores(chosen_logratio, rejected_logratio, f_divergence, f_alpha)
    chosen_lengths, rejected_lengths = logps.require_lengths("sigmoid_norm")
    losses = -F.logsigmoid(beta * (chosen_score / chosen_lengths - rejected_score / rejected_lengths))
    return _output(losses, beta * chosen_logratio, beta * rejected_logratio)


def simpo(logps: PreferenceLogps, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0) -> LossOutput:
    """SimPO (reference-free): with a_w = log π_θ(y_w|x)/|y_w|, a_l likewise,
    L = −(1−ε) log σ(β(a_w − a_l) − γ) − ε log σ(−β(a_w − a_l) + γ). Meng et al. 2024, Eq. 6.

    Needs the policy log-probs and the token counts only. Defaults β = 2, γ = 1 (the paper's
    γ/β = 0.5). TRL: ``CPOTrainer`` with ``loss_type="simpo"``, ``simpo_gamma=γ``. Rewards: β·a.
    """
    chosen_lengths, rejected_lengths = logps.require_lengths("simpo")
    chosen_mean = logps.policy_chosen_logps / chosen_lengths
    rejected_mean = logps.policy_rejected_logps / rejected_lengths
    losses = _smoothed_sigmoid_loss(beta * (chosen_mean - rejected_mean) - gamma, label_smoothing)
    return _output(losses, beta * chosen_mean, beta * rejected_mean)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, stable on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(logps: PreferenceLogps, lam: float = 0.1, reduction: str = "batch_token_mean") -> LossOutput:
    """ORPO (reference-free): L = NLL(y_w) − λ·log σ(log odds(y_w) − log odds(y_l)),
    with odds(y) = P/(1 − P) and P = exp(log π_θ(y|x)/|y|) the per-token geometric-mean probability.

    Hong et al. 2024, Eqs. 4–7. Needs the summed policy log-probs and the token counts (the odds use
    per-token-mean log-probs). ``reduction`` is the NLL's; ``batch_token_mean`` (default) is the
    token-weighted cross-entropy of the ORPO paper and TRL's ``ORPOTrainer`` (whose λ is ``beta``).
    Logged terms: ``nll``, ``log_odds_ratio``. Rewards: λ·mean token log-prob.
    """
    chosen_lengths, rejected_lengths = logps.require_lengths("orpo")
    chosen_mean = logps.policy_chosen_logps / chosen_lengths
    rejected_mean = logps.policy_rejected_logps / rejected_lengths
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    odds_term = F.logsigmoid(log_odds)
    nll = _nll(logps, reduction, "orpo")
    return _output(nll - lam * odds_term, lam * chosen_mean, lam * rejected_mean, nll=nll, log_odds_ratio=log_odds)


# ---------------------------------------------------------------------------------------------
# Reward model (Bradley–Terry): a loss on scalar rewards, not on log-probs
# ---------------------------------------------------------------------------------------------


def reward_model(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: Tensor | float | None = None,
    center_coefficient: float = 0.0,
) -> LossOutput:
    """Bradley–Terry reward-model loss: L = −log σ(r_φ(x, y_w) − r_φ(x, y_l) − m) + c·(r_φ(x, y_w) + r_φ(x, y_l))².

    Ouyang et al. 2022; 3D-properties paper Eq. 3. ``margin`` m is optional, per pair or scalar.
    ``center_coefficient`` c pulls the rewards towards zero mean (Eisenstein et al. 2023, "Helping or
    herding?"; TRL's ``center_rewards_coefficient``, whose batch term mean((r_w + r_l)²) is the mean of
    this per-pair term). ∂L/∂r_w = −(1 − σ) + 2c(r_w + r_l), ∂L/∂r_l = +(1 − σ) + 2c(r_w + r_l): with
    c = 0 balanced, hence no 3D properties (3D paper §4).
    """
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(
            f"chosen_scores and rejected_scores must both have shape (B,); got "
            f"{tuple(chosen_scores.shape)} and {tuple(rejected_scores.shape)}"
        )
    for name, value in (("chosen_scores", chosen_scores), ("rejected_scores", rejected_scores)):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or inf")
    margin_value = 0.0 if margin is None else margin
    bradley_terry = -F.logsigmoid(chosen_scores - rejected_scores - margin_value)
    centring = (chosen_scores + rejected_scores) ** 2
    losses = bradley_terry + center_coefficient * centring if center_coefficient else bradley_terry
    return _output(losses, chosen_scores, rejected_scores, reward_centring=centring)


# ---------------------------------------------------------------------------------------------
# RLHF-PPO: per-token quantities of sampled responses (Schulman et al. 2017; Ouyang et al. 2022)
#
# Shapes: (B, T) for B responses of up to T tokens, right-padded; ``mask`` is 1 on response tokens.
# ``logps`` are log π(a_t | s_t) of the sampled tokens. Not in the registry: they take token tensors.
# ---------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logps: Tensor, reference_logps: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π (Schulman 2020, "Approximating KL").

    With log ρ = log π_ref − log π: ``k1`` = −log ρ (unbiased; negative on some tokens), ``k2`` = ½(log ρ)²
    (biased, low variance), ``k3`` = (ρ − 1) − log ρ (unbiased and ≥ 0). Their expectations under π:
    E[k1] = E[k3] = KL(π ‖ π_ref); E[k2] = KL to second order.
    """
    log_ratio = reference_logps - logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"estimator must be one of {', '.join(KL_ESTIMATORS)}; got {estimator!r}")


def masked_mean(values: Tensor, mask: Tensor, count: Tensor | float | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1 (every response token weighs the same).

    ``count``: divide by it instead of this mask's sum. On P processes, the global minibatch's token count / P
    makes the average that DDP takes of the P local results the mean over every process's tokens."""
    return (values * mask).sum() / (mask.sum().clamp(min=1) if count is None else count)


def whiten(
    values: Tensor, mask: Tensor, shift_mean: bool = True, mean: Tensor | None = None, variance: Tensor | None = None
) -> Tensor:
    """(values − mean) / std over the masked positions (the mean kept when ``shift_mean`` is false); 0 elsewhere.

    Used for advantages (zero mean, unit variance per rollout batch) and, without the shift, for rewards.
    ``mean`` and ``variance``: given when the batch spans several processes (computed over all of them).
    """
    mean = masked_mean(values, mask) if mean is None else mean
    variance = masked_mean((values - mean) ** 2, mask) if variance is None else variance
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16): (advantages, returns), each (B, T).

    δ_t = r_t + γ V_{t+1} − V_t, with V = 0 after a response's last token; A_t = Σ_l (γλ)^l δ_{t+l};
    returns R_t = A_t + V_t (the value targets). Positions outside ``mask`` get 0.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


@dataclass
class PPOLosses:
    """The policy and value terms of one PPO minibatch, and what to log about them."""

    policy: Tensor  # scalar: the clipped surrogate, a mean over response tokens
    value: Tensor  # scalar: the clipped value loss, a mean over response tokens
    clip_fraction: Tensor  # share of tokens whose ratio was clipped (the gradient came from the clipped side)
    approx_kl: Tensor  # ½ E[(log π − log π_old)²] over tokens: how far this update moved the policy
    value_clip_fraction: Tensor


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2, count=None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), a mean over response tokens:

    L = −E[min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t)], ρ_t = π(a_t|s_t) / π_old(a_t|s_t).

    Returns (loss, clip fraction, approx KL ½(log ρ)²). ∂L/∂log π_t = −ρ_t A_t / N where the unclipped
    term is the smaller, 0 where the clipped one is (N: the response tokens, or ``count``: :func:`masked_mean`).
    """
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, count)
    clip_fraction = masked_mean((clipped > unclipped).to(logps.dtype), mask, count)
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask, count)
    return loss, clip_fraction.detach(), approx_kl


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float = 0.2, count=None
) -> tuple[Tensor, Tensor]:
    """The clipped value loss of PPO for language models (Ziegler et al. 2019; OpenAI baselines), a mean over
    response tokens: ½ E[max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)]. Returns (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask, count)
    return loss, masked_mean((clipped > unclipped).to(values.dtype), mask, count).detach()


def ppo_losses(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    clip_range_value: float = 0.2,
    count: Tensor | float | None = None,
) -> PPOLosses:
    """Both PPO terms of one minibatch (:func:`ppo_policy_loss`, :func:`ppo_value_loss`); ``count`` as in
    :func:`masked_mean`."""
    policy, clip_fraction, approx_kl = ppo_policy_loss(logps, old_logps, advantages, mask, clip_range, count)
    value, value_clip_fraction = ppo_value_loss(values, old_values, returns, mask, clip_range_value, count)
    return PPOLosses(policy, value, clip_fraction, approx_kl, value_clip_fraction)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, Eq. 4): for k samples of one prompt, (prompts, k) rewards,
    A_i = R_i − mean_{j≠i} R_j, a baseline with no value model."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("rloo needs at least 2 samples per prompt")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

# Rules for parameters, by name: every loss that has a parameter of this name is checked the same way.
_PARAM_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "beta": (lambda v: v > 0, "must be > 0"),
    "beta_chosen": (lambda v: v > 0, "must be > 0"),
    "beta_rejected": (lambda v: v > 0, "must be > 0"),
    "tau": (lambda v: v > 0, "must be > 0"),
    "lam": (lambda v: v >= 0, "must be >= 0"),
    "reg_weight": (lambda v: v >= 0, "must be >= 0"),
    "delta": (lambda v: v >= 0, "must be >= 0"),
    "gamma": (lambda v: math.isfinite(v), "must be finite"),
    "center_coefficient": (lambda v: v >= 0, "must be >= 0"),
    "f_alpha": (lambda v: math.isfinite(v), "must be finite"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "must lie in [0, 0.5)"),
    "f_divergence": (lambda v: v in F_DIVERGENCES, f"must be one of {', '.join(F_DIVERGENCES)}"),
    "reduction": (
        lambda v: v in ("sum", "token_mean", "batch_token_mean"),
        "must be sum, token_mean or batch_token_mean",
    ),
    "length_normalized": (lambda v: isinstance(v, bool), "must be true or false"),
}
# EXO's ε is a probability of the "rejected is better" label; log ε must exist.
_PER_LOSS_RULES: dict[tuple[str, str], tuple[Callable[[object], bool], str]] = {
    ("exo_pair", "label_smoothing"): (lambda v: 0 < v < 1, "must lie in (0, 1) for exo_pair"),
}


@dataclass(frozen=True)
class LossSpec:
    """One entry of the catalog: the function, its formula, its source and its parameters."""

    name: str
    function: Callable[..., LossOutput]
    formula: str
    source: str
    needs_reference: bool = True
    needs_lengths: str = "no"
    trl_name: str | None = None
    """TRL's name of the loss: a ``DPOConfig.loss_type`` value when ``trl_trainer`` is ``DPOTrainer``."""
    inputs: str = "logps"
    trl_trainer: str = "DPOTrainer"
    """The TRL trainer that computes it (``CPOTrainer`` for SimPO, ``ORPOTrainer`` for ORPO)."""
    trl_beta: str | None = "beta"
    """The parameter that TRL's ``beta`` sets: ``tau`` for IPO (TRL passes τ as beta), None when TRL's
    ``beta`` does not enter the loss (``sft``)."""

    @property
    def defaults(self) -> dict[str, object]:
        """Parameter defaults, read from the function's signature (the single source of truth)."""
        parameters = list(inspect.signature(self.function).parameters.values())[1:]
        return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}

    @property
    def trl_label(self) -> str | None:
        """TRL's name as `dpolab losses` shows it: the loss type, and the trainer when it is not DPOTrainer."""
        if self.trl_trainer == "DPOTrainer":
            return self.trl_name
        return f"{self.trl_name} ({self.trl_trainer})" if self.trl_name else self.trl_trainer

    @property
    def summary(self) -> str:
        return (self.function.__doc__ or "").strip().splitlines()[0]

    def check_params(self, params: dict[str, object]) -> dict[str, object]:
        """Return the defaults overridden by ``params``; ``ValueError`` naming any bad key or value."""
        defaults = self.defaults
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            known = ", ".join(defaults) or "none"
            raise ValueError(f"loss {self.name!r} has no parameter {unknown[0]!r} (its parameters: {known})")
        merged = {**defaults, **params}
        for key, value in merged.items():
            if isinstance(value, float) and not math.isfinite(value):  # e.g. beta: .inf from YAML
                raise ValueError(f"{self.name}.{key} must be finite; got {value!r}")
            rule = _PER_LOSS_RULES.get((self.name, key)) or _PARAM_RULES.get(key)
            if rule is None:
                continue
            check, message = rule
            if isinstance(value, bool) and key != "length_normalized":
                raise ValueError(f"{self.name}.{key} {message}; got {value!r}")
            try:
                ok = bool(check(value))
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"{self.name}.{key} {message}; got {value!r}")
        return merged


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in [
        LossSpec("dpo", dpo, "−log σ(β(r_w − r_l))", "Rafailov et al. 2023 Eq. 7; 3D paper Eq. 5", trl_name="sigmoid"),
        LossSpec("dpop", dpop, "−log σ(β(r_w − r_l − λ·max(0, −r_w)))", "Pal et al. 2024 (Smaug), DPOP"),
        LossSpec("flex", flex, "−log σ(β_w r_w − β_l r_l)", "3D paper §3.3, App. B.2.1"),
        LossSpec(
            "ipo",
            ipo,
            "(h − 1/(2τ))², h optionally per token",
            "Azar et al. 2024 Eq. 17; 3D paper Eq. 8",
            needs_lengths="if length_normalized",
            trl_name="ipo",
            trl_beta="tau",
        ),
        LossSpec(
            "slic",
            slic,
            "max(0, δ − log π_w + log π_l) − λ_reg log π_w",
            "Zhao et al. 2023 (SLiC-HF)",
            needs_reference=False,
            needs_lengths="if reduction≠sum",
        ),
        LossSpec("hinge", hinge, "max(0, 1 − β h)", "Zhao et al. 2023; TRL hinge", trl_name="hinge"),
        LossSpec(
            "robust", robust, "[−(1−ε) log σ(βh) + ε log σ(−βh)]/(1−2ε)", "Chowdhury et al. 2024", trl_name="robust"
        ),
        LossSpec("cdpo", cdpo, "−(1−ε) log σ(βh) − ε log σ(−βh)", "Mitchell 2023 (conservative DPO)"),
        LossSpec(
            "sft",
            sft,
            "−log π_w (token mean, sum or batch token mean)",
            "3D paper Eq. 7 (as a term)",
            needs_reference=False,
            needs_lengths="if reduction≠sum",
            trl_name="sft",
            trl_beta=None,
        ),
        LossSpec(
            "exo_pair",
            exo_pair,
            "KL(softmax(βr) ‖ (1−ε, ε)) over the pair",
            "Ji et al. 2024 Eq. 16",
            trl_name="exo_pair",
        ),
        LossSpec(
            "nca_pair",
            nca_pair,
            "−log σ(βr_w) − ½ log σ(−βr_w) − ½ log σ(−βr_l)",
            "Chen et al. 2024",
            trl_name="nca_pair",
        ),
        LossSpec("bco_pair", bco_pair, "−log σ(βr_w) − log σ(−βr_l)", "Jung et al. 2024", trl_name="bco_pair"),
        LossSpec("sppo_hard", sppo_hard, "(r_w − 1/(2β))² + (r_l + 1/(2β))²", "Wu et al. 2024", trl_name="sppo_hard"),
        LossSpec("aot", aot, "−log σ(β(sort(Δπ) − sort(Δref)))", "Melnyk et al. 2024", trl_name="aot"),
        LossSpec(
            "aot_unpaired",
            aot_unpaired,
            "−log σ(β(sort(r_w) − sort(r_l)))",
            "Melnyk et al. 2024",
            trl_name="aot_unpaired",
        ),
        LossSpec("apo_zero", apo_zero, "1 − σ(βr_w) + σ(βr_l)", "D'Oosterlinck et al. 2024 Eq. 7", trl_name="apo_zero"),
        LossSpec(
            "apo_down",
            apo_down,
            "σ(βr_w) + 1 − σ(β(r_w − r_l))",
            "D'Oosterlinck et al. 2024 Eq. 8",
            trl_name="apo_down",
        ),
        LossSpec(
            "discopop",
            discopop,
            "(1−m)(−log σ(βh)) + m·exp(−βh), m = σ(βh/τ)",
            "Lu et al. 2024 Eq. 5",
            trl_name="discopop",
        ),
        LossSpec(
            "sigmoid_norm",
            sigmoid_norm,
            "−log σ(β(r_w/|y_w| − r_l/|y_l|))",
            "TRL sigmoid_norm",
            needs_lengths="yes",
            trl_name="sigmoid_norm",
        ),
        LossSpec(
            "simpo",
            simpo,
            "−log σ(β(ā_w − ā_l) − γ), ā = log π/|y|",
            "Meng et al. 2024 Eq. 6",
            needs_reference=False,
            needs_lengths="yes",
            trl_name="simpo",
            trl_trainer="CPOTrainer",
        ),
        LossSpec(
            "orpo",
            orpo,
            "NLL(y_w) − λ log σ(log odds_w − log odds_l)",
            "Hong et al. 2024 Eqs. 4–7",
            needs_reference=False,
            needs_lengths="yes",
            trl_trainer="ORPOTrainer",
        ),
        LossSpec(
            "reward_model",
            reward_model,
            "−log σ(r_φ(y_w) − r_φ(y_l) − m) + c·(r_φ(y_w) + r_φ(y_l))²",
            "Ouyang et al. 2022; 3D paper Eq. 3; centring: Eisenstein et al. 2023",
            needs_reference=False,
            inputs="scalar rewards",
        ),
    ]
}

# The one map of TRL's names, read off the catalogue above: TRL 1.16's DPOConfig.loss_type values and the loss that
# computes each (tested against a real DPOTrainer), and the ones that differ from dpolab's name, accepted everywhere
# a loss name is.
TRL_DPO_LOSS_TYPES: dict[str, str] = {
    spec.trl_name: name for name, spec in LOSSES.items() if spec.trl_name and spec.trl_trainer == "DPOTrainer"
}
ALIASES: dict[str, str] = {trl: name for trl, name in TRL_DPO_LOSS_TYPES.items() if trl != name}

# Losses that take the f_divergence option (TRL allows it on the same set, where a loss is in TRL).
F_DIVERGENCE_LOSSES = tuple(name for name, spec in LOSSES.items() if "f_divergence" in spec.defaults)


def get_loss(name: str) -> LossSpec:
    """Look a loss up by name or TRL alias; ``ValueError`` listing the known names otherwise."""
    key = ALIASES.get(name, name)
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    return LOSSES[key]


def compute_loss(name: str, logps: PreferenceLogps, **params: object) -> LossOutput:
    """Validate ``params`` and ``logps``, then compute the named loss."""
    spec = get_loss(name)
    if spec.inputs != "logps":
        raise ValueError(f"loss {spec.name!r} takes scalar rewards: call dpolab.losses.{spec.name}() directly")
    merged = spec.check_params(params)
    logps.validate()
    return spec.function(logps, **merged)


# ---------------------------------------------------------------------------------------------
# Weighted combinations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossTerm:
    """One loss of an objective: its name, its weight and its parameters."""

    name: str
    weight: float = 1.0
    params: dict[str, object] = field(default_factory=dict)


class Objective:
    """A weighted sum of losses plus an optional SFT term: L = Σ_k w_k L_k + α·NLL(y_w).

    The equivalent of TRL's ``loss_type`` list with ``loss_weights``. All parameters are checked
    here, once, so a bad configuration fails before any model is loaded. Rewards come from the
    first term; each term's per-pair loss is logged as ``loss/<name>``.

    Args:
        terms: the losses and their weights.
        sft_weight: α ≥ 0, the weight of the chosen-completion NLL added to the sum (3D paper Eq. 7).
        sft_reduction: ``batch_token_mean`` (default), ``token_mean`` or ``sum``; see :func:`sft`.
        validate_inputs: check shapes and finiteness of the log-probs on every call.
    """

    def __init__(
        self,
        terms: list[LossTerm],
        sft_weight: float = 0.0,
        sft_reduction: str = "batch_token_mean",
        validate_inputs: bool = True,
    ) -> None:
        if not terms:
            raise ValueError("an objective needs at least one loss")
        if not (isinstance(sft_weight, (int, float)) and not isinstance(sft_weight, bool) and sft_weight >= 0):
            raise ValueError(f"sft_weight must be >= 0; got {sft_weight!r}")
        self.terms: list[tuple[LossSpec, float, dict[str, object]]] = []
        for term in terms:
            spec = get_loss(term.name)
            if spec.inputs != "logps":
                raise ValueError(f"loss {spec.name!r} takes scalar rewards and cannot be part of a policy objective")
            weight = term.weight
            if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and math.isfinite(weight)):
                raise ValueError(f"weight of loss {term.name!r} must be a finite number; got {weight!r}")
            if weight < 0:  # −L_k would be maximised: the objective would push the preference the wrong way
                raise ValueError(f"weight of loss {term.name!r} must be >= 0; got {weight!r}")
            self.terms.append((spec, float(term.weight), spec.check_params(dict(term.params))))
        if sft_weight:
            self.terms.append(
                (LOSSES["sft"], float(sft_weight), LOSSES["sft"].check_params({"reduction": sft_reduction}))
            )
        self.validate_inputs = validate_inputs

    @property
    def needs_reference(self) -> bool:
        return any(spec.needs_reference for spec, _, _ in self.terms)

    def __call__(self, logps: PreferenceLogps) -> LossOutput:
        if self.validate_inputs:
            logps.validate()
        total: Tensor | None = None
        first: LossOutput | None = None
        terms: dict[str, Tensor] = {}
        for spec, weight, params in self.terms:
            out = spec.function(logps, **params)
            first = first or out
            total = weight * out.losses if total is None else total + weight * out.losses
            if len(self.terms) > 1:
                terms[f"loss/{spec.name}"] = out.losses.detach()
            for name, value in out.terms.items():
                terms.setdefault(name, value)
        assert total is not None and first is not None
        return LossOutput(total, first.chosen_rewards, first.rejected_rewards, terms)


def objective_from_config(
    loss: str | list[str] = "dpo",
    loss_weights: list[float] | None = None,
    loss_params: dict[str, object] | list[dict[str, object]] | None = None,
    sft_weight: float = 0.0,
    sft_reduction: str = "batch_token_mean",
) -> Objective:
    """Build an :class:`Objective` from config-style fields (TRL-like ``loss_type`` + ``loss_weights``).

    ``loss_params`` is one mapping shared by all losses (keys a loss does not have are an error only
    when no loss has them) or one mapping per loss.
    """
    names = [loss] if isinstance(loss, str) else list(loss)
    if loss_weights is not None and len(loss_weights) != len(names):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries but loss names {len(names)} losses")
    weights = loss_weights or [1.0] * len(names)
    if isinstance(loss_params, list):
        if len(loss_params) != len(names):
            raise ValueError(f"loss_params has {len(loss_params)} entries but loss names {len(names)} losses")
        per_loss = loss_params
    else:
        shared = dict(loss_params or {})
        known = set().union(*(get_loss(n).defaults for n in names))
        unknown = sorted(set(shared) - known)
        if unknown:
            raise ValueError(f"no loss among {names} has a parameter {unknown[0]!r}")
        per_loss = [{k: v for k, v in shared.items() if k in get_loss(n).defaults} for n in names]
    # One key for every SFT NLL: the sft loss reduces as the sft_weight term does, unless its params say otherwise
    per_loss = [
        {"reduction": sft_reduction, **params} if get_loss(n).name == "sft" else params
        for n, params in zip(names, per_loss, strict=True)
    ]
    terms = [LossTerm(n, w, p) for n, w, p in zip(names, weights, per_loss, strict=True)]
    return Objective(terms, sft_weight=sft_weight, sft_reduction=sft_reduction)


def trl_beta_keys(loss: str | list[str]) -> list[str]:
    """The parameters that TRL's ``beta`` sets for ``loss`` (a name or a list): ``beta``, and ``tau`` for IPO (TRL
    passes τ as beta); none for ``sft``. The config's ``beta`` (a TRL name) goes to these, as
    :func:`objective_from_trl` does."""
    names = [loss] if isinstance(loss, str) else list(loss)
    keys = [get_loss(name).trl_beta for name in names if isinstance(name, str)]
    return list(dict.fromkeys(key for key in keys if key))


def objective_from_trl(
    loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
) -> Objective:
    """The :class:`Objective` that computes what TRL 1.16's ``DPOTrainer`` computes for these ``DPOConfig`` fields.

    For users moving a TRL config over. The mapping: ``beta`` is τ for ``ipo`` (length-normalised,
    as in TRL); ``sft`` is the token-weighted batch NLL (``reduction="batch_token_mean"``, the default);
    ``label_smoothing`` goes to the losses that read it (exo_pair, robust, aot, aot_unpaired);
    TRL's ``sigmoid`` ignores it, and so does this mapping. The tests check every loss type against
    a real ``DPOTrainer``.
    """
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = loss_weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries but loss_type names {len(names)} losses")
    f_params = {"f_divergence": f_divergence_type, "f_alpha": f_alpha_divergence_coef}
    terms = []
    for name, weight in zip(names, weights, strict=True):
        if name not in TRL_DPO_LOSS_TYPES:
            raise ValueError(f"unknown TRL loss_type {name!r}; TRL 1.16's are {', '.join(TRL_DPO_LOSS_TYPES)}")
        spec = LOSSES[TRL_DPO_LOSS_TYPES[name]]
        if spec.trl_beta is None:  # sft: TRL's token-weighted batch NLL, dpolab's default reduction
            terms.append(LossTerm(spec.name, weight, {}))
            continue
        params: dict[str, object] = {spec.trl_beta: beta}
        if "label_smoothing" in spec.defaults:
            params["label_smoothing"] = label_smoothing
        if spec.name == "discopop":
            params["tau"] = discopop_tau
        if "f_divergence" in spec.defaults:
            params.update(f_params)
        elif f_divergence_type != "reverse_kl":
            raise ValueError(f"f_divergence_type={f_divergence_type!r} is not defined for TRL loss {name!r}")
        terms.append(LossTerm(spec.name, weight, params))
    return Objective(terms)
