"""The reference pass equals the naive log-probs; the cache is reused, and keyed on every input."""

from __future__ import annotations

import torch

from dpolab.engine.logps import LogpEngine, naive_token_logps
from dpolab.engine.reference import (
    cache_key,
    compute_reference_logps,
    items_fingerprint,
    load_cached,
    store_cached,
    weights_fingerprint,
)
from tests.engine.test_logps import build, random_pairs

ENGINE = LogpEngine(row_tokens=64, pad_token_id=0, device=torch.device("cpu"))


def test_reference_pass_matches_naive_log_probs_in_any_order():
    model = build("llama", "sdpa", torch.float32)
    pairs = random_pairs(10, seed=5)
    indices = [7, 2, 9, 0, 4]
    values = compute_reference_logps(model, pairs, indices, 3, ENGINE)
    with torch.no_grad():
        naive = naive_token_logps(model, [pairs[i] for i in indices], 0).sums()
    torch.testing.assert_close(values, naive, rtol=1e-5, atol=1e-5)


def test_cache_round_trip_and_keys_change_with_any_input(tmp_path):
    model = build("llama", "sdpa", torch.float32)
    pairs = random_pairs(6, seed=6)
    key = cache_key(weights_fingerprint(model), items_fingerprint(pairs), {"ld_alpha": None})
    assert load_cached(tmp_path, key) is None
    values = compute_reference_logps(model, pairs, range(6), 4, ENGINE)
    store_cached(tmp_path, key, values)
    torch.testing.assert_close(load_cached(tmp_path, key), values, rtol=0, atol=0)

    other_weights = build("llama", "sdpa", torch.float32)
    with torch.no_grad():
        next(other_weights.parameters()).add_(1e-3)
    assert weights_fingerprint(other_weights) != weights_fingerprint(model)
    assert items_fingerprint(pairs[:-1]) != items_fingerprint(pairs)
    assert cache_key("w", "p", {"ld_alpha": 0.5}) != cache_key("w", "p", {"ld_alpha": None})
    assert not any(p.name.startswith("reference-") and p.suffix != ".safetensors" for p in tmp_path.iterdir())


def test_a_damaged_cache_file_is_a_miss_and_is_rewritten(tmp_path, capsys):
    values = torch.randn(5, 2, dtype=torch.float64)
    path = store_cached(tmp_path, "key", values)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short, a full disk
    assert load_cached(tmp_path, "key") is None
    assert "unreadable" in capsys.readouterr().err
    store_cached(tmp_path, "key", values)
    assert torch.equal(load_cached(tmp_path, "key"), values)
