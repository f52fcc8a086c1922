"""Procedural maths problems are correct and deterministic; corruption changes exactly one result."""

from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rapidfuzz.distance import Levenshtein

from dpolab.data.corrupt import ANNOTATED, corrupt_solution
from dpolab.data.synthetic import final_answer, make_problems, wrong_solution
from tests.paths import DATA as SHARED  # noqa: E402


def test_problems_are_deterministic_and_arithmetically_correct():
    problems = make_problems(200, seed=3)
    assert problems == make_problems(200, seed=3)
    assert problems != make_problems(200, seed=4)
    for problem in problems:
        for match in ANNOTATED.finditer(problem.answer):
            expression = match.group("expr")
            assert re.fullmatch(r"[\d+\-*]+", expression)
            assert eval(expression) == int(match.group("value")) == int(match.group("written"))  # noqa: S307
        assert final_answer(problem.answer) == str(problem.result)
        assert problem.result >= 0


def test_difficulty_parameters_and_errors():
    steps = {p.answer.count("<<") for p in make_problems(50, seed=0, min_steps=4, max_steps=4)}
    assert steps == {4}
    with pytest.raises(ValueError):
        make_problems(3, min_steps=3, max_steps=2)


def numbers(text: str) -> list[str]:
    return re.findall(r"-?\d+(?:\.\d+)?", text)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_corruption_changes_one_intermediate_result_only(problem_seed, corruption_seed):
    (problem,) = make_problems(1, seed=problem_seed, min_steps=2, max_steps=5)
    corruption = corrupt_solution(problem.answer, random.Random(corruption_seed))
    assert corruption is not None and corruption.text != problem.answer
    assert final_answer(corruption.text) == final_answer(problem.answer)  # final="keep"
    assert corruption.step < corruption.results - 1
    changed = [(a, b) for a, b in zip(numbers(problem.answer), numbers(corruption.text), strict=True) if a != b]
    assert changed and {a for a, _ in changed} == {corruption.original_value}
    assert {b for _, b in changed} == {corruption.new_value}
    assert len(changed) == 2  # the annotation's result and the written result of that one step


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_a_chosen_step_changes_that_result(problem_seed, corruption_seed):
    (problem,) = make_problems(1, seed=problem_seed, min_steps=3, max_steps=5)
    results = [m.group("value") for m in ANNOTATED.finditer(problem.answer)]
    early = corrupt_solution(problem.answer, random.Random(corruption_seed), step=0)
    late = corrupt_solution(problem.answer, random.Random(corruption_seed), step=-1)
    assert (early.step, late.step) == (0, len(results) - 2)  # -1: the last result before the final one
    assert (early.original_value, late.original_value) == (results[0], results[-2])
    assert early.text[: problem.answer.index("<<")] == problem.answer[: problem.answer.index("<<")]
    first_line = problem.answer.split("\n")[0]
    assert late.text.startswith(first_line) and not early.text.startswith(first_line)


def test_a_step_that_does_not_exist_gives_no_pair():
    two_steps = make_problems(1, seed=0, min_steps=2, max_steps=2)[0].answer
    assert corrupt_solution(two_steps, random.Random(0), step=1) is None  # one intermediate result only
    assert corrupt_solution(two_steps, random.Random(0), step=-2) is None
    with pytest.raises(ValueError, match="intermediate result"):
        corrupt_solution(two_steps, random.Random(0), final="change", step=0)


def test_change_final_and_nothing_to_corrupt():
    (problem,) = make_problems(1, seed=7)
    changed = corrupt_solution(problem.answer, random.Random(0), final="change")
    assert final_answer(changed.text) == changed.new_value != final_answer(problem.answer)
    assert corrupt_solution("The answer is obvious.\n#### 5", random.Random(0)) is None
    one_step = "2 + 3 = <<2+3=5>>5\n#### 5"
    assert corrupt_solution(one_step, random.Random(0)) is None  # only the final result exists
    with pytest.raises(ValueError, match="final must be 'keep' or 'change'"):
        corrupt_solution(one_step, random.Random(0), final="maybe")


def test_plain_equals_results_are_corrupted_too():
    text = "3/5 x 100 = 60 balls missed.\n2/3 x 75 = 50 balls missed.\n60 + 50 = <<60+50=110>>110\n#### 110"
    corruption = corrupt_solution(text, random.Random(0))
    assert corruption is not None and corruption.original_value in ("60", "50")


def test_real_gsm8k_solutions_are_corruptible_at_low_edit_distance():
    rows = [json.loads(line) for line in (SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    distances = []
    for row in rows:
        corruption = corrupt_solution(row["answer"], rng)
        if corruption is not None:
            distances.append(Levenshtein.normalized_distance(row["answer"], corruption.text))
    assert len(distances) / len(rows) > 0.99  # measured: 7,423 of 7,473
    assert sum(distances) / len(distances) < 0.02  # measured mean normalised character distance 0.0108


def test_cli_corrupt_math_writes_trainable_pairs_and_lists_skips(tmp_path):
    import subprocess
    import sys

    from dpolab.data.check import check_file
    from dpolab.data.formats import load_examples

    source = tmp_path / "solutions.jsonl"
    rows = [p.as_row() for p in make_problems(20, seed=1)] + [{"question": "Q?", "answer": "#### 4"}, {"question": 1}]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "pairs.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "data", "corrupt-math", str(source), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 20 pairs from 22 rows" in result.stdout and "2 rows could not be corrupted" in result.stdout
    assert "line 21 (row 20): no intermediate result to change" in result.stdout
    assert "line 22 (row 21): needs string fields" in result.stdout
    assert check_file(str(out), allow_extra=True).clean
    examples, bad = load_examples(str(out))
    assert len(examples) == 20 and not bad
    late = subprocess.run(
        [sys.executable, "-m", "dpolab", "data", "corrupt-math", str(source), "--out", str(out), "--step", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert late.returncode == 0, late.stderr
    two_step = sum(1 for p in make_problems(20, seed=1) if p.answer.count("<<") == 2)  # no second intermediate result
    assert f"{two_step + 2} rows could not be corrupted" in late.stdout
    assert "no intermediate result number 1 to change" in late.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "dpolab", "data", "corrupt-math", str(source), "--out", str(out), "--step", "0",
         "--final", "change"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "--step picks an intermediate result" in refused.stderr


def test_distinct_and_excluded_problems():
    first = make_problems(300, seed=0, min_steps=1, max_steps=2, max_value=30, distinct=True)
    questions = [p.question for p in first]
    assert len(set(questions)) == 300
    held_out = make_problems(100, seed=1, min_steps=1, max_steps=2, max_value=30, exclude=set(questions))
    assert not {p.question for p in held_out} & set(questions)
    # The space of one-step problems with small numbers is finite: asking for too many fails clearly.
    with pytest.raises(ValueError, match="could only make"):
        make_problems(100_000, seed=0, min_steps=1, max_steps=1, max_value=10, distinct=True)


@given(st.integers(0, 10_000), st.integers(0, 10_000))
@settings(max_examples=150, deadline=None)
def test_wrong_solution_is_wrong_parsable_and_far_from_the_correct_one(problem_seed, rng_seed):
    problem = make_problems(1, seed=problem_seed, min_steps=1, max_steps=4)[0]
    wrong = wrong_solution(problem, random.Random(rng_seed))
    answer = final_answer(wrong)
    assert answer is not None and int(answer) != problem.result and int(answer) >= 0
    for match in ANNOTATED.finditer(wrong):  # its own arithmetic is right; it answers the wrong question
        assert eval(match.group("expr")) == int(match.group("value"))  # noqa: S307
    assert Levenshtein.normalized_distance(problem.answer, wrong) > 0.3


def test_digit_splitting_tokenizer_gives_one_token_per_digit(tmp_path):
    from transformers import AutoTokenizer

    from dpolab.data.tokenizer import train_bpe_tokenizer

    texts = [p.question + "\n" + p.answer for p in make_problems(200, seed=0)]
    plain = train_bpe_tokenizer(texts, 600)
    split = train_bpe_tokenizer(texts, 600, split_digits=True)
    split.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.tokenize("12*34=408") == ["1", "2", "*", "3", "4", "=", "4", "0", "8"]
    assert loaded.decode(loaded("x = 1234 apples")["input_ids"]) == "x = 1234 apples"
    merged = lambda vocab: [t for t in vocab if len(t.lstrip("Ġ")) > 1 and t.lstrip("Ġ").isdigit()]  # noqa: E731
    assert merged(plain.get_vocab()) and not merged(split.get_vocab())  # without the option, digits merge


def test_choice_questions_hold_the_answer_once_among_distinct_wrong_numbers(tmp_path):
    from collections import Counter

    from dpolab.data.choices import Schema, pairs_from_choices
    from dpolab.data.synthetic import choice_question
    from dpolab.eval.tasks import check_file

    problems = make_problems(400, seed=5, min_steps=1, max_steps=3, max_value=100)
    rng = random.Random(1)
    rows = [choice_question(p, rng, number=i) for i, p in enumerate(problems)]
    for problem, row in zip(problems, rows, strict=True):
        texts, labels = row["choices"]["text"], row["choices"]["label"]
        assert len(set(texts)) == 4 and all(t.isdigit() for t in texts)
        assert texts[labels.index(row["answerKey"])] == str(problem.result)
        assert texts.count(str(problem.result)) == 1
    positions = Counter(row["answerKey"] for row in rows)
    assert set(positions) == set("ABCD") and min(positions.values()) > 60  # about 100 each
    pairs, problems_found = pairs_from_choices(rows, Schema("arc"))
    assert not problems_found and len(pairs) == 3 * len(rows)
    assert pairs[0]["prompt"] == rows[0]["question"] + "\nAnswer:" and pairs[0]["chosen"].strip().isdigit()
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert check_file("arc", path) == len(rows)  # the harness task reads them


def test_choice_question_settings_are_checked():
    from dpolab.data.synthetic import choice_question

    (problem,) = make_problems(1, seed=0)
    with pytest.raises(ValueError, match="choices must be between 2 and 8"):
        choice_question(problem, random.Random(0), choices=1)
