"""The judges: math (math-verify), rules (lines, words, rhyme, keywords; rule files), the LLM judge's
best/worst mode, and the agreement between two judges (Cohen's κ)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpolab.data.answers import answers_match
from dpolab.data.onpolicy import pairs_file
from dpolab.eval.agreement import agreement, cohen_kappa, kappa_interval
from dpolab.eval.judges import LLMJudge, MathJudge, RulesJudge, read_rule_file
from dpolab.pipeline.judge import judge_file
from tests.chat_server import ChatServer


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def dpolab(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpolab", *map(str, args)], capture_output=True, text=True)


# --- math ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "candidate, reference, expected",
    [
        ("so 3 + 5 = 8.\n#### 8", "#### 8", 1.0),
        ("#### 1,200", "1200", 1.0),  # thousands separators
        ("A: $1,200.00", "#### 1200", 1.0),
        ("the area is \\boxed{\\frac{1}{2}}", "0.5", 1.0),  # MATH's boxed LaTeX against a decimal
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),  # symbolic, not textual
        ("so \\boxed{x^2+1}", "1+x^2", 1.0),
        ("#### 72\n\nQ: and then?\n#### 5", "72", 0.0),  # the last marked answer is the answer
        ("#### 9", "#### 8", 0.0),
        ("the answer is 8", "#### 8", 0.0),  # no marked answer: wrong, not guessed from the last number
    ],
)
def test_math_judge_compares_answers_with_math_verify(candidate, reference, expected):
    assert MathJudge().score([("q", candidate, reference)])[0].score == expected


def test_math_judge_records_what_it_cannot_score():
    verdicts = MathJudge().score([("q", "#### 3", "no answer here"), ("q", " ", "#### 3"), ("q", "three", "3")])
    assert verdicts[0].score is None and "the reference has no final answer" in verdicts[0].note
    assert verdicts[1].score is None and verdicts[1].note == "empty generation"
    assert verdicts[2].score == 0.0 and verdicts[2].note == "no final answer (scored as wrong)"


@settings(max_examples=60, deadline=None)
@given(st.integers(-(10**7), 10**7), st.integers(-(10**7), 10**7), st.booleans())
def test_integer_answers_match_exactly_when_equal(first, second, commas):
    shown = f"{first:,}" if commas else str(first)
    assert answers_match(f"steps\n#### {shown}", f"#### {second}") is (first == second)


# --- rules -----------------------------------------------------------------------------------------

POEM = "The cat sat down upon the mat\nIt watched the sun go down\nAnd thought of this and then of that\nAnd of the sleeping town"


def test_rules_each_pass_or_fail_with_details():
    judge = RulesJudge(
        [
            {"type": "lines", "min": 4, "max": 4},
            {"type": "words_per_line", "min": 5, "max": 8},
            {"type": "rhyme", "pairs": [[1, 3], [2, 4]]},
            {"type": "keywords", "words": ["cat", "Sun"]},
            {"type": "keywords", "words": ["dog"], "mode": "none"},
            {"type": "words", "max": 20},
        ]
    )
    verdict = judge.score([("a poem", POEM, None)])[0]
    assert verdict.details == {
        "lines": True, "words_per_line": True, "rhyme": True, "keywords": True, "keywords#2": True, "words": False,
    }  # fmt: skip
    assert verdict.score == pytest.approx(5 / 6) and verdict.note == "failed words: 26 words"
    broken = POEM.replace("town", "city").replace("The cat", "A dog")
    verdict = judge.score([("a poem", broken, None)])[0]
    assert not verdict.details["rhyme"] and not verdict.details["keywords"] and not verdict.details["keywords#2"]
    assert "lines 2 and 4: 'down' and 'city' do not rhyme" in verdict.note


def test_rhyme_names_a_word_missing_from_the_dictionary_and_a_missing_line():
    judge = RulesJudge([{"type": "rhyme", "pairs": [[1, 2]]}])
    assert "no pronunciation for 'zzyzzx'" in judge.score([("p", "a cat\nzzyzzx", None)])[0].note
    assert "the text has 1 lines" in judge.score([("p", "only one line", None)])[0].note
    assert judge.score([("p", "the light\ninto the night", None)])[0].score == 1.0


def test_a_rule_file_per_data_set_and_per_prompt(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - {type: lines, min: 4, max: 4}\nprompts:\n  1:  # the slogan\n    - {type: words, max: 6}\n"
        "    - {type: keywords, words: [fast], mode: any}\n"
    )
    rows = [
        {"prompt_id": 0, "prompt": "a poem", "candidates": [POEM, "one line"]},
        {"prompt_id": 1, "prompt": "a slogan", "candidates": ["Fast and fresh", "slow and very very very stale bread"]},
    ]
    judge_file(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "j.jsonl", RulesJudge(read_rule_file(rules)))
    poem, slogan = read_jsonl(tmp_path / "j.jsonl")
    assert poem["scores"] == [1.0, 0.0] and poem["details"] == [{"lines": True}, {"lines": False}]
    assert slogan["scores"] == [1.0, 0.0] and slogan["details"][1] == {"words": False, "keywords": False}
    pairs_file(tmp_path / "j.jsonl", tmp_path / "pairs.jsonl")
    assert [p["chosen"] for p in read_jsonl(tmp_path / "pairs.jsonl")] == [POEM, "Fast and fresh"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("- {type: syllables, max: 5}", "rules.yaml: rules[0].type: unknown rule 'syllables' (the rules: regex,"),
        ("- {type: lines}", "rules.yaml: rules[0]: needs min and/or max"),
        ("- {type: lines, max: 4, maximum: 5}", "rules.yaml: rules[0].maximum: not a setting of a lines rule"),
        ("- {type: rhyme, pairs: [2, 4]}", "rules.yaml: rules[0].pairs: expected a list of [i, j] line numbers"),
        ("- {type: keywords, words: [a], mode: most}", "rules.yaml: rules[0].mode: one of all, any, none"),
        ("prompts: {p1: [{type: regex}]}", "rules.yaml: prompts.p1[0].pattern: required by a regex rule"),
        ("rule: []", "rules.yaml: 'rule' is not a key of a rule file (keys: rules, prompts)"),
        ("rules: [", "rules.yaml: invalid YAML"),
    ],
)
def test_a_bad_rule_file_is_refused_naming_the_rule(tmp_path, content, message):
    (tmp_path / "rules.yaml").write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_rule_file(tmp_path / "rules.yaml")


def test_the_judge_command_with_rules_refuses_a_bad_file_and_an_absent_prompt(tmp_path):
    samples = write_jsonl(tmp_path / "c.jsonl", [{"prompt_id": 0, "prompt": "p", "candidates": ["a\nb", "c"]}])
    (tmp_path / "bad.json").write_text('[{"type": "syllables"}]')
    run = dpolab(
        "data", "judge", samples, "--judge", "rules", "--rules", tmp_path / "bad.json", "--out", tmp_path / "o"
    )
    assert run.returncode != 0 and "unknown rule 'syllables'" in run.stderr and not (tmp_path / "o").exists()
    (tmp_path / "other.json").write_text('{"prompts": {"7": [{"type": "lines", "min": 2}]}}')
    run = dpolab(
        "data", "judge", samples, "--judge", "rules", "--rules", tmp_path / "other.json", "--out", tmp_path / "o"
    )
    assert run.returncode != 0 and "names prompt_id '7', which is not in" in run.stderr
    run = dpolab("data", "judge", samples, "--judge", "math", "--rules", tmp_path / "bad.json", "--out", tmp_path / "o")
    assert run.returncode != 0 and "--rules is read by --judge rules only" in run.stderr
    run = dpolab("data", "judge", samples, "--judge", "rules", "--out", tmp_path / "o")
    assert run.returncode != 0 and "--judge rules needs --rules FILE" in run.stderr
    run = dpolab("data", "judge", samples, "--judge", "math", "--llm-mode", "best_worst", "--out", tmp_path / "o")
    assert run.returncode != 0 and "--llm-mode is read by --judge llm only" in run.stderr
    (tmp_path / "good.json").write_text('[{"type": "lines", "min": 2}]')
    run = dpolab(
        "data", "judge", samples, "--judge", "rules", "--rules", tmp_path / "good.json", "--out", tmp_path / "o"
    )
    assert run.returncode == 0, run.stderr
    assert read_jsonl(tmp_path / "o")[0]["scores"] == [1.0, 0.0]


# --- the LLM judge ranking a prompt's candidates (3D paper App. C) ----------------------------------


def ranker(message: str) -> str:
    """Best: the candidate with '#### 4'; worst: the one with 'gibberish'; reads the numbered candidates."""
    numbered = re.findall(r"Candidate (\d+):\n(.*?)\n(?=\nCandidate|\Z)", message + "\n", re.S)
    best = next(n for n, text in numbered if "#### 4" in text)
    worst = next(n for n, text in numbered if "gibberish" in text)
    return f"Candidate {best} is right.\nBest: {best}\nWorst: {worst}"


def test_best_worst_mode_shows_all_candidates_and_pairs_best_against_worst(tmp_path):
    rows = [
        {"prompt_id": 0, "prompt": "two plus two?", "reference": "#### 4",
         "candidates": ["gibberish", "", "#### 5", "2 + 2 = 4\n#### 4"]},
        {"prompt_id": 1, "prompt": "two plus two?", "candidates": ["#### 4", ""]},
    ]  # fmt: skip
    server = ChatServer(reply=ranker)
    try:
        judge = LLMJudge(server.url, "judge-model", mode="best_worst", concurrency=1)
        result = judge_file(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "j.jsonl", judge)
    finally:
        server.close()
    first, second = read_jsonl(tmp_path / "j.jsonl")
    assert first["scores"] == [0.0, None, 0.5, 1.0] and first["notes"][1] == "empty generation"
    assert second["scores"] == [None, None] and "fewer than two" in second["notes"][0]
    assert len(server.requests) == 1 and result["unscored"] == 3  # one request per prompt with two or more
    shown = server.requests[0]["messages"][1]["content"]
    assert "Candidate 3:\n2 + 2 = 4\n#### 4" in shown and "Reference answer:\n#### 4" in shown
    assert first["judge"]["mode"] == "best_worst"
    pairs_file(tmp_path / "j.jsonl", tmp_path / "pairs.jsonl")
    (pair,) = read_jsonl(tmp_path / "pairs.jsonl")
    assert (pair["chosen"], pair["rejected"]) == ("2 + 2 = 4\n#### 4", "gibberish")


@pytest.mark.parametrize("reply", ["Best: 2\nWorst: 2", "Best: 9\nWorst: 1", "They are all fine."])
def test_an_unusable_ranking_scores_nothing_and_says_why(tmp_path, reply):
    rows = [{"prompt_id": 0, "prompt": "q", "candidates": ["#### 4", "#### 5", "gibberish"]}]
    server = ChatServer(reply=lambda message: reply)
    try:
        judge = LLMJudge(server.url, "judge-model", mode="best_worst")
        judge_file(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "j.jsonl", judge)
    finally:
        server.close()
    (row,) = read_jsonl(tmp_path / "j.jsonl")
    assert row["scores"] == [None, None, None] and row["notes"][0].startswith("unparsable judge reply (need Best")


# --- agreement -------------------------------------------------------------------------------------


def test_cohen_kappa_on_a_textbook_table():
    # 50 items: both yes 20, A yes B no 5, A no B yes 10, both no 15. p_o = 0.7, p_e = 0.5, κ = 0.4.
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(first, first) == 1.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=2, max_size=40))
def test_kappa_is_symmetric_and_blind_to_renaming(pairs):
    first, second = [a for a, _ in pairs], [b for _, b in pairs]
    kappa = cohen_kappa(first, second)
    renamed = {1: "d", 2: "c", 3: "b", 4: "a"}
    if kappa == kappa:  # not nan
        assert cohen_kappa(second, first) == pytest.approx(kappa)
        assert cohen_kappa([renamed[a] for a in first], [renamed[b] for b in second]) == pytest.approx(kappa)
        assert -1.0 <= kappa <= 1.0


def judged(path, scores_per_prompt, candidates=None):
    rows = []
    for number, scores in enumerate(scores_per_prompt):
        texts = candidates[number] if candidates else [f"c{number}-{i}" for i in range(len(scores))]
        rows.append({"prompt_id": number, "prompt": "q", "candidates": texts, "scores": scores})
    return write_jsonl(path, rows)


def test_agreement_between_two_judge_outputs(tmp_path):
    grades = judged(tmp_path / "llm.jsonl", [[5, 2, None], [4, 1, 3], [5, 5, 1]])
    math = judged(tmp_path / "math.jsonl", [[1, 0, 0], [1, 1, 0], [1, 0, 0]])
    result = agreement(grades, math, threshold_first=4)  # "correct" = a grade of 4 or 5
    assert result["candidates"] == 8 and result["unscored"] == 1 and result["labels"] == [0, 1]
    assert result["confusion"] == [[3, 1], [1, 3]]  # rows: the llm judge; columns: math
    assert result["kappa"] == pytest.approx(0.5) and result["observed_agreement"] == pytest.approx(0.75)
    low, high = result["kappa_interval"]
    assert low <= result["kappa"] <= high
    run = dpolab("data", "agreement", grades, math, "--threshold-first", 4, "--out", tmp_path / "a.json")
    assert run.returncode == 0, run.stderr
    assert "| 1 | 1 | 3 |" in run.stdout and "Cohen's κ = 0.500" in run.stdout
    assert json.loads((tmp_path / "a.json").read_text())["confusion"] == [[3, 1], [1, 3]]


def test_the_kappa_interval_equals_resampling_prompts_one_by_one():
    import numpy as np

    first = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    second = [1, 0, 0, 1, 0, 1, 1, 0, 0, 1]
    groups = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    draws = np.random.default_rng(7).integers(0, 5, size=(40, 5))
    naive = []
    for draw in draws:  # the same draws, each resample's κ computed from its items
        picked = [i for prompt in draw for i, g in enumerate(groups) if g == prompt]
        kappa = cohen_kappa([first[i] for i in picked], [second[i] for i in picked])
        if kappa == kappa:
            naive.append(kappa)
    expected = (np.quantile(naive, 0.025), np.quantile(naive, 0.975))
    assert kappa_interval(first, second, groups, resamples=40, seed=7) == pytest.approx(expected)


def test_agreement_refuses_judgements_of_different_candidates(tmp_path):
    first = judged(tmp_path / "a.jsonl", [[1, 0]], [["x", "y"]])
    second = judged(tmp_path / "b.jsonl", [[1, 0]], [["y", "x"]])
    run = dpolab("data", "agreement", first, second)
    assert run.returncode != 0 and "prompt_id 0: the two files judge different candidates" in run.stderr
    other = write_jsonl(tmp_path / "c.jsonl", [{"prompt_id": 9, "prompt": "q", "candidates": ["x"], "scores": [1]}])
    run = dpolab("data", "agreement", first, other)
    assert run.returncode != 0 and "share no prompt_id" in run.stderr
