"""Preference formats: explicit, implicit (HH-RLHF) and conversational rows; errors name the row."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpolab.data.formats import DataError, example_from_row, load_examples, read_rows, split_implicit_prompt
from tests.paths import DATA as SHARED  # noqa: E402


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_explicit_prompt_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}])
    (example,), bad = load_examples(path)
    assert bad == []
    assert (example.prompt, example.chosen, example.rejected, example.row) == ("Q?", " yes", " no", 0)


def test_implicit_prompt_is_cut_after_the_last_assistant_marker():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: Sure, here is how."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: Sorry, I can't."
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert prompt.endswith("help me\n\nAssistant:") and c == " Sure, here is how." and r == " Sorry, I can't."


def test_real_hh_rlhf_rows_split_cleanly():
    with pytest.raises(DataError, match=r"bad rows \(set on_bad_rows: skip"):
        load_examples(str(SHARED / "hh-rlhf" / "harmless_base_test_part.jsonl"))
    examples, bad = load_examples(str(SHARED / "hh-rlhf" / "harmless_base_test_part.jsonl"), on_bad_rows="skip")
    assert len(examples) + len(bad) == 1800 and 0 < len(bad) < 20  # real rows with an empty final turn
    assert "line 87 (row 86): empty chosen completion" in bad[0]
    rows = read_rows(str(SHARED / "hh-rlhf" / "harmless_base_test_part.jsonl"))
    ends_with_marker = sum(e.prompt.endswith("Assistant:") for e in examples)
    assert ends_with_marker / len(examples) > 0.95
    for example in examples:
        row = rows[example.row]
        assert example.prompt + example.chosen == row["chosen"]
        assert example.prompt + example.rejected == row["rejected"]


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_implicit_split_never_loses_text(prefix, tail_a, tail_b):
    chosen, rejected = prefix + tail_a, prefix + tail_b
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert prompt + c == chosen and prompt + r == rejected


def test_conversational_rows_with_and_without_prompt():
    user = {"role": "user", "content": "What colour is the sky?"}
    good = {"role": "assistant", "content": "Blue."}
    bad = {"role": "assistant", "content": "Green."}
    implicit = example_from_row({"chosen": [user, good], "rejected": [user, bad]}, 0)
    assert implicit.conversational and implicit.prompt == [user] and implicit.chosen == [good]
    explicit = example_from_row({"prompt": [user], "chosen": [good], "rejected": [bad]}, 1)
    assert explicit.rejected == [bad]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Q", "chosen": "a"}, "row 3: missing field 'rejected' (fields: chosen, prompt)"),
        (
            {"prompt": "Q", "chosen": 5, "rejected": "b"},
            "row 3: field 'chosen' must be a string or a list of messages, got int",
        ),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "row 3: empty prompt"),
        ({"prompt": "Q", "chosen": "a", "rejected": " "}, "row 3: empty rejected completion"),
        ({"prompt": 1, "chosen": "a", "rejected": "b"}, "row 3: field 'prompt' must be a string, got int"),
        ([1, 2], "row 3: expected an object with chosen/rejected, got list"),
    ],
)
def test_bad_rows_name_the_row(row, message):
    with pytest.raises(DataError) as error:
        example_from_row(row, 3, "pairs.jsonl")
    assert f"pairs.jsonl: {message}" == str(error.value)


def test_bad_files(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "Q", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 \(row 1\): invalid JSON"):
        load_examples(str(bad_json))
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes(
        b'{"prompt": "Q", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    )
    examples, bad = load_examples(str(raw), on_bad_rows="skip")
    assert len(examples) == 1 and bad == [f"{raw}: line 2 (row 1): not UTF-8 (at byte offset 15)"]
    same = write_jsonl(
        tmp_path / "same.jsonl",
        [
            {"prompt": "Q", "chosen": "a", "rejected": "a"},
            {"prompt": "Q", "chosen": "a", "rejected": "b"},
            {"prompt": "Q", "chosen": "a", "rejected": "b"},
        ],
    )
    _, bad = load_examples(same, on_bad_rows="skip")
    assert [b.split(": ", 1)[1] for b in bad] == [
        "line 1 (row 0): chosen and rejected are identical",
        "line 3 (row 2): duplicate of row 1",
    ]
    with pytest.raises(DataError, match="no such file: .*missing.jsonl"):
        load_examples(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_examples(str(tmp_path / "x.txt"))
    two_bad = write_jsonl(
        tmp_path / "two.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"chosen": "a"}, {}]
    )
    with pytest.raises(DataError) as error:
        load_examples(two_bad)
    assert "2 bad rows" in str(error.value) and "line 2 (row 1): missing field 'rejected'" in str(error.value)
    examples, bad = load_examples(two_bad, on_bad_rows="skip")
    assert len(examples) == 1 and len(bad) == 2


def test_parquet_and_csv(tmp_path):
    import datasets

    rows = {"prompt": ["Q1", "Q2"], "chosen": [" a", " b"], "rejected": [" c", " d"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_dict(rows).to_csv(str(tmp_path / "p.csv"), index=False)
    for name in ("p.parquet", "p.csv"):
        examples, _ = load_examples(str(tmp_path / name))
        assert [e.chosen for e in examples] == [" a", " b"], name


@pytest.mark.parametrize(
    "row, message",
    [
        ({"answer": "3"}, "needs a non-empty field 'prompt'"),
        ({"prompt": "   "}, "needs a non-empty field 'prompt'"),
        ({"prompt": [{"role": "user"}]}, "prompt"),
        ({"prompt": "say 3 :", "answer": {"value": 3}}, "field 'answer' must be a string or a number, got"),
        ({"prompt": "say 3 :", "answer": True}, "field 'answer' must be a string or a number"),
        (["say 3 :"], "expected an object, got list"),
    ],
)
def test_bad_prompt_rows_are_named(row, message):
    from dpolab.data.formats import DataError, prompt_example_from_row

    with pytest.raises(DataError, match=re.escape(message)) as caught:
        prompt_example_from_row(row, 7, "prompts.jsonl")
    assert str(caught.value).startswith("prompts.jsonl: row 7")


def test_prompt_rows_keep_messages_and_numeric_answers(tmp_path):
    from dpolab.data.formats import load_prompt_examples

    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "say 3 :", "answer": 3},
        {"prompt": [{"role": "user", "content": "hi"}]},
        {"prompt": "say 3 :", "answer": 3},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    examples, bad = load_prompt_examples(str(path), on_bad_rows="skip")
    assert [(e.prompt, e.answer, e.row) for e in examples] == [("say 3 :", "3", 0), (rows[1]["prompt"], None, 1)]
    assert [b.split(": ", 1)[1] for b in bad] == [
        "line 3 (row 2): duplicate of row 0",
        "line 4 (row 3): invalid JSON (Expecting value, column 1)",
    ]
