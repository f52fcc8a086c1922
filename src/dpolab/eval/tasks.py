"""dpolab's task definitions for lm-evaluation-harness: the leaderboard task shapes, read from local files.

Each :class:`TaskShape` is one of the Open LLM Leaderboard's evaluation forms, with the public schema
of the data set it was made for, so the real files (a Hugging Face data set's JSONL or Parquet split)
can be named as they are, and a user's own data in the same schema works too:

===============  ==========================  ===================================================  ===========
task             form                        schema (one row)                                      metrics
===============  ==========================  ===================================================  ===========
arc              multiple-choice likelihood  question, choices {text [..], label [..]}, answerKey  acc, acc_norm
hellaswag        completion choice           activity_label, ctx_a, ctx_b, endings [..], label     acc, acc_norm
mmlu             lettered multiple choice    question, choices [..], answer (index)                acc
truthfulqa_mc1   multiple-choice likelihood  question, mc1_targets {choices [..], labels [..]}     acc
truthfulqa_mc2   true-answer probability     question, mc2_targets {choices [..], labels [..]}     acc
winogrande      partial scoring             sentence (with _), option1, option2, answer (1 or 2)  acc
gsm8k            few-shot generation         question, answer (ending in #### N)                   exact_match
gsm8k_plain      the same, plain format      question, answer (ending in #### N)                   exact_match
===============  ==========================  ===================================================  ===========

``gsm8k`` uses the leaderboard's "Question: … / Answer:" format; ``gsm8k_plain`` the question, a newline,
then the solution: the format of dpolab's own data and of ``dpolab eval math``, for models trained on it.

:func:`write_task_dir` writes, for the tasks asked, one YAML per task (``dpolab_<task>``, its data files
named by absolute path) and a ``utils.py`` that imports :mod:`dpolab.eval.task_functions`. The same
folder drives the in-memory run (:mod:`dpolab.eval.harness`) and ``lm_eval --include_path FOLDER``, so
the two run one definition. Nothing is downloaded: the data are ``json``/``parquet`` files on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from dpolab.data.formats import BadLine, DataError, read_jsonl_lines, read_rows

PREFIX = "dpolab_"
EVALUATION_SPLITS = ("test", "validation")
FEWSHOT_SPLITS = ("train", "dev", "validation")
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class Function(str):
    """A ``!function utils.NAME`` reference in a task YAML."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Function, lambda dumper, name: dumper.represent_scalar("!function", f"utils.{name}"))


# --- the schema checks: a problem with one row, or None ------------------------------------------------


def _text(row: dict, key: str) -> str | None:
    if key not in row:
        return f"no {key!r} field"
    if not isinstance(row[key], str) or not row[key].strip():
        return f"{key!r} must be a non-empty string"
    return None


def _texts(value: object, key: str, at_least: int = 2) -> str | None:
    if not isinstance(value, list) or len(value) < at_least or not all(isinstance(v, str) for v in value):
        return f"{key!r} must be a list of at least {at_least} strings"
    return None


def _first(*problems: str | None) -> str | None:
    return next((p for p in problems if p is not None), None)


def _arc(row: dict) -> str | None:
    choices = row.get("choices")
    if not isinstance(choices, dict):
        return _first(_text(row, "question"), "'choices' must be an object {text: [...], label: [...]}")
    problem = _first(
        _text(row, "question"),
        _texts(choices.get("text"), "choices.text"),
        _texts(choices.get("label"), "choices.label"),
        _text(row, "answerKey"),
    )
    if problem:
        return problem
    if len(choices["text"]) != len(choices["label"]):
        return "'choices.text' and 'choices.label' differ in length"
    if row["answerKey"] not in choices["label"]:
        return f"'answerKey' {row['answerKey']!r} is not one of choices.label {choices['label']}"
    return None


def _hellaswag(row: dict) -> str | None:
    problem = _first(
        *(_text(row, k) for k in ("activity_label", "ctx_a")),
        None if isinstance(row.get("ctx_b"), str) else "'ctx_b' must be a string (it may be empty)",
        _texts(row.get("endings"), "endings"),
    )
    if problem:
        return problem
    label = row.get("label")
    if str(label).strip() not in {str(i) for i in range(len(row["endings"]))}:
        return f"'label' must be the index of the right ending (0..{len(row['endings']) - 1}); got {label!r}"
    return None


def _mmlu(row: dict) -> str | None:
    problem = _first(_text(row, "question"), _texts(row.get("choices"), "choices"))
    if problem:
        return problem
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(row["choices"]):
        return f"'answer' must be the index of the right choice (0..{len(row['choices']) - 1}); got {answer!r}"
    if len(row["choices"]) > 26:
        return "more than 26 choices (they are lettered A..Z)"
    return None


def _targets(row: dict, key: str, single: bool) -> str | None:
    targets = row.get(key)
    if not isinstance(targets, dict):
        return f"no {key!r} object {{choices: [...], labels: [...]}}"
    problem = _texts(targets.get("choices"), f"{key}.choices")
    if problem:
        return problem
    labels = targets.get("labels")
    if not isinstance(labels, list) or len(labels) != len(targets["choices"]) or not set(labels) <= {0, 1}:
        return f"'{key}.labels' must be a list of 0/1, one per choice"
    if single and labels.count(1) != 1:
        return f"'{key}.labels' must have exactly one 1 (the one true answer)"
    if not single and not (0 < labels.count(1) < len(labels)):
        return f"'{key}.labels' needs at least one true (1) and one false (0) answer"
    return None


def _winogrande(row: dict) -> str | None:
    problem = _first(*(_text(row, k) for k in ("sentence", "option1", "option2")))
    if problem:
        return problem
    if row["sentence"].count("_") != 1:
        return f"'sentence' must have exactly one blank '_'; it has {row['sentence'].count('_')}"
    if str(row.get("answer")).strip() not in ("1", "2"):
        return f"'answer' must be 1 or 2 (which option fills the blank); got {row.get('answer')!r}"
    return None


def _gsm8k(row: dict) -> str | None:
    problem = _first(_text(row, "question"), _text(row, "answer"))
    if problem:
        return problem
    if "####" not in row["answer"]:
        return "'answer' must end with the final answer as '#### N'"
    return None


# --- the task shapes -------------------------------------------------------------------------------------

_EXACT_MATCH = {
    "metric": "exact_match",
    "aggregation": "mean",
    "higher_is_better": True,
    "ignore_case": True,
    "ignore_punctuation": False,
    # "#### N" and a bare "N" compare equal; thousands commas, dollar signs and a final full stop are dropped
    "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
}


# strict: the "#### N" the data's solutions end with; flexible: the last number written
_ANSWER_FILTERS = [
    {
        "name": "strict-match",
        "filter": [
            {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
            {"function": "take_first"},
        ],
    },
    {
        "name": "flexible-extract",
        "filter": [
            {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
            {"function": "take_first"},
        ],
    },
]


def _metric(name: str) -> dict:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True}


@dataclass(frozen=True)
class TaskShape:
    name: str
    form: str
    schema: str  # the fields of one row, for error messages and docs
    check: Callable[[dict], str | None]
    definition: dict  # the task YAML's body, without the data
    metrics: tuple[str, ...]


TASKS: dict[str, TaskShape] = {
    shape.name: shape
    for shape in [
        TaskShape(
            "arc",
            "multiple-choice likelihood (ARC-Easy/Challenge)",
            "question, choices {text: [..], label: [..]}, answerKey",
            _arc,
            {
                "output_type": "multiple_choice",
                "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_target": "{{choices.label.index(answerKey)}}",
                "doc_to_choice": "{{choices.text}}",
                "metric_list": [_metric("acc"), _metric("acc_norm")],
            },
            ("acc", "acc_norm"),
        ),
        TaskShape(
            "hellaswag",
            "completion choice (HellaSwag)",
            "activity_label, ctx_a, ctx_b, endings [..], label",
            _hellaswag,
            {
                "output_type": "multiple_choice",
                "process_docs": Function("hellaswag_docs"),
                "doc_to_text": "{{query}}",
                "doc_to_target": "{{gold}}",
                "doc_to_choice": "choices",
                "metric_list": [_metric("acc"), _metric("acc_norm")],
            },
            ("acc", "acc_norm"),
        ),
        TaskShape(
            "mmlu",
            "lettered multiple choice (MMLU)",
            "question, choices [..], answer (index of the right choice)",
            _mmlu,
            {
                "output_type": "multiple_choice",
                "doc_to_text": Function("lettered_question"),
                "doc_to_target": "answer",
                "doc_to_choice": Function("letters"),
                "metric_list": [_metric("acc")],
            },
            ("acc",),
        ),
        TaskShape(
            "truthfulqa_mc1",
            "multiple-choice likelihood, one true answer (TruthfulQA MC1)",
            "question, mc1_targets {choices: [..], labels: [0/1 ..]}",
            lambda row: _first(_text(row, "question"), _targets(row, "mc1_targets", single=True)),
            {
                "output_type": "multiple_choice",
                "doc_to_text": Function("truthfulqa_question"),
                "doc_to_target": Function("mc1_target"),
                "doc_to_choice": Function("mc1_choices"),
                "metric_list": [_metric("acc")],
            },
            ("acc",),
        ),
        TaskShape(
            "truthfulqa_mc2",
            "probability mass of the true answers (TruthfulQA MC2)",
            "question, mc2_targets {choices: [..], labels: [0/1 ..]}",
            lambda row: _first(_text(row, "question"), _targets(row, "mc2_targets", single=False)),
            {
                "output_type": "multiple_choice",
                "doc_to_text": Function("truthfulqa_question"),
                "doc_to_target": 0,
                "doc_to_choice": Function("mc2_choices"),
                "process_results": Function("mc2_results"),
                "metric_list": [_metric("acc")],
            },
            ("acc",),
        ),
        TaskShape(
            "winogrande",
            "partial scoring: the continuation after the blank, under each filled prefix (Winogrande)",
            "sentence (one '_'), option1, option2, answer (1 or 2)",
            _winogrande,
            {
                "output_type": "multiple_choice",
                "doc_to_text": Function("winogrande_gold"),
                "doc_to_target": Function("winogrande_continuation"),
                "doc_to_choice": Function("winogrande_contexts"),
                "metric_list": [_metric("acc")],
            },
            ("acc",),
        ),
        TaskShape(
            "gsm8k",
            "few-shot generation, final answer extracted (GSM8K)",
            "question, answer (a solution ending in '#### N')",
            _gsm8k,
            {
                "output_type": "generate_until",
                "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_target": "{{answer}}",
                "fewshot_delimiter": "\n\n",
                "generation_kwargs": {
                    "until": ["Question:", "</s>", "<|im_end|>"],
                    "do_sample": False,
                    "temperature": 0.0,
                    "max_gen_toks": 256,
                },
                "filter_list": _ANSWER_FILTERS,
                "metric_list": [_EXACT_MATCH],
            },
            ("exact_match",),
        ),
        TaskShape(
            "gsm8k_plain",
            "GSM8K in the plain format of dpolab's own data: the question, a newline, the solution",
            "question, answer (a solution ending in '#### N')",
            _gsm8k,
            {
                "output_type": "generate_until",
                "doc_to_text": "{{question}}\n",
                "doc_to_target": "{{answer}}",
                "target_delimiter": "",
                "fewshot_delimiter": "\n\n",
                "generation_kwargs": {"until": ["\n\n", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0},
                "filter_list": _ANSWER_FILTERS,
                "metric_list": [_EXACT_MATCH],
            },
            ("exact_match",),
        ),
    ]
}


def shape(name: str) -> TaskShape:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are: {', '.join(TASKS)}")
    return TASKS[name]


# --- the data files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFiles:
    """The files one task reads: the documents it scores, and (for few-shot) where the examples come from."""

    evaluation: Path
    fewshot: Path | None = None


def _split_file(folder: Path, splits: tuple[str, ...], exclude: Path | None = None) -> Path | None:
    for split in splits:
        for suffix in SUFFIXES:
            candidate = folder / f"{split}{suffix}"
            if candidate.is_file() and candidate != exclude:
                return candidate
    return None


def find_files(task: str, data_dir: str | Path) -> TaskFiles:
    """``DATA_DIR/<task>/{test,validation}.{jsonl,json,parquet}``, and a few-shot ``{train,dev,validation}`` file."""
    shape(task)
    folder = Path(data_dir).expanduser() / task
    evaluation = _split_file(folder, EVALUATION_SPLITS)
    if evaluation is None:
        raise DataError(
            f"task {task}: no evaluation file in {folder} (expected test.jsonl or validation.jsonl; "
            f".json and .parquet are read too)"
        )
    return TaskFiles(evaluation.resolve(), _resolved(_split_file(folder, FEWSHOT_SPLITS, exclude=evaluation)))


def resolve_files(
    tasks: list[str],
    data_dir: str | Path | None,
    data: dict[str, str],
    fewshot_data: dict[str, str],
    keys: tuple[str, str, str] = ("--data-dir", "--data", "--fewshot-data"),
) -> dict[str, TaskFiles]:
    """Each task's :class:`TaskFiles`: the files named in ``data``/``fewshot_data`` (task → file), else found in
    ``data_dir`` (:func:`find_files`). ``keys`` name the three settings in errors (flags, or config keys)."""
    dir_key, data_key, fewshot_key = keys
    for task in [*tasks, *data, *fewshot_data]:
        shape(task)  # an unknown task lists the known ones
    stray = sorted((set(data) | set(fewshot_data)) - set(tasks))
    if stray:
        raise ValueError(f"{data_key}/{fewshot_key} name {stray[0]!r}, which is not among the tasks")
    files = {}
    for task in tasks:
        if task in data:
            found = TaskFiles(Path(data[task]).expanduser().resolve())
        elif data_dir is not None:
            found = find_files(task, data_dir)
        else:
            raise ValueError(
                f"task {task}: no data (give {dir_key} DIR with {task}/test.jsonl, or {data_key} {task}=FILE)"
            )
        fewshot = Path(fewshot_data[task]).expanduser().resolve() if task in fewshot_data else found.fewshot
        files[task] = TaskFiles(found.evaluation, fewshot)
    return files


def _resolved(path: Path | None) -> Path | None:
    return None if path is None else path.resolve()


def check_file(task: str, path: str | Path) -> int:
    """Every row of ``path`` in ``task``'s schema; the row count. Names the file, the row and the field."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(
            f"{path}: task {task} reads .jsonl, .json or .parquet files; got {path.suffix or 'no suffix'!r}"
        )
    check = shape(task).check
    if path.suffix.lower() == ".jsonl":
        numbered = read_jsonl_lines(path)  # line numbers, as an editor shows them
        where = "line"
    else:
        numbered = list(enumerate(read_rows(str(path)), start=1))
        where = "row"
    if not numbered:
        raise DataError(f"{path}: no rows (the file is empty)")
    for number, row in numbered:
        if isinstance(row, BadLine):
            raise DataError(f"{path} {where} {number}: {row.reason}")
        problem = "not a JSON object" if not isinstance(row, dict) else check(row)
        if problem:
            raise DataError(f"{path} {where} {number}: {problem} (task {task} expects: {shape(task).schema})")
    return len(numbered)


def check_files(files: dict[str, TaskFiles]) -> None:
    """:func:`check_file` on every task's evaluation and few-shot file."""
    for task, task_files in files.items():
        check_file(task, task_files.evaluation)
        if task_files.fewshot is not None:
            check_file(task, task_files.fewshot)


def write_task_dir(
    files: dict[str, TaskFiles],
    directory: str | Path,
    shots: dict[str, int] | None = None,
    max_new_tokens: int = 256,
) -> dict[str, str]:
    """The YAMLs and ``utils.py`` of ``files``' tasks in ``directory``; {task: its lm-eval task name}.

    The files are those :func:`check_files` passed (the harness checks them before any model loads).
    """
    from dpolab.outputs import write_text

    directory = Path(directory)
    write_text(
        directory / "utils.py",
        '"""Written by dpolab: the functions its task YAMLs name (dpolab.eval.task_functions)."""\n'
        "from dpolab.eval.task_functions import *  # noqa: F403\n",
    )
    names = {}
    for task, task_files in files.items():
        names[task] = PREFIX + task
        write_text(
            directory / f"{names[task]}.yaml",
            yaml.dump(
                task_config(task, task_files, (shots or {}).get(task, 0), max_new_tokens),
                Dumper=_Dumper,
                sort_keys=False,
                allow_unicode=True,
            ),
        )
    return names


def task_config(task: str, files: TaskFiles, num_fewshot: int = 0, max_new_tokens: int = 256) -> dict:
    """The task YAML of ``task`` over ``files``, with ``num_fewshot`` examples drawn from the few-shot file
    and, for a generation task, at most ``max_new_tokens`` generated per document."""
    builders = {SUFFIXES[p.suffix.lower()] for p in (files.evaluation, files.fewshot) if p is not None}
    if len(builders) > 1:
        raise DataError(f"task {task}: the evaluation and few-shot files must be the same type (both JSON or Parquet)")
    data_files = {"test": str(files.evaluation)}
    if files.fewshot is not None:
        data_files["train"] = str(files.fewshot)
    config = {
        "task": PREFIX + task,
        "dataset_path": builders.pop(),
        "dataset_kwargs": {"data_files": data_files},
        "test_split": "test",
    }
    if files.fewshot is not None:
        config["fewshot_split"] = "train"
    definition = dict(shape(task).definition)
    if "generation_kwargs" in definition:
        definition["generation_kwargs"] = {**definition["generation_kwargs"], "max_gen_toks": max_new_tokens}
    return {**config, "num_fewshot": num_fewshot, **definition, "metadata": {"version": 1.0}}
