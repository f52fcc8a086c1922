"""Multiple-choice → pairs, for ARC, HellaSwag and a generic schema; bad rows are named."""

from __future__ import annotations

import json
import subprocess
import sys

from dpolab.data.choices import Schema, pairs_from_choices
from dpolab.data.formats import load_examples

ARC = {
    "question": "Which gas do plants take in?",
    "answerKey": "B",
    "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
}
HELLASWAG = {
    "ctx_a": "A man is mixing flour and water.",
    "ctx_b": "he",
    "label": "2",
    "endings": ["flies away.", "paints a car.", "kneads the dough.", "sings loudly."],
}


def test_arc_gives_three_pairs_per_question():
    pairs, skipped = pairs_from_choices([ARC], Schema("arc"))
    assert skipped == [] and len(pairs) == 3
    assert {p["chosen"] for p in pairs} == {" carbon dioxide"}
    assert {p["rejected"] for p in pairs} == {" oxygen", " helium", " neon"}
    assert pairs[0]["prompt"] == "Which gas do plants take in?\nAnswer:"


def test_hellaswag_and_generic():
    pairs, _ = pairs_from_choices([HELLASWAG], Schema("hellaswag"))
    assert len(pairs) == 3 and pairs[0]["chosen"] == " kneads the dough." and pairs[0]["prompt"].endswith("water. he")
    rows = [{"q": "2+2?", "opts": ["3", "4", "5"], "ans": "4"}, {"q": "1+1?", "opts": ["2", "3"], "ans": 0}]
    pairs, skipped = pairs_from_choices(rows, Schema("generic", "q", "opts", "ans"))
    assert skipped == [] and [p["chosen"] for p in pairs] == [" 4", " 4", " 2"]


def test_bad_rows_are_named():
    rows = [
        {**ARC, "answerKey": "E"},
        {"question": "Q", "choices": {"text": ["a", "b"], "label": ["A"]}, "answerKey": "A"},
        {key: value for key, value in ARC.items() if key != "answerKey"},
        {**HELLASWAG},
    ]
    _, skipped = pairs_from_choices(rows, Schema("arc"), "arc.jsonl")
    assert skipped[0] == "arc.jsonl: row 0: answerKey 'E' is not among the labels ['A', 'B', 'C', 'D']"
    assert skipped[1] == "arc.jsonl: row 1: choices have 2 texts but 1 labels"
    assert skipped[2] == "arc.jsonl: row 2: missing answerKey"
    assert "row 3: 'choices' must be" in skipped[3]
    _, skipped = pairs_from_choices([{**HELLASWAG, "label": 7}], Schema("hellaswag"))
    assert skipped == ["data: row 0: label 7 is out of range for 4 endings"]


def test_cli_writes_trainable_pairs(tmp_path):
    source = tmp_path / "arc.jsonl"
    source.write_text(json.dumps(ARC) + "\n" + json.dumps({**ARC, "answerKey": "Z"}) + "\n{broken\n")
    out = tmp_path / "pairs.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "data", "from-choices", str(source), "--schema", "arc", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 3 pairs from 3 questions" in result.stdout and "line 2 (row 1): answerKey 'Z'" in result.stdout
    assert "line 3 (row 2): invalid JSON" in result.stdout
    examples, bad = load_examples(str(out))
    assert len(examples) == 3 and not bad
