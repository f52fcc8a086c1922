"""Scores of a one-output head (reward and value models): the packed pass equals one sequence at a time.

The packed path reads the score head's output at the last token of each branch of [prompt | chosen |
rejected] rows; the reference is Hugging Face's own ``*ForSequenceClassification`` run on each
sequence alone (no padding, its pooled logit), and the naive padded path.
"""

from __future__ import annotations

import pytest
import torch

from dpolab.data.packing import pack
from dpolab.data.tokenize import TokenizedPair
from dpolab.engine.scores import ScoreEngine, naive_scores, packed_scores, score_head, scores_fallback_reason
from tests.engine.test_logps import VOCAB, random_pairs
from tests.tiny import tiny_scalar_model


def alone(model, pairs) -> torch.Tensor:
    """Hugging Face's pooled logit of each (prompt + branch) run as a batch of one."""
    values = []
    with torch.no_grad():
        for pair in pairs:
            for branch in pair.branches:
                ids = torch.tensor([pair.prompt_ids + branch])
                values.append(model(input_ids=ids).logits[0, 0])
    return torch.stack(values).view(len(pairs), 2)


def test_branch_end_positions_point_at_each_sequences_last_token():
    pairs = random_pairs(7, seed=3)
    batch = pack(pairs, list(range(7)), row_tokens=40, pad_token_id=0)
    flat = batch.input_ids.reshape(-1)
    for index, pair in enumerate(pairs):
        for branch, ids in enumerate(pair.branches):
            assert int(flat[batch.branch_end_positions[index * 2 + branch]]) == ids[-1]


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_packed_scores_equal_the_classifier_on_each_sequence_alone_float64(architecture):
    model = tiny_scalar_model(architecture, VOCAB, dtype=torch.float64)
    pairs = random_pairs(9)
    assert pack(pairs, list(range(9)), 64, 0).input_ids.shape[0] > 1, "several rows, with padding"
    with torch.no_grad():
        packed = packed_scores(model, pairs, list(range(9)), 64, 0, "cpu")
        naive = naive_scores(model, pairs, 0)
    expected = alone(model, pairs)
    assert float(expected.std()) > 0.1  # scores that differ, so equality says something
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(naive, expected, rtol=0, atol=1e-9)


def test_packed_scores_float32_equal_the_naive_path():
    pairs = random_pairs(9, seed=1)
    model = tiny_scalar_model("qwen2", VOCAB, dtype=torch.float32)
    with torch.no_grad():
        packed, naive = packed_scores(model, pairs, list(range(9)), 96, 0, "cpu"), naive_scores(model, pairs, 0)
    torch.testing.assert_close(packed, naive, rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_naive_gradients_float64():
    pairs = random_pairs(6, seed=1)
    weights = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = []
    for path in ("packed", "naive"):
        model = tiny_scalar_model("llama", VOCAB, dtype=torch.float64)
        scores = (
            packed_scores(model, pairs, list(range(6)), 48, 0, "cpu")
            if path == "packed"
            else naive_scores(model, pairs, 0)
        )
        (scores * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    # Not exact even in float64 (as for log-probs, tests/engine/test_logps.py): Hugging Face attention takes its
    # softmax in float32, so sums over the packed row's masked key set round differently (~1e-7 relative). A
    # wrong mask, position or score index would differ by O(1).
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=2e-6, msg=name)
    assert float(grads[0]["score.weight"].abs().max()) > 0


def test_pad_equal_to_eos_still_scores_the_last_token():
    """Hugging Face pools at the last non-pad token; with pad = EOS that is the token before the EOS. dpolab
    reads the EOS position itself, whatever the pad token."""
    model = tiny_scalar_model("llama", VOCAB, dtype=torch.float64)
    eos = 7
    pair = TokenizedPair((10, 11, 12), (20, 21, eos), (30, eos), 0)
    with torch.no_grad():
        ours = naive_scores(model, [pair], pad_token_id=eos)
        packed = packed_scores(model, [pair], [0], 64, eos, "cpu")
        through_eos = alone(model, [pair])  # run with the model's pad token (0): pools at the EOS
    torch.testing.assert_close(ours, through_eos, rtol=0, atol=1e-9)
    torch.testing.assert_close(packed, through_eos, rtol=0, atol=1e-9)


def test_the_score_head_is_found_through_wrappers_and_refused_when_missing():
    from peft import LoraConfig, get_peft_model

    model = tiny_scalar_model("llama", VOCAB)
    wrapped = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj"]))
    head = score_head(wrapped)
    assert type(head).__name__ == "ModulesToSaveWrapper"  # the trained copy, not the frozen original
    pairs = random_pairs(3)
    with torch.no_grad():
        torch.testing.assert_close(
            packed_scores(wrapped, pairs, [0, 1, 2], 64, 0, "cpu"),
            naive_scores(wrapped, pairs, 0),
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.raises(ValueError, match="has no score head"):
        score_head(torch.nn.Linear(2, 1))


def test_fallback_check_agrees_on_a_model_that_takes_the_mask_and_names_a_failing_one():
    model = tiny_scalar_model("llama", VOCAB)
    engine = ScoreEngine(64, 0, torch.device("cpu"))
    assert scores_fallback_reason(model, random_pairs(4), engine, torch.float32) is None

    class Breaks(torch.nn.Module):  # a model whose forward cannot take the packed 4D mask
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask, **kwargs):
            if attention_mask.dim() == 4:
                raise RuntimeError("no 4D masks here")
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    reason = scores_fallback_reason(Breaks(), random_pairs(4), engine, torch.float32)
    assert reason.startswith("the packed forward failed (RuntimeError: no 4D masks here")
