"""corrupt-math is exact: rejected differs from chosen in one number, changed whole and in each copy's format.

The checker below splits a text into numbers and the text between them with its own number grammar (not the
builder's): a sign, ``$``, digits with or without thousands separators, decimals, ``%``. A pair is right when
the text between numbers is identical, and the numbers that differ are copies of one number (an annotation's
value and the result written after it, plus the final line with ``final="change"``) that all had one old value
and all have one new value, each written the way the old one was.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from decimal import Decimal

import pytest

from dpolab.data.corrupt import corrupt_file, corrupt_solution
from tests.paths import GSM8K_TRAIN

# A leading "-" is a sign only where it cannot be a minus between two operands ("10-5" is 10, "-", 5).
NUMBER = r"(?:(?<![\w)\]])-)?\$?-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))(?:\.\d+)?%?"
SPLIT = re.compile(f"({NUMBER})")


def value(token: str) -> Decimal:
    return Decimal(re.sub(r"[$,%]", "", token))


def decimals(token: str) -> int:
    return len(token.rstrip("%").partition(".")[2])


def same_format(old: str, new: str, final_line: bool = False) -> bool:
    """``new`` is written the way ``old`` is. A final line may show more decimals than it had ("#### 144" for
    a result 144.00 that became 143.50)."""
    if ("$" in old, old.endswith("%")) != ("$" in new, new.endswith("%")):
        return False
    if decimals(new) != decimals(old) and not (final_line and decimals(new) > decimals(old)):
        return False
    if ("," in new) != ("," in old and abs(value(new)) >= 1000):
        return False
    no_zero = lambda token: bool(re.match(r"-?\$?-?\.", token))  # noqa: E731  ".4" rather than "0.4"
    return no_zero(new) == (no_zero(old) and abs(value(new)) < 1)


def problem(chosen: str, rejected: str, final: str = "keep") -> str | None:
    """Why rejected does not differ from chosen in exactly one number; None when it does."""
    before, after = SPLIT.split(chosen), SPLIT.split(rejected)  # text, number, text, …, text
    if len(before) != len(after):
        return f"{len(before) // 2} numbers became {len(after) // 2}"
    if before[0::2] != after[0::2]:
        return "text between the numbers changed"
    changed = [i for i in range(1, len(before), 2) if before[i] != after[i]]
    if not changed:
        return "nothing changed"
    old, new = {value(before[i]) for i in changed}, {value(after[i]) for i in changed}
    if len(old) != 1 or len(new) != 1:
        return f"more than one number changed: {[(before[i], after[i]) for i in changed]}"
    if old == new:
        return f"a number was rewritten without changing: {before[changed[0]]} -> {after[changed[0]]}"
    if min(old) >= 0 > min(new):
        return f"a non-negative result became negative: {before[changed[0]]} -> {after[changed[0]]}"
    step = changed
    if final == "change":
        if changed[-1] != len(before) - 2 or not re.search(r"(####|A:)\s*$", before[-3]):
            return "the final answer did not change with the last result"
        step = changed[:-1]
    if not before[step[0] - 1].rstrip().endswith("="):
        return f"{before[step[0]]} is not a result (no '=' before it)"
    if not (len(step) == 1 or (len(step) == 2 and step[1] == step[0] + 2 and before[step[0] + 1] == ">>")):
        return f"the changed copies are not one step: {[before[i] for i in step]}"
    for i in changed:
        if not same_format(before[i], after[i], final_line=i == len(before) - 2 and final == "change"):
            return f"{before[i]} was rewritten as {after[i]}"
    return None


def provenance_problem(pair: dict) -> str | None:
    """Why the pair's ``original_value`` / ``new_value`` are not the number that changed; None when they are."""
    for old, new in zip(SPLIT.split(pair["chosen"])[1::2], SPLIT.split(pair["rejected"])[1::2], strict=True):
        if old != new:
            if (value(old), value(new)) != (value(pair["original_value"]), value(pair["new_value"])):
                return f"provenance says {pair['original_value']} -> {pair['new_value']}, the text {old} -> {new}"
            return None
    return None


def gsm8k_rows() -> list[dict]:
    return [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines()]


@pytest.mark.parametrize("final", ["keep", "change"])
def test_every_gsm8k_train_pair_differs_in_exactly_one_number(tmp_path, final):
    out = tmp_path / "pairs.jsonl"
    result = corrupt_file(str(GSM8K_TRAIN), str(out), final=final)
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    wrong = [
        (pair["source_row"], why)
        for pair in pairs
        if (why := problem(pair["chosen"], pair["rejected"], final) or provenance_problem(pair))
    ]
    assert not wrong, f"{len(wrong)} wrong pairs, e.g. {wrong[:5]}"

    rows = gsm8k_rows()
    assert result["rows"] == len(rows) and result["pairs"] == len(pairs)
    # Every row is either a pair or a listed skip, and the counts by reason are the listed skips by reason.
    skipped_rows = [int(re.search(r"\(row (\d+)\): ", message).group(1)) for message in result["skipped"]]
    assert sorted(skipped_rows + [pair["source_row"] for pair in pairs]) == list(range(len(rows)))
    by_reason = result["skipped_by_reason"]
    listed = Counter(next(r for r in by_reason if f"): {r}" in message) for message in result["skipped"])
    assert listed == Counter(by_reason) and sum(by_reason.values()) == len(rows) - len(pairs)
    # The reasons hold, found without the builder: a row has an annotation written as another number (or none)
    # exactly when it is skipped for that; a row without an intermediate result has fewer than two annotations.
    disagreeing = set()
    for number, row in enumerate(rows):
        for annotated, written in re.findall(rf"<<[^<>=]*=([^<>]*)>>({NUMBER})?", row["answer"]):
            if not written or value(annotated) != value(written):
                disagreeing.add(number)
    reason_of = dict(zip(skipped_rows, (m.split("): ", 1)[1] for m in result["skipped"]), strict=True))
    mismatch = {n for n, message in reason_of.items() if message.startswith("an annotation's value is not")}
    assert mismatch == disagreeing
    for number, message in reason_of.items():
        if message.startswith("no intermediate result") or message.startswith("no result"):
            assert rows[number]["answer"].count("<<") < (2 if final == "keep" else 1), number
    # A builder that skipped every hard row would pass the checks above: most rows must give a pair.
    assert len(pairs) > 0.98 * len(rows)


def test_each_number_shape_changes_whole_in_each_copys_format():
    cases = {
        "separators": "They sell 22500*20 = <<22500*20=450000>>450,000 cups.\nThen <<450000/2=225000>>225000\n#### 225000",
        "millions": "<<420000000*.6=252000000>>252,000,000 left\n<<252000000/2=126000000>>126000000\n#### 126000000",
        "currency, separators, decimals": (
            "Total: $<<600+250+150+150=1150.00>>1,150.00.\nTwice: <<1150*2=2300>>2300\n#### 2300"
        ),
        "decimals": "Each is <<1.20*4=4.80>>4.80.\nThen <<4.80*5=24>>24\n#### 24",
        "percent": "So <<100-50=50>>50% is left.\nThen <<50*2=100>>100\n#### 100",
        "negative": "It is <<-20+10=-10>>-10 degrees.\nThen <<-10+5=-5>>-5\n#### -5",
        "no leading zero": "salt: <<2*20*.01=.4>>.4 liters\nml: <<.4*1000=400>>400 ml\n#### 400",
        "the result also in the expression": "<<24*1=24>>24 each\n<<24+24=48>>48\n#### 48",
        "plain, currency and separators": "She pays 30,000*.10 = $3,000.00 now.\nThen 3000+4500 = <<3000+4500=7500>>7500\n#### 7500",
        "plain, separators": "Then 1000 * 20 = 20,000 cups.\nSo <<20000/4=5000>>5000\n#### 5000",
        "plain, sign after currency": "The balance is 5 - 10 = $-5 now.\nSo <<5+5=10>>10\n#### 10",
        "plain, percent": "Left: 100% - 40% = 60% of it.\nSo <<60*2=120>>120\n#### 120",
    }
    wrong = []
    for shape, solution in cases.items():
        for seed in range(20):
            corruption = corrupt_solution(solution, random.Random(seed), step=0)
            why = "no pair" if corruption is None else problem(solution, corruption.text)
            if why:
                wrong.append((shape, seed, why))
    assert not wrong, wrong[:10]


def test_the_new_value_is_written_in_each_copys_own_format():
    # Spelled out for one draw: the annotation in its plain format, the text with its separators.
    solution = "They sell 22500*20 = <<22500*20=450000>>450,000 cups.\nThen <<450000/2=225000>>225000\n#### 225000"
    corruption = corrupt_solution(solution, random.Random(0), step=0)
    new = int(corruption.new_value)
    assert corruption.original_value == "450000" and new != 450000
    assert corruption.text == solution.replace("=450000>>450,000", f"={new}>>{new:,}", 1)
    solution = "Total: $<<600+250+150+150=1150.00>>1,150.00.\nTwice: <<1150*2=2300>>2300\n#### 2300"
    corruption = corrupt_solution(solution, random.Random(0), step=0)
    new = Decimal(corruption.new_value)
    assert corruption.original_value == "1150.00" and corruption.new_value == f"{new:.2f}"
    assert corruption.text == solution.replace("=1150.00>>1,150.00", f"={new:.2f}>>{new:,.2f}")


def test_non_negative_results_stay_non_negative_and_keep_their_decimals():
    for solution in (
        "A: <<1-.8=.2>>.2 left\nB: <<.2*5=1>>1\n#### 1",
        "A: <<2*0.15=0.30>>0.30 left\nB: <<0.3*10=3>>3\n#### 3",
    ):
        for seed in range(40):
            corruption = corrupt_solution(solution, random.Random(seed), step=0)
            assert corruption is not None and Decimal(corruption.new_value) >= 0, (solution, seed, corruption)
            assert decimals(corruption.new_value) == decimals(corruption.original_value)
            assert problem(solution, corruption.text) is None


def test_only_whole_results_are_plain_results():
    # An operand, a fraction, a clock time and a space-grouped number follow "=" but are not the step's result.
    solution = (
        "Oranges = 12 * 150 = <<12*150=1800>>1800\nHalf is 1 - 1/2 = 1/2 of them.\nIt is 10:00+2:00 = 12:00 now.\n"
        "They weigh 3 * 1000 = 3 000 grams.\nSo <<1800*2=3600>>3600\n#### 3600"
    )
    for seed in range(20):
        corruption = corrupt_solution(solution, random.Random(seed))
        assert corruption.results == 2 and corruption.original_value == "1800", (seed, corruption)
        assert problem(solution, corruption.text) is None


def test_final_change_writes_the_final_line_in_its_own_format_or_skips():
    solution = "A: <<2*3=6>>6\nB: <<1000*1.15=1150.00>>1,150.00\n#### 1,150"
    for seed in range(20):
        corruption = corrupt_solution(solution, random.Random(seed), final="change")
        assert corruption.step == 1 and problem(solution, corruption.text, final="change") is None, (seed, corruption)
        assert corruption.text.endswith(f"#### {Decimal(corruption.new_value).normalize():,f}")
    # The final answer is not the last result (a share written as a percentage): changing both would change two
    # numbers, so there is no pair.
    assert corrupt_solution("A: <<1/4=0.25>>0.25\nB: <<.25*2=.5>>.5\n#### 50", random.Random(0), final="change") is None


def test_skipped_rows_are_counted_by_reason(tmp_path):
    source = tmp_path / "solutions.jsonl"
    rows = [
        {"question": "Q1?", "answer": "A <<2*3=6>>6\nB <<6*2=12>>12\n#### 12"},
        {"question": "Q2?", "answer": "A <<2*3=6>>7\nB <<7*2=14>>14\n#### 14"},  # 6 written as 7
        {"question": "Q3?", "answer": "A <<2*3=6>> six\nB <<6*2=12>>12\n#### 12"},  # 6 not written at all
        {"question": "Q4?", "answer": "<<2+3=5>>5\n#### 5"},
        {"question": 4},
    ]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{not json\n")
    result = corrupt_file(str(source), str(tmp_path / "pairs.jsonl"))
    assert result["pairs"] == 1 and len(result["skipped"]) == 5
    assert result["skipped_by_reason"] == {
        "an annotation's value is not the number written after it": 2,
        "no intermediate result to change": 1,
        "needs string fields 'question' and 'answer'": 1,
        "invalid JSON": 1,
    }
    assert (
        "(row 1): an annotation's value is not the number written after it: <<2*3=6>> is followed by '7"
        in (result["skipped"][0])
    )
