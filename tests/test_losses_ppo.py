"""RLHF-PPO's per-token quantities in dpolab.losses against hand computations and exact expectations."""

from __future__ import annotations

import math

import pytest
import torch

from dpolab import losses as L


def test_gae_matches_a_hand_computation_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, 1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)  # row 2 ends after 2 tokens: 9 and 5 unused
    advantages, returns = L.gae(rewards, values, mask, gamma=1.0, lam=0.9)
    # row 1: δ = (−0.1, −0.1, 0.7); A2 = 0.7, A1 = −0.1 + 0.9·0.7, A0 = −0.1 + 0.9·A1
    a1 = -0.1 + 0.9 * 0.7
    expected = torch.tensor([[-0.1 + 0.9 * a1, a1, 0.7], [0.9, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, (expected + values) * mask, rtol=0, atol=1e-12)
    # γ = 0.5 on row 2: δ1 = 2 − 1 = 1, δ0 = 0 + 0.5·1 − 1 = −0.5, A0 = −0.5 + 0.5·0.9·1
    advantages, _ = L.gae(rewards[1:], values[1:], mask[1:], gamma=0.5, lam=0.9)
    torch.testing.assert_close(advantages, torch.tensor([[-0.05, 1.0, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)


def test_gae_with_lambda_one_is_the_return_minus_the_baseline():
    generator = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    mask = torch.ones(4, 6)
    advantages, returns = L.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    discounted = torch.zeros(4, 6)
    for t in range(6):
        discounted[:, t] = sum(0.9 ** (k - t) * rewards[:, k] for k in range(t, 6))
    torch.testing.assert_close(returns, discounted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(advantages, discounted - values, rtol=1e-5, atol=1e-5)


def test_clipped_policy_loss_values_and_gradient_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    old = torch.zeros(1, 4, dtype=torch.float64)
    logps = ratio.log().requires_grad_()
    loss, clip_fraction, approx_kl = L.ppo_policy_loss(logps, old, advantages, torch.ones(1, 4), clip_range=0.2)
    # per token −min(ρA, clip(ρ)A): −1.2 (clipped), −0.5, +1.5, +0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4, abs=1e-12)
    assert float(clip_fraction) == 0.5
    assert float(approx_kl) == pytest.approx(0.5 * 2 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 4, abs=1e-12)
    loss.backward()
    # ∂/∂log π = −ρA/N on the unclipped tokens, 0 on the clipped ones
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.5 / 4, 1.5 / 4, 0.0]], dtype=torch.float64))


def test_padding_does_not_count_in_the_policy_loss():
    logps = torch.tensor([[0.1, -0.2, 7.0]])
    old = torch.zeros(1, 3)
    advantages = torch.tensor([[1.0, 2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _, _ = L.ppo_policy_loss(logps, old, advantages, mask)
    alone, _, _ = L.ppo_policy_loss(logps[:, :2], old[:, :2], advantages[:, :2], mask[:, :2])
    assert loss.item() == pytest.approx(float(alone))


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.1, -0.5]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    loss, clip_fraction = L.ppo_value_loss(values, old, returns, torch.ones(1, 3), clip_range=0.2)
    # token 1: max((0.5−1)², (0.2−1)²) = 0.64 (clipped); token 2: max(0.81, 0.81) = 0.81; token 3: max(2.25, 1.44)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3, abs=1e-12)
    assert float(clip_fraction) == pytest.approx(1 / 3)
    loss.backward()  # ∂/∂V = (V − R)/N on unclipped tokens, 0 on the clipped one
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.9 / 3, -1.5 / 3]], dtype=torch.float64))


def test_kl_estimators_have_the_exact_kl_as_expectation_on_a_categorical():
    """E_π[k1] = E_π[k3] = KL(π‖q) exactly (expectations computed by weighting each outcome by π); k3 ≥ 0;
    k2 is a second-order approximation (close for nearby distributions, not equal)."""
    generator = torch.Generator().manual_seed(1)
    policy = torch.softmax(torch.randn(50, generator=generator, dtype=torch.float64), 0)
    reference = torch.softmax(torch.randn(50, generator=generator, dtype=torch.float64), 0)
    exact = float((policy * (policy.log() - reference.log())).sum())
    for estimator in ("k1", "k3"):
        per_outcome = L.kl_estimate(policy.log(), reference.log(), estimator)
        assert float((policy * per_outcome).sum()) == pytest.approx(exact, rel=1e-12)
    assert bool((L.kl_estimate(policy.log(), reference.log(), "k3") >= 0).all())
    assert bool((L.kl_estimate(policy.log(), reference.log(), "k1") < 0).any())  # k1 is negative on some outcomes
    near = torch.softmax(policy.log() + 0.01 * torch.randn(50, generator=generator, dtype=torch.float64), 0)
    exact_near = float((policy * (policy.log() - near.log())).sum())
    k2 = float((policy * L.kl_estimate(policy.log(), near.log(), "k2")).sum())
    assert k2 == pytest.approx(exact_near, rel=0.05) and k2 != pytest.approx(exact_near, rel=1e-9)
    with pytest.raises(ValueError, match="estimator must be one of k1, k2, k3"):
        L.kl_estimate(policy, reference, "k4")


def test_whitening_gives_zero_mean_unit_variance_on_the_masked_tokens():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -100.0, -100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    whitened = L.whiten(values, mask)
    real = whitened[mask.bool()]
    assert float(real.mean()) == pytest.approx(0, abs=1e-12)
    assert float(real.pow(2).mean()) == pytest.approx(1, abs=1e-6)
    assert bool((whitened[~mask.bool()] == 0).all())
    kept = L.whiten(values, mask, shift_mean=False)[mask.bool()]
    assert float(kept.mean()) == pytest.approx(3.0, abs=1e-12)


def test_rloo_baseline_leaves_each_sample_out():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    torch.testing.assert_close(
        L.rloo_advantages(rewards), torch.tensor([[1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3], [0.0, 0.0, 0.0, 0.0]])
    )
    with pytest.raises(ValueError, match="at least 2 samples"):
        L.rloo_advantages(torch.ones(3, 1))
