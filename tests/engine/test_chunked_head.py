"""The chunked LM-head log-softmax equals the unchunked one: values, the detached extras, and gradients."""

from __future__ import annotations

import pytest
import torch

from dpolab.data.packing import pack
from dpolab.engine.logps import ChunkedTargetLogps, LogpEngine, packed_token_logps, packing_fallback_reason
from tests.engine.test_attention import random_pairs
from tests.tiny import tiny_causal_lm

VOCAB = 300


def reference(hidden, weight, bias, targets):
    log_probs = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias), dim=-1)
    values = log_probs.gather(-1, targets[:, None])[:, 0]
    probs = log_probs.exp()
    mean = (probs * log_probs).sum(-1)
    std = (probs * (log_probs - mean[:, None]) ** 2).sum(-1).sqrt()
    return values, torch.logsumexp(2 * log_probs, -1), mean, std


@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
def test_chunked_values_extras_and_gradients_equal_the_full_log_softmax(chunk):
    generator = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(13, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (13,), generator=generator)
    upstream = torch.randn(13, dtype=torch.float64, generator=generator)

    values, log_sum_sq, mean, std = ChunkedTargetLogps.apply(hidden, weight, bias, targets, chunk, True, True)
    grads = torch.autograd.grad((values * upstream).sum(), (hidden, weight, bias))
    expected = reference(hidden, weight, bias, targets)
    expected_grads = torch.autograd.grad((expected[0] * upstream).sum(), (hidden, weight, bias))

    for got, want in zip((values, log_sum_sq, mean, std), expected, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not log_sum_sq.requires_grad and not mean.requires_grad


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])  # GPT-2 ties its head to the input embeddings
def test_chunked_head_through_the_model_equals_the_full_head(architecture):
    pairs = random_pairs(7, seed=11)
    batch = pack(pairs, list(range(7)), row_tokens=64, pad_token_id=0)
    results = []
    for chunk in (0, 5):
        model = tiny_causal_lm(architecture, VOCAB, dtype=torch.float64)
        token = packed_token_logps(model, batch, with_log_sum_sq=True, with_moments=True, logit_chunk_tokens=chunk)
        (token.sums()[:, 0].sum() - 2 * token.sums()[:, 1].sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((token.values.detach(), token.log_sum_sq, *token.moments, grads))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_chunked_head_under_bfloat16_autocast_is_as_accurate_as_the_full_head():
    """Under bf16 autocast both paths round (differently: per chunk vs once); against the fp32 result, the chunked
    head's error is no larger than the full head's."""
    pairs = random_pairs(6, seed=12)
    batch = pack(pairs, list(range(6)), row_tokens=64, pad_token_id=0)
    results = {}
    for name, chunk, autocast in (("fp32", 0, False), ("full", 0, True), ("chunked", 7, True)):
        model = tiny_causal_lm("qwen2", VOCAB, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sums = packed_token_logps(model, batch, logit_chunk_tokens=chunk).sums()
        sums.sum().backward()
        results[name] = (sums.detach(), model.lm_head.weight.grad.clone(), model.model.embed_tokens.weight.grad.clone())
    for index in range(3):
        truth = results["fp32"][index]
        full_error = (results["full"][index] - truth).abs().max()
        chunked_error = (results["chunked"][index] - truth).abs().max()
        assert chunked_error <= 1.25 * full_error + 1e-6, (index, float(chunked_error), float(full_error))


def test_a_model_that_transforms_its_logits_cannot_use_the_chunked_head():
    """Gemma-2 softcaps its logits after the head: the chunked path refuses instead of returning capped log-probs."""
    model = tiny_causal_lm("gemma2", VOCAB, dtype=torch.float64, attention="eager")
    pairs = random_pairs(4, seed=13)
    with pytest.raises(ValueError, match="chunked log-softmax cannot be used"):
        packed_token_logps(model, pack(pairs, list(range(4)), 64, 0), logit_chunk_tokens=8)
    engine = LogpEngine(64, 0, torch.device("cpu"), logit_chunk_tokens=8)
    assert "chunked" in packing_fallback_reason(model, pairs, engine, torch.float64)
