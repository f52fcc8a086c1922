"""``dpolab eval``: maths accuracy (``math``), lm-evaluation-harness tasks (``harness``), contamination."""

from __future__ import annotations

import argparse
from pathlib import Path

from dpolab.console import say

SUBCOMMANDS = ("math", "harness", "contamination", "tokens")


def route(argv: list[str]) -> list[str]:
    """``dpolab eval DATA ...`` (the form before the subcommands) is ``dpolab eval math DATA ...``."""
    if argv[:1] == ["eval"] and len(argv) > 1 and argv[1] not in (*SUBCOMMANDS, "-h", "--help"):
        return ["eval", "math", *argv[1:]]
    return argv


def math_command(args: argparse.Namespace) -> int:
    from dpolab.eval.maths import evaluate_file
    from dpolab.outputs import check_outputs, write_json

    inputs = {"data": args.data, "model": args.model, "--fewshot-data": args.fewshot_data}
    args.out = check_outputs({"--out": args.out}, "eval", inputs)["--out"]
    result = evaluate_file(
        args.model,
        args.data,
        args.prompt_field,
        args.answer_field,
        args.prompt_suffix,
        args.limit,
        args.fewshot_data,
        args.num_fewshot,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
    )
    if args.out:
        write_json(args.out, result)
    say(
        f"{args.model}: greedy accuracy {100 * result['accuracy']:.1f}% ({result['correct']}/{result['problems']}); "
        f"{result['no_final_answer']} without a final answer" + (f"; generations in {args.out}" if args.out else "")
    )
    return 0


def _assignments(values: list[str], flag: str) -> dict[str, str]:
    """``TASK=VALUE`` arguments as a mapping; a malformed one is an error naming it."""
    pairs = {}
    for value in values:
        task, sep, rest = value.partition("=")
        if not sep or not task or not rest:
            raise ValueError(f"{flag} {value!r}: expected TASK=VALUE")
        pairs[task.strip()] = rest.strip()
    return pairs


def _fewshot(value: str | None) -> int | dict[str, int] | None:
    """``--num-fewshot 5`` (every task) or ``--num-fewshot gsm8k=5,arc=25`` (per task, others 0)."""
    if value is None:
        return None
    counts = _assignments(value.split(","), "--num-fewshot") if "=" in value else {"": value}
    if not all(count.isdigit() for count in counts.values()):
        raise ValueError(f"--num-fewshot {value!r}: expected a count, or TASK=COUNT pairs separated by commas")
    return int(counts[""]) if "" in counts else {task: int(count) for task, count in counts.items()}


def harness_files(tasks: list[str], data_dir: str | None, data: list[str], fewshot_data: list[str]) -> dict:
    """Each task's files: named with --data/--fewshot-data (``TASK=FILE``), else found in --data-dir."""
    from dpolab.eval.tasks import resolve_files

    named, named_fewshot = _assignments(data, "--data"), _assignments(fewshot_data, "--fewshot-data")
    return resolve_files(tasks, data_dir, named, named_fewshot)


def harness_command(args: argparse.Namespace) -> int:
    from dpolab.eval.harness import evaluate_directory, table
    from dpolab.outputs import check_output, check_outputs, claim_folder, write_json

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks: name at least one task")
    num_fewshot = _fewshot(args.num_fewshot)
    files = harness_files(tasks, args.data_dir, args.data or [], args.fewshot_data or [])
    inputs = {"model": args.model, "tokenizer": args.tokenizer, "--data-dir": args.data_dir}
    inputs |= {f"{task} data": [found.evaluation, found.fewshot] for task, found in files.items()}
    args.out = check_outputs({"--out": args.out}, "eval", inputs)["--out"]
    if args.task_dir:
        from dpolab.eval.tasks import PREFIX

        writes = {"utils.py"} | {f"{PREFIX}{task}.yaml" for task in tasks}
        owner = "dpolab eval harness --task-dir"
        args.task_dir = check_output(args.task_dir, "eval", inputs, "--task-dir", writes=writes, owner=owner)
        claim_folder(args.task_dir, owner)
        if args.out is not None and args.out.resolve().parent == args.task_dir.resolve() and args.out.name in writes:
            raise ValueError(f"--out {args.out} is one of the files --task-dir writes; give it another name")
    result = evaluate_directory(
        args.model,
        files,
        allow_pickle=args.allow_pickle,
        tokenizer_dir=args.tokenizer,
        num_fewshot=num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        task_dir=args.task_dir,
        log_samples=args.log_samples,
    )
    if args.out:
        write_json(args.out, result)
    say(table(result, title=f"{args.model} (lm-evaluation-harness {result['lm_eval_version']})"))
    if args.out:
        say(f"results in {args.out}")
    return 0


def contamination_command(args: argparse.Namespace) -> int:
    from dpolab.eval.contamination import check, table
    from dpolab.outputs import check_outputs, write_json

    inputs = {"data": args.data, "model": args.model, "reference": args.reference}
    args.out = check_outputs({"--out": args.out}, "eval", inputs)["--out"]
    result = check(
        args.model,
        args.data,
        reference_dir=args.reference,
        fields=[f.strip() for f in args.fields.split(",") if f.strip()],
        label_field=args.label_field or None,
        k=args.k,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        allow_pickle=args.allow_pickle,
        progress=not args.no_progress,
    )
    if args.out:
        write_json(args.out, result)
    say(table(result))
    if args.out:
        say(f"scores of every text in {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "eval",
        help="evaluate a model: maths accuracy, lm-evaluation-harness tasks, contamination",
        description="`dpolab eval DATA --model M` is `dpolab eval math DATA --model M`.",
    )
    commands = evaluate.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")

    maths = commands.add_parser(
        "math",
        help="greedy-decoding accuracy on maths problems (final answer checked with math-verify)",
        description="Decodes each problem's prompt greedily and compares the final answer (#### N, A: N or "
        "\\boxed{...}) with the reference answer's by math-verify. Rows without the prompt or answer field are named.",
    )
    maths.add_argument(
        "data", help=".jsonl of problems, e.g. data/gsm8k/train.jsonl of the dpolab repository (openai/gsm8k)"
    )
    maths.add_argument("--model", required=True, help="Hugging Face causal LM directory or id")
    maths.add_argument("--prompt-field", default="question")
    maths.add_argument("--answer-field", default="answer", help="a solution ending in #### N, or a number")
    maths.add_argument("--prompt-suffix", default="\n", help="appended to each prompt (default: a newline)")
    maths.add_argument("--limit", type=int, default=None, help="only the first N problems")
    maths.add_argument("--fewshot-data", help="few-shot: a .jsonl of solved problems (same fields), e.g. a train split")
    maths.add_argument(
        "--num-fewshot", type=int, default=0, help="few-shot: the first K problems of --fewshot-data precede each one"
    )
    maths.add_argument("--max-new-tokens", type=int, default=256)
    maths.add_argument("--batch-size", type=int, default=64)
    maths.add_argument("--out", help="JSON with the accuracy and every generation")
    maths.add_argument("--allow-pickle", action="store_true")
    maths.add_argument("--no-progress", action="store_true")
    maths.set_defaults(handler=math_command)

    from dpolab.eval.tasks import TASKS

    harness = commands.add_parser(
        "harness",
        help="the leaderboard task shapes through lm-evaluation-harness, offline, from local files",
        description="Runs lm-evaluation-harness on the model in memory over dpolab's task definitions, which read "
        "local files in each task's public schema (docs/evaluation.md). Tasks: " + ", ".join(TASKS) + ". "
        "Needs the eval extra: pip install 'dpolab[eval]'.",
    )
    harness.add_argument("--model", required=True, help="Hugging Face causal LM directory")
    harness.add_argument("--tasks", required=True, help="comma-separated, e.g. arc,gsm8k")
    harness.add_argument(
        "--data-dir", help="a folder with TASK/test.jsonl (or validation) and TASK/train.jsonl (or dev)"
    )
    harness.add_argument("--data", action="append", metavar="TASK=FILE", help="a task's evaluation file (repeatable)")
    harness.add_argument("--fewshot-data", action="append", metavar="TASK=FILE", help="a task's few-shot examples")
    harness.add_argument("--num-fewshot", help="shots for every task (e.g. 5), or per task: gsm8k=5,arc=25 (default 0)")
    harness.add_argument("--limit", type=int, default=None, help="only the first N documents of each task")
    harness.add_argument("--batch-size", type=int, default=8)
    harness.add_argument("--max-new-tokens", type=int, default=256, help="generation tasks: tokens per answer")
    harness.add_argument("--tokenizer", help="the tokenizer's folder, when it is not beside the model")
    harness.add_argument("--task-dir", help="keep the task YAMLs here (rerun them with lm_eval --include_path)")
    harness.add_argument("--out", help="JSON with every metric, its stderr and 95%% bootstrap interval")
    harness.add_argument("--log-samples", action="store_true", help="put every document's prompt and score in --out")
    harness.add_argument("--allow-pickle", action="store_true")
    harness.set_defaults(handler=harness_command)

    contamination = commands.add_parser(
        "contamination",
        help="Min-K%% Prob and Min-K%%++ per text; AUROC with seen/unseen labels; comparison with a reference model",
        description="Scores each text by Min-K%% Prob (Shi et al. 2023), Min-K%%++ (Zhang et al. 2024) and its mean "
        "token log-prob; higher means more likely seen in training. With a label column (seen/unseen), the AUROC of "
        "each score with a 95%% bootstrap interval; with --reference, the model's scores minus the reference's.",
    )
    contamination.add_argument("--model", required=True, help="Hugging Face causal LM directory")
    contamination.add_argument("--data", required=True, help=".jsonl/.json/.parquet of texts")
    contamination.add_argument("--reference", help="a reference model's directory, scored on the same texts")
    contamination.add_argument("--fields", default="text", help="the fields that make a text, joined by a newline "
                               "(default: text; e.g. question,answer)")  # fmt: skip
    contamination.add_argument("--label-field", default="label", help="seen/unseen (or 1/0) per row, when present")
    contamination.add_argument("--k", type=float, default=0.2, help="the fraction of lowest-scoring tokens (0.2)")
    contamination.add_argument("--max-tokens", type=int, default=512, help="texts are cut at this many tokens")
    contamination.add_argument("--batch-size", type=int, default=16)
    contamination.add_argument("--out", help="JSON with the summary and every text's scores")
    contamination.add_argument("--allow-pickle", action="store_true")
    contamination.add_argument("--no-progress", action="store_true")
    contamination.set_defaults(handler=contamination_command)
    register_tokens(commands)


PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".eps", ".ps", ".tif", ".tiff")
"""The file types a figure is written as (matplotlib's, read from the name)."""


def tokens_command(args: argparse.Namespace) -> int:

    from dpolab.eval.tokens import plot_positions, table, token_report
    from dpolab.outputs import check_outputs, write_json, write_jsonl

    outputs = {"--out": args.out, "--tokens": args.tokens, "--plot": args.plot}
    inputs = {"data": args.data, "model": args.model, "reference": args.reference}
    args.out, args.tokens, args.plot = check_outputs(outputs, "eval", inputs).values()
    if args.plot is not None and args.plot.suffix.lower() not in PLOT_FORMATS:
        raise ValueError(f"--plot {args.plot}: name an image file ({', '.join(PLOT_FORMATS)}); checked before any work")
    summary, rows = token_report(
        args.model,
        args.data,
        reference_dir=args.reference,
        window=args.window,
        limit=args.limit,
        batch_size=args.batch_size,
        max_length=args.max_length,
        allow_pickle=args.allow_pickle,
        progress=not args.no_progress,
        max_prompt_length=args.max_prompt_length,
        truncation_mode=args.truncation_mode,
    )
    say(table(summary))
    if args.out:
        write_json(args.out, summary)
        say(f"summary in {args.out}")
    if args.tokens:
        write_jsonl(args.tokens, rows)
        say(f"every token's log-prob in {args.tokens}")
    if args.plot:
        plot_positions({"/".join(Path(args.model).parts[-2:]): summary}, args.plot)
        say(f"figure in {args.plot}")
    return 0


def register_tokens(commands: argparse._SubParsersAction) -> None:
    tokens = commands.add_parser(
        "tokens",
        help="each completion token's log-prob, and its change from a reference, by position from the first difference",
        description="Scores every chosen and rejected token of a pair file under the model (and a reference, e.g. the "
        "model a run started from) and summarises the log-probs and their change before, at and after the first "
        "token where chosen and rejected differ (the Smaug paper's mechanism; docs/evaluation.md).",
    )
    tokens.add_argument("data", help="preference pairs (.jsonl/.json/.parquet: prompt, chosen, rejected)")
    tokens.add_argument("--model", required=True, help="Hugging Face causal LM directory (its tokenizer beside it)")
    tokens.add_argument("--reference", help="the model to compare with (e.g. the run's starting model)")
    tokens.add_argument("--window", type=int, default=40, help="offsets from the first difference in by_position (40)")
    tokens.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    tokens.add_argument("--max-length", type=int, default=None, help="tokens per prompt + completion, as in training")
    tokens.add_argument("--max-prompt-length", type=int, default=None, help="prompt tokens, as in training")
    tokens.add_argument("--truncation-mode", choices=["keep_end", "keep_start", "drop"], default="keep_end")
    tokens.add_argument("--batch-size", type=int, default=16)
    tokens.add_argument("--out", help="JSON summary (flat numbers, and by_position)")
    tokens.add_argument("--tokens", help="JSONL: every pair's tokens and their log-probs")
    tokens.add_argument("--plot", help="PNG: the mean change (or log-prob) by offset from the first difference")
    tokens.add_argument("--allow-pickle", action="store_true")
    tokens.add_argument("--no-progress", action="store_true")
    tokens.set_defaults(handler=tokens_command)
