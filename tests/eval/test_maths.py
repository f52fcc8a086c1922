"""`dpolab eval`: greedy accuracy counts exactly the generations whose final number matches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpolab.eval.maths import evaluate_file, math_accuracy
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
    with pytest.raises(ValueError, match=r"references without a final answer at rows \[1\]"):
        math_accuracy(model, ["a", "b"], ["#### 3", "no answer here"], max_new_tokens=2, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    with pytest.raises(ValueError, match=r"line 2 \(row 1\).*'answer'"):
        evaluate_file(model, str(bad))
    for limit in (0, -1):  # -1 used to evaluate all but the last problem
        with pytest.raises(ValueError, match=f"--limit must be at least 1; got {limit}"):
            evaluate_file(model, str(bad), limit=limit)


def test_cli_eval_on_gsm8k_rows(model, tmp_path):

    from tests.paths import GSM8K_TRAIN as shared

    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "eval", str(shared), "--model", model, "--limit", "4",
         "--max-new-tokens", "4", "--out", str(tmp_path / "r.json"), "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "greedy accuracy 0.0% (0/4)" in result.stdout  # a random model does not solve GSM8K
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["problems"] == 4 and len(saved["generations"]) == 4


def test_few_shot_prompts_and_generations_cut_at_the_separator(model, tmp_path):
    shots = tmp_path / "shots.jsonl"
    shots.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"s\n#### {i}"}) + "\n" for i in range(4)))
    problems = tmp_path / "problems.jsonl"
    problems.write_text(
        json.dumps({"question": "q1", "answer": "#### 1"})
        + "\n"
        + json.dumps({"question": "new", "answer": "#### 2"})
        + "\n"
    )
    result = evaluate_file(
        model, str(problems), fewshot_data=str(shots), num_fewshot=2, max_new_tokens=4, progress=False
    )
    prompts = [g["prompt"] for g in result["generations"]]
    assert prompts[0] == "q0\ns\n#### 0\n\nq2\ns\n#### 2\n\nq1\n"  # q1's own solution is never a shot
    assert prompts[1] == "q0\ns\n#### 0\n\nq1\ns\n#### 1\n\nnew\n" and result["num_fewshot"] == 2
    with pytest.raises(ValueError, match="needs both --fewshot-data FILE and --num-fewshot K"):
        evaluate_file(model, str(problems), num_fewshot=2)
    with pytest.raises(ValueError, match="4 problems, fewer than --num-fewshot 9"):
        evaluate_file(model, str(problems), fewshot_data=str(shots), num_fewshot=9)
    # The cut: a generation ends at its first occurrence of the stop text.
    free = math_accuracy(model, ["two plus two is"], ["4"], max_new_tokens=12, progress=False)["generations"][0]
    stop = free["generated"][3:5]
    cut = math_accuracy(model, ["two plus two is"], ["4"], max_new_tokens=12, progress=False, stop=stop)
    assert len(stop) == 2 and cut["generations"][0]["generated"] == free["generated"].split(stop, 1)[0]
