"""Every loss's gradient against its closed form, written by hand from the formula in its docstring.

tests/test_losses.py holds the ones with a story (DPO's Corollary 1, DPOP on both sides of the max and at
r_w = 0, flex-β, IPO, SLiC, DPO + SFT, the reward model); this file holds the rest, and
``test_every_loss_has_a_closed_form_gradient_test`` keeps the two lists complete as losses are added.

Notation: a = log π_θ(y|x) summed over the completion's tokens, r = a − log π_ref, n the token count,
u the argument of the loss's sigmoid, σ'(x) = σ(x)σ(−x). Gradients are ∂(Σ_pairs L)/∂a_w and ∂/∂a_l.
"""

from __future__ import annotations

import torch

from dpolab import losses as L

B = 48
TIGHT = dict(rtol=1e-9, atol=1e-12)
# Checked in tests/test_losses.py (closed form there).
CHECKED_ELSEWHERE = {"dpo", "dpop", "flex", "ipo", "slic", "sft", "reward_model"}


def sigma(x):
    return torch.sigmoid(x)


def d_sigma(x):
    return torch.sigmoid(x) * torch.sigmoid(-x)


def inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.randint(1, 40, (B,), generator=generator).double()
    rejected_lengths = torch.randint(1, 40, (B,), generator=generator).double()
    # Per-token log-probs in (−3, −0.05): sequence log-probs of −0.05 to −120, mean log-probs below 0 (ORPO's odds).
    chosen = -(torch.rand(B, generator=generator, dtype=torch.float64) * 2.95 + 0.05) * chosen_lengths
    rejected = -(torch.rand(B, generator=generator, dtype=torch.float64) * 2.95 + 0.05) * rejected_lengths
    reference_chosen = chosen + torch.randn(B, generator=generator, dtype=torch.float64) * 4
    reference_rejected = rejected + torch.randn(B, generator=generator, dtype=torch.float64) * 4
    return chosen, rejected, reference_chosen, reference_rejected, chosen_lengths, rejected_lengths


def closed_forms(a_w, a_l, ref_w, ref_l, n_w, n_l):
    """name → (parameters, ∂ΣL/∂a_w, ∂ΣL/∂a_l), each from the loss's formula."""
    beta = 0.3
    r_w, r_l = a_w - ref_w, a_l - ref_l
    u = beta * (r_w - r_l)
    eps = 0.1
    forms = {}
    active = (u < 1).double()  # hinge: max(0, 1 − βh)
    forms["hinge"] = ({"beta": beta}, -beta * active, beta * active)
    d_robust = (-(1 - eps) * sigma(-u) - eps * sigma(u)) / (1 - 2 * eps)  # d/du [−(1−ε) log σ(u) + ε log σ(−u)]/(1−2ε)
    forms["robust"] = ({"beta": beta, "label_smoothing": eps}, beta * d_robust, -beta * d_robust)
    d_cdpo = -(1 - eps) * sigma(-u) + eps * sigma(u)  # d/du [−(1−ε) log σ(u) − ε log σ(−u)]
    forms["cdpo"] = ({"beta": beta, "label_smoothing": eps}, beta * d_cdpo, -beta * d_cdpo)
    forms["nca_pair"] = (
        {"beta": beta},
        beta * (-sigma(-beta * r_w) + 0.5 * sigma(beta * r_w)),
        beta * 0.5 * sigma(beta * r_l),
    )
    forms["bco_pair"] = ({"beta": beta}, -beta * sigma(-beta * r_w), beta * sigma(beta * r_l))
    forms["sppo_hard"] = ({"beta": beta}, 2 * (r_w - 0.5 / beta), 2 * (r_l + 0.5 / beta))
    # EXO: p = σ(u), L = p(log p − log(1−ε)) + (1−p)(log(1−p) − log ε), dL/du = p(1−p)(u − log((1−ε)/ε)).
    eps_exo = 1e-3
    d_exo = d_sigma(u) * (u - torch.log(torch.tensor((1 - eps_exo) / eps_exo, dtype=u.dtype)))
    forms["exo_pair"] = ({"beta": beta, "label_smoothing": eps_exo}, beta * d_exo, -beta * d_exo)
    forms["apo_zero"] = ({"beta": beta}, -beta * d_sigma(beta * r_w), beta * d_sigma(beta * r_l))
    forms["apo_down"] = ({"beta": beta}, beta * d_sigma(beta * r_w) - beta * d_sigma(u), beta * d_sigma(u))
    # DiscoPOP: L = (1 − m)(−log σ(u)) + m e^(−u), m = σ(u/τ).
    tau = 0.05
    m, dm = sigma(u / tau), d_sigma(u / tau) / tau
    d_disco = -dm * (-torch.nn.functional.logsigmoid(u)) - (1 - m) * sigma(-u) + dm * torch.exp(-u) - m * torch.exp(-u)
    forms["discopop"] = ({"beta": beta, "tau": tau}, beta * d_disco, -beta * d_disco)
    u_norm = beta * (r_w / n_w - r_l / n_l)
    forms["sigmoid_norm"] = ({"beta": beta}, -beta * sigma(-u_norm) / n_w, beta * sigma(-u_norm) / n_l)
    beta_simpo, gamma = 2.0, 0.5
    u_simpo = beta_simpo * (a_w / n_w - a_l / n_l) - gamma
    forms["simpo"] = (
        {"beta": beta_simpo, "gamma": gamma},
        -beta_simpo * sigma(-u_simpo) / n_w,
        beta_simpo * sigma(-u_simpo) / n_l,
    )
    # ORPO, token-mean NLL: L = −a_w/n_w − λ log σ(lo), lo = (m_w − m_l) − (log(1 − e^m_w) − log(1 − e^m_l)),
    # m = a/n, d lo/d m_w = 1/(1 − e^m_w).
    lam = 0.4
    m_w, m_l = a_w / n_w, a_l / n_l
    log_odds = (m_w - m_l) - (torch.log1p(-torch.exp(m_w)) - torch.log1p(-torch.exp(m_l)))
    forms["orpo"] = (
        {"lam": lam, "reduction": "token_mean"},
        -1 / n_w - lam * sigma(-log_odds) / (1 - torch.exp(m_w)) / n_w,
        lam * sigma(-log_odds) / (1 - torch.exp(m_l)) / n_l,
    )
    # AOT: L_i = −log σ(β(sort(Δπ)_i − sort(Δref)_i)), Δ = a_w − a_l; the i-th smallest Δπ gets −βσ(−u_i).
    policy_sorted, order = torch.sort(a_w - a_l)
    u_aot = beta * (policy_sorted - torch.sort(ref_w - ref_l).values)
    d_margin = torch.empty_like(u_aot).scatter_(0, order, -beta * sigma(-u_aot))
    forms["aot"] = ({"beta": beta}, d_margin, -d_margin)
    # AOT unpaired: chosen and rejected log-ratios sorted separately.
    chosen_sorted, chosen_order = torch.sort(r_w)
    rejected_sorted, rejected_order = torch.sort(r_l)
    u_unpaired = beta * (chosen_sorted - rejected_sorted)
    forms["aot_unpaired"] = (
        {"beta": beta},
        torch.empty_like(u_unpaired).scatter_(0, chosen_order, -beta * sigma(-u_unpaired)),
        torch.empty_like(u_unpaired).scatter_(0, rejected_order, beta * sigma(-u_unpaired)),
    )
    return forms


def test_gradients_match_their_closed_forms():
    for seed in range(3):
        a_w, a_l, ref_w, ref_l, n_w, n_l = inputs(seed)
        for name, (params, expected_w, expected_l) in closed_forms(a_w, a_l, ref_w, ref_l, n_w, n_l).items():
            chosen = a_w.clone().requires_grad_(True)
            rejected = a_l.clone().requires_grad_(True)
            logps = L.PreferenceLogps(chosen, rejected, ref_w, ref_l, n_w, n_l)
            out = L.compute_loss(name, logps, **params)
            g_w, g_l = torch.autograd.grad(out.losses.sum(), (chosen, rejected))
            torch.testing.assert_close(g_w, expected_w, **TIGHT, msg=lambda m, n=name: f"{n} ∂/∂a_w: {m}")
            torch.testing.assert_close(g_l, expected_l, **TIGHT, msg=lambda m, n=name: f"{n} ∂/∂a_l: {m}")


def test_every_loss_has_a_closed_form_gradient_test():
    a_w, a_l, ref_w, ref_l, n_w, n_l = inputs(0)
    here = set(closed_forms(a_w, a_l, ref_w, ref_l, n_w, n_l))
    assert not here & CHECKED_ELSEWHERE
    assert here | CHECKED_ELSEWHERE == set(L.LOSSES), sorted(set(L.LOSSES) ^ (here | CHECKED_ELSEWHERE))
