"""The reference cache: computed once, reused while inputs are unchanged, recomputed when any changes."""

from __future__ import annotations

import torch

from dpolab.engine.logps import naive_logps
from dpolab.engine.reference import (
    cache_key,
    cached_reference_logps,
    compute_reference_logps,
    pairs_fingerprint,
    weights_fingerprint,
)
from tests.engine.test_logps import build, random_pairs


def test_reference_pass_matches_naive_log_probs():
    model = build("llama", "sdpa", torch.float32)
    pairs = random_pairs(10, seed=5)
    chosen, rejected = compute_reference_logps(model, pairs, 3, 64, 0, torch.device("cpu"))
    with torch.no_grad():
        naive = naive_logps(model, pairs, 0)
    torch.testing.assert_close(chosen, naive.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected, naive.rejected, rtol=1e-5, atol=1e-5)


def test_cache_is_reused_and_keys_change_with_any_input(tmp_path):
    model = build("llama", "sdpa", torch.float32)
    pairs = random_pairs(6, seed=6)
    calls = []

    def compute():
        calls.append(1)
        return compute_reference_logps(model, pairs, 4, 64, 0, torch.device("cpu"))

    key = cache_key(weights_fingerprint(model), pairs_fingerprint(pairs), {"ld_alpha": None})
    first = cached_reference_logps(tmp_path, key, compute)
    second = cached_reference_logps(tmp_path, key, compute)
    assert len(calls) == 1 and first[2] is False and second[2] is True
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)

    other_weights = build("llama", "sdpa", torch.float32)
    with torch.no_grad():
        next(other_weights.parameters()).add_(1e-3)
    assert weights_fingerprint(other_weights) != weights_fingerprint(model)
    assert pairs_fingerprint(pairs[:-1]) != pairs_fingerprint(pairs)
    assert cache_key("w", "p", {"ld_alpha": 0.5}) != cache_key("w", "p", {"ld_alpha": None})
    assert not any(p.name.startswith("reference-") and p.suffix != ".safetensors" for p in tmp_path.iterdir())
