"""Issue 13's adversarial data cases: each is refused with one line naming the file, line or row and key
(exit 2 for a usage error), or counted as a bad row by `dpolab data check`; never a traceback."""

from __future__ import annotations

import json
import re
import time

import pytest

from dpolab.cli import main
from dpolab.data.formats import DataError, load_examples, load_sft_examples
from tests.data.test_onpolicy import ChatServer
from tests.tiny import save_tiny_model

USER = {"role": "user", "content": "What colour is the sky?"}
GOOD = {"role": "assistant", "content": "Blue."}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def cli(capsys, *args):
    """``dpolab data ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main(["data", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def error_line(err: str) -> str:
    """The one ``dpolab data: error:`` line of stderr (there must be exactly one, and it must be one line)."""
    lines = [line for line in err.splitlines() if line.startswith("dpolab data: error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- 1. conversational rows: message contents are strings; identical message lists are refused ---------------


@pytest.mark.parametrize(
    "content, got",
    [(123, "int"), (None, "null"), ({"text": "Blue."}, "dict"), ([{"type": "text", "text": "Blue."}], "list")],
)
def test_a_message_content_that_is_not_a_string_is_a_named_bad_row(tmp_path, capsys, content, got):
    rows = [
        {"chosen": [USER, GOOD], "rejected": [USER, {"role": "assistant", "content": "Green."}]},
        {"chosen": [USER, {"role": "assistant", "content": content}], "rejected": [USER, GOOD]},
        {"prompt": [{"role": "user", "content": content}], "chosen": [GOOD], "rejected": [USER]},
    ]
    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    code, out, _ = cli(capsys, "check", path)
    assert code == 1
    assert f"line 2 (row 1): chosen[1].content must be a string, got {got}" in out
    assert f"line 3 (row 2): prompt[0].content must be a string, got {got}" in out
    assert "3 rows, 2 with problems" in out
    with pytest.raises(DataError, match=rf"line 2 \(row 1\): chosen\[1\].content must be a string, got {got}"):
        load_examples(path)  # what `dpolab train` reads: the same validator
    examples, bad = load_examples(path, on_bad_rows="skip")
    assert len(examples) == 1 and len(bad) == 2
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [USER, {"role": "assistant", "content": content}]}])
    with pytest.raises(DataError, match=rf"row 0\): messages\[1\].content must be a string, got {got}"):
        load_sft_examples(sft)


def test_identical_chosen_and_rejected_message_lists_are_refused_like_identical_strings(tmp_path, capsys):
    rows = [
        {"chosen": [USER, GOOD], "rejected": [USER, GOOD]},  # implicit prompt
        {"prompt": [USER], "chosen": [GOOD], "rejected": [GOOD]},  # explicit prompt
        {"prompt": "Q", "chosen": " a", "rejected": " a"},  # strings, as before
    ]
    code, out, _ = cli(capsys, "check", write_jsonl(tmp_path / "same.jsonl", rows))
    assert code == 1
    for line in (1, 2, 3):
        assert f"line {line} (row {line - 1}): chosen and rejected are identical" in out
    assert re.search(r"chosen identical to rejected\s*│\s*3 │", out)


# --- 2. data pairs / scenario: scores are finite numbers --------------------------------------------------------


@pytest.mark.parametrize(
    "score, message",
    [
        ('"5"', "scores[0] must be a number or null, got str '5' (write numbers, not strings"),
        ("NaN", "scores[0] must be a finite number or null, got nan"),
        ("Infinity", "scores[0] must be a finite number or null, got inf"),
        ("true", "scores[0] must be a number or null, got bool True"),
        ('{"v": 5}', "scores[0] must be a number or null, got dict"),
    ],
)
def test_pairs_refuse_scores_that_are_not_finite_numbers(tmp_path, capsys, score, message):
    good = '{"prompt_id": 0, "prompt": "p", "candidates": ["a", "b"], "scores": [1.0, 0.0]}\n'
    bad = '{"prompt_id": 1, "prompt": "p", "candidates": ["a", "b"], "scores": [' + score + ', "1"]}\n'
    (tmp_path / "j.jsonl").write_text(good + bad)
    code, _, err = cli(capsys, "pairs", tmp_path / "j.jsonl", "--out", tmp_path / "pairs.jsonl")
    assert code == 2
    assert f"j.jsonl: line 2 (row 1): {message}" in error_line(err)
    assert not (tmp_path / "pairs.jsonl").exists()
    code, _, err = cli(capsys, "scenario", "--policy", tmp_path / "j.jsonl", "--other", tmp_path / "j.jsonl",
                       "--out", tmp_path / "scen")  # fmt: skip
    assert code == 2 and f"line 2 (row 1): {message}" in error_line(err)


def test_string_scores_are_never_compared_as_text(tmp_path, capsys):
    """ "10" < "9" as text: a numeric string would pick the wrong best candidate, so it is refused."""
    row = {"prompt_id": 0, "prompt": "p", "candidates": ["ten", "nine"], "scores": ["10", "9"]}
    code, _, err = cli(capsys, "pairs", write_jsonl(tmp_path / "j.jsonl", [row]), "--out", tmp_path / "p.jsonl")
    assert code == 2 and "scores[0] must be a number or null, got str '10'" in error_line(err)
    row["scores"] = [10, 9]
    code, out, _ = cli(capsys, "pairs", write_jsonl(tmp_path / "j.jsonl", [row]), "--out", tmp_path / "p.jsonl")
    assert code == 0 and json.loads((tmp_path / "p.jsonl").read_text())["chosen"] == "ten"


def test_a_good_score_that_is_not_finite_is_refused(tmp_path, capsys):
    judged = write_jsonl(tmp_path / "j.jsonl", [{"prompt_id": 0, "prompt": "p", "candidates": ["a"], "scores": [1]}])
    code, _, err = cli(capsys, "scenario", "--policy", judged, "--other", judged, "--out", tmp_path / "s",
                       "--good-score", "nan")  # fmt: skip
    assert code == 2 and "--good-score must be a finite number; got nan" in error_line(err)


# --- 3. data sample: a changed prompts file is refused on resume --------------------------------------------

PROMPTS = [{"question": f"What is {a} plus {a}?", "answer": f"#### {2 * a}"} for a in range(5)]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("policy") / "llama", seed=1)


def test_sample_refuses_to_resume_from_a_changed_prompts_file(policy, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"

    def sample(out, rows=PROMPTS):
        write_jsonl(prompts, rows)
        return cli(capsys, "sample", prompts, "--model", policy, "--out", out, "--n", "2", "--max-new-tokens", "4",
                   "--batch-size", "2", "--prompt-field", "question", "--reference-field", "answer", "--no-progress")  # fmt: skip

    assert sample(tmp_path / "whole.jsonl")[0] == 0
    whole = (tmp_path / "whole.jsonl").read_text()
    part = tmp_path / "part.jsonl"

    def interrupted():  # what a run killed after its first batch leaves
        part.write_text("".join(whole.splitlines(keepends=True)[:2]))

    # A prompt already sampled has another text: named by its line.
    interrupted()
    edited = [dict(row) for row in PROMPTS]
    edited[1]["question"] = "What is 1 times 1?"
    code, _, err = sample(part, edited)
    assert code == 2
    assert f"{prompts}: line 2 (prompt_id 1): the prompt differs from the one already sampled" in error_line(err)
    # Its reference changed.
    edited = [dict(row) for row in PROMPTS]
    edited[0]["answer"] = "#### 1"
    code, _, err = sample(part, edited)
    assert code == 2 and "line 1 (prompt_id 0): the reference differs" in error_line(err)
    # A prompt not sampled yet changed, or one was added: the file's fingerprint differs.
    edited = [dict(row) for row in PROMPTS]
    edited[4]["question"] = "What is 4 times 4?"
    code, _, err = sample(part, edited)
    assert code == 2 and f"{prompts} changed since {part} was started (5 prompt rows then, 5 now" in error_line(err)
    code, _, err = sample(part, PROMPTS + [{"question": "One more?", "answer": "#### 1"}])
    assert code == 2 and "(5 prompt rows then, 6 now" in error_line(err)
    # Nothing was written by the refusals, and the unchanged file resumes to the uninterrupted result.
    assert part.read_text() == "".join(whole.splitlines(keepends=True)[:2])
    code, out, _ = sample(part)
    assert code == 0 and "sampled 3 now, 2 already in" in out
    assert part.read_text() == whole


# --- 4. JSON nested too deeply --------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_json_nested_too_deeply_is_a_counted_bad_line(tmp_path, capsys):
    row = {"prompt": "Q", "chosen": " a", "rejected": " b"}
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(row) + "\n" + DEEP + "\n" + '{"prompt": "Q", "chosen": ' + "[" * 150 + "]" * 150
                    + ', "rejected": " c"}\n')  # fmt: skip
    code, out, _ = cli(capsys, "check", path)
    assert code == 1
    assert "line 2 (row 1): nested too deeply (more than 100 levels)" in out
    assert "line 3 (row 2): nested too deeply" in out and "3 rows, 2 with problems" in out
    examples, bad = load_examples(str(path), on_bad_rows="skip")
    assert len(examples) == 1 and "line 2 (row 1): nested too deeply" in bad[0]
    (tmp_path / "deep.json").write_text("[" + json.dumps(row) + ", " + DEEP + "]")
    with pytest.raises(DataError, match="deep.json: nested too deeply"):
        load_examples(str(tmp_path / "deep.json"))
    (tmp_path / "rows.json").write_text("[" + json.dumps(row) + ", " + "[" * 500 + "]" * 500 + "]")
    examples, bad = load_examples(str(tmp_path / "rows.json"), on_bad_rows="skip")
    assert len(examples) == 1 and bad == [f"{tmp_path / 'rows.json'}: row 1: nested too deeply (more than 100 levels)"]
    # The on-policy steps read JSONL the same way.
    (tmp_path / "j.jsonl").write_text(DEEP + "\n")
    code, _, err = cli(capsys, "pairs", tmp_path / "j.jsonl", "--out", tmp_path / "p.jsonl")
    assert code == 2 and "j.jsonl: line 1 (row 0): nested too deeply" in error_line(err)


# --- 5. lone surrogates ---------------------------------------------------------------------------------------


def test_a_lone_surrogate_is_a_named_bad_row(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"prompt": "Q", "chosen": " a", "rejected": " b"}\n'
        '{"prompt": "Q\\ud800", "chosen": " a", "rejected": " b"}\n'
        '{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "\\udfffx"}],'
        ' "rejected": [{"role": "assistant", "content": "y"}]}\n'
        '{"prompt": "Q", "chosen": " \\ud83d\\ude00", "rejected": " b"}\n'  # a valid pair: one emoji
    )
    code, out, _ = cli(capsys, "check", path)
    assert code == 1
    assert "line 2 (row 1): field 'prompt' contains a lone surrogate \\ud800 at character 1" in out
    assert "line 3 (row 2): chosen[0].content contains a lone surrogate \\udfff at character 0" in out
    assert "4 rows, 2 with problems" in out and "invalid Unicode text" in out
    examples, bad = load_examples(str(path), on_bad_rows="skip")
    assert [e.row for e in examples] == [0, 3] and len(bad) == 2
    for example in examples:  # what is accepted encodes as UTF-8, as training needs
        (example.prompt + example.chosen + example.rejected).encode("utf-8")
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "Q", "completion": "a\\ud800"}\n')
    with pytest.raises(DataError, match=r"line 1 \(row 0\): field 'completion' contains a lone surrogate"):
        load_sft_examples(str(sft))


# --- 6. a chat template that raises -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, error",
    [
        ("{{ raise_exception('only user and assistant roles are supported') }}",
         "TemplateError: only user and assistant roles are supported"),
        ("{% for m in messages %}{{ m['content'] }}", "TemplateSyntaxError:"),
    ],
)  # fmt: skip
def test_a_chat_template_that_raises_is_one_line_naming_the_prompt(tmp_path, capsys, template, error):
    from transformers import AutoTokenizer

    model = save_tiny_model(tmp_path / "chat")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(model)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "two plus two is"}])
    code, _, err = cli(capsys, "sample", prompts, "--model", model, "--out", tmp_path / "c.jsonl", "--chat-template",
                       "--no-progress")  # fmt: skip
    assert code == 2
    line = error_line(err)
    assert f"{prompts}: line 1 (prompt_id 0): the tokenizer's chat template fails: {error}" in line
    assert not (tmp_path / "c.jsonl").exists()  # refused before any sampling
    # `data check --tokenizer` counts such a conversational row as a problem of the row.
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": [USER], "chosen": [GOOD], "rejected": [USER]}])
    code, out, _ = cli(capsys, "check", pairs, "--tokenizer", model, "--max-length", 64)
    assert code == 1 and "line 1 (row 0): the tokenizer's chat template fails on this row" in out
    assert "chat template error" in out


def test_a_reward_model_chat_template_that_raises_is_one_line(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.chat_template = "{{ raise_exception('no assistant turns here') }}"
    tokenizer.save_pretrained(tmp_path / "rm")
    record = {"prompt_id": 0, "prompt": [USER], "candidates": ["Blue."], "sampler": {"chat_template": True}}
    code, _, err = cli(capsys, "judge", write_jsonl(tmp_path / "c.jsonl", [record]), "--judge", "reward-model",
                       "--model", tmp_path / "rm", "--out", tmp_path / "j.jsonl", "--no-progress")  # fmt: skip
    assert code == 2 and "chat template fails on the prompt" in error_line(err)
    assert "TemplateError: no assistant turns here" in error_line(err)


# --- 7. an LLM judge reply whose content is not text -----------------------------------------------------------


def test_an_llm_reply_without_text_content_is_recorded_as_unscored(tmp_path, capsys):
    contents = {
        "null": None,
        "int": 5,
        "list": [{"type": "image_url", "image_url": {"url": "x"}}],
        "dict": {"score": 5},
        "parts": [{"type": "text", "text": "Fine.\n"}, {"type": "text", "text": "Score: 4"}],
        "text": "Score: 3",
    }
    record = {"prompt_id": 0, "prompt": "two plus two?", "candidates": list(contents)}
    server = ChatServer(reply=lambda response: contents[response.split("\n")[0]])
    try:
        code, out, err = cli(capsys, "judge", write_jsonl(tmp_path / "c.jsonl", [record]), "--judge", "llm",
                             "--base-url", server.url, "--llm-model", "m", "--out", tmp_path / "j.jsonl",
                             "--no-progress")  # fmt: skip
    finally:
        server.close()
    assert code == 0, err
    assert "6 candidates" not in out and "4 candidates unscored" in out
    row = json.loads((tmp_path / "j.jsonl").read_text())
    assert row["scores"] == [None, None, None, None, 4.0, 3.0]
    assert row["notes"][:4] == [
        "judge reply without text content: content = null",
        "judge reply without text content: content = 5",
        'judge reply without text content: content = [{"type": "image_url", "image_url": {"url": "x"}}]',
        'judge reply without text content: content = {"score": 5}',
    ]


# --- 8. folders, empty files and header-only CSVs where a data file is expected -------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("folder.jsonl", None, "is a folder, not a data file"),
        ("folder", None, "is a folder, not a data file"),
        ("empty.jsonl", "", "no rows (the file is empty)"),
        ("blank.jsonl", "\n  \n", "no rows (the file is empty)"),
        ("empty.json", "", "no rows (the file is empty)"),
        ("list.json", "[]", "no rows (the file is empty)"),
        ("empty.csv", "", "no rows (the file is empty)"),
        ("header.csv", "prompt,chosen,rejected\n", "no rows (only a header line)"),
        ("empty.parquet", "", "no rows (the file is empty)"),
    ],
)
def test_unreadable_data_files_are_one_line_naming_the_file(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    code, _, err = cli(capsys, "check", path)
    assert code == 2 and error_line(err).startswith(f"dpolab data: error: {path}: {message}")
    with pytest.raises(DataError, match="no rows|is a folder"):
        load_examples(str(path))
    code, _, err = cli(capsys, "edit-stats", path, "--out", tmp_path / "stats")
    assert code == 2 and str(path) in error_line(err)


def test_a_folder_as_an_input_or_output_of_the_on_policy_steps_is_one_line(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    code, _, err = cli(capsys, "pairs", tmp_path / "folder", "--out", tmp_path / "p.jsonl")
    assert code == 2 and "folder: is a folder" in error_line(err)
    judged = write_jsonl(
        tmp_path / "j.jsonl", [{"prompt_id": 0, "prompt": "p", "reference": "1", "candidates": ["a"], "scores": [1]}]
    )
    code, _, err = cli(capsys, "pairs", judged, "--out", tmp_path / "folder")
    assert code == 2 and "folder: is a folder" in error_line(err)
    code, _, err = cli(capsys, "judge", judged, "--judge", "math", "--out", tmp_path / "folder", "--no-progress")
    assert code == 2 and "folder: is a folder" in error_line(err)


# --- 9. a mistyped local path is not tried on the hub ---------------------------------------------------------


@pytest.mark.parametrize("source", ["typo.jsonl", "data/typo.jsonl", "data/typo", "./typo", "~/no-such-dpolab.csv"])
def test_a_mistyped_local_path_is_no_such_file_at_once(tmp_path, capsys, monkeypatch, source):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was tried on the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    start = time.perf_counter()
    code, _, err = cli(capsys, "check", source)
    assert code == 2 and error_line(err) == f"dpolab data: error: no such file: {source}"
    assert time.perf_counter() - start < 5
    code, _, err = cli(capsys, "from-choices", source, "--schema", "arc", "--out", tmp_path / "o.jsonl")
    assert code == 2 and error_line(err) == f"dpolab data: error: no such file: {source}"


def test_a_hub_id_still_goes_to_the_hub(tmp_path, monkeypatch):
    import datasets

    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: asked.append(name) or [{"a": 1}])
    monkeypatch.chdir(tmp_path)
    from dpolab.data.formats import read_rows

    assert read_rows("Anthropic/hh-rlhf") == [{"a": 1}] and asked == ["Anthropic/hh-rlhf"]
