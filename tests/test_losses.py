"""The loss library against its closed forms (PAPERS.md §2), its limits, and bad input.

Gradients are taken by autograd with respect to the *probabilities* π_w = π_θ(y_w|x) and
π_l = π_θ(y_l|x) (log-probs are log π), in double precision, and compared with the paper's formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpolab import losses as L

B = 64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def make_inputs(seed: int = 0, batch: int = B):
    """Random probabilities and reference log-probs spanning likely and very unlikely sequences."""
    generator = torch.Generator().manual_seed(seed)
    policy_chosen = -torch.rand(batch, generator=generator, dtype=torch.float64) * 30 - 0.1
    policy_rejected = -torch.rand(batch, generator=generator, dtype=torch.float64) * 30 - 0.1
    reference_chosen = policy_chosen + torch.randn(batch, generator=generator, dtype=torch.float64) * 3
    reference_rejected = policy_rejected + torch.randn(batch, generator=generator, dtype=torch.float64) * 3
    chosen_lengths = torch.randint(1, 40, (batch,), generator=generator)
    rejected_lengths = torch.randint(1, 40, (batch,), generator=generator)
    pi_w = policy_chosen.exp().requires_grad_(True)
    pi_l = policy_rejected.exp().requires_grad_(True)
    return pi_w, pi_l, reference_chosen, reference_rejected, chosen_lengths, rejected_lengths


def logps_of(pi_w, pi_l, reference_chosen, reference_rejected, chosen_lengths=None, rejected_lengths=None):
    return L.PreferenceLogps(
        policy_chosen_logps=torch.log(pi_w),
        policy_rejected_logps=torch.log(pi_l),
        reference_chosen_logps=reference_chosen,
        reference_rejected_logps=reference_rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )


def grads(losses: torch.Tensor, *tensors: torch.Tensor):
    """Per-pair gradients: each pair's loss depends only on its own inputs, so grad of the sum is per pair."""
    return torch.autograd.grad(losses.sum(), tensors)


# ---------------------------------------------------------------------------------------------
# Closed-form gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_gradient_matches_closed_form_and_corollary_1(beta):
    pi_w, pi_l, ref_w, ref_l, *_ = make_inputs(1)
    out = L.dpo(logps_of(pi_w, pi_l, ref_w, ref_l), beta=beta)
    g_w, g_l = grads(out.losses, pi_w, pi_l)
    u = beta * ((torch.log(pi_w) - ref_w) - (torch.log(pi_l) - ref_l))
    one_minus_sigma = torch.sigmoid(-(u))  # = 1 − σ(u), without cancellation
    torch.testing.assert_close(g_w, -beta * one_minus_sigma / pi_w, **TIGHT)
    torch.testing.assert_close(g_l, beta * one_minus_sigma / pi_l, **TIGHT)
    # Corollary 1: |∂L/∂π_l| / |∂L/∂π_w| = π_w / π_l
    torch.testing.assert_close(g_l.abs() / g_w.abs(), pi_w / pi_l, rtol=1e-9, atol=0)


def test_dpo_gradient_ratio_grows_as_rejected_probability_falls():
    """The engine of the drastic drop: holding π_w, the rejected-side gradient grows like 1/π_l."""
    pi_w = torch.full((5,), 0.3, dtype=torch.float64, requires_grad=True)
    pi_l = torch.tensor([1e-1, 1e-2, 1e-3, 1e-4, 1e-5], dtype=torch.float64, requires_grad=True)
    reference = torch.full((5,), math.log(0.3), dtype=torch.float64)
    out = L.dpo(logps_of(pi_w, pi_l, reference, reference), beta=0.1)
    g_w, g_l = grads(out.losses, pi_w, pi_l)
    ratio = g_l.abs() / g_w.abs()
    assert torch.all(ratio[1:] > ratio[:-1] * 9.99)


def test_dpop_gradient_on_both_sides_of_the_max():
    beta, lam = 0.3, 50.0
    pi_w, pi_l, ref_w, ref_l, *_ = make_inputs(2)
    out = L.dpop(logps_of(pi_w, pi_l, ref_w, ref_l), beta=beta, lam=lam)
    g_w, g_l = grads(out.losses, pi_w, pi_l)
    r_w = torch.log(pi_w) - ref_w
    r_l = torch.log(pi_l) - ref_l
    below = r_w < 0
    assert below.any() and (~below).any(), "inputs must cover both sides of max(0, −r_w)"
    u = beta * (r_w - r_l - lam * torch.clamp(-r_w, min=0))
    one_minus_sigma = torch.sigmoid(-(u))  # = 1 − σ(u), without cancellation
    chosen_coefficient = torch.where(below, beta * (1 + lam), torch.full_like(r_w, beta))
    torch.testing.assert_close(g_w, -chosen_coefficient * one_minus_sigma / pi_w, **TIGHT)
    torch.testing.assert_close(g_l, beta * one_minus_sigma / pi_l, **TIGHT)
    torch.testing.assert_close(out.terms["dpop_penalty"], torch.clamp(-r_w, min=0).detach(), **TIGHT)


def test_dpop_gradient_at_r_w_zero_is_dpo_gradient():
    # r_w = 0 exactly is every pair at the first step (policy = reference). max(0, −r_w) has a kink
    # there; the one-sided derivative that keeps "r_w ≥ 0 ⇒ DPO" true is 0, so the chosen side moves
    # with β(1 − σ(u)), not β(1 + λ)(1 − σ(u)).
    beta, lam = 0.3, 50.0
    generator = torch.Generator().manual_seed(3)
    reference_w = -torch.rand(B, generator=generator, dtype=torch.float64) * 20
    reference_l = -torch.rand(B, generator=generator, dtype=torch.float64) * 20
    for r_l_offset in (0.0, 0.7):
        chosen = reference_w.clone().requires_grad_(True)  # r_w = 0 exactly
        rejected = (reference_l + r_l_offset).requires_grad_(True)
        logps = L.PreferenceLogps(chosen, rejected, reference_w, reference_l)
        g_w, g_l = torch.autograd.grad(L.dpop(logps, beta=beta, lam=lam).losses.sum(), (chosen, rejected))
        one_minus_sigma = torch.sigmoid(torch.full_like(reference_w, beta * r_l_offset))  # 1 − σ(β(0 − r_l))
        torch.testing.assert_close(g_w, -beta * one_minus_sigma, **TIGHT)
        torch.testing.assert_close(g_l, beta * one_minus_sigma, **TIGHT)
        assert torch.all(L.dpop(logps, beta=beta, lam=lam).terms["dpop_penalty"] == 0)


def test_flex_gradient_matches_closed_form():
    beta_w, beta_l = 0.2, 0.05
    pi_w, pi_l, ref_w, ref_l, *_ = make_inputs(3)
    out = L.flex(logps_of(pi_w, pi_l, ref_w, ref_l), beta_chosen=beta_w, beta_rejected=beta_l)
    g_w, g_l = grads(out.losses, pi_w, pi_l)
    u = beta_w * (torch.log(pi_w) - ref_w) - beta_l * (torch.log(pi_l) - ref_l)
    one_minus_sigma = torch.sigmoid(-(u))  # = 1 − σ(u), without cancellation
    torch.testing.assert_close(g_w, -beta_w * one_minus_sigma / pi_w, **TIGHT)
    torch.testing.assert_close(g_l, beta_l * one_minus_sigma / pi_l, **TIGHT)


@pytest.mark.parametrize("reduction", ["sum", "token_mean"])
def test_dpo_plus_sft_gradient_gains_alpha_over_pi_w(reduction):
    beta, alpha = 0.1, 0.7
    pi_w, pi_l, ref_w, ref_l, n_w, n_l = make_inputs(4)
    objective = L.Objective([L.LossTerm("dpo", params={"beta": beta})], sft_weight=alpha, sft_reduction=reduction)
    out = objective(logps_of(pi_w, pi_l, ref_w, ref_l, n_w, n_l))
    g_w, g_l = grads(out.losses, pi_w, pi_l)
    u = beta * ((torch.log(pi_w) - ref_w) - (torch.log(pi_l) - ref_l))
    one_minus_sigma = torch.sigmoid(-(u))  # = 1 − σ(u), without cancellation
    scale = 1.0 if reduction == "sum" else n_w.to(torch.float64)
    torch.testing.assert_close(g_w, -beta * one_minus_sigma / pi_w - alpha / (scale * pi_w), **TIGHT)
    torch.testing.assert_close(g_l, beta * one_minus_sigma / pi_l, **TIGHT)


def test_sft_term_keeps_pushing_chosen_when_dpo_saturates():
    """3D paper App. B.2.2: as σ(u) → 1 the DPO gradient on π_w vanishes, the SFT one does not."""
    pi_w = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    pi_l = torch.tensor([1e-30], dtype=torch.float64, requires_grad=True)
    reference = torch.log(torch.tensor([0.2], dtype=torch.float64))

    def logps():
        return logps_of(pi_w, pi_l, reference, reference, torch.tensor([1]), torch.tensor([1]))

    (g_dpo,) = grads(L.dpo(logps(), beta=1.0).losses, pi_w)
    (g_both,) = grads(L.Objective([L.LossTerm("dpo", params={"beta": 1.0})], sft_weight=1.0)(logps()).losses, pi_w)
    assert abs(float(g_dpo)) < 1e-20
    assert float(g_both) == pytest.approx(-1 / 0.2, rel=1e-12)


@pytest.mark.parametrize("length_normalized", [False, True])
def test_ipo_gradient_matches_closed_form(length_normalized):
    tau = 0.1
    pi_w, pi_l, ref_w, ref_l, n_w, n_l = make_inputs(5)
    out = L.ipo(logps_of(pi_w, pi_l, ref_w, ref_l, n_w, n_l), tau=tau, length_normalized=length_normalized)
    g_w, g_l = grads(out.losses, pi_w, pi_l)
    r_w = torch.log(pi_w) - ref_w
    r_l = torch.log(pi_l) - ref_l
    if length_normalized:
        n_w, n_l = n_w.to(torch.float64), n_l.to(torch.float64)
        h = r_w / n_w - r_l / n_l
        expected_w, expected_l = 2 * (h - 1 / (2 * tau)) / n_w, -2 * (h - 1 / (2 * tau)) / n_l
    else:
        h = r_w - r_l
        expected_w, expected_l = 2 * (h - 1 / (2 * tau)), -2 * (h - 1 / (2 * tau))
    # ∂L/∂π = (∂L/∂log π) / π
    torch.testing.assert_close(g_w, expected_w / pi_w, **TIGHT)
    torch.testing.assert_close(g_l, expected_l / pi_l, **TIGHT)


def test_slic_gradient_matches_closed_form():
    delta, reg_weight = 1.0, 0.3
    pi_w, pi_l, *_ = make_inputs(6)
    logps = L.PreferenceLogps(torch.log(pi_w), torch.log(pi_l))
    out = L.slic(logps, delta=delta, reg_weight=reg_weight)
    g_w, g_l = grads(out.losses, pi_w, pi_l)
    active = (delta - torch.log(pi_w) + torch.log(pi_l) > 0).to(torch.float64)
    assert 0 < active.sum() < len(active), "inputs must cover both sides of the hinge"
    torch.testing.assert_close(g_w, (-active - reg_weight) / pi_w, **TIGHT)
    torch.testing.assert_close(g_l, active / pi_l, **TIGHT)


def test_reward_model_gradients_are_balanced():
    generator = torch.Generator().manual_seed(7)
    chosen = torch.randn(B, generator=generator, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(B, generator=generator, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(B, generator=generator, dtype=torch.float64)
    out = L.reward_model(chosen, rejected, margin=margin)
    g_w, g_l = grads(out.losses, chosen, rejected)
    one_minus_sigma = torch.sigmoid(-(chosen - rejected - margin))  # = 1 − σ(u), without cancellation
    torch.testing.assert_close(g_w, -one_minus_sigma, **TIGHT)
    torch.testing.assert_close(g_l, one_minus_sigma, **TIGHT)
    torch.testing.assert_close(g_w.abs(), g_l.abs(), **TIGHT)


def test_reward_model_centring_term_gradients():
    """c·(r_w + r_l)² adds 2c(r_w + r_l) to both gradients; the batch mean equals TRL's mean((r_w + r_l)²) term."""
    generator = torch.Generator().manual_seed(8)
    chosen = torch.randn(B, generator=generator, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(B, generator=generator, dtype=torch.float64, requires_grad=True)
    c = 0.01
    out = L.reward_model(chosen, rejected, center_coefficient=c)
    g_w, g_l = grads(out.losses, chosen, rejected)
    one_minus_sigma = torch.sigmoid(-(chosen - rejected))
    pull = 2 * c * (chosen + rejected)
    torch.testing.assert_close(g_w, -one_minus_sigma + pull.detach(), **TIGHT)
    torch.testing.assert_close(g_l, one_minus_sigma + pull.detach(), **TIGHT)
    trl_style = -torch.nn.functional.logsigmoid(chosen - rejected).mean() + c * ((chosen + rejected) ** 2).mean()
    torch.testing.assert_close(out.losses.mean(), trl_style, **TIGHT)
    with pytest.raises(ValueError, match="center_coefficient must be >= 0"):
        L.get_loss("reward_model").check_params({"center_coefficient": -1.0})


# ---------------------------------------------------------------------------------------------
# Limits and identities
# ---------------------------------------------------------------------------------------------


def test_dpop_equals_dpo_when_chosen_is_above_reference():
    pi_w, pi_l, ref_w, ref_l, *_ = make_inputs(8)
    ref_w = torch.log(pi_w).detach() - torch.rand(B, dtype=torch.float64)  # r_w > 0 everywhere
    logps = logps_of(pi_w, pi_l, ref_w, ref_l)
    torch.testing.assert_close(L.dpop(logps, beta=0.3, lam=50).losses, L.dpo(logps, beta=0.3).losses, **TIGHT)
    # ... and is strictly larger where r_w < 0
    ref_w_above = torch.log(pi_w).detach() + 0.5
    logps_below = logps_of(pi_w, pi_l, ref_w_above, ref_l)
    assert torch.all(L.dpop(logps_below, beta=0.3, lam=50).losses > L.dpo(logps_below, beta=0.3).losses)


def test_flex_equals_dpo_when_betas_are_equal():
    logps = logps_of(*make_inputs(9)[:4])
    torch.testing.assert_close(
        L.flex(logps, beta_chosen=0.25, beta_rejected=0.25).losses, L.dpo(logps, beta=0.25).losses, **TIGHT
    )


@pytest.mark.parametrize("tau", [0.05, 0.1, 1.0])
def test_ipo_is_minimised_at_the_target_margin(tau):
    target = 1 / (2 * tau)
    h = torch.linspace(target - 3, target + 3, 6001, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros_like(h)
    logps = L.PreferenceLogps(h, zeros.clone(), zeros.clone(), zeros.clone())
    losses = L.ipo(logps, tau=tau, length_normalized=False).losses
    assert float(h.detach()[losses.argmin()]) == pytest.approx(target, abs=1e-3)
    (gradient,) = torch.autograd.grad(losses[losses.argmin()], h)
    assert float(gradient.abs().max()) < 1e-2


def test_cdpo_and_robust_reduce_to_dpo_without_smoothing():
    logps = logps_of(*make_inputs(10)[:4])
    dpo = L.dpo(logps, beta=0.2).losses
    torch.testing.assert_close(L.cdpo(logps, beta=0.2, label_smoothing=0.0).losses, dpo, **TIGHT)
    torch.testing.assert_close(L.robust(logps, beta=0.2, label_smoothing=0.0).losses, dpo, **TIGHT)


def test_f_divergence_reverse_kl_is_dpo_and_alpha_one_is_reverse_kl():
    logps = logps_of(*make_inputs(11)[:4])
    dpo = L.dpo(logps).losses
    torch.testing.assert_close(L.dpo(logps, f_divergence="alpha_divergence", f_alpha=1.0).losses, dpo, **TIGHT)
    forward = L.dpo(logps, f_divergence="forward_kl").losses
    assert not torch.allclose(forward, dpo)


def test_sft_batch_token_mean_is_the_token_weighted_batch_mean():
    pi_w, pi_l, ref_w, ref_l, n_w, n_l = make_inputs(12)
    logps = logps_of(pi_w, pi_l, ref_w, ref_l, n_w, n_l)
    batch_mean = L.sft(logps, reduction="batch_token_mean").losses.mean()
    expected = -torch.log(pi_w).sum() / n_w.sum()
    torch.testing.assert_close(batch_mean, expected, **TIGHT)


def test_rewards_are_beta_times_logratios_and_detached():
    pi_w, pi_l, ref_w, ref_l, *_ = make_inputs(13)
    out = L.dpo(logps_of(pi_w, pi_l, ref_w, ref_l), beta=0.3)
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (torch.log(pi_w) - ref_w).detach(), **TIGHT)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_weighted_objective_is_the_weighted_sum():
    pi_w, pi_l, ref_w, ref_l, n_w, n_l = make_inputs(14)
    logps = logps_of(pi_w, pi_l, ref_w, ref_l, n_w, n_l)
    objective = L.objective_from_config(["dpo", "ipo", "sft"], loss_weights=[0.8, 0.2, 1.0], loss_params={"beta": 0.3})
    expected = 0.8 * L.dpo(logps, beta=0.3).losses + 0.2 * L.ipo(logps).losses + L.sft(logps).losses
    out = objective(logps)
    torch.testing.assert_close(out.losses, expected, **TIGHT)
    assert set(out.terms) >= {"loss/dpo", "loss/ipo", "loss/sft", "nll"}


@settings(max_examples=200, deadline=None)
@given(
    st.floats(-50, 0),
    st.floats(-50, 0),
    st.floats(-50, 0),
    st.floats(-50, 0),
    st.floats(0.01, 5),
    st.floats(0, 500),
)
def test_dpop_never_below_dpo(policy_w, policy_l, reference_w, reference_l, beta, lam):
    logps = L.PreferenceLogps(
        *(torch.tensor([v], dtype=torch.float64) for v in (policy_w, policy_l, reference_w, reference_l))
    )
    assert float(L.dpop(logps, beta=beta, lam=lam).losses) >= float(L.dpo(logps, beta=beta).losses) - 1e-12


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-1e3, 0, allow_subnormal=False), min_size=4, max_size=4),
    st.integers(1, 500),
    st.integers(1, 500),
)
def test_every_loss_is_finite_on_finite_inputs(values, chosen_length, rejected_length):
    policy_w, policy_l, reference_w, reference_l = (torch.tensor([v], dtype=torch.float64) for v in values)
    logps = L.PreferenceLogps(
        policy_w - 1e-3,
        policy_l - 1e-3,
        reference_w,
        reference_l,
        torch.tensor([chosen_length]),
        torch.tensor([rejected_length]),
    )
    for name, spec in L.LOSSES.items():
        if spec.inputs != "logps" or name in ("exo_pair", "discopop"):
            continue  # exp(−βh) of discopop and log ε of exo overflow by design for huge margins
        out = L.compute_loss(name, logps)
        assert torch.isfinite(out.losses).all(), name


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def good_logps(batch: int = 3) -> L.PreferenceLogps:
    pi_w, pi_l, ref_w, ref_l, n_w, n_l = make_inputs(15, batch)
    return logps_of(pi_w.detach(), pi_l.detach(), ref_w, ref_l, n_w, n_l)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("dpo", {"beta": 0.0}, "dpo.beta must be > 0; got 0.0"),
        ("dpo", {"beta": -1}, "dpo.beta must be > 0; got -1"),
        ("dpop", {"lam": -0.5}, "dpop.lam must be >= 0; got -0.5"),
        ("flex", {"beta_rejected": 0}, "flex.beta_rejected must be > 0; got 0"),
        ("cdpo", {"label_smoothing": 0.5}, "cdpo.label_smoothing must lie in [0, 0.5); got 0.5"),
        ("robust", {"label_smoothing": -0.1}, "robust.label_smoothing must lie in [0, 0.5); got -0.1"),
        ("exo_pair", {"label_smoothing": 0.0}, "exo_pair.label_smoothing must lie in (0, 1) for exo_pair; got 0.0"),
        ("ipo", {"tau": 0}, "ipo.tau must be > 0; got 0"),
        ("dpo", {"f_divergence": "kl"}, "dpo.f_divergence must be one of"),
        ("dpo", {"beta": "0.1"}, "dpo.beta must be > 0; got '0.1'"),
        ("dpo", {"gamma": 1.0}, "loss 'dpo' has no parameter 'gamma'"),
        ("sft", {"reduction": "mean"}, "sft.reduction must be sum, token_mean or batch_token_mean; got 'mean'"),
    ],
)
def test_bad_parameters_name_the_parameter_and_value(name, params, message):
    with pytest.raises(ValueError) as error:
        L.compute_loss(name, good_logps(), **params)
    assert message in str(error.value)


def test_unknown_loss_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown loss 'dpoo'; known losses: dpo, dpop"):
        L.get_loss("dpoo")
    assert L.get_loss("sigmoid").name == "dpo"


def test_mismatched_shapes_are_named():
    logps = good_logps(3)
    bad = L.PreferenceLogps(
        logps.policy_chosen_logps,
        logps.policy_rejected_logps[:2],
        logps.reference_chosen_logps,
        logps.reference_rejected_logps,
    )
    with pytest.raises(ValueError, match=r"policy_rejected_logps has shape \(2,\) but policy_chosen_logps has \(3,\)"):
        L.compute_loss("dpo", bad)
    two_d = L.PreferenceLogps(logps.policy_chosen_logps[:, None], logps.policy_rejected_logps[:, None])
    with pytest.raises(ValueError, match=r"policy_chosen_logps must have shape \(B,\)"):
        L.compute_loss("slic", two_d)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_name_the_field_and_row(bad_value):
    logps = good_logps(3)
    reference = logps.reference_rejected_logps.clone()
    reference[1] = bad_value
    bad = L.PreferenceLogps(
        logps.policy_chosen_logps, logps.policy_rejected_logps, logps.reference_chosen_logps, reference
    )
    with pytest.raises(ValueError, match="reference_rejected_logps is not finite at row 1"):
        L.compute_loss("dpo", bad)
    with pytest.raises(ValueError, match="not finite"):
        L.Objective([L.LossTerm("dpo")])(bad)


def test_missing_reference_and_lengths_are_named():
    logps = good_logps(3)
    free = L.PreferenceLogps(logps.policy_chosen_logps, logps.policy_rejected_logps)
    with pytest.raises(ValueError, match="loss 'dpop' needs reference_chosen_logps"):
        L.compute_loss("dpop", free)
    with pytest.raises(ValueError, match="loss 'simpo' needs chosen_lengths"):
        L.compute_loss("simpo", free)
    L.compute_loss("slic", free)  # reference-free, sum reduction: needs neither


def test_objective_configuration_errors():
    with pytest.raises(ValueError, match="loss_weights has 1 entries but loss names 2 losses"):
        L.objective_from_config(["dpo", "ipo"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="no loss among \\['dpo'\\] has a parameter 'lam'"):
        L.objective_from_config("dpo", loss_params={"lam": 5})
    with pytest.raises(ValueError, match="sft_weight must be >= 0; got -1"):
        L.objective_from_config("dpo", sft_weight=-1)
    with pytest.raises(ValueError, match="takes scalar rewards"):
        L.objective_from_config("reward_model")


def test_every_registered_loss_has_formula_source_and_docstring():
    for name, spec in L.LOSSES.items():
        assert spec.formula and spec.source, name
        assert spec.function.__doc__ and len(spec.function.__doc__) > 40, name


def test_losses_module_imports_only_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(L))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    import sys

    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "__future__"}
    assert third_party == {"torch"}, third_party


def test_dpo_matches_a_naive_reference_implementation():
    """The registry path equals a by-hand computation (what Mitchell's reference code does)."""
    logps = good_logps(16)
    beta = 0.1
    h = (logps.policy_chosen_logps - logps.reference_chosen_logps) - (
        logps.policy_rejected_logps - logps.reference_rejected_logps
    )
    expected = -F.logsigmoid(beta * h)
    torch.testing.assert_close(L.compute_loss("sigmoid", logps, beta=beta).losses, expected, **TIGHT)
