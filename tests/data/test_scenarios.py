"""The math judge and the GSM8K four-scenario construction, on fixtures and on the real file."""

from __future__ import annotations

import json
import subprocess
import sys

from dpolab.data.scenarios import gsm8k_scenarios, math_judge
from tests.paths import DATA as SHARED  # noqa: E402


def solution(answer: int, correct: bool) -> dict:
    return {"solution": f"2 + 3 = <<2+3=5>>5\nA: {answer}", "is_correct": correct}


def test_math_judge_reads_both_final_forms():
    assert math_judge("... \nA: 18", "x <<9*2=18>>18\n#### 18") is True
    assert math_judge("#### 1,000", "A: 1000") is True
    assert math_judge("A: 17", "#### 18") is False
    assert math_judge("no number here", "#### 18") is None


def test_scenarios_follow_the_definitions():
    row = {
        "question": "Q?",
        "ground_truth": "ref\nA: 5",
        "6b_finetuning": solution(5, True),
        "6b_verification": solution(4, False),
        "175b_finetuning": solution(6, False),
        "175b_verification": solution(5, True),
    }
    scenarios, counts = gsm8k_scenarios([row])
    assert counts["judge_disagrees_with_is_correct"] == 0
    assert scenarios[1][0]["chosen"].endswith("A: 5") and scenarios[1][0]["rejected"].endswith("A: 4")
    assert scenarios[2][0]["chosen"] == "ref\nA: 5" and scenarios[2][0]["rejected"].endswith("A: 4")
    assert scenarios[3][0]["rejected"].endswith("A: 6") and scenarios[4][0]["chosen"] == "ref\nA: 5"
    no_wrong = {**row, "6b_verification": solution(5, True), "175b_finetuning": solution(5, True)}
    scenarios, _ = gsm8k_scenarios([no_wrong])
    assert all(not pairs for pairs in scenarios.values())


def test_real_model_solutions(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpolab",
            "data",
            "gsm8k-scenarios",
            str(SHARED / "gsm8k" / "model_solutions.jsonl"),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # Measured: the judge agrees with the data set's is_correct on every parsable solution.
    assert "1000 questions, 4000 model solutions judged (10 unparsable, 0 disagree with is_correct)" in result.stdout
    sizes = {n: len((tmp_path / f"scenario{n}.jsonl").read_text().splitlines()) for n in (1, 2, 3, 4)}
    assert sizes == {1: 269, 2: 825, 3: 207, 4: 708}
    first = json.loads((tmp_path / "scenario1.jsonl").read_text().splitlines()[0])
    assert set(first) >= {"prompt", "chosen", "rejected", "source_row", "scenario"}


def test_bad_input_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q", "ground_truth": "#### 1"}) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "data", "gsm8k-scenarios", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"dpolab data: error: {bad}: line 1 (row 0): missing field '6b_finetuning' (model_solutions.jsonl format)"
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{nope\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpolab",
            "data",
            "gsm8k-scenarios",
            str(broken),
            "--out",
            str(tmp_path / "o"),
            "--policy",
            "6b",
            "--other",
            "6b",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "must be different models" in result.stderr
