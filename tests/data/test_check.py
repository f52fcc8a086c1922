"""`dpolab data check` names every bad row; the loaders never crash on malformed rows (hypothesis)."""

from __future__ import annotations

import json
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpolab.data.check import check_file
from dpolab.data.formats import DataError, load_examples
from tests.tiny import tiny_tokenizer

ONE_OF_EACH = [
    b'{"prompt": "Q", "chosen": " a", "rejected": " b"}',  # clean
    b'{"prompt": "Q", "chosen": " a"',  # invalid JSON
    b'{"prompt": "Q", "chosen": " a", "rejected": " b"}',  # duplicate of line 1
    b'{"prompt": "Q", "chosen": " same", "rejected": " same"}',  # identical
    b'{"prompt": "", "chosen": " a", "rejected": " c"}',  # empty prompt
    b'{"prompt": "Q", "chosen": 3, "rejected": " c"}',  # wrong type
    b'{"prompt": "Q", "rejected": " c"}',  # missing field
    b'{"prompt": "Q", "chosen": " x", "rejected": " y", "score": 1}',  # extra field
    b'{"prompt": "Q", "chosen": " x", "rejected": " "}',  # empty completion
    b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',  # not UTF-8
    b'{"prompt": "' + b"Natalia sold clips to 48 of her friends " * 3 + b'", "chosen": " yes", "rejected": " no"}',
]
EXPECTED = {
    2: "invalid JSON",
    3: "duplicate pair",
    4: "chosen identical to rejected",
    5: "empty prompt",
    6: "wrong type",
    7: "missing field",
    8: "extra field",
    9: "empty completion",
    10: "non-UTF-8 text",
    11: "prompt too long",
}


def test_one_bad_row_of_each_kind_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(ONE_OF_EACH) + b"\n")
    report = check_file(str(path), tiny_tokenizer(), max_length=12)
    found = {(p.line, p.kind) for p in report.problems}
    assert found == {(line, kind) for line, kind in EXPECTED.items()}
    assert report.rows == 11 and report.bad_rows() == 10 and not report.clean


def test_cli_exit_codes_and_table(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(ONE_OF_EACH[:4]) + b"\n")
    result = subprocess.run([sys.executable, "-m", "dpolab", "data", "check", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert (
        "line 2 (row 1): invalid JSON" in result.stdout
        and "line 4 (row 3): chosen and rejected are identical" in result.stdout
    )
    assert "4 rows, 3 with problems" in result.stdout
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(ONE_OF_EACH[0] + b"\n")
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "data", "check", str(clean)], capture_output=True, text=True
    )
    assert result.returncode == 0 and "1 rows, 0 with problems" in result.stdout


# Text with lone surrogates (written as JSON escapes such as "\\ud800"), which UTF-8 cannot encode.
texts = st.text(max_size=6) | st.text(st.characters(codec=None, categories=["Cs"]), min_size=1, max_size=2)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
contents = st.text(max_size=5) | json_values  # a message content: text, or null, a number, a list of parts…
rows = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": json_values | st.text(max_size=6),
            "chosen": json_values | st.text(max_size=6),
            "rejected": json_values | st.text(max_size=6),
        },
    ),
    st.fixed_dictionaries(
        {
            "chosen": st.lists(
                st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": contents}),
                max_size=3,
            ),
            "rejected": st.lists(
                st.fixed_dictionaries({"role": st.just("assistant"), "content": contents}), max_size=3
            ),
        },
        optional={
            "prompt": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": contents}), max_size=2)
        },
    ),
)
DEEP = b"[" * 20_000 + b"]" * 20_000  # nested too deeply for the JSON parser's recursion


def _texts(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for message in value:
            assert set(message) >= {"role", "content"}
            assert isinstance(message["role"], str) and isinstance(message["content"], str)
            yield message["role"]
            yield message["content"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(rows, min_size=1, max_size=6),
    st.lists(st.binary(max_size=12) | st.just(DEEP), max_size=2),
)
def test_loaders_never_crash_on_malformed_rows(tmp_path, values, garbage):
    path = tmp_path / "fuzz.jsonl"
    lines = [json.dumps(v).encode() for v in values] + [g.replace(b"\n", b" ") for g in garbage if g.strip()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        load_examples(str(path))
    except DataError:
        pass  # a clear, row-naming error is the only acceptable failure
    examples, bad = load_examples(str(path), on_bad_rows="skip")
    assert len(examples) + len(bad) == sum(1 for line in lines if line.strip())
    for example in examples:  # what is accepted is text a tokenizer can encode: no None, repr or surrogate
        for text in (*_texts(example.prompt), *_texts(example.chosen), *_texts(example.rejected)):
            text.encode("utf-8")
    report = check_file(str(path))
    assert report.rows == len(examples) + len(bad)
