"""`dpolab eval tokens`: per-token log-probs of pairs and their change by offset from the first difference."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from dpolab.data.formats import PreferenceExample
from dpolab.data.tokenize import TokenizedPair, tokenize_pairs
from dpolab.eval.tokens import first_difference, pair_token_logps, summarise
from tests.tiny import save_tiny_model, tiny_causal_lm, tiny_tokenizer


def _pair(chosen, rejected, prompt=(5, 6)):
    return TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected), 0)


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ((1, 2, 3), (1, 9, 3), 1),
        ((1, 2, 3), (4, 2, 3), 0),
        ((1, 2, 3), (1, 2, 3, 4), 3),  # one completion is a prefix of the other: they differ where it ends
        ((1, 2), (1, 2), None),
    ],
)
def test_the_first_difference_is_the_common_token_prefix(chosen, rejected, expected):
    assert first_difference(_pair(chosen, rejected)) == expected


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_the_token_log_probs_are_the_full_forward_s_log_softmax_at_each_completion_token(architecture):
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(architecture, len(tokenizer), seed=3, dtype=torch.float64,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    examples = [
        PreferenceExample("Weng earns 12 an hour.", " The answer is 72.", " The answer is 10 and more.", 0),
        PreferenceExample("two plus two is", " four", " nine and three", 1),
        PreferenceExample("Natalia sold clips to 48 of her friends in April,", " then May.", " then June.", 2),
    ]
    pairs, _ = tokenize_pairs(tokenizer, examples)
    scored = pair_token_logps(model, tokenizer, pairs, batch_size=2)  # two batches, the packed path
    for pair, sides in zip(pairs, scored, strict=True):
        for completion, values in zip(pair.branches, sides, strict=True):
            ids = torch.tensor([pair.prompt_ids + completion])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            expected = logits[torch.arange(len(pair.prompt_ids) - 1, ids.shape[1] - 1), torch.tensor(completion)]
            assert values.shape == expected.shape
            torch.testing.assert_close(values, expected, rtol=0, atol=1e-10)


def test_the_summary_splits_the_change_at_the_first_difference():
    # Two pairs, completions of 5 tokens; the first differs at token 2, the second at token 0.
    pairs = [_pair((1, 2, 3, 4, 5), (1, 2, 8, 4, 5)), _pair((1, 2, 3, 4, 5), (7, 2, 3, 4, 5))]
    reference = [(torch.full((5,), -1.0, dtype=torch.float64),) * 2 for _ in pairs]
    # The model: chosen tokens at positions 0..4 changed by -0.1 * position, rejected by -1 after the difference
    step = -0.1 * torch.arange(5, dtype=torch.float64)
    model = []
    for pair in pairs:
        first = first_difference(pair)
        rejected = torch.full((5,), -1.0, dtype=torch.float64)
        rejected[first:] -= 1.0
        model.append((-1.0 + step, rejected))
    summary = summarise(pairs, model, reference, window=3)
    assert summary["pairs"] == 2 and summary["first_difference"] == 1.0
    assert summary["chosen_logp_reference"] == pytest.approx(-5.0)
    assert summary["chosen_logp_reference_per_token"] == pytest.approx(-1.0)
    assert summary["rejected_logp_per_token"] == pytest.approx(-(5 + 3 + 5 + 5) / 10)
    assert summary["chosen_logratio"] == pytest.approx(-1.0)  # -0.1 * (0+1+2+3+4)
    assert summary["rejected_logratio"] == pytest.approx(-(3 + 5) / 2)
    # Chosen: before the difference only pair 1's positions 0 and 1 (changes 0, -0.1); at it: -0.2 and 0.0
    assert summary["chosen_change_before"] == pytest.approx(-0.05)
    assert summary["chosen_change_at"] == pytest.approx(-0.1)
    assert summary["chosen_change_before_sum"] == pytest.approx(-0.05)
    assert summary["chosen_change_before_sum"] + summary["chosen_change_from_sum"] == pytest.approx(
        summary["chosen_logratio"]
    )
    assert summary["rejected_change_before"] == 0.0 and summary["rejected_change_after"] == -1.0
    # By offset: offset -2 is pair 1's position 0 only; offset +3 is pair 1's position 5 (none) and pair 2's 3
    positions = {entry.pop("offset"): entry for entry in summary["by_position"]}
    assert positions[-2] == {"chosen": 0.0, "rejected": 0.0, "chosen_tokens": 1, "rejected_tokens": 1}
    assert positions[3]["chosen"] == pytest.approx(-0.3)
    assert positions[3]["chosen_tokens"] == 1
    assert set(positions) == set(range(-2, 4))


def test_completions_of_different_lengths_are_counted_per_side():
    pairs = [_pair((1, 2), (1, 3, 4, 5))]  # the rejected is two tokens longer
    values = [
        (torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-1.0, -3.0, -4.0, -5.0], dtype=torch.float64))
    ]
    summary = summarise(pairs, values)
    positions = {entry["offset"]: entry for entry in summary["by_position"]}
    assert positions[2] == {"offset": 2, "chosen": None, "rejected": -5.0, "chosen_tokens": 0, "rejected_tokens": 1}
    assert summary["rejected_logp_after"] == pytest.approx(-4.5) and summary["chosen_logp_after"] is None
    assert summary["rejected_logp_per_token"] == pytest.approx(-13 / 4)


def test_identical_completions_count_in_the_sums_and_not_in_the_positions():
    pairs = [_pair((1, 2), (1, 2)), _pair((1, 2), (1, 3))]
    values = [(torch.tensor([-1.0, -2.0], dtype=torch.float64),) * 2 for _ in pairs]
    summary = summarise(pairs, values)
    assert summary["pairs_without_difference"] == 1
    assert summary["chosen_logp"] == -3.0
    assert summary["chosen_logp_before"] == -1.0 and summary["chosen_logp_at"] == -2.0
    assert summary["chosen_logp_after"] is None  # no token after the last
    assert "chosen_logratio" not in summary  # no reference, no change


def test_the_command_on_a_model_against_itself_and_against_another(tmp_path):
    first, second = save_tiny_model(tmp_path / "a", seed=0), save_tiny_model(tmp_path / "b", seed=1)
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Weng earns 12 an hour. ", "chosen": "The answer is 72.", "rejected": "The answer is 10."},
        {"prompt": "two plus two is ", "chosen": "four", "rejected": "nine"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(reference, name):
        out, tokens = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
        command = [sys.executable, "-m", "dpolab", "eval", "tokens", str(data), "--model", first,
                   "--reference", reference, "--out", str(out), "--tokens", str(tokens), "--no-progress"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return json.loads(out.read_text()), [json.loads(line) for line in tokens.read_text().splitlines()]

    same, rows_same = run(first, "same")
    assert same["chosen_logratio"] == 0.0 and same["rejected_change_after"] == 0.0
    other, rows_other = run(second, "other")
    assert other["chosen_logp"] == same["chosen_logp"]  # the model's own log-probs do not depend on the reference
    assert other["chosen_logratio"] != 0.0
    per_pair = [sum(r["chosen_logps"]) - sum(r["chosen_logps_reference"]) for r in rows_other]
    assert other["chosen_logratio"] == pytest.approx(sum(per_pair) / 2, abs=1e-5)  # the rows are rounded to 1e-6
    assert all(len(r["chosen_tokens"]) == len(r["chosen_logps"]) for r in rows_other)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"limit": 0}, "--limit must be at least 1; got 0"),
        ({"window": -1}, "--window must be >= 0; got -1"),
        ({"batch_size": 0}, "--batch-size must be at least 1; got 0"),
    ],
)
def test_bad_settings_are_refused_before_any_model_loads(tmp_path, options, message):
    from dpolab.eval.tokens import token_report

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        token_report(str(tmp_path / "no-model"), str(data), **options)


def test_a_bad_row_is_named(tmp_path):
    from dpolab.eval.tokens import token_report

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "p"}) + "\n"
    )
    with pytest.raises(ValueError, match=r"pairs.jsonl: line 2 \(row 1\): missing field .chosen."):
        token_report(str(tmp_path / "no-model"), str(data))


def test_the_command_names_a_missing_file(tmp_path):
    model = save_tiny_model(tmp_path / "m")
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "eval", "tokens", str(tmp_path / "nope.jsonl"), "--model", model],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "nope.jsonl" in result.stderr
