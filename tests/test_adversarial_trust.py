"""Issue 30 (trust, round 3), items 4–6 and 8: what reaches the terminal cannot drive it, every JSON is strict,
a huge row or a key given twice is a named bad row, builders write only valid training input, and the messages
name what to change in one convention. Items 1–3 and 7 are in test_adversarial_outputs.py,
tests/data/test_corrupt_exact.py, tests/engine/test_loading_whole.py and tests/train/test_distributed_edges.py.

Each case of CASES runs the real command line in-process; none may change an input.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpolab.cli import main
from tests.paths import GSM8K_SOLUTIONS
from tests.tiny import save_tiny_model

RUNS = itertools.count()
PAIRS = [{"prompt": f"Q: {a} plus {a}? A:", "chosen": f" {2 * a}", "rejected": f" {2 * a + 1}"} for a in range(6)]
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b[31m"  # rename the window, clear the screen, turn the text red


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def strict(text: str):
    """JSON as a strict reader sees it: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda constant: pytest.fail(f"non-strict JSON constant {constant}"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    save_tiny_model(root / "model", seed=0)
    jsonl(root / "pairs.jsonl", PAIRS)
    # a key holding escape sequences (named in "missing field … (fields: …)" and by data check's extra fields)
    jsonl(root / "escapes.jsonl", [{"prompt": "Q", "chosen": " a", ESCAPES: " b"}])
    (root / "duplicate-key.jsonl").write_text('{"prompt": "Q", "chosen": " a", "rejected": " b", "chosen": " c"}\n')
    (root / "duplicate-key.yaml").write_text(f"model: {root / 'model'}\nloss: dpo\nloss: ipo\n")
    chat = [{"role": "user", "content": "hi"}]
    rows = [{"prompt": [{"role": "wizard", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]  # fmt: skip
    jsonl(root / "roles.jsonl", rows)
    jsonl(root / "chat.jsonl", [{**rows[0], "prompt": chat}])
    arc = {"question": "2 + 2?", "choices": {"text": ["3", "4", "5"], "label": ["A", "A", "B"]}, "answerKey": "A"}
    jsonl(root / "arc-duplicate-labels.jsonl", [arc])
    jsonl(root / "escapes-among-good.jsonl", [*PAIRS, {"prompt": "Q", "chosen": " a", ESCAPES: " b"}])
    solution = json.loads(GSM8K_SOLUTIONS.read_text().splitlines()[0])
    solution["6b_finetuning"]["is_correct"] = "false"  # a string: bool("false") is True
    jsonl(root / "is-correct-string.jsonl", [solution])
    jsonl(root / "few.jsonl", PAIRS[:1])
    (root / "empty-run").mkdir()
    (root / "empty-run" / "config.yaml").write_text("model: m\n")
    (root / "empty-run" / "metrics.jsonl").write_text("")
    one = [{"prompt_id": i, "prompt": f"p{i}", "candidates": ["a", "b"], "scores": [1.0, 1.0]} for i in range(3)]
    jsonl(root / "all-good.jsonl", one)
    return root


def train(root: Path, *extra) -> list:
    out = root / "outputs" / f"run-{next(RUNS)}"
    words = ["train", "--model", root / "model", "--data", root / "pairs.jsonl", "--output_dir", out]
    words += ["--max_steps", "1", "--batch_size", "2", "--progress", "false", "--tensorboard", "false"]
    return [*words, "--save_model", "false", "--cache_dir", root / "outputs" / "cache", *extra]


# (case, command line, exit code, what the output must say)
CASES = [
    # item 4: escape sequences from the data are shown, never executed
    ("escapes in a key (data check)", lambda r: ["data", "check", r / "escapes.jsonl"], 1, "\\x1b]0;pwned\\x07"),
    ("escapes in a key (train)", lambda r: train(r, "--data", r / "escapes.jsonl"), 2, "\\x1b[2J"),
    (
        "escapes in a skipped row (training log)",
        lambda r: train(r, "--data", r / "escapes-among-good.jsonl", "--on_bad_rows", "skip"),
        0,
        "\\x1b[31m",
    ),
    # item 5: a key given twice
    (
        "key twice in a row (check)",
        lambda r: ["data", "check", r / "duplicate-key.jsonl"],
        1,
        "the key 'chosen' appears twice",
    ),
    (
        "key twice in a row (train)",
        lambda r: train(r, "--data", r / "duplicate-key.jsonl"),
        2,
        "line 1 (row 0): the key 'chosen' appears twice",
    ),
    (
        "key twice in a config",
        lambda r: ["train", r / "duplicate-key.yaml"],
        2,
        "line 3: the key 'loss' appears twice in one mapping (first on line 2)",
    ),
    ("row size limit", lambda r: train(r, "--max_row_bytes", "10"), 2, "longer than the row size limit (10 bytes"),
    ("row size limit 0", lambda r: train(r, "--max_row_bytes", "0"), 2, "max_row_bytes: a whole number of bytes"),
    # item 6: only valid training input
    (
        "role outside the four (check)",
        lambda r: ["data", "check", r / "roles.jsonl"],
        1,
        "prompt[0].role 'wizard' is not a chat role",
    ),
    (
        "role outside the four (train)",
        lambda r: train(r, "--data", r / "roles.jsonl"),
        2,
        "'wizard' is not a chat role (one of system, user, assistant, tool)",
    ),
    (
        "duplicate labels",
        lambda r: [
            "data",
            "from-choices",
            r / "arc-duplicate-labels.jsonl",
            "--schema",
            "arc",
            "--out",
            r / "outputs" / "d.jsonl",
        ],
        0,
        "the label 'A' is given to two choices",
    ),  # fmt: skip
    (
        "is_correct as a string",
        lambda r: ["data", "gsm8k-scenarios", r / "is-correct-string.jsonl", "--out", r / "outputs" / "scen"],
        2,
        "line 1 (row 0): 6b_finetuning.is_correct must be true or false; got 'false'",
    ),  # fmt: skip
    (
        "negative loss weight",
        lambda r: train(r, "--loss", "[dpo, ipo]", "--loss_weights", "[1, -1]"),
        2,
        "weight of loss 'ipo' must be >= 0",
    ),
    (
        "negative toy loss weight",
        lambda r: [
            "toy",
            "run",
            "--loss",
            "dpo",
            "ipo",
            "--loss-weights",
            "1",
            "-1",
            "--steps",
            "2",
            "--out",
            r / "outputs" / "toy-neg",
        ],
        2,
        "must be >= 0",
    ),  # fmt: skip
    (
        "toy run that diverges",
        lambda r: [
            "toy",
            "run",
            "--loss",
            "ipo",
            "--optimizer",
            "sgd",
            "--lr",
            "1e30",
            "--steps",
            "20",
            "--out",
            r / "outputs" / "toy-div",
        ],
        2,
        "the toy run diverged at step",
    ),  # fmt: skip
    # item 8: clear messages
    (
        "eval_fraction leaves nothing",
        lambda r: train(r, "--data", r / "few.jsonl", "--eval_fraction", "0.5"),
        2,
        "eval_fraction: 0.5 of 1 usable rows holds out 1, leaving none to train on",
    ),  # fmt: skip
    (
        "report of an empty metrics file",
        lambda r: ["report", r / "empty-run", "--out", r / "outputs" / "r.html"],
        2,
        "metrics.jsonl holds no logged step",
    ),  # fmt: skip
    ("data that is neither a file nor org/name", lambda r: train(r, "--data", "pairs"), 2, "data: no such file: pairs"),
    (
        "eval tokens advice",
        lambda r: ["eval", "tokens", r / "duplicate-key.jsonl", "--model", r / "model"],
        2,
        "dpolab data check",
    ),
    (
        "kappa undefined",
        lambda r: ["data", "agreement", r / "all-good.jsonl", r / "all-good.jsonl"],
        0,
        "Cohen's κ is undefined: both judges put all 6 candidates in one category",
    ),  # fmt: skip
    (
        "resume and overwrite",
        lambda r: [*train(r), "--resume", "--overwrite"],
        2,
        "--resume and --overwrite contradict",
    ),
    (
        "flag without a value",
        lambda r: train(r, "--loss_params.beta", "--seed", "1"),
        2,
        "--loss_params.beta: missing value",
    ),
]


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] != "outputs"
    }


@pytest.mark.parametrize("case, command, code, message", CASES, ids=[case[0] for case in CASES])
def test_each_case_is_one_clear_line(inputs, capsys, monkeypatch, case, command, code, message):
    monkeypatch.chdir(inputs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = fingerprint(inputs)
    assert main([str(word) for word in command(inputs)]) == code, capsys.readouterr().err[-2000:]
    output = capsys.readouterr()
    shown = output.out + output.err
    assert "Traceback" not in shown and "internal error" not in shown, shown[-2000:]
    assert message in shown, shown[-2000:]
    assert "\x1b" not in shown and "\x07" not in shown  # nothing from the data drives the terminal
    assert fingerprint(inputs) == before


def test_every_json_a_run_writes_is_strict_even_when_the_loss_is_not_finite(inputs, tmp_path):
    """A blown-up policy (lr 1e10) with skip_nonfinite: the skipped batches' losses are null in metrics.jsonl, and
    the log says which keys were not finite."""
    out = tmp_path / "run"
    words = train(inputs, "--output_dir", out, "--learning_rate", "1e10", "--max_grad_norm", "null", "--max_steps", "4")
    words += ["--skip_nonfinite", "true", "--max_nonfinite", "10", "--checkpoint_steps", "2"]
    result = subprocess.run([sys.executable, "-m", "dpolab", *map(str, words)], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("nonfinite_skipped") for row in rows)
    assert any(value is None for row in rows for value in row.values())  # the skipped batch's loss: null
    assert "not a finite number; written as null" in result.stderr
    for file in [*out.glob("*.json"), *out.glob("checkpoints/*/state.json")]:
        strict(file.read_text())


def test_a_toy_run_writes_strict_json_where_a_ratio_is_infinite(tmp_path, capsys):
    """The toy's |∂L/∂π_l|/|∂L/∂π_w| reaches float64's limit in long runs (the 3D paper's unbounded ratio): not a
    divergence; it is written as null, with a note."""
    from dpolab.toy.lab import ToyConfig, run_toy

    run = run_toy(ToyConfig(steps=3))
    run.metrics[-1]["grad_ratio"] = float("inf")  # as at step 513 of the remedies figure's flex-β run
    run.save(tmp_path / "toy")
    rows = [strict(line) for line in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["grad_ratio"] is None and rows[0]["grad_ratio"] is not None
    strict((tmp_path / "toy" / "summary.json").read_text())
    assert "grad_ratio (inf) not a finite number; written as null" in capsys.readouterr().err


def test_a_huge_row_is_refused_by_its_line_without_reading_it_into_memory(inputs, tmp_path):
    """One 64 MB row among good ones: `data check` names its line, and training with on_bad_rows: skip trains on
    the others; neither process grows by anything like the row's size (a 50 MB row used to take 12 GB)."""
    data = tmp_path / "huge.jsonl"
    with open(data, "w") as handle:
        handle.write(json.dumps(PAIRS[0]) + "\n")
        handle.write('{"prompt": "Q", "chosen": "' + "a" * 64 * 2**20 + '", "rejected": " b"}\n')
        for pair in PAIRS[1:]:
            handle.write(json.dumps(pair) + "\n")
    check = subprocess.run([sys.executable, "-m", "dpolab", "data", "check", str(data)], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert check.returncode == 1 and "line 2 (row 1): longer than the row size limit" in check.stdout
    words = train(inputs, "--data", data, "--on_bad_rows", "skip", "--output_dir", tmp_path / "run")
    trained = subprocess.run([sys.executable, "-m", "dpolab", *map(str, words)], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert len(report["bad_rows"]) == 1 and "line 2 (row 1)" in report["bad_rows"][0]
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert peak_mib < 1500, f"a child process peaked at {peak_mib:.0f} MiB"


def test_pairs_that_become_identical_after_truncation_are_dropped_and_counted():
    from dpolab.data.formats import PreferenceExample
    from dpolab.data.tokenize import tokenize_pairs
    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    same_start = " the answer is four and " * 8
    examples = [
        PreferenceExample("Q:", same_start + "yes", same_start + "no", 0),  # differ only past max_length
        PreferenceExample("Q:", " yes", " no", 1),
    ]
    pairs, report = tokenize_pairs(tokenizer, examples, max_length=16)
    assert [pair.row for pair in pairs] == [1]
    assert report.dropped_by == {"identical_tokens": [0]}
    assert any("chosen and rejected are the same tokens" in line for line in report.lines())
    pairs, report = tokenize_pairs(tokenizer, examples, max_length=None)
    assert len(pairs) == 2 and not report.dropped_by  # whole, they differ


def test_every_builder_writes_what_data_check_passes(inputs, tmp_path, capsys):
    """corrupt-math, from-choices (three schemas), gsm8k-scenarios, pairs and scenario on inputs with the cases
    that used to give bad rows: a wrong choice with the correct one's text, two wrong choices alike, two
    candidates alike, a prompt repeated."""
    from tests.paths import GSM8K_TRAIN

    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text("".join(GSM8K_TRAIN.read_text().splitlines(keepends=True)[:50]))
    arc = {
        "question": "2+2?",
        "choices": {"text": ["4", "4", "5", "5"], "label": ["A", "B", "C", "D"]},
        "answerKey": "A",
    }
    hellaswag = {"ctx": "She", "endings": ["runs", "runs", "sits", "sits"], "label": 0}
    generic = {"question": "2+2?", "choices": ["4", "3", "3"], "answer": "4"}
    judged = [
        {"prompt_id": 0, "prompt": "p", "candidates": ["x", "x", "y"], "scores": [1.0, 0.0, 0.5]},
        {"prompt_id": 1, "prompt": "p", "candidates": ["x", "y"], "scores": [1.0, 0.0]},
        {"prompt_id": 2, "prompt": "p", "candidates": ["x", "y"], "scores": [1.0, 0.0]},
        {"prompt_id": 3, "prompt": "q", "candidates": ["x", "y"], "scores": [0.0, 1.0]},
    ]
    policy = [{**row, "reference": "x"} for row in judged]
    out = tmp_path / "out"
    commands = {
        "corrupt-math.jsonl": ["data", "corrupt-math", gsm8k],
        "corrupt-final.jsonl": ["data", "corrupt-math", gsm8k, "--final", "change"],
        "arc.jsonl": ["data", "from-choices", jsonl(tmp_path / "arc.jsonl", [arc]), "--schema", "arc"],
        "hellaswag.jsonl": ["data", "from-choices", jsonl(tmp_path / "h.jsonl", [hellaswag]), "--schema", "hellaswag"],
        "generic.jsonl": ["data", "from-choices", jsonl(tmp_path / "g.jsonl", [generic]), "--schema", "generic"],
        "scenarios": ["data", "gsm8k-scenarios", GSM8K_SOLUTIONS],
        "pairs.jsonl": ["data", "pairs", jsonl(tmp_path / "judged.jsonl", judged)],
        "scenario": [
            "data",
            "scenario",
            "--policy",
            jsonl(tmp_path / "policy.jsonl", policy),
            "--other",
            tmp_path / "judged.jsonl",
        ],  # fmt: skip
    }
    written = []
    for name, words in commands.items():
        assert main([*map(str, words), "--out", str(out / name)]) == 0, capsys.readouterr().err
        target = out / name
        written += sorted(target.glob("scenario*.jsonl")) if target.is_dir() else [target]
    capsys.readouterr()
    assert len(written) == 14
    for file in written:
        if file.read_text().strip():
            assert main(["data", "check", str(file), "--allow-extra"]) == 0, (file, capsys.readouterr().out[-2000:])


def test_every_command_names_a_bad_row_by_its_line_and_row_alike(inputs, tmp_path, capsys, monkeypatch):
    """One convention (dpolab.data.formats.where): ``FILE: line L (row R)``, L as an editor shows it, R from 0."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gsm8k = {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\nThen 5 * 2 = <<5*2=10>>10\n#### 10"}
    arc = {"question": "2+2?", "choices": {"text": ["4", "5"], "label": ["A", "B"]}, "answerKey": "A"}
    judged = {"prompt_id": 0, "prompt": "p", "candidates": ["a", "b"], "scores": [1.0, 0.0]}
    solutions = json.loads(GSM8K_SOLUTIONS.read_text().splitlines()[0])
    rows = {"pairs": PAIRS[0], "gsm8k": gsm8k, "arc": arc, "judged": judged, "solutions": solutions,
            "texts": {"text": "some text to score"}, "prompts": {"prompt": "Q: 1 + 1? A:"}}  # fmt: skip
    files = {}
    for name, row in rows.items():
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text(json.dumps(row) + "\n" + json.dumps({**row, "prompt_id": 1}) + "\n{broken\n")
    out = tmp_path / "out"
    commands = [
        ["data", "check", files["pairs"]],
        train(inputs, "--data", files["pairs"]),
        ["eval", "tokens", files["pairs"], "--model", inputs / "model"],
        ["data", "corrupt-math", files["gsm8k"], "--out", out / "c.jsonl"],
        ["data", "from-choices", files["arc"], "--schema", "arc", "--out", out / "a.jsonl"],
        ["data", "pairs", files["judged"], "--out", out / "p.jsonl"],
        ["data", "gsm8k-scenarios", files["solutions"], "--out", out / "s"],
        ["eval", "contamination", "--model", inputs / "model", "--data", files["texts"], "--fields", "text"],
        ["data", "sample", files["prompts"], "--model", inputs / "model", "--out", out / "c2.jsonl", "--n", "1"],
    ]
    for words in commands:
        main([str(word) for word in words])
        shown = "".join(capsys.readouterr())
        assert ": line 3 (row 2): " in shown, (words[:2], shown[-1500:])


def test_a_damaged_checkpoint_names_the_missing_or_truncated_file_before_the_data_is_read(inputs, tmp_path, capsys):
    out, data = tmp_path / "run", jsonl(tmp_path / "pairs.jsonl", PAIRS)
    words = train(inputs, "--data", data, "--output_dir", out, "--max_steps", "2", "--checkpoint_steps", "1")
    assert main([str(word) for word in words]) == 0
    first, second = sorted((out / "checkpoints").iterdir())
    (second / "model.safetensors").unlink()
    data.write_text("{broken\n")  # read after the checkpoint is checked, or this would be the error
    config = out / "config.yaml"
    capsys.readouterr()
    assert main(["train", str(config), "--resume"]) == 2
    error = capsys.readouterr().err
    assert f"checkpoint {second} is damaged: model.safetensors cannot be read (the file is missing)" in error
    assert f"resume from the one before it with --resume {first}" in error
    size = (first / "optimizer.bin").stat().st_size
    with open(first / "optimizer.bin", "r+b") as handle:
        handle.truncate(1000)
    assert main(["train", str(config), "--resume", str(first)]) == 2
    error = capsys.readouterr().err
    assert f"optimizer.bin cannot be read (1000 bytes, written with {size})" in error, error


# --- from the second trial --------------------------------------------------------------------------------


def test_builders_on_the_rows_that_used_to_give_bad_pairs_write_only_what_training_reads(tmp_path, capsys):
    """Empty questions, empty or null choices, rows repeated, candidates empty, an annotation whose value is
    written with decimals and its result without: every builder's output passes data check."""
    gsm8k_row = {"question": "How many?", "answer": "He has <<10/2=5.00>>5 apples, <<5*2=10>>10 in all.\n#### 10"}
    gsm8k = jsonl(tmp_path / "gsm8k.jsonl", [gsm8k_row, gsm8k_row, {**gsm8k_row, "question": " "}])
    arc = {"question": "2+2?", "choices": {"text": ["4", "", None, "5"], "label": ["A", "B", "C", "D"]},
           "answerKey": "A"}  # fmt: skip
    hellaswag = [{"ctx": "", "endings": ["runs", "sits"], "label": 0}, {"ctx": "She", "endings": ["runs", "sits"],
                                                                       "label": 0}]  # fmt: skip
    solutions = json.loads(GSM8K_SOLUTIONS.read_text().splitlines()[0])
    judged = [
        {"prompt_id": 0, "prompt": "p", "candidates": ["x", ""], "scores": [1.0, 0.0]},
        {"prompt_id": 1, "prompt": "", "candidates": ["x", "y"], "scores": [1.0, 0.0]},
        {"prompt_id": 2, "prompt": "p", "candidates": ["x", "  "], "scores": [1.0, 0.0]},
        {"prompt_id": 3, "prompt": "q", "candidates": ["x", "y"], "scores": [1.0, 0.0]},
    ]
    out = tmp_path / "out"
    commands = {
        "corrupt.jsonl": ["data", "corrupt-math", gsm8k, "--step", "0"],
        "arc.jsonl": ["data", "from-choices", jsonl(tmp_path / "arc.jsonl", [arc, arc]), "--schema", "arc"],
        "hellaswag.jsonl": ["data", "from-choices", jsonl(tmp_path / "h.jsonl", hellaswag), "--schema", "hellaswag"],
        "scenarios": ["data", "gsm8k-scenarios",
                      jsonl(tmp_path / "s.jsonl", [solutions, solutions, {**solutions, "question": ""}])],
        "pairs.jsonl": ["data", "pairs", jsonl(tmp_path / "judged.jsonl", judged)],
    }  # fmt: skip
    for name, words in commands.items():
        assert main([*map(str, words), "--out", str(out / name)]) == 0, capsys.readouterr().err
    listed = capsys.readouterr().out
    assert "choice 1 is empty; no pair" in listed and "choice 2 is not text (null); no pair" in listed
    assert "the same prompt, chosen and rejected as an earlier pair" in listed
    written = [path for path in out.rglob("*.jsonl")]
    for file in written:
        assert main(["data", "check", str(file), "--allow-extra"]) == 0, (file, capsys.readouterr().out[-2000:])
    corrupted = [json.loads(line) for line in (out / "corrupt.jsonl").read_text().splitlines()]
    assert [pair["source_row"] for pair in corrupted] == [0, 1]  # the empty question gives none
    for pair in corrupted:
        value, written_value = pair["rejected"].split(" apples")[0].split("=")[1].split(">>")
        assert float(value) == float(written_value) and "." not in written_value  # both copies: one number
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [pair["prompt_id"] for pair in pairs] == [3]


def test_a_builder_with_nothing_to_write_says_so_and_writes_nothing(tmp_path, capsys):
    rows = [{"prompt_id": 0, "prompt": "p", "candidates": ["x", "y"], "scores": [1.0, 1.0]}]
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "pairs", str(jsonl(tmp_path / "j.jsonl", rows)), "--out", str(out)]) == 2
    assert "no pair to write (1 prompts: 1 all candidates scored the same)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("field, value", [("question", 123), ("ground_truth", 18)])
def test_gsm8k_scenarios_names_a_field_of_the_wrong_type(tmp_path, capsys, field, value):
    solutions = json.loads(GSM8K_SOLUTIONS.read_text().splitlines()[0])
    source = jsonl(tmp_path / "s.jsonl", [{**solutions, field: value}])
    assert main(["data", "gsm8k-scenarios", str(source), "--out", str(tmp_path / "out")]) == 2
    assert f"line 1 (row 0): {field} must be a string, got int" in capsys.readouterr().err


def test_names_from_files_and_arguments_never_drive_the_terminal_nor_rich_markup(inputs, tmp_path, capsys):
    """File names in the result lines, a scenario's name in the toy's table (which rich would read as markup:
    "[/oops]" used to be an internal error), a sweep point's name."""
    from tests.paths import GSM8K_TRAIN

    gsm8k = tmp_path / "g.jsonl"
    gsm8k.write_text("".join(GSM8K_TRAIN.read_text().splitlines(keepends=True)[:5]))
    assert main(["data", "corrupt-math", str(gsm8k), "--out", str(tmp_path / f"o{ESCAPES}.jsonl")]) == 0
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text('name: "[/oops] \\e]0;pwned\\a"\nchosen: 0.5\nrejected_each: 0.1\n')
    assert main(["toy", "run", "--scenario", str(scenario), "--steps", "3", "--out", str(tmp_path / "toy")]) == 0
    spec = tmp_path / "spec.yaml"
    spec.write_text('recipe: toy\npoints: [{name: "[/oops]", loss: dpo}]\nbase: {steps: 3}\nseeds: [0]\n')
    assert main(["sweep", str(spec), "--out", str(tmp_path / "sweep"), "--no-progress"]) == 0
    shown = "".join(capsys.readouterr())
    assert "\x1b" not in shown and "\x07" not in shown and "internal error" not in shown
    assert "o\\x1b]0;pwned\\x07" in shown and "[/oops]" in shown


def test_the_harness_in_a_pipe_prints_no_bars_and_no_git_errors(inputs, tmp_path):
    """lm-evaluation-harness draws tqdm bars with disable=False and asks git for the working directory's commit
    (git prints "fatal: not a git repository" outside one): neither reaches a pipe."""
    from tests.eval.test_harness import FIXTURES

    words = ["eval", "harness", "--model", inputs / "model", "--tasks", "arc", "--data",
             f"arc={FIXTURES / 'arc' / 'test.jsonl'}", "--limit", "2"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "dpolab", *map(str, words)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr and "fatal:" not in result.stderr, result.stderr[-2000:]


def test_messages_from_the_second_trial_name_the_file_line_and_row(inputs, tmp_path, capsys):
    sample = jsonl(tmp_path / "sample.jsonl", [{"prompt_id": 0, "prompt": "p", "candidates": ["a"]}])
    assert main(["data", "judge", str(sample), "--judge", "math", "--out", str(tmp_path / "j.jsonl")]) == 2
    assert f"{sample}: line 1 (row 0) (prompt_id 0): the math judge needs a 'reference'" in capsys.readouterr().err
    texts = jsonl(tmp_path / "texts.jsonl", [{"text": "a text long enough"}, {"text": "a"}])
    words = ["eval", "contamination", "--model", str(inputs / "model"), "--data", str(texts), "--no-progress"]
    assert main(words) == 2
    assert f"{texts}: line 2 (row 1): the text is 1 token long" in capsys.readouterr().err
    chat = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]  # fmt: skip
    data = jsonl(tmp_path / "chat.jsonl", [PAIRS[0], *chat])
    assert main([str(w) for w in train(inputs, "--data", data)]) == 2  # the tiny tokenizer has no chat template
    error = capsys.readouterr().err
    assert f"{data}: line 2 (row 1): the tokenizer's chat template fails" in error
    with pytest.raises(SystemExit) as stop:  # argparse's error: one line too, exit 2
        main(["data", "corrupt-math", str(data), "--out"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "argument --out: expected one argument" in error
    assert main([str(w) for w in train(inputs, "--loss", "[dpo, ipo]", "--loss_weights", "[1, -1e-9]")]) == 2
    assert "weight of loss 'ipo' must be >= 0" in capsys.readouterr().err  # YAML's "-1e-9" is a float here


def test_a_checkpoint_without_its_state_or_with_changed_bytes_is_named(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main([str(w) for w in train(inputs, "--output_dir", out, "--max_steps", "2", "--checkpoint_steps", "1")]) == 0
    )
    first, second = sorted((out / "checkpoints").iterdir())
    (second / "state.json").unlink()
    capsys.readouterr()
    assert main(["train", str(out / "config.yaml"), "--resume"]) == 2
    error = capsys.readouterr().err
    assert f"checkpoint {second} is damaged: state.json cannot be read (the file is missing)" in error, error
    optimizer = first / "optimizer.bin"
    data = bytearray(optimizer.read_bytes())
    data[5000:9000] = bytes(4000)  # the same size, other bytes
    optimizer.write_bytes(bytes(data))
    assert main(["train", str(out / "config.yaml"), "--resume", str(first)]) == 2
    assert "optimizer.bin cannot be read" in capsys.readouterr().err


# --- from the third trial ---------------------------------------------------------------------------------


def test_a_tokenizer_whose_ids_have_a_gap_past_the_vocabulary_is_refused(inputs, tmp_path, capsys):
    """As many tokens as the model has rows, but one id moved past the end: counting tokens is not enough."""
    shutil.copytree(inputs / "model", tmp_path / "model")
    settings_file = tmp_path / "model" / "tokenizer.json"
    settings = json.loads(settings_file.read_text())
    vocabulary = settings["model"]["vocab"]
    last = max(vocabulary, key=vocabulary.get)
    vocabulary[last] = 5000
    settings_file.write_text(json.dumps(settings))
    assert main([str(w) for w in train(inputs, "--model", tmp_path / "model")]) == 2
    assert "ids up to 5000" in capsys.readouterr().err


def test_a_full_disk_while_a_checkpoint_or_the_model_is_written_is_one_line(inputs, tmp_path):
    """A file-size limit stands in for a full disk: the model's safetensors fail to write (a SafetensorError,
    once an internal error)."""
    words = train(inputs, "--output_dir", tmp_path / "run", "--checkpoint_steps", "1")
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    limit += "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))"
    script = f"{limit}; from dpolab.cli import main; raise SystemExit(main({[str(w) for w in words]!r}))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "internal error" not in result.stderr, result.stderr[-2000:]
    assert "is the disk full?" in result.stderr


def test_a_note_naming_a_key_from_the_data_is_escaped(inputs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2+2?", "\\u001b]0;PWNED\\u0007k": NaN}\n')
    words = ["data", "sample", prompts, "--model", inputs / "model", "--out", tmp_path / "s.jsonl", "--n", "1",
             "--max-new-tokens", "2", "--no-progress"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "dpolab", *map(str, words)], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\x1b" not in result.stderr and "\\x1b]0;PWNED" in result.stderr


def test_a_plot_that_cannot_be_an_image_is_refused_before_any_work(inputs, capsys):
    words = ["eval", "tokens", str(inputs / "pairs.jsonl"), "--model", str(inputs / "model"), "--plot", "fig"]
    assert main(words) == 2
    assert "--plot fig: name an image file" in capsys.readouterr().err
