"""The block-sparse attention kernels over packed rows equal the naive path (one padded row per sequence).

``segments`` is checked forward and backward on CPU for several architectures; ``flex``'s block mask is
checked entry by entry against the dense mask, and its fused kernel forward on CPU (PyTorch's
FlexAttention has no backward on CPU).
"""

from __future__ import annotations

import random

import pytest
import torch

from dpolab.data.packing import pack, plan_rows
from dpolab.data.tokenize import TokenizedPair, TokenizedSequence
from dpolab.engine import attention
from dpolab.engine.logps import LogpEngine, naive_token_logps, packed_token_logps, packing_fallback_reason
from dpolab.engine.scores import naive_scores, packed_scores
from dpolab.train.config import TrainConfig
from dpolab.train.models import enable_gradient_checkpointing
from tests.tiny import tiny_causal_lm, tiny_scalar_model

VOCAB = 300


def random_pairs(count: int, seed: int = 0, longest: int = 15) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(low, high):
        return tuple(rng.randrange(3, VOCAB) for _ in range(rng.randint(low, high)))

    return [TokenizedPair(ids(1, 12), ids(1, longest), ids(1, longest), i) for i in range(count)]


def model_for(architecture: str, dtype: torch.dtype, **extra):
    return tiny_causal_lm(
        architecture, VOCAB, seed=0, dtype=dtype, attention="eager" if architecture == "gemma2" else "sdpa", **extra
    )


def gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def objective(sums: torch.Tensor) -> torch.Tensor:
    """A weighting that differs per branch, so a swapped branch changes the gradient."""
    return sums[:, 0].sum() - 2 * sums[:, 1].sum()


@pytest.mark.parametrize("kernel", ["segments", "varlen"])
@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral", "gpt2"])
def test_kernel_equals_naive_forward_and_backward_float64(architecture, kernel):
    """``varlen`` runs its CPU reference loop here: what flash-attn's and PyTorch's fused kernels compute
    over the same sequences."""
    pairs = random_pairs(9)
    batch = pack(pairs, list(range(9)), row_tokens=64, pad_token_id=0)
    assert batch.input_ids.shape[0] > 1 and batch.real_tokens < batch.input_ids.numel(), "rows and padding"
    results = []
    for packed in (True, False):
        model = model_for(architecture, torch.float64)  # eval mode: no dropout; gradients still flow
        if packed:
            sums = packed_token_logps(model, batch, kernel=kernel).sums()
            assert attention.installed(model)
        else:
            sums = naive_token_logps(model, pairs, pad_token_id=0).sums()
        objective(sums).backward()
        results.append((sums.detach(), gradients(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-9)
    # Hugging Face's sdpa takes its softmax in float32 when given a mask (the naive path's padding mask)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_segments_equals_naive_float32(architecture):
    model = model_for(architecture, torch.float32)
    pairs = random_pairs(9, seed=1)
    batch = pack(pairs, list(range(9)), row_tokens=96, pad_token_id=0)
    with torch.no_grad():
        packed = packed_token_logps(model, batch, kernel="segments").sums()
        naive = naive_token_logps(model, pairs, pad_token_id=0).sums()
    torch.testing.assert_close(packed, naive, rtol=1e-5, atol=1e-5)


def test_segments_honours_a_sliding_window_shorter_than_the_items():
    """Mistral with a 6-token window: keys further back than the window are hidden, in both paths alike."""
    pairs = random_pairs(6, seed=2, longest=20)
    model = model_for("mistral", torch.float64, sliding_window=6)
    with torch.no_grad():
        packed = packed_token_logps(model, pack(pairs, list(range(6)), 128, 0), kernel="segments").sums()
        naive = naive_token_logps(model, pairs, pad_token_id=0).sums()
        unwindowed = naive_token_logps(model_for("mistral", torch.float64), pairs, pad_token_id=0).sums()
    torch.testing.assert_close(packed, naive, rtol=0, atol=1e-9)
    assert (naive - unwindowed).abs().max() > 1e-3, "the window must change these items' log-probs"


def test_segments_on_single_branch_items_is_causal_attention_per_item():
    """SFT rows: each example alone, causal (the varlen case), several to a row."""
    model = model_for("qwen2", torch.float64)
    sequences = [TokenizedSequence(p.prompt_ids, p.chosen_ids, p.row) for p in random_pairs(8, seed=3)]
    batch = pack(sequences, list(range(8)), row_tokens=96, pad_token_id=0)
    assert batch.input_ids.shape[0] < 8
    with torch.no_grad():
        packed = packed_token_logps(model, batch, kernel="segments").sums()
        naive = naive_token_logps(model, sequences, pad_token_id=0).sums()
    torch.testing.assert_close(packed, naive, rtol=0, atol=1e-9)


def test_varlen_plan_writes_every_real_token_once_and_repeats_only_the_prompt():
    """Each pair: [prompt | chosen] then [prompt | rejected]; the second sequence writes only its branch."""
    pairs = random_pairs(7, seed=12)
    batch = pack(pairs, list(range(7)), row_tokens=64, pad_token_id=0)
    plan = attention.varlen_plan(attention.layout_mask(batch, varlen=True))
    real = (batch.segment_ids >= 0).flatten().nonzero().flatten()
    assert sorted(plan.written.tolist()) == real.tolist()
    assert len(plan.bounds) - 1 == 2 * len(pairs) and plan.cu_seqlens.dtype == torch.int32
    lengths = sorted(b - a for a, b in zip(plan.bounds[:-1], plan.bounds[1:], strict=True))
    expected = sorted(len(p.prompt_ids) + len(branch) for p in pairs for branch in (p.chosen_ids, p.rejected_ids))
    assert lengths == expected and plan.max_length == max(expected)
    repeated = plan.gather[~plan.keep]
    assert bool((batch.branch_ids.flatten()[repeated] == 0).all()), "only prompt tokens are read twice"
    assert len(repeated) == sum(len(p.prompt_ids) for p in pairs)


def test_varlen_honours_a_sliding_window_and_sft_rows():
    """Mistral's 6-token window inside each sequence, and SFT rows (one branch: plain varlen packing)."""
    pairs = random_pairs(6, seed=13, longest=20)
    model = model_for("mistral", torch.float64, sliding_window=6)
    sequences = [TokenizedSequence(p.prompt_ids, p.chosen_ids, p.row) for p in random_pairs(8, seed=14)]
    sft_batch = pack(sequences, list(range(8)), row_tokens=96, pad_token_id=0)
    assert sft_batch.input_ids.shape[0] < 8
    with torch.no_grad():
        windowed = packed_token_logps(model, pack(pairs, list(range(6)), 128, 0), kernel="varlen").sums()
        sft = packed_token_logps(model, sft_batch, kernel="varlen").sums()
        naive_windowed = naive_token_logps(model, pairs, pad_token_id=0).sums()
        naive_sft = naive_token_logps(model, sequences, pad_token_id=0).sums()
    torch.testing.assert_close(windowed, naive_windowed, rtol=0, atol=1e-9)
    torch.testing.assert_close(sft, naive_sft, rtol=0, atol=1e-9)


def test_the_kernel_check_takes_varlen_and_names_what_it_cannot_do():
    pairs = random_pairs(7, seed=15)
    engine = LogpEngine(64, 0, torch.device("cpu"), kernel="varlen")
    assert packing_fallback_reason(model_for("llama", torch.float32), pairs, engine, torch.float32) is None
    gemma = packing_fallback_reason(model_for("gemma2", torch.float64), pairs, engine, torch.float64)
    assert gemma is not None and "varlen kernel does not support softcap" in gemma


def test_the_installed_dispatcher_leaves_other_calls_unchanged():
    """After install, a plain padded forward (generation, the naive path) goes to the model's own kernel."""
    pairs = random_pairs(5, seed=4)
    model = model_for("llama", torch.float64)
    with torch.no_grad():
        before = naive_token_logps(model, pairs, 0).sums()
        assert attention.install(model) is None and attention.installed(model)
        after = naive_token_logps(model, pairs, 0).sums()
        tokens = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
        attention.uninstall(model)
        assert model.config._attn_implementation == "sdpa"
        again = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert torch.equal(before, after) and torch.equal(tokens, again)


def test_softcapped_attention_is_refused_and_the_dense_path_taken():
    """Gemma-2 caps attention logits, which sdpa cannot: the check names it, and the dense kernel still agrees."""
    model = model_for("gemma2", torch.float64)
    pairs = random_pairs(4, seed=5)
    segments = LogpEngine(64, 0, torch.device("cpu"), kernel="segments")
    reason = packing_fallback_reason(model, pairs, segments, torch.float64)
    assert reason is not None and "softcap" in reason
    dense = LogpEngine(64, 0, torch.device("cpu"), kernel="dense")
    assert packing_fallback_reason(model, pairs, dense, torch.float64) is None


@pytest.mark.parametrize("kernel, architecture", [("segments", "llama"), ("varlen", "qwen2")])
def test_reward_scores_through_the_kernels_equal_naive(kernel, architecture):
    model = tiny_scalar_model(architecture, VOCAB, dtype=torch.float64)
    pairs = random_pairs(7, seed=6)
    with torch.no_grad():
        packed = packed_scores(model, pairs, list(range(7)), 64, 0, "cpu", kernel=kernel)
        naive = naive_scores(model, pairs, 0)
    torch.testing.assert_close(packed, naive, rtol=0, atol=1e-9)


def test_block_mask_applies_exactly_the_dense_mask():
    """Every entry of the block mask (full blocks, partial blocks through mask_mod, empty blocks) equals the dense rule."""
    pairs = random_pairs(30, seed=7, longest=40)
    batch = pack(pairs, list(range(30)), row_tokens=300, pad_token_id=0)
    block = 16
    mask = attention.block_mask(batch, block_size=block)
    dense = batch.attention_mask(torch.float32)[:, 0] == 0
    rows, length = batch.input_ids.shape
    blocks = -(-length // block)
    from torch.nn.attention.flex_attention import _ordered_to_dense  # the block tables as dense 0/1 grids

    partial = _ordered_to_dense(mask.kv_num_blocks, mask.kv_indices, blocks)
    full = _ordered_to_dense(mask.full_kv_num_blocks, mask.full_kv_indices, blocks)
    query = torch.arange(length)[:, None].expand(length, length)
    key = torch.arange(length)[None, :].expand(length, length)
    skipped = 0
    for row in range(rows):
        by_mod = mask.mask_mod(torch.tensor(row), torch.tensor(0), query, key)
        kind = torch.zeros(blocks, blocks, dtype=torch.long)  # 0 empty, 1 partial, 2 full
        kind[partial[row, 0].bool()] = 1
        kind[full[row, 0].bool()] = 2
        entry_kind = kind.repeat_interleave(block, 0).repeat_interleave(block, 1)[:length, :length]
        applied = (entry_kind == 2) | ((entry_kind == 1) & by_mod)
        assert torch.equal(applied, dense[row])
        skipped += int((kind == 0).sum())
    assert skipped > 0, "cross-pair blocks must be skipped"


@pytest.mark.slow
def test_flex_kernel_forward_equals_naive_on_cpu():
    """The fused FlexAttention kernel (compiled for CPU) with the block mask gives the naive log-probs."""
    model = model_for("llama", torch.float32)
    pairs = random_pairs(9, seed=8)
    batch = pack(pairs, list(range(9)), row_tokens=64, pad_token_id=0)
    with torch.no_grad():
        flex = packed_token_logps(model, batch, kernel="flex").sums()
        naive = naive_token_logps(model, pairs, pad_token_id=0).sums()
    torch.testing.assert_close(flex, naive, rtol=1e-5, atol=1e-5)


def test_flex_without_backward_on_cpu_is_refused_by_the_check():
    model = model_for("llama", torch.float32).train()
    engine = LogpEngine(64, 0, torch.device("cpu"), kernel="flex")
    reason = packing_fallback_reason(model, random_pairs(4, seed=9), engine, torch.float32)
    assert reason is not None and "backward on CPU" in reason


def test_balanced_rows_leave_little_padding():
    """Eight items of about equal size under a budget of a bit more than four: two rows of four, not 4+4 by
    luck of order — first-fit in order would fill 7 + 1 under a budget that holds 7."""
    items = [TokenizedSequence(tuple(range(3, 3 + 40 + i)), (5,) * 30, i) for i in range(8)]
    sizes = [item.unique_tokens for item in items]
    rows = plan_rows(items, row_tokens=sum(sorted(sizes)[:7]))
    assert len(rows) == 2 and sorted(len(row) for row in rows) == [4, 4]
    assert sorted(i for row in rows for i in row) == list(range(8))


@pytest.mark.parametrize("kernel", ["segments", "varlen", "dense", "naive"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradients(kernel, lora, monkeypatch):
    """Non-reentrant checkpointing reruns each layer in backward (the layout mask travels with it) and the
    gradients are those of the run that kept its activations."""
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama import modeling_llama

    mlp_calls = []  # checkpointing reruns each layer's forward (its MLP included) in backward
    mlp_forward = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: mlp_calls.append(1) or mlp_forward(self, x))
    pairs = random_pairs(6, seed=10)
    batch = pack(pairs, list(range(6)), row_tokens=64, pad_token_id=0)
    results = []
    for checkpointing in (False, True):
        model = model_for("llama", torch.float64).train()  # Llama has no dropout by default
        if checkpointing:
            enable_gradient_checkpointing(TrainConfig(model="m", data="d", gradient_checkpointing=True), model)
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        mlp_calls.clear()
        if kernel == "naive":
            sums = naive_token_logps(model, pairs, 0).sums()
        else:
            sums = packed_token_logps(model, batch, kernel=kernel).sums()
        objective(sums).backward()
        layers = model.base_model.config.num_hidden_layers
        assert len(mlp_calls) == layers * (2 if checkpointing else 1)
        results.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)
