"""`dpolab eval contamination`: Min-K% Prob, Min-K%++ and their AUROC, validated on a model that saw half the texts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpolab.data.formats import DataError
from dpolab.eval.contamination import auroc, check, lowest_mean, read_texts, text_scores
from tests.paths import GSM8K_TRAIN as GSM8K  # noqa: E402


@given(
    st.lists(st.integers(-5, 5), min_size=1, max_size=12),
    st.lists(st.integers(-5, 5), min_size=1, max_size=12),
)
def test_auroc_is_the_share_of_seen_unseen_pairs_ordered_right_ties_half(seen, unseen):
    pairs = [(s > u) + 0.5 * (s == u) for s in seen for u in unseen]
    assert auroc(seen, unseen) == pytest.approx(sum(pairs) / len(pairs))


def test_the_scores_of_one_text():
    values = torch.tensor([-0.1, -5.0, -0.2, -3.0, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8], dtype=torch.float64)
    mean = torch.full_like(values, -2.0)
    std = torch.full_like(values, 0.5)
    scores = text_scores(values, mean, std, k=0.2)
    assert scores["min_k"] == pytest.approx((-5.0 - 3.0) / 2)  # the 2 lowest of 10
    assert scores["min_k_plus_plus"] == pytest.approx(((-5.0 + 2) / 0.5 + (-3.0 + 2) / 0.5) / 2)
    assert scores["loss"] == pytest.approx(float(values.mean()))
    assert lowest_mean(values, 0.01) == -5.0  # at least one token
    # Min-K%++ ranks by the standardised value, not the raw one: a token in a flat distribution is less surprising
    std = torch.tensor([0.5] * 9 + [100.0], dtype=torch.float64)
    values = torch.tensor([-1.0] * 9 + [-50.0], dtype=torch.float64)
    assert text_scores(values, torch.full_like(values, -1.0), std, k=0.1)["min_k_plus_plus"] == pytest.approx(-0.49)


@pytest.fixture(scope="module")
def seen_and_unseen(tmp_path_factory):
    """A tiny model trained 10 epochs on 32 GSM8K questions; the same model before training; both saved."""
    from dpolab.data.tokenizer import train_bpe_tokenizer
    from tests.tiny import tiny_causal_lm

    folder = tmp_path_factory.mktemp("contamination")
    questions = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()[:64]]
    tokenizer = train_bpe_tokenizer(questions, 800)
    model = tiny_causal_lm("llama", len(tokenizer), seed=0, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    for name in ("random", "trained"):
        if name == "trained":
            batch = tokenizer(questions[:32], padding=True, return_tensors="pt")
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
            model.train()
            for _ in range(10):
                model(**batch, labels=labels).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            model.eval()
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    rows = [{"text": q, "label": "seen" if i < 32 else "unseen"} for i, q in enumerate(questions)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.slow
def test_a_model_trained_on_half_the_texts_separates_them_and_a_random_one_does_not(seen_and_unseen, tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, "-m", "dpolab", "eval", "contamination", "--model", str(seen_and_unseen / "trained"),
         "--reference", str(seen_and_unseen / "random"), "--data", str(seen_and_unseen / "data.jsonl"),
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| model | min_k_plus_plus |" in run.stdout and "AUROC of the difference" in run.stdout
    result = json.loads(out.read_text())
    for method in ("min_k", "min_k_plus_plus", "loss"):
        trained = result["models"]["model"]["summary"][method]
        assert trained["auroc_low"] > 0.8 and trained["mean_seen"] > trained["mean_unseen"], method
        random = result["models"]["reference"]["summary"][method]
        assert random["auroc_low"] < 0.5 < random["auroc_high"], method
        # the per-text scores in the file give the AUROC in the summary
        seen = [t[f"model_{method}"] for t in result["per_text"] if t["seen"]]
        unseen = [t[f"model_{method}"] for t in result["per_text"] if not t["seen"]]
        assert trained["auroc"] == pytest.approx(auroc(seen, unseen))
        comparison = result["comparison"][method]
        assert comparison["auroc"] > 0.8 and comparison["low"] <= comparison["mean_difference"] <= comparison["high"]
    assert len(result["per_text"]) == 64 and all(t["tokens"] > 5 for t in result["per_text"])


def test_bad_input_is_one_clear_line(seen_and_unseen, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a b c", "label": "seen"}\n{"text": "d e f", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"data.jsonl: line 2 \(row 1\): 'label' is 'maybe'; use seen/unseen"):
        read_texts(data, ["text"], "label")
    data.write_text('{"text": "a b c", "label": "seen"}\n{"text": "d e f", "label": 1}\n')
    with pytest.raises(DataError, match=r"needs both seen and unseen rows for an AUROC; all are seen"):
        read_texts(data, ["text"], "label")
    data.write_text('{"question": "a b c"}\n{"question": "d"}\n')
    with pytest.raises(
        DataError,
        match=r"line 1 \(row 0\): 'answer' must be a non-empty string \(fields read: \['question', 'answer'\]\)",
    ):
        read_texts(data, ["question", "answer"], "label")
    assert read_texts(data, ["question"], "label") == (["a b c", "d"], None)
    with pytest.raises(ValueError, match=r"--k is a fraction of the tokens, in \(0, 1\]; got 20"):
        check(seen_and_unseen / "trained", data, fields=["question"], k=20)
    with pytest.raises(ValueError, match=r"--max-tokens must be at least 2; got 1"):
        check(seen_and_unseen / "trained", data, fields=["question"], max_tokens=1)
    data.write_text("")
    with pytest.raises(DataError, match="empty"):
        check(seen_and_unseen / "trained", data)
