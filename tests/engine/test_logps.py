"""The prefix-shared packed forward equals separate forwards of prompt+chosen and prompt+rejected."""

from __future__ import annotations

import random

import pytest
import torch

from dpolab.data.packing import CHOSEN, PROMPT, REJECTED, pack, plan_rows
from dpolab.data.tokenize import TokenizedPair
from dpolab.engine.logps import naive_logps, packed_logps
from tests.tiny import tiny_causal_lm

VOCAB = 300


def random_pairs(count: int, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(low, high):
        return tuple(rng.randrange(3, VOCAB) for _ in range(rng.randint(low, high)))

    return [TokenizedPair(ids(1, 12), ids(1, 15), ids(1, 15), i) for i in range(count)]


def build(architecture: str, attention: str, dtype: torch.dtype):
    return tiny_causal_lm(architecture, VOCAB, seed=0, dtype=dtype, attention=attention)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_equals_naive_float64(architecture, attention):
    model = build(architecture, attention, torch.float64)
    pairs = random_pairs(9)
    batch = pack(pairs, list(range(9)), row_tokens=64, pad_token_id=0)
    assert batch.input_ids.shape[0] > 1, "several rows, with padding, must be exercised"
    with torch.no_grad():
        packed, naive = packed_logps(model, batch), naive_logps(model, pairs, pad_token_id=0)
    torch.testing.assert_close(packed.chosen, naive.chosen, rtol=0, atol=1e-7)
    torch.testing.assert_close(packed.rejected, naive.rejected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_packed_equals_naive_float32(architecture):
    model = build(architecture, "sdpa", torch.float32)
    pairs = random_pairs(9, seed=1)
    batch = pack(pairs, list(range(9)), row_tokens=96, pad_token_id=0)
    with torch.no_grad():
        packed, naive = packed_logps(model, batch), naive_logps(model, pairs, pad_token_id=0)
    # Sums of up to 27 tokens of ~5.7 nats: fp32 rounding alone is ~1e-5 relative to the sum.
    torch.testing.assert_close(packed.chosen, naive.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.rejected, naive.rejected, rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_naive_gradients():
    pairs = random_pairs(5, seed=2)
    grads = []
    for use_packed in (True, False):
        model = build("llama", "sdpa", torch.float64).train()
        if use_packed:
            out = packed_logps(model, pack(pairs, list(range(5)), 128, 0))
        else:
            out = naive_logps(model, pairs, 0)
        (out.chosen.sum() - 2 * out.rejected.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    # Not exact even in float64: Hugging Face attention takes its softmax in float32, so sums over the
    # packed row's (masked) key set round differently (~4e-7 on gradients of ~10). A wrong mask or
    # position would differ by O(1).
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=2e-6)


def test_ld_alpha_weights_tokens_past_the_shorter_completion():
    model = build("llama", "sdpa", torch.float64)
    pairs = random_pairs(6, seed=3)
    batch = pack(pairs, list(range(6)), 128, 0)
    with torch.no_grad():
        full = packed_logps(model, batch, with_tokens=True)
        alpha_one = packed_logps(model, batch, ld_alpha=1.0)
        alpha = packed_logps(model, batch, ld_alpha=0.25)
    torch.testing.assert_close(alpha_one.chosen, full.chosen)
    # By hand from the per-token values: the first min(|y_w|, |y_l|) tokens at 1, the rest at α.
    for i, pair in enumerate(pairs):
        shared = min(len(pair.chosen_ids), len(pair.rejected_ids))
        tokens = full.token_logps[(batch.target_pair == i) & batch.target_is_chosen]
        expected = tokens[:shared].sum() + 0.25 * tokens[shared:].sum()
        assert float(alpha.chosen[i]) == pytest.approx(float(expected), abs=1e-10)


def test_layout_positions_and_mask():
    pair = TokenizedPair((5, 6, 7), (8, 9), (10, 11, 12), 0)
    batch = pack([pair], [0], 64, 0)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]  # both branches restart after the prompt
    assert batch.branch_ids[0].tolist() == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 3
    allowed = batch.attention_mask(torch.float32)[0, 0] == 0
    assert not allowed[5, 3] and not allowed[5, 4]  # rejected never sees chosen
    assert allowed[5, 0] and allowed[5, 2] and allowed[6, 5]  # sees the prompt and its own branch
    assert not allowed[3, 5]  # chosen never sees rejected
    assert batch.predict_positions.tolist() == [2, 3, 2, 5, 6]  # last prompt token predicts both first tokens
    assert batch.target_ids.tolist() == [8, 9, 10, 11, 12]


def test_pairs_in_one_row_do_not_see_each_other():
    pairs = [TokenizedPair((5, 6), (7,), (8,), 0), TokenizedPair((9, 10), (11,), (12,), 1)]
    batch = pack(pairs, [0, 1], 64, 0)
    assert batch.input_ids.shape == (1, 8)
    allowed = batch.attention_mask(torch.float32)[0, 0] == 0
    assert not allowed[4:, :4].any()


def test_plan_rows_respects_the_budget_and_keeps_every_pair():
    pairs = random_pairs(40, seed=4)
    rows = plan_rows(pairs, 50)
    assert sorted(i for row in rows for i in row) == list(range(40))
    for row in rows:
        size = sum(pairs[i].unique_tokens for i in row)
        assert size <= 50 or len(row) == 1


def test_empty_rejected_branches_sft_pairs_pack_correctly():
    """SFT pairs have no rejected tokens; several in one row must still line up with their targets."""
    model = build("llama", "sdpa", torch.float64)
    pairs = [TokenizedPair(p.prompt_ids, p.chosen_ids, (), p.row) for p in random_pairs(6, seed=7)]
    batch = pack(pairs, list(range(6)), row_tokens=128, pad_token_id=0)
    assert batch.input_ids.shape[0] < 6  # several pairs share a row
    with torch.no_grad():
        packed, naive = packed_logps(model, batch), naive_logps(model, pairs, pad_token_id=0)
    torch.testing.assert_close(packed.chosen, naive.chosen, rtol=0, atol=1e-7)
    assert torch.all(packed.rejected == 0)
