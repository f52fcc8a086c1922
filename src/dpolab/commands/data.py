"""``dpolab data``: the preference data tools (check, build pairs, sample, judge, scenarios)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpolab.console import say


def print_skipped(reasons: list[str], show: int) -> None:
    """The first ``show`` reasons a builder skipped rows for, then how many more."""

    for reason in reasons[:show]:
        say(f"skipped {reason}")
    if len(reasons) > show:
        say(f"… {len(reasons) - show} more skipped rows")


def _progress(enabled: bool, description: str):
    """A ``progress(total, done)`` factory for the resumable data commands: a rich bar with ETA."""
    import contextlib

    from dpolab.console import progress_bar

    stack = contextlib.ExitStack()

    def start(total: int, done: int):
        advance = stack.enter_context(progress_bar(enabled, description, total))
        if done:
            advance(0, completed=done)  # resumed: the count starts there, the ETA counts new work
        return advance

    return start, stack


def data_check_command(args: argparse.Namespace) -> int:
    from dpolab.data.check import check_file, print_report

    tokenizer = None
    if args.tokenizer:
        from dpolab.engine.loading import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    elif args.max_length is not None:
        raise ValueError("--max-length needs --tokenizer (lengths are counted in tokens)")
    report = check_file(args.file, tokenizer, args.max_length, args.allow_extra, args.max_row_bytes)
    print_report(report, args.show)
    return 0 if report.clean else 1


def data_corrupt_command(args: argparse.Namespace) -> int:
    from dpolab.data.corrupt import corrupt_file
    from dpolab.outputs import check_output

    args.out = str(check_output(args.out, "data", {"input file": args.file}, file=True))
    if args.step is not None and args.final != "keep":
        raise ValueError("--step picks an intermediate result; it cannot go with --final change")
    result = corrupt_file(args.file, args.out, args.solution_field, args.prompt_field, args.seed, args.final, args.step)
    print_skipped(result["skipped"], args.show)
    say(
        f"wrote {result['pairs']} pairs from {result['rows']} rows to {args.out}; "
        f"{len(result['skipped'])} rows could not be corrupted"
    )
    for reason, count in sorted(result["skipped_by_reason"].items(), key=lambda item: -item[1]):
        say(f"  {count} rows: {reason}")
    return 0


def data_edit_stats_command(args: argparse.Namespace) -> int:
    import time

    from dpolab.data.edit_stats import edit_stats, write_outputs
    from dpolab.data.formats import load_examples
    from dpolab.outputs import check_output, claim_folder

    inputs = {"input file": args.file, "tokenizer": args.tokenizer}
    writes, owner = {"summary.json", "histogram.png"}, "dpolab data edit-stats"
    args.out = str(claim_folder(check_output(args.out, "data", inputs, writes=writes, owner=owner), owner))
    start = time.perf_counter()
    examples, bad = load_examples(args.file, on_bad_rows="skip")
    if not examples:
        raise ValueError(f"{args.file}: no usable pairs ({len(bad)} bad rows)")
    tokenizer = None
    if args.tokenizer:
        from dpolab.engine.loading import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    text = lambda value: value if isinstance(value, str) else json.dumps(value)  # noqa: E731
    stats = edit_stats([text(e.chosen) for e in examples], [text(e.rejected) for e in examples], tokenizer)
    summary = write_outputs(stats, args.out, Path(args.file).name)
    c = summary["char_distance"]
    say(f"{summary['pairs']} pairs ({len(bad)} bad rows skipped) in {time.perf_counter() - start:.1f} s")
    say(
        f"normalised character edit distance: mean {c['mean']:.4f}, median {c['median']:.4f}, "
        f"p10 {c['p10']:.4f}, p90 {c['p90']:.4f}; below 0.1: {100 * c['share_below']['0.1']:.1f}%"
    )
    if "token_distance" in summary:
        t = summary["token_distance"]
        say(f"normalised token edit distance: mean {t['mean']:.4f}, median {t['median']:.4f}")
    r = summary["first_difference_relative"]
    say(
        f"first difference at {100 * r['median']:.1f}% of the completion (median); "
        f"wrote {args.out}/summary.json and histogram.png"
    )
    return 0


def data_from_choices_command(args: argparse.Namespace) -> int:
    from dpolab.data.choices import Schema, pairs_from_choices
    from dpolab.data.formats import numbered_rows, write_jsonl
    from dpolab.outputs import check_output

    args.out = str(check_output(args.out, "data", {"input file": args.file}, file=True))
    numbered = numbered_rows(args.file, args.split)
    rows, lines = [row for _, row in numbered], [line for line, _ in numbered]
    schema = Schema(args.schema, args.question_field, args.choices_field, args.answer_field)
    pairs, skipped = pairs_from_choices(rows, schema, args.file, lines)
    write_jsonl(args.out, pairs)
    print_skipped(skipped, args.show)
    say(
        f"wrote {len(pairs)} pairs from {len(rows)} questions to {args.out}; "
        f"{len(skipped)} rows or choices gave no pair (listed above)"
    )
    return 0


def data_gsm8k_scenarios_command(args: argparse.Namespace) -> int:
    from dpolab.data.scenarios import write_scenarios
    from dpolab.outputs import check_output, claim_folder

    scenarios = {f"scenario{number}.jsonl" for number in (1, 2, 3, 4)}
    owner = "dpolab data gsm8k-scenarios"
    args.out = str(claim_folder(check_output(args.out, "data", {"input file": args.file}, writes=scenarios,
                                             owner=owner), owner))  # fmt: skip
    counts = write_scenarios(args.file, args.out, args.policy, args.other)
    say(
        f"{counts['questions']} questions, {counts['solutions']} model solutions judged "
        f"({counts['judge_unparsable']} unparsable, {counts['judge_disagrees_with_is_correct']} disagree with is_correct)"
    )
    for scenario, size in counts["pairs"].items():
        target = f"→ {Path(args.out) / f'scenario{scenario}.jsonl'}" if size else "(no file written)"
        say(f"  scenario {scenario}: {size} pairs {target}")
        print_skipped(counts["dropped"][scenario], args.show)
    return 0


def data_sample_command(args: argparse.Namespace) -> int:
    from dpolab.outputs import check_output
    from dpolab.pipeline.sample import sample_file

    args.out = str(check_output(args.out, "data", {"prompts file": args.prompts, "model": args.model}, file=True))
    progress, stack = _progress(not args.no_progress, f"sampling {args.n} per prompt")
    with stack:
        result = sample_file(
            args.model,
            args.prompts,
            args.out,
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            prompt_field=args.prompt_field,
            reference_field=args.reference_field,
            allow_pickle=args.allow_pickle,
            restart=args.restart,
            chat_template=args.chat_template,
            progress=progress,
        )
    say(
        f"{result['prompts']} prompts: sampled {result['sampled']} now, {result['resumed']} already in {args.out}; "
        f"{result['empty_candidates']} empty generations (the judge records them as unscored)"
    )
    return 0


def _read_rubric(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--rubric {path}: not UTF-8 (at byte offset {error.start})") from None
    except OSError as error:
        raise ValueError(f"--rubric {path}: cannot read: {error.strerror or error}") from None


def data_judge_command(args: argparse.Namespace) -> int:
    from dpolab.eval import judges
    from dpolab.outputs import check_output
    from dpolab.pipeline.judge import judge_file

    inputs = {"input file": args.file, "rule file": args.rules, "rubric": args.rubric, "model": args.model}
    args.out = str(check_output(args.out, "data", inputs, file=True))
    if args.judge != "rules" and args.rules:
        raise ValueError("--rules is read by --judge rules only")
    if args.judge != "llm" and args.llm_mode != "grade":
        raise ValueError("--llm-mode is read by --judge llm only")
    if args.judge == "math":
        judge = judges.MathJudge()
    elif args.judge == "rules":
        if not args.rules:
            raise ValueError("--judge rules needs --rules FILE (a YAML or JSON rule file: docs/evaluation.md#rules)")
        judge = judges.RulesJudge(judges.read_rule_file(args.rules))
    elif args.judge == "reward-model":
        if not args.model:
            raise ValueError("--judge reward-model needs --model (a sequence-classification model directory)")
        judge = judges.RewardModelJudge(args.model, args.batch_size, allow_pickle=args.allow_pickle)
    else:
        if not (args.base_url and args.llm_model):
            raise ValueError("--judge llm needs --base-url (e.g. https://api.openai.com/v1) and --llm-model")
        judge = judges.LLMJudge(
            args.base_url,
            args.llm_model,
            args.api_key_env,
            _read_rubric(args.rubric) if args.rubric else None,
            retries=args.retries,
            timeout=args.timeout,
            concurrency=args.concurrency,
            mode=args.llm_mode,
        )
    progress, stack = _progress(not args.no_progress, f"judging ({args.judge})")
    try:
        with stack:
            result = judge_file(args.file, args.out, judge, restart=args.restart, progress=progress)
    except RuntimeError as error:
        say(f"dpolab data judge: error: {error}\nthe prompts judged so far are in {args.out}; "
              "run the same command again to continue", file=sys.stderr)  # fmt: skip
        return 1
    say(
        f"{result['prompts']} prompts: judged {result['judged']} now, {result['resumed']} already in {args.out}; "
        f"{result['unscored']} candidates unscored (reasons in the 'notes' field)"
    )
    return 0


def data_agreement_command(args: argparse.Namespace) -> int:
    from dpolab.eval.agreement import agreement, table
    from dpolab.outputs import check_output, write_json

    if args.out:
        inputs = {"first file": args.first, "second file": args.second}
        args.out = str(check_output(args.out, "eval", inputs, file=True))
    result = agreement(args.first, args.second, args.threshold_first, args.threshold_second)
    say(table(result))
    if args.out:
        write_json(args.out, result)
        say(f"wrote {args.out}")
    return 0


def data_pairs_command(args: argparse.Namespace) -> int:
    from dpolab.data.onpolicy import pairs_file
    from dpolab.outputs import check_output

    args.out = str(check_output(args.out, "data", {"input file": args.file}, file=True))
    result = pairs_file(args.file, args.out)
    say(f"wrote {result['pairs']} best-vs-worst pairs from {result['prompts']} prompts to {args.out}")
    for reason, prompt_ids in result["dropped"].items():
        if prompt_ids:
            shown = ", ".join(map(str, prompt_ids[:20])) + (" …" if len(prompt_ids) > 20 else "")
            say(f"dropped {len(prompt_ids)} prompts: {reason} (prompt_id {shown})")
    return 0


def data_scenario_command(args: argparse.Namespace) -> int:
    from dpolab.data.onpolicy import SCENARIOS, scenario_files
    from dpolab.outputs import check_output, claim_folder

    writes = {f"scenario{number}.jsonl" for number in SCENARIOS} | {"summary.json"}
    inputs = {"policy file": args.policy, "other file": args.other}
    owner = "dpolab data scenario"
    args.out = str(claim_folder(check_output(args.out, "data", inputs, writes=writes, owner=owner), owner))
    summary = scenario_files(args.policy, args.other, args.out, args.good_score, args.same_prompts)
    say(f"{summary['prompts']} prompts; good = score >= {summary['good_score']:g}")
    for number, counts in summary["scenarios"].items():
        chosen, rejected = SCENARIOS[number]
        dropped = ", ".join(f"{v} {k}" for k, v in counts["dropped"].items() if v) or "none dropped"
        say(f"  scenario {number} (chosen: {chosen}, rejected: {rejected}): {counts['pairs']} pairs ({dropped})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from dpolab.data.formats import MAX_ROW_BYTES

    data = subparsers.add_parser("data", help="preference data tools")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    check = data_commands.add_parser(
        "check",
        help="list every bad row of a preference file; exit 0 only when it is clean",
        description="Reports per row: invalid JSON or UTF-8 (with line numbers), JSON nested too deeply, missing or "
        "extra fields, wrong types (a message content that is not a string included), a key given twice, a row over "
        "--max-row-bytes, a chat role outside system/user/assistant/tool, lone surrogates, empty prompt "
        "or completion, chosen identical to rejected, duplicate pairs, and (with --tokenizer and --max-length) "
        "prompts that alone reach max_length or a chat template that fails. Ends with a summary table. Exit 1 when a "
        "row has a problem, 2 when the file cannot be read at all (missing, a folder, empty).",
    )
    check.add_argument("file", help=".jsonl, .json, .parquet or .csv file (or a datasets id)")
    check.add_argument("--tokenizer", help="tokenizer directory or id, to check prompt lengths in tokens")
    check.add_argument("--max-length", type=int, default=None, help="as the training config's max_length")
    check.add_argument("--allow-extra", action="store_true", help="accept fields beyond prompt/chosen/rejected")
    check.add_argument("--show", type=int, default=50, help="problems to list before the table (default 50)")
    check.add_argument(
        "--max-row-bytes",
        type=int,
        default=MAX_ROW_BYTES,
        help=f"a longer row is a problem, as in training (max_row_bytes; default {MAX_ROW_BYTES:,})",
    )
    check.set_defaults(handler=data_check_command)
    corrupt = data_commands.add_parser(
        "corrupt-math",
        help="maths solutions → low-edit pairs: rejected = one intermediate result changed",
        description="For each row, chosen = the solution and rejected = the same solution with one result "
        "(a GSM8K <<a*b=c>>c annotation or a plain '= c') changed. Seeded; rows with nothing to change are "
        "listed, never dropped silently.",
    )
    corrupt.add_argument("file", help=".jsonl (or .json/.parquet/.csv) with a question and a solution per row")
    corrupt.add_argument("--out", required=True, help="output .jsonl of prompt/chosen/rejected pairs")
    corrupt.add_argument("--solution-field", default="answer")
    corrupt.add_argument("--prompt-field", default="question")
    corrupt.add_argument(
        "--final",
        choices=["keep", "change"],
        default="keep",
        help="keep the final answer (change an intermediate result) or change the final answer",
    )
    corrupt.add_argument(
        "--step",
        type=int,
        default=None,
        help="which intermediate result to change: 0 the first, -1 the last before the final one (default: drawn)",
    )
    corrupt.add_argument("--seed", type=int, default=0)
    corrupt.add_argument("--show", type=int, default=20, help="skipped rows to list (default 20)")
    corrupt.set_defaults(handler=data_corrupt_command)
    stats = data_commands.add_parser(
        "edit-stats",
        help="edit distance between chosen and rejected: summary.json and a histogram",
        description="Normalised Levenshtein distance of the completions in characters (and tokens with "
        "--tokenizer), and where they first differ. Bad rows are skipped and counted.",
    )
    stats.add_argument("file", help="preference pairs (any format dpolab train reads)")
    stats.add_argument("--out", required=True, help="folder for summary.json and histogram.png")
    stats.add_argument("--tokenizer", help="tokenizer directory or id, for the token-level distance")
    stats.set_defaults(handler=data_edit_stats_command)
    choices = data_commands.add_parser(
        "from-choices",
        help="multiple-choice data → pairs: chosen = the correct choice, rejected = each wrong one",
        description="Smaug's ARC / HellaSwag pairs (3 per 4-choice question). Schemas: arc, hellaswag, or generic "
        "with --question-field/--choices-field/--answer-field. Unusable rows are listed with their row numbers.",
    )
    choices.add_argument("file", help="local .jsonl/.json/.parquet/.csv or a datasets id")
    choices.add_argument("--schema", choices=["arc", "hellaswag", "generic"], required=True)
    choices.add_argument("--out", required=True, help="output .jsonl of prompt/chosen/rejected pairs")
    choices.add_argument("--split", default="train", help="split, for a datasets id")
    choices.add_argument("--question-field", default="question")
    choices.add_argument("--choices-field", default="choices")
    choices.add_argument("--answer-field", default="answer", help="generic: an index or the correct choice's text")
    choices.add_argument("--show", type=int, default=20)
    choices.set_defaults(handler=data_from_choices_command)
    scenarios = data_commands.add_parser(
        "gsm8k-scenarios",
        help="the 3D paper's four chosen/rejected scenarios from GSM8K model solutions",
        description="Scenario 1: policy-correct vs policy-wrong; 2: reference vs policy-wrong; 3: policy-correct vs "
        "other-model-wrong; 4: reference vs other-model-wrong. Correctness by the math judge (final number).",
    )
    scenarios.add_argument(
        "file", help="data/gsm8k/model_solutions.jsonl (in the dpolab repository) or the same format"
    )
    scenarios.add_argument("--out", required=True, help="folder for scenario1..4.jsonl")
    scenarios.add_argument("--policy", choices=["6b", "175b"], default="6b")
    scenarios.add_argument("--other", choices=["6b", "175b"], default="175b")
    scenarios.add_argument("--show", type=int, default=20, help="pairs left out to list per scenario (default 20)")
    scenarios.set_defaults(handler=data_gsm8k_scenarios_command)
    register_onpolicy(data_commands)


def register_onpolicy(data_commands: argparse._SubParsersAction) -> None:
    """The on-policy pipeline's commands: sample, judge, agreement, pairs, scenario."""
    sample = data_commands.add_parser(
        "sample",
        help="N candidates per prompt from a causal LM (resumable, progress bar)",
        description="One JSONL line per prompt: prompt_id, prompt, candidates (and reference, and the other "
        "fields of the prompt row). Appends as it goes; rerun the same command to continue after an interruption.",
    )
    sample.add_argument("prompts", help=".jsonl with a prompt per row")
    sample.add_argument("--model", required=True, help="Hugging Face causal LM directory or id")
    sample.add_argument("--out", required=True, help="output .jsonl (appended to; see --restart)")
    sample.add_argument("--n", type=int, default=8, help="candidates per prompt (default 8, as the 3D paper)")
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--max-new-tokens", type=int, default=256)
    sample.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--prompt-field", default="prompt")
    sample.add_argument("--reference-field", default=None, help="field with the reference solution/answer to carry")
    sample.add_argument("--allow-pickle", action="store_true", help="allow .bin (pickle) weights")
    sample.add_argument("--restart", action="store_true", help="discard an existing --out instead of continuing it")
    sample.add_argument(
        "--chat-template",
        action="store_true",
        help="render prompts with the tokenizer's chat template (instruct models); pairs are then conversational",
    )
    sample.add_argument("--no-progress", action="store_true")
    sample.set_defaults(handler=data_sample_command)
    judge = data_commands.add_parser(
        "judge",
        help="score every candidate: math (math-verify), rules, reward-model, or llm (OpenAI-compatible)",
        description="Adds 'scores' and 'notes' to each line of a sample output (and 'details', each rule's "
        "pass/fail, for the rules judge). A candidate without a score (empty, unparsable judge reply) gets null "
        "and a note. The llm judge reads its key from the environment variable named by --api-key-env and never "
        "writes it. Resumable like sample. Judges: docs/evaluation.md#judges.",
    )
    judge.add_argument("file", help="output of dpolab data sample")
    judge.add_argument("--judge", choices=["math", "rules", "reward-model", "llm"], required=True)
    judge.add_argument("--rules", help="rules: a YAML/JSON rule file (rules for every prompt and/or per prompt_id)")
    judge.add_argument("--out", required=True)
    judge.add_argument("--model", help="reward-model: sequence-classification model directory (num_labels 1)")
    judge.add_argument("--batch-size", type=int, default=16, help="reward-model batch size")
    judge.add_argument("--allow-pickle", action="store_true")
    judge.add_argument("--base-url", help="llm: e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    judge.add_argument("--llm-model", help="llm: the model name the endpoint expects")
    judge.add_argument("--api-key-env", default="OPENAI_API_KEY", help="llm: environment variable with the key")
    judge.add_argument(
        "--llm-mode",
        choices=["grade", "best_worst"],
        default="grade",
        help="llm: grade each candidate alone (1-5), or show all of a prompt's candidates and ask for the best and "
        "the worst (3D paper App. C; scores 1 best, 0 worst, 0.5 the others)",
    )
    judge.add_argument(
        "--rubric", help="llm: a text file with the system prompt (default: the 1-5 maths rubric, or the ranking one)"
    )
    judge.add_argument("--retries", type=int, default=4, help="llm: retries with exponential back-off")
    judge.add_argument("--timeout", type=float, default=60.0, help="llm: seconds per request")
    judge.add_argument("--concurrency", type=int, default=4, help="llm: requests in flight")
    judge.add_argument("--restart", action="store_true")
    judge.add_argument("--no-progress", action="store_true")
    judge.set_defaults(handler=data_judge_command)
    agree = data_commands.add_parser(
        "agreement",
        help="Cohen's kappa and the confusion table between two judges' scores of the same candidates",
        description="Both files are dpolab data judge outputs of the same sample (matched by prompt_id; the "
        "candidates must be the same). Candidates one judge left unscored are left out and counted. With a "
        "threshold, a judge's score becomes 1 when >= it, else 0 (compare a 1-5 grader with the 0/1 math judge).",
    )
    agree.add_argument("first", help="a judge output")
    agree.add_argument("second", help="another judge's output of the same candidates")
    agree.add_argument("--threshold-first", type=float, help="binarise the first judge's scores: >= this is 1")
    agree.add_argument("--threshold-second", type=float, help="binarise the second judge's scores: >= this is 1")
    agree.add_argument("--out", help="write the result as JSON")
    agree.set_defaults(handler=data_agreement_command)
    pairs = data_commands.add_parser(
        "pairs",
        help="best vs worst candidate per prompt of a judge output",
        description="Ties go to the lowest candidate index. Prompts whose candidates all score the same, or with "
        "fewer than two scored candidates, are dropped and listed.",
    )
    pairs.add_argument("file", help="output of dpolab data judge")
    pairs.add_argument("--out", required=True, help="preference .jsonl for dpolab train")
    pairs.set_defaults(handler=data_pairs_command)
    scenario = data_commands.add_parser(
        "scenario",
        help="the 3D paper's four scenarios from two judged pools (the policy's and another model's)",
        description="1: policy vs policy; 2: reference vs policy; 3: policy vs other; 4: reference vs other. Chosen "
        "= the best good candidate (score >= --good-score) or the reference; rejected = the worst bad one.",
    )
    scenario.add_argument("--policy", required=True, help="judge output of the policy's candidates (with reference)")
    scenario.add_argument("--other", required=True, help="judge output of another model's candidates")
    scenario.add_argument("--out", required=True, help="folder for scenario1..4.jsonl and summary.json")
    scenario.add_argument("--good-score", type=float, default=None, help="default: the highest score in the pools")
    scenario.add_argument(
        "--same-prompts",
        action="store_true",
        help="keep only the prompts with a pair in all four scenarios (equal counts, the same prompts)",
    )
    scenario.set_defaults(handler=data_scenario_command)
