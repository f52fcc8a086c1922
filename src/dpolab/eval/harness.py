"""``dpolab eval harness``: lm-evaluation-harness on a model in memory, over dpolab's offline task files.

:func:`evaluate_model` wraps a loaded causal LM and its tokenizer in the harness's ``HFLM`` (which takes
a model instance), writes the task definitions of :mod:`dpolab.eval.tasks` for the files named, and
runs ``lm_eval.simple_evaluate`` on them with the harness's own seeds. The numbers are the harness's:
a test checks they equal what the ``lm_eval`` command line prints for the same model and task folder.

Each metric gets the harness's standard error and a 95% percentile-bootstrap interval over the documents
(resampling the per-document scores the harness logs, :data:`BOOTSTRAP_RESAMPLES` times, seeded), which
stays inside [0, 1] where the normal interval ±1.96·stderr would not on a few hundred documents.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dpolab.eval.tasks import TaskFiles, check_files, shape, write_task_dir

BOOTSTRAP_RESAMPLES = 2000
EXTRA = "pip install 'dpolab[eval]'"


def require_lm_eval():
    """The ``lm_eval`` module, or a one-line error saying which extra to install."""
    try:
        import lm_eval
    except ImportError:
        raise ValueError(f"dpolab eval harness needs lm-evaluation-harness, which is not installed: {EXTRA}") from None
    return lm_eval


def bootstrap_interval(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95):
    """(low, high): the percentile-bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def fewshot_counts(num_fewshot: int | dict[str, int] | None, files: dict[str, TaskFiles]) -> dict[str, int]:
    """Shots per task: one count for all, or per task (others 0); each task with shots needs a few-shot file."""
    if isinstance(num_fewshot, dict):
        unknown = sorted(set(num_fewshot) - set(files))
        if unknown:
            raise ValueError(
                f"num_fewshot names {unknown[0]!r}, which is not among the tasks asked ({', '.join(files)})"
            )
        shots = {task: int(num_fewshot.get(task, 0)) for task in files}
    else:
        shots = dict.fromkeys(files, int(num_fewshot or 0))
    for task, count in shots.items():
        if count < 0:
            raise ValueError(f"num_fewshot of {task} must be 0 or more; got {count}")
        if count and files[task].fewshot is None:
            raise ValueError(
                f"task {task} asks for {count} few-shot examples and has no few-shot file "
                "(a train.jsonl or dev.jsonl beside its test file, or --fewshot-data TASK=FILE)"
            )
    return shots


def context_length(model) -> int | None:
    """The model's longest sequence, from its config (where the harness reads it), or None."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def check_request(files: dict[str, TaskFiles], num_fewshot: int | dict[str, int] | None, limit: int | None):
    """Everything about a run that needs no model: the tasks, the limit, the shots, every row of every file.

    Returns the shots per task (:func:`fewshot_counts`).
    """
    if not files:
        raise ValueError("no tasks to evaluate")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1; got {limit}")
    shots = fewshot_counts(num_fewshot, files)
    check_files(files)
    return shots


def evaluate_model(
    model,
    tokenizer,
    files: dict[str, TaskFiles],
    *,
    num_fewshot: int | dict[str, int] | None = None,
    limit: int | None = None,
    **options,
) -> dict:
    """The harness's results of ``model`` on ``files``' tasks, with 95% intervals (see the module docstring).

    ``options``: ``batch_size`` (8), ``max_new_tokens`` (256), ``task_dir`` (where the task YAMLs are
    written and kept, so ``lm_eval --include_path`` can rerun them; a temporary folder when None), ``seed``
    (0) and ``log_samples``. ``model`` is used as it is (device, dtype; its train/eval mode is restored).
    """
    return evaluate_checked(model, tokenizer, files, check_request(files, num_fewshot, limit), limit=limit, **options)


@contextmanager
def _quiet_git_hash():
    """lm-evaluation-harness records the working directory's git commit with ``git describe``, whose "fatal: not a
    git repository" reaches the terminal outside a repository: asked the same way here, git's errors kept."""
    import lm_eval.evaluator as evaluator

    original = evaluator.get_git_commit_hash

    def quiet() -> str | None:
        try:
            described = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return described.stdout.strip() or None

    evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def evaluate_checked(
    model,
    tokenizer,
    files: dict[str, TaskFiles],
    shots: dict[str, int],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    task_dir: str | Path | None = None,
    seed: int = 0,
    log_samples: bool = False,
    max_new_tokens_key: str = "--max-new-tokens",
) -> dict:
    """:func:`evaluate_model` once :func:`check_request` has passed."""
    context = context_length(model)
    generating = [task for task in files if shape(task).definition["output_type"] == "generate_until"]
    if generating and context is not None and max_new_tokens >= context:
        raise ValueError(
            f"task {generating[0]} generates up to {max_new_tokens} tokens, and the model's context is {context}: "
            f"lower {max_new_tokens_key}"  # the flag, or the config key when training evaluates
        )
    if tokenizer is None:
        raise ValueError("the model has no tokenizer (save one beside it, or name it with --tokenizer)")
    lm_eval = require_lm_eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task files are local: never ask the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="dpolab-tasks-") as scratch:
        folder = Path(task_dir) if task_dir is not None else Path(scratch)
        names = write_task_dir(files, folder, shots, max_new_tokens)
        was_training = model.training
        model.eval()
        harness_log = logging.getLogger("lm_eval")
        level = harness_log.level
        harness_log.setLevel(logging.ERROR)  # its notes on an in-memory model and on truncation are not for users
        try:
            device = next(model.parameters()).device
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
            with _quiet_git_hash():
                output = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=list(names.values()),
                    limit=limit,
                    task_manager=TaskManager(include_path=str(folder), include_defaults=False, verbosity="ERROR"),
                    log_samples=True,
                    random_seed=seed,
                    numpy_random_seed=seed + 1234,
                    torch_random_seed=seed + 1234,
                    fewshot_random_seed=seed + 1234,
                    verbosity="ERROR",
                )
        finally:
            model.train(was_training)
            harness_log.setLevel(level)
    result = {
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "limit": limit,
        "seed": seed,
        "task_dir": str(task_dir) if task_dir is not None else None,
        "tasks": {task: _task_result(task, name, output, files[task]) for task, name in names.items()},
    }
    if log_samples:
        result["samples"] = {task: _plain(output["samples"][name]) for task, name in names.items()}
    return result


def _task_result(task: str, name: str, output: dict, files: TaskFiles) -> dict:
    """One task's metrics: {"metric[,filter]": {value, stderr, low, high}}, its document count and files."""
    numbers = output["results"][name]
    samples = output["samples"][name]
    metrics = {}
    for key, value in numbers.items():
        if "," not in key or "_stderr," in key or not isinstance(value, int | float):
            continue
        metric, filter_name = key.split(",", 1)
        if metric not in shape(task).metrics:
            continue
        per_document = [s[metric] for s in samples if s["filter"] == filter_name]
        low, high = bootstrap_interval(per_document)
        stderr = numbers.get(f"{metric}_stderr,{filter_name}")
        label = metric if filter_name == "none" else f"{metric},{filter_name}"
        metrics[label] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            "low": low,
            "high": high,
            "documents": len(per_document),
        }
    return {
        "documents": int(output["n-samples"][name]["effective"]),
        "num_fewshot": output["n-shot"].get(name),
        "files": {"evaluation": str(files.evaluation), "fewshot": str(files.fewshot) if files.fewshot else None},
        "metrics": metrics,
    }


def _plain(samples: list[dict]) -> list[dict]:
    """The logged samples, JSON-ready (their documents, prompts, responses and per-document scores)."""
    return json.loads(json.dumps(samples, default=str))


def table(result: dict, title: str | None = None) -> str:
    """A Markdown table of ``result``: task, metric, documents, value and its 95% interval, in percent."""
    lines = [f"**{title}**", ""] if title else []
    lines += [
        "| task | metric | shots | documents | value (%) | 95% interval (%) | stderr (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, numbers in result["tasks"].items():
        for metric, m in numbers["metrics"].items():
            stderr = "–" if m["stderr"] is None else f"{100 * m['stderr']:.1f}"
            lines.append(
                f"| {task} | {metric} | {numbers['num_fewshot']} | {m['documents']} | {100 * m['value']:.1f} | "
                f"{100 * m['low']:.1f} – {100 * m['high']:.1f} | {stderr} |"
            )
    return "\n".join(lines)


def evaluate_directory(
    model_dir: str | Path,
    files: dict[str, TaskFiles],
    *,
    allow_pickle: bool = False,
    tokenizer_dir: str | Path | None = None,
    **options,
) -> dict:
    """:func:`evaluate_model` on the model saved in ``model_dir`` (loaded by dpolab's one loader), with the same
    options; the request and the data are checked before the model loads."""
    from dpolab.console import quiet_libraries
    from dpolab.engine.loading import check_vocabulary, default_device, load_model, load_tokenizer

    source = Path(tokenizer_dir or model_dir).expanduser()
    if source.is_dir() and not any((source / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"{source}: no tokenizer (tokenizer.json or tokenizer_config.json); name one with --tokenizer")
    require_lm_eval()
    # bad data or a bad request stops the run before the model loads
    shots = check_request(files, options.pop("num_fewshot", None), options.get("limit"))
    with quiet_libraries():
        model = load_model(model_dir, allow_pickle=allow_pickle, device=default_device())
        tokenizer = load_tokenizer(source)
    check_vocabulary(model, tokenizer, model_dir, source)
    with quiet_libraries():  # the harness's own request bars: lines of carriage returns in a pipe
        result = evaluate_checked(model, tokenizer, files, shots, **options)
    return {"model": str(model_dir), **result}
