"""`dpolab eval harness`: the harness on a model in memory, over dpolab's offline task definitions.

The parity test runs `dpolab eval harness` and the `lm_eval` command line on the same saved model and task
folder, and checks every metric and every document's responses are the same.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpolab.data.formats import DataError
from dpolab.eval import task_functions
from dpolab.eval.harness import bootstrap_interval, evaluate_directory, evaluate_model, fewshot_counts
from dpolab.eval.tasks import TASKS, TaskFiles, check_file, find_files
from tests.tiny import save_tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
from tests.paths import GSM8K_TRAIN as GSM8K  # noqa: E402

ENVIRONMENT = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("harness") / "llama", seed=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The fixtures in each task's public schema, and GSM8K rows from the repository's data/ (test and few-shot)."""
    folder = tmp_path_factory.mktemp("tasks")
    for task in FIXTURES.iterdir():
        (folder / task.name).symlink_to(task)
    lines = GSM8K.read_text().splitlines()
    (folder / "gsm8k").mkdir()
    (folder / "gsm8k" / "test.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (folder / "gsm8k" / "train.jsonl").write_text("\n".join(lines[100:103]) + "\n")
    (folder / "gsm8k_plain").symlink_to(folder / "gsm8k")
    return folder


SHOTS = "arc=2,hellaswag=1,mmlu=1,winogrande=1,gsm8k=2,gsm8k_plain=1"


@pytest.mark.slow
def test_dpolab_eval_harness_equals_the_lm_eval_command_line(model_dir, data_dir, tmp_path):
    tasks = ",".join(TASKS)
    ours = subprocess.run(
        [sys.executable, "-m", "dpolab", "eval", "harness", "--model", model_dir, "--tasks", tasks,
         "--data-dir", str(data_dir), "--num-fewshot", SHOTS, "--batch-size", "4", "--max-new-tokens", "24",
         "--task-dir", str(tmp_path / "tasks"), "--out", str(tmp_path / "ours.json"), "--log-samples"],
        capture_output=True, text=True, env=ENVIRONMENT,
    )  # fmt: skip
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert "| gsm8k | exact_match,strict-match | 2 | 6 |" in ours.stdout
    theirs = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir}",
         "--tasks", ",".join(f"dpolab_{t}" for t in TASKS), "--include_path", str(tmp_path / "tasks"),
         "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "lm_eval"), "--log_samples"],
        capture_output=True, text=True, env=ENVIRONMENT, cwd=tmp_path,
    )  # fmt: skip
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    result = json.loads((tmp_path / "ours.json").read_text())
    [results_file] = (tmp_path / "lm_eval").rglob("results_*.json")
    reference = json.loads(results_file.read_text())["results"]
    compared = 0
    for task, numbers in result["tasks"].items():
        for label, metric in numbers["metrics"].items():
            name, _, filter_name = label.partition(",")
            key = f"{name},{filter_name or 'none'}"
            assert metric["value"] == reference[f"dpolab_{task}"][key], (task, label)
            assert metric["stderr"] == reference[f"dpolab_{task}"][f"{name}_stderr,{filter_name or 'none'}"]
            assert metric["low"] <= metric["value"] <= metric["high"]
            compared += 1
        # the documents' responses (log-likelihoods, generations), not only the averages
        [samples_file] = (tmp_path / "lm_eval").rglob(f"samples_dpolab_{task}_[0-9]*.jsonl")  # not gsm8k_plain
        their_samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
        key = lambda s: (s["doc_id"], s["filter"])  # noqa: E731
        ours_by_doc = {key(s): s for s in result["samples"][task]}
        assert (
            len(ours_by_doc) == len(their_samples) == numbers["documents"] * len({s["filter"] for s in their_samples})
        )
        for sample in their_samples:
            mine = ours_by_doc[key(sample)]
            for field in ("filtered_resps", "target"):
                assert _as_text(mine[field]) == _as_text(sample[field]), (task, field, sample["doc_id"])
            # the command line writes each request's arguments as {gen_args_i: {arg_j: ...}}
            arguments = [list(request.values()) for request in sample["arguments"].values()]
            assert _as_text(mine["arguments"]) == _as_text(arguments), (task, sample["doc_id"])
    assert compared == 12  # two metrics on arc and hellaswag, two filters on each gsm8k, one on the other four
    # a random model's numbers are not all alike: the comparison is not of zeros
    assert len({m["value"] for n in result["tasks"].values() for m in n["metrics"].values()}) >= 3
    assert result["tasks"]["gsm8k"]["num_fewshot"] == 2 and result["tasks"]["truthfulqa_mc1"]["num_fewshot"] == 0
    generations = [s["resps"][0][0] for s in result["samples"]["gsm8k"]]
    assert any(g.strip() for g in generations)


def _as_text(value):
    """The command line writes the responses' numbers as text (str of a float is exact): compare as text."""
    if isinstance(value, dict):
        return {str(k): _as_text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_text(v) for v in value]
    return str(value)


def test_mc2_is_the_normalised_probability_of_the_true_answers():
    doc = {"mc2_targets": {"choices": ["a", "b", "c"], "labels": [1, 1, 0]}}
    value = task_functions.mc2_results(doc, [(-1.0, False), (-2.0, False), (-3.0, True)])["acc"]
    assert value == pytest.approx((math.exp(-1) + math.exp(-2)) / (math.exp(-1) + math.exp(-2) + math.exp(-3)))
    # long answers: exp(-2000) underflows to 0, the shifted form keeps the same ratio
    far = task_functions.mc2_results(doc, [(-2001.0, False), (-2002.0, False), (-2003.0, True)])["acc"]
    assert far == pytest.approx(value)


def test_winogrande_scores_the_same_continuation_under_each_filled_prefix():
    doc = {
        "sentence": "Sam gave his coat to Tom because _ was cold.",
        "option1": "Sam",
        "option2": "Tom",
        "answer": "2",
    }
    contexts = task_functions.winogrande_contexts(doc)
    assert contexts == ["Sam gave his coat to Tom because Sam", "Sam gave his coat to Tom because Tom"]
    assert task_functions.winogrande_continuation(doc) == " was cold."
    assert contexts[task_functions.winogrande_gold(doc)].endswith("Tom")


def test_hellaswag_and_mmlu_prompts():
    class Rows(list):
        def map(self, function):
            return [function(row) for row in self]

    [doc] = task_functions.hellaswag_docs(
        Rows([json.loads((FIXTURES / "hellaswag" / "validation.jsonl").read_text().splitlines()[1])])
    )
    # the "[title]" marker ends a sentence, other bracketed markers go (as the leaderboard's preprocessing does)
    assert doc["query"] == "Personal Care and Style: How to wash your hair. Wet your hair."
    assert doc["choices"] == [" Apply shampoo and rub it in.", "Paint the wall blue.", "Cut the grass.", "Fly a kite."]
    assert doc["gold"] == 0
    mmlu = {"question": " What is 7 times 6? ", "choices": ["36", "42"], "answer": 1}
    assert task_functions.lettered_question(mmlu) == "What is 7 times 6?\nA. 36\nB. 42\nAnswer:"
    assert task_functions.letters(mmlu) == ["A", "B"]


def test_the_bootstrap_interval_has_the_binomial_width():
    rng = np.random.default_rng(0)
    values = (rng.random(400) < 0.3).astype(float)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high
    normal_width = 2 * 1.96 * math.sqrt(values.mean() * (1 - values.mean()) / values.size)
    assert high - low == pytest.approx(normal_width, rel=0.1)
    assert bootstrap_interval(values) == (low, high)  # seeded
    assert bootstrap_interval([1.0] * 5) == (1.0, 1.0)


def test_every_fixture_is_in_its_task_schema():
    for task in TASKS:
        if task.startswith("gsm8k"):
            continue
        files = find_files(task, FIXTURES)
        assert check_file(task, files.evaluation) >= 4


@pytest.mark.parametrize(
    "task, row, message",
    [
        ("arc", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"},
         r"line 2: 'answerKey' 'C' is not one of choices.label"),
        ("mmlu", {"question": "q", "choices": ["a", "b"], "answer": 2}, r"line 2: 'answer' must be the index"),
        ("winogrande", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}, r"exactly one blank"),
        ("truthfulqa_mc1", {"question": "q", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 1]}},
         r"exactly one 1"),
        ("hellaswag", {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"], "label": "5"},
         r"'label' must be the index"),
        ("gsm8k", {"question": "q", "answer": "4"}, r"line 2: 'answer' must end with the final answer"),
        ("gsm8k", {"question": "q"}, r"line 2: no 'answer' field \(task gsm8k expects: question, answer"),
    ],
)  # fmt: skip
def test_a_row_in_the_wrong_schema_is_named_with_its_line_and_field(tmp_path, task, row, message):
    good = json.loads((FIXTURES / "arc" / "test.jsonl").read_text().splitlines()[0]) if task == "arc" else row
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(good if task == "arc" else _valid(task)) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        check_file(task, path)


def _valid(task: str) -> dict:
    if task == "gsm8k":
        return {"question": "q", "answer": "so #### 4"}
    return json.loads(next((FIXTURES / task).glob("*.jsonl")).read_text().splitlines()[0])


def test_bad_requests_are_one_clear_line(model_dir, tmp_path):
    from dpolab.commands.eval import harness_files

    with pytest.raises(ValueError, match=r"unknown task 'arcc'; the tasks are: arc, hellaswag, mmlu"):
        harness_files(["arcc"], str(FIXTURES), [], [])
    with pytest.raises(ValueError, match=r"task gsm8k: no evaluation file in .*gsm8k \(expected test.jsonl"):
        harness_files(["gsm8k"], str(FIXTURES), [], [])
    with pytest.raises(ValueError, match=r"--data/--fewshot-data name 'mmlu', which is not among the tasks"):
        harness_files(["arc"], str(FIXTURES), [f"mmlu={FIXTURES}/mmlu/test.jsonl"], [])
    files = {"truthfulqa_mc1": find_files("truthfulqa_mc1", FIXTURES)}
    with pytest.raises(ValueError, match=r"task truthfulqa_mc1 asks for 3 few-shot examples and has no few-shot file"):
        fewshot_counts(3, files)
    with pytest.raises(ValueError, match=r"num_fewshot names 'arc', which is not among the tasks asked"):
        fewshot_counts({"arc": 1}, files)
    empty = tmp_path / "empty" / "arc"
    empty.mkdir(parents=True)
    (empty / "test.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty"):
        evaluate_directory(model_dir, {"arc": find_files("arc", tmp_path / "empty")})
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((Path(model_dir) / name).read_bytes())
    with pytest.raises(ValueError, match=r"no tokenizer \(tokenizer.json or tokenizer_config.json\)"):
        evaluate_directory(str(no_tokenizer), files)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"question": "q", "answer": "so #### 4"}) + "\n")
    with pytest.raises(ValueError, match=r"task gsm8k generates up to 256 tokens, and the model's context is 256"):
        evaluate_model(model, None, {"gsm8k": TaskFiles(problems)})
    with pytest.raises(ValueError, match=r"the model has no tokenizer"):
        evaluate_model(model, None, {"gsm8k": TaskFiles(problems)}, max_new_tokens=16)
    with pytest.raises(ValueError, match=r"limit must be at least 1; got 0"):
        evaluate_model(model, None, {"gsm8k": TaskFiles(problems)}, limit=0)


def test_malformed_command_line_values_are_named(model_dir, capsys):
    from dpolab.cli import main

    for arguments, message in [
        (["--tasks", "arc", "--num-fewshot", "arc=x"], "--num-fewshot 'arc=x': expected a count, or TASK=COUNT"),
        (["--tasks", "arc", "--num-fewshot", "-1"], "--num-fewshot '-1': expected a count"),
        (["--tasks", "arc", "--data", "arc"], "--data 'arc': expected TASK=VALUE"),
        (["--tasks", " , "], "--tasks: name at least one task"),
        (["--tasks", "arc"], "task arc: no data (give --data-dir DIR"),
    ]:
        assert main(["eval", "harness", "--model", model_dir, *arguments]) == 2
        assert message in capsys.readouterr().err
    from dpolab.commands.eval import _fewshot

    assert _fewshot("5") == 5 and _fewshot("gsm8k=5,arc=25") == {"gsm8k": 5, "arc": 25}


def test_without_lm_eval_the_error_names_the_extra(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    with pytest.raises(ValueError, match=r"not installed: pip install 'dpolab\[eval\]'"):
        evaluate_directory(model_dir, {"arc": find_files("arc", FIXTURES)})
