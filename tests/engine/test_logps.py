"""The prefix-shared packed forward equals separate forwards of prompt+chosen and prompt+rejected.

The packed path calls the model's own forward (with the LM head restricted by a hook), so it is also
checked through a DDP-style container and a PEFT wrapper.
"""

from __future__ import annotations

import random

import pytest
import torch

from dpolab.data.packing import CHOSEN, PROMPT, REJECTED, pack, plan_rows
from dpolab.data.tokenize import TokenizedPair, TokenizedSequence
from dpolab.engine.logps import naive_token_logps, output_head, packed_token_logps
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
        packed, naive = packed_token_logps(model, batch), naive_token_logps(model, pairs, pad_token_id=0)
    torch.testing.assert_close(packed.sums(), naive.sums(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_the_naive_path_item_by_item_equals_one_padded_batch(architecture):
    """The kernel check runs the naive side one item at a time (its full logits would set the peak memory
    with a large vocabulary): padding to the batch's longest row must not change any value."""
    model = build(architecture, "sdpa", torch.float64)
    pairs = random_pairs(6, seed=4)
    assert len({len(p.prompt_ids) + len(p.chosen_ids) for p in pairs}) > 1, "rows of different lengths"
    with torch.no_grad():
        batched = naive_token_logps(model, pairs, pad_token_id=0)
        alone = [naive_token_logps(model, [pair], pad_token_id=0) for pair in pairs]
    torch.testing.assert_close(torch.cat([a.sums() for a in alone]), batched.sums(), rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat([a.values for a in alone]), batched.values, rtol=0, atol=1e-10)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_packed_equals_naive_float32(architecture):
    model = build(architecture, "sdpa", torch.float32)
    pairs = random_pairs(9, seed=1)
    batch = pack(pairs, list(range(9)), row_tokens=96, pad_token_id=0)
    with torch.no_grad():
        packed, naive = packed_token_logps(model, batch), naive_token_logps(model, pairs, pad_token_id=0)
    # Sums of up to 27 tokens of ~5.7 nats: fp32 rounding alone is ~1e-5 relative to the sum.
    torch.testing.assert_close(packed.sums(), naive.sums(), rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_naive_gradients():
    pairs = random_pairs(5, seed=2)
    grads = []
    for use_packed in (True, False):
        model = build("llama", "sdpa", torch.float64).train()
        if use_packed:
            out = packed_token_logps(model, pack(pairs, list(range(5)), 128, 0)).sums()
        else:
            out = naive_token_logps(model, pairs, 0).sums()
        (out[:, 0].sum() - 2 * out[:, 1].sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    # Not exact even in float64: Hugging Face attention takes its softmax in float32, so sums over the
    # packed row's (masked) key set round differently (~4e-7 on gradients of ~10). A wrong mask or
    # position would differ by O(1).
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=2e-6)


def test_token_values_are_the_same_in_both_paths_and_sum_to_the_sequences():
    """Per-token log-probs, with their sequence and position, agree between the paths (LD-DPO and WPO use them)."""
    model = build("llama", "sdpa", torch.float64)
    pairs = random_pairs(6, seed=3)
    with torch.no_grad():
        packed = packed_token_logps(model, pack(pairs, list(range(6)), 48, 0), with_log_sum_sq=True)
        naive = naive_token_logps(model, pairs, 0, with_log_sum_sq=True)
    for out in (packed, naive):
        for s, pair_branch in enumerate((p, b) for p in pairs for b in (0, 1)):
            pair, branch = pair_branch
            selected = out.sequence == s
            assert out.index[selected].tolist() == list(range(len(pair.branches[branch])))

    def by_token(out):
        return sorted(
            zip(out.sequence.tolist(), out.index.tolist(), out.values.tolist(), out.log_sum_sq.tolist(), strict=True)
        )

    for (s1, i1, v1, q1), (s2, i2, v2, q2) in zip(by_token(packed), by_token(naive), strict=True):
        assert (s1, i1) == (s2, i2)
        assert v1 == pytest.approx(v2, abs=1e-7) and q1 == pytest.approx(q2, abs=1e-7)
        assert q1 <= 0  # log Σ p² ≤ log Σ p = 0
    weights = torch.where(packed.index >= 1, 0.25, 1.0).double()
    by_hand = torch.zeros(12, dtype=torch.float64).index_add(0, packed.sequence, packed.values * weights)
    torch.testing.assert_close(packed.sums(weights).flatten(), by_hand)


class Container(torch.nn.Module):
    """What DistributedDataParallel looks like from outside: the model at ``.module``, forward passed through."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_the_packed_path_goes_through_wrappers_own_forward():
    model = build("llama", "sdpa", torch.float64)
    pairs = random_pairs(5, seed=8)
    batch = pack(pairs, list(range(5)), 64, 0)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.no_grad():
        plain = packed_token_logps(model, batch).sums()
        wrapped = packed_token_logps(Container(model), batch).sums()
    handle.remove()
    assert len(calls) == 2  # the model's own forward ran each time (so a wrapper's hooks would)
    torch.testing.assert_close(plain, wrapped, rtol=0, atol=0)
    assert output_head(Container(model)) is model.lm_head


def test_the_packed_path_under_peft_lora_equals_the_naive_path():
    peft = pytest.importorskip("peft")
    model = build("llama", "sdpa", torch.float64)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    pairs = random_pairs(5, seed=9)
    with torch.no_grad():
        packed = packed_token_logps(wrapped, pack(pairs, list(range(5)), 64, 0)).sums()
        naive = naive_token_logps(wrapped, pairs, 0).sums()
        with wrapped.disable_adapter():
            base = naive_token_logps(wrapped, pairs, 0).sums()
    torch.testing.assert_close(packed, naive, rtol=0, atol=1e-7)
    assert (packed - base).abs().max() > 1e-4  # the adapter is active on the packed path


def test_a_model_whose_forward_skips_its_head_module_is_refused():
    model = build("llama", "sdpa", torch.float64)
    pairs = random_pairs(3, seed=10)
    batch = pack(pairs, list(range(3)), 64, 0)

    class HeadAsFunction(torch.nn.Module):  # computes logits from the weight, never calling the head module
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, **kwargs):
            hidden = self.inner.model(**kwargs).last_hidden_state
            return type("Out", (), {"logits": hidden @ self.inner.lm_head.weight.T})()

    with pytest.raises(ValueError, match="did not project the selected positions"):
        packed_token_logps(HeadAsFunction(model), batch)


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


def test_sft_sequences_pack_several_to_a_row_and_equal_the_naive_path():
    """SFT items have one branch; several in one row must still line up with their targets."""
    model = build("llama", "sdpa", torch.float64)
    sequences = [TokenizedSequence(p.prompt_ids, p.chosen_ids, p.row) for p in random_pairs(6, seed=7)]
    batch = pack(sequences, list(range(6)), row_tokens=128, pad_token_id=0)
    assert batch.input_ids.shape[0] < 6 and batch.num_branches == 1  # several examples share a row
    with torch.no_grad():
        packed, naive = packed_token_logps(model, batch), naive_token_logps(model, sequences, pad_token_id=0)
    assert packed.sums().shape == (6, 1)
    torch.testing.assert_close(packed.sums(), naive.sums(), rtol=0, atol=1e-7)


def test_items_with_different_branch_counts_cannot_share_a_batch():
    pair, sequence = random_pairs(1)[0], TokenizedSequence((5, 6), (7,), 1)
    with pytest.raises(ValueError, match="same number of branches"):
        pack([pair, sequence], [0, 1], 64, 0)


def test_the_moments_of_the_next_token_distribution_agree_in_both_paths_and_with_sampling():
    """Min-K%++ reads E_v[log π(v)] and its standard deviation at each position: packed = naive, and both equal
    a Monte-Carlo estimate from tokens drawn from the model's own next-token distribution."""
    model = build("llama", "sdpa", torch.float64)
    pairs = random_pairs(4, seed=5)
    with torch.no_grad():
        packed = packed_token_logps(model, pack(pairs, list(range(4)), 48, 0), with_moments=True)
        naive = naive_token_logps(model, pairs, 0, with_moments=True)
        order_packed = torch.argsort(packed.sequence * 1000 + packed.index)
        order_naive = torch.argsort(naive.sequence * 1000 + naive.index)
        for got, want in zip(packed.moments, naive.moments, strict=True):
            torch.testing.assert_close(got[order_packed], want[order_naive], rtol=0, atol=1e-7)
        pair = pairs[0]
        ids = torch.tensor([list(pair.prompt_ids) + list(pair.branches[0])])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, len(pair.prompt_ids) - 1].double(), -1)
        draws = log_probs[
            torch.multinomial(log_probs.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
        ]
    first = naive.index.eq(0) & naive.sequence.eq(0)
    mean, std = naive.moments[0][first].item(), naive.moments[1][first].item()
    assert mean == pytest.approx(draws.mean().item(), abs=0.02) and std == pytest.approx(draws.std().item(), rel=0.02)
    assert mean < 0 < std
