"""`dpolab eval`: greedy accuracy counts exactly the generations whose final number matches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpolab.evaluate import evaluate_file, math_accuracy
from tests.tiny import save_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("eval") / "llama", seed=2)


def test_accuracy_agrees_with_the_generations_it_reports(model):
    from dpolab.data.synthetic import final_answer

    prompts = ["two plus two is", "The answer is", "three times three"]
    # The random model's greedy text is what it is; make one reference match it and two not.
    first = math_accuracy(model, prompts, ["1", "2", "3"], max_new_tokens=8, progress=False)
    generated = [g["generated"] for g in first["generations"]]
    references = [final_answer(g) or "999" for g in generated]
    second = math_accuracy(model, prompts, references, max_new_tokens=8, progress=False)
    expected = sum(final_answer(g) is not None for g in generated)
    assert second["correct"] == expected and second["accuracy"] == expected / 3
    assert [g["correct"] for g in second["generations"]] == [final_answer(g) is not None for g in generated]
    assert first["no_final_answer"] == sum(final_answer(g) is None for g in generated)


def test_references_without_a_number_and_bad_rows_are_named(model, tmp_path):
    with pytest.raises(ValueError, match=r"references without a final number at rows \[1\]"):
        math_accuracy(model, ["a", "b"], ["#### 3", "no number"], max_new_tokens=2, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    with pytest.raises(ValueError, match=r"line 2 \(row 1\).*'answer'"):
        evaluate_file(model, str(bad))
    for limit in (0, -1):  # -1 used to evaluate all but the last problem
        with pytest.raises(ValueError, match=f"--limit must be at least 1; got {limit}"):
            evaluate_file(model, str(bad), limit=limit)


def test_cli_eval_on_gsm8k_rows(model, tmp_path):
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "eval", str(shared), "--model", model, "--limit", "4",
         "--max-new-tokens", "4", "--out", str(tmp_path / "r.json"), "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "greedy accuracy 0.0% (0/4)" in result.stdout  # a random model does not solve GSM8K
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["problems"] == 4 and len(saved["generations"]) == 4
