"""The ``dpolab`` command line: parses arguments and calls one library function per command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpolab import __version__


def _format_default(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def losses_command(args: argparse.Namespace) -> int:
    from dpolab.losses import ALIASES, LOSSES

    rows = []
    for spec in LOSSES.values():
        aliases = [alias for alias, target in ALIASES.items() if target == spec.name]
        rows.append(
            {
                "name": spec.name,
                "formula": spec.formula,
                "source": spec.source,
                "parameters": {k: v for k, v in spec.defaults.items()},
                "reference": spec.needs_reference,
                "token_counts": spec.needs_lengths,
                "inputs": spec.inputs,
                "trl": spec.trl_name,
                "aliases": aliases,
                "summary": spec.summary,
            }
        )
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dpolab losses ({len(rows)}) — r = log π_θ − log π_ref, h = r_w − r_l", show_lines=True)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("per-pair loss")
    table.add_column("source")
    table.add_column("parameters (defaults)")
    table.add_column("needs")
    table.add_column("TRL")
    for row in rows:
        needs = []
        if row["inputs"] != "logps":
            needs.append(row["inputs"])
        else:
            needs.append("reference" if row["reference"] else "no reference")
            if row["token_counts"] != "no":
                needs.append(f"token counts ({row['token_counts']})")
        params = ", ".join(f"{k}={_format_default(v)}" for k, v in row["parameters"].items()) or "margin (optional)"
        name = row["name"] + "".join(f"\n(alias {a})" for a in row["aliases"])
        table.add_row(name, row["formula"], row["source"], params, "; ".join(needs), row["trl"] or "—")
    # Piped output (CI logs, `make demo | tee`) would otherwise wrap at rich's 80-column fallback.
    width = args.width or (None if sys.stdout.isatty() else 200)
    Console(width=width).print(table)
    return 0


def _parse_params(items: list[str]) -> dict:
    """``key=value`` pairs; values are read as YAML scalars (numbers, true/false, strings)."""
    import yaml

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects key=value; got {item!r}")
        params[key] = yaml.safe_load(value)
    return params


def toy_run_command(args: argparse.Namespace) -> int:
    from dpolab.toy.lab import ToyConfig, run_toy

    config = ToyConfig(
        scenario=args.scenario,
        loss=args.loss if len(args.loss) > 1 else args.loss[0],
        loss_params=_parse_params(args.param),
        loss_weights=args.loss_weights,
        sft_weight=args.sft_weight,
        steps=args.steps,
        learning_rate=args.lr,
        seed=args.seed,
        kl_beta=args.kl_beta,
    )
    run = run_toy(config)
    directory = run.save(args.out)
    summary = run.summary()
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"toy run: {config.label}, scenario {run.scenario.name}")
    table.add_column("quantity")
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    table.add_row("π(chosen)", f"{summary['initial_chosen_prob']:.4f}", f"{summary['final_chosen_prob']:.4f}")
    table.add_row(
        "π(rejected), each", f"{summary['initial_rejected_prob']:.3g}", f"{summary['final_rejected_prob']:.3g}"
    )
    table.add_row("π(unseen 9–10)", f"{summary['initial_unseen_mass']:.4f}", f"{summary['final_unseen_mass']:.4f}")
    table.add_row(
        "mass outside the pairs", f"{1 - summary['initial_data_mass']:.4f}", f"{1 - summary['final_data_mass']:.4f}"
    )
    table.add_row("|∂L/∂π_l| / |∂L/∂π_w|", f"{summary['initial_grad_ratio']:.3g}", f"{summary['final_grad_ratio']:.3g}")
    Console().print(table)
    print(f"peak π(chosen) {summary['peak_chosen_prob']:.4f} at step {summary['peak_step']}; run folder: {directory}")
    return 0


def toy_figures_command(args: argparse.Namespace) -> int:
    import time

    from rich.progress import Progress

    from dpolab.toy.figures import make_figures

    start = time.perf_counter()
    with Progress(transient=True) as progress:
        task = progress.add_task("toy lab", total=1)

        def report(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, total=total, description=f"toy lab: {name}")

        summary = make_figures(args.out, scenario=args.scenario, steps=args.steps, seed=args.seed, progress=report)
    elapsed = time.perf_counter() - start
    print(
        f"wrote {len(summary['figures'])} figures, summary.json and {len(summary['runs'])} run folders "
        f"to {args.out} in {elapsed:.1f} s"
    )
    for name in summary["figures"].values():
        print(f"  {name}")
    return 0


def data_check_command(args: argparse.Namespace) -> int:
    from dpolab.data.check import check_file, print_report

    tokenizer = None
    if args.tokenizer:
        from dpolab.engine.loading import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    elif args.max_length is not None:
        raise ValueError("--max-length needs --tokenizer (lengths are counted in tokens)")
    report = check_file(args.file, tokenizer, args.max_length, args.allow_extra)
    print_report(report, args.show)
    return 0 if report.clean else 1


def report_command(args: argparse.Namespace) -> int:
    import time

    from dpolab.report.html import write_report

    start = time.perf_counter()
    out = write_report(args.runs, args.out, args.title)
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(args.runs)} run(s)) in {time.perf_counter() - start:.1f} s"
    )
    return 0


def print_skipped(reasons: list[str], show: int) -> None:
    """The first ``show`` reasons a builder skipped rows for, then how many more."""
    for reason in reasons[:show]:
        print(f"skipped {reason}")
    if len(reasons) > show:
        print(f"… {len(reasons) - show} more skipped rows")


def data_corrupt_command(args: argparse.Namespace) -> int:
    from dpolab.data.corrupt import corrupt_file

    result = corrupt_file(args.file, args.out, args.solution_field, args.prompt_field, args.seed, args.final)
    print_skipped(result["skipped"], args.show)
    print(
        f"wrote {result['pairs']} pairs from {result['rows']} rows to {args.out}; "
        f"{len(result['skipped'])} rows could not be corrupted"
    )
    return 0


def data_edit_stats_command(args: argparse.Namespace) -> int:
    import time

    from dpolab.data.edit_stats import edit_stats, write_outputs
    from dpolab.data.formats import load_examples

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
    print(f"{summary['pairs']} pairs ({len(bad)} bad rows skipped) in {time.perf_counter() - start:.1f} s")
    print(
        f"normalised character edit distance: mean {c['mean']:.4f}, median {c['median']:.4f}, "
        f"p10 {c['p10']:.4f}, p90 {c['p90']:.4f}; below 0.1: {100 * c['share_below']['0.1']:.1f}%"
    )
    if "token_distance" in summary:
        t = summary["token_distance"]
        print(f"normalised token edit distance: mean {t['mean']:.4f}, median {t['median']:.4f}")
    r = summary["first_difference_relative"]
    print(
        f"first difference at {100 * r['median']:.1f}% of the completion (median); "
        f"wrote {args.out}/summary.json and histogram.png"
    )
    return 0


def data_from_choices_command(args: argparse.Namespace) -> int:
    from dpolab.data.choices import Schema, pairs_from_choices
    from dpolab.data.formats import read_rows, write_jsonl

    rows = read_rows(args.file, args.split)
    schema = Schema(args.schema, args.question_field, args.choices_field, args.answer_field)
    pairs, skipped = pairs_from_choices(rows, schema, args.file)
    write_jsonl(args.out, pairs)
    print_skipped(skipped, args.show)
    print(f"wrote {len(pairs)} pairs from {len(rows)} questions to {args.out}; {len(skipped)} rows skipped")
    return 0


def data_gsm8k_scenarios_command(args: argparse.Namespace) -> int:
    from dpolab.data.scenarios import write_scenarios

    counts = write_scenarios(args.file, args.out, args.policy, args.other)
    print(
        f"{counts['questions']} questions, {counts['solutions']} model solutions judged "
        f"({counts['judge_unparsable']} unparsable, {counts['judge_disagrees_with_is_correct']} disagree with is_correct)"
    )
    for scenario, size in counts["pairs"].items():
        print(f"  scenario {scenario}: {size} pairs → {Path(args.out) / f'scenario{scenario}.jsonl'}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from dpolab.evaluate import evaluate_file, write_result

    result = evaluate_file(
        args.model,
        args.data,
        args.prompt_field,
        args.answer_field,
        args.prompt_suffix,
        args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
    )
    if args.out:
        write_result(result, args.out)
    print(
        f"{args.model}: greedy accuracy {100 * result['accuracy']:.1f}% ({result['correct']}/{result['problems']}); "
        f"{result['no_final_answer']} without a final number" + (f"; generations in {args.out}" if args.out else "")
    )
    return 0


def quickstart_command(args: argparse.Namespace) -> int:
    from dpolab.quickstart import run_quickstart

    run_quickstart(args.out, args.size, args.seed, args.overwrite, progress=not args.no_progress)
    return 0


def _progress(enabled: bool, description: str):
    """A ``progress(total, done)`` factory for the resumable data commands: a rich bar with ETA."""
    import contextlib

    from dpolab.train.metrics import progress_bar

    stack = contextlib.ExitStack()

    def start(total: int, done: int):
        advance = stack.enter_context(progress_bar(enabled, description, total))
        if done:
            advance(done)
        return advance

    return start, stack


def data_sample_command(args: argparse.Namespace) -> int:
    from dpolab.data.onpolicy import sample_file

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
    print(
        f"{result['prompts']} prompts: sampled {result['sampled']} now, {result['resumed']} already in {args.out}; "
        f"{result['empty_candidates']} empty generations (the judge records them as unscored)"
    )
    return 0


def data_judge_command(args: argparse.Namespace) -> int:
    from dpolab.data import judges
    from dpolab.data.onpolicy import judge_file

    if args.judge == "math":
        judge = judges.MathJudge()
    elif args.judge == "reward-model":
        if not args.model:
            raise ValueError("--judge reward-model needs --model (a sequence-classification model directory)")
        judge = judges.RewardModelJudge(args.model, args.batch_size, allow_pickle=args.allow_pickle)
    else:
        if not (args.base_url and args.llm_model):
            raise ValueError("--judge llm needs --base-url (e.g. https://api.openai.com/v1) and --llm-model")
        rubric = Path(args.rubric).read_text() if args.rubric else judges.MATH_RUBRIC
        judge = judges.LLMJudge(
            args.base_url,
            args.llm_model,
            args.api_key_env,
            rubric,
            retries=args.retries,
            timeout=args.timeout,
            concurrency=args.concurrency,
        )
    progress, stack = _progress(not args.no_progress, f"judging ({args.judge})")
    try:
        with stack:
            result = judge_file(args.file, args.out, judge, restart=args.restart, progress=progress)
    except RuntimeError as error:
        print(f"dpolab data judge: error: {error}\nthe prompts judged so far are in {args.out}; "
              "run the same command again to continue", file=sys.stderr)  # fmt: skip
        return 1
    print(
        f"{result['prompts']} prompts: judged {result['judged']} now, {result['resumed']} already in {args.out}; "
        f"{result['unscored']} candidates unscored (reasons in the 'notes' field)"
    )
    return 0


def data_pairs_command(args: argparse.Namespace) -> int:
    from dpolab.data.onpolicy import pairs_file

    result = pairs_file(args.file, args.out)
    print(f"wrote {result['pairs']} best-vs-worst pairs from {result['prompts']} prompts to {args.out}")
    for reason, prompt_ids in result["dropped"].items():
        if prompt_ids:
            shown = ", ".join(map(str, prompt_ids[:20])) + (" …" if len(prompt_ids) > 20 else "")
            print(f"dropped {len(prompt_ids)} prompts: {reason} (prompt_id {shown})")
    return 0


def data_scenario_command(args: argparse.Namespace) -> int:
    from dpolab.data.onpolicy import SCENARIOS, scenario_files

    summary = scenario_files(args.policy, args.other, args.out, args.good_score)
    print(f"{summary['prompts']} prompts; good = score >= {summary['good_score']:g}")
    for number, counts in summary["scenarios"].items():
        chosen, rejected = SCENARIOS[number]
        dropped = ", ".join(f"{v} {k}" for k, v in counts["dropped"].items() if v) or "none dropped"
        print(f"  scenario {number} (chosen: {chosen}, rejected: {rejected}): {counts['pairs']} pairs ({dropped})")
    return 0


def train_command(args: argparse.Namespace) -> int:
    from dpolab.train import load_config, run
    from dpolab.train.guard import NonFiniteError, TrainingInterrupted

    rest = list(args.rest)
    config_path = rest.pop(0) if rest and not rest[0].startswith("--") else None
    resume, overwrite = None, False
    if "--overwrite" in rest:
        rest.remove("--overwrite")
        overwrite = True
    if "--resume" in rest:
        at = rest.index("--resume")
        rest.pop(at)
        resume = rest.pop(at) if at < len(rest) and not rest[at].startswith("--") else "latest"
    defaults = {"task": "sft", "loss": "sft", "loss_params": {"reduction": "batch_token_mean"}} if args.sft else None
    config = load_config(config_path, rest, defaults)
    try:
        run(config, resume=resume, overwrite=overwrite)
    except TrainingInterrupted as stop:
        return stop.exit_code
    except NonFiniteError as error:
        print(f"dpolab train: error: {error}", file=sys.stderr)
        return 1
    return 0


def _processes_asked_of_accelerate_cpu() -> int:
    """N when this process was started by ``accelerate launch --cpu --num_processes N`` (N > 1), else 0.

    accelerate's launcher starts a single process whenever ``--cpu`` is given, whatever
    ``--num_processes`` says; the parent's command line is the only place the request survives.
    """
    import os

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "WORLD_SIZE" in os.environ:
        return 0
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return 0
    if "--cpu" not in parent:
        return 0
    for index, word in enumerate(parent):
        value = word.split("=", 1)[1] if word.startswith("--num_processes=") else None
        if word == "--num_processes" and index + 1 < len(parent):
            value = parent[index + 1]
        if value is not None and value.isdigit():
            return int(value) if int(value) > 1 else 0
    return 0


def _relaunch_with_torchrun(processes: int, argv: list[str]) -> None:
    """Replace this process by ``torchrun --standalone --nproc_per_node N -m dpolab ARGV`` (same environment)."""
    import os

    print(
        f"dpolab: accelerate launch --cpu starts one process; starting {processes} with "
        f"torchrun --standalone --nproc_per_node {processes} -m dpolab {' '.join(argv)}",
        file=sys.stderr,
    )
    sys.stderr.flush()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    os.execv(sys.executable, [*command, "-m", "dpolab", *argv])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpolab",
        description="Preference optimisation for language models: the DPO family, DPO-Positive, "
        "flexible-β, and the diagnostics of the 3D-properties and Smaug papers.",
    )
    parser.add_argument("--version", action="version", version=f"dpolab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    losses = commands.add_parser("losses", help="list every loss: formula, source, parameters and defaults")
    losses.add_argument("--format", choices=["table", "json"], default="table", help="output format (default: table)")
    losses.add_argument("--width", type=int, default=None, help="table width in characters (default: the terminal's)")
    losses.set_defaults(handler=losses_command)

    train = commands.add_parser(
        "train",
        help="preference-train a Hugging Face causal LM from a YAML config",
        description="Train with CONFIG.yaml; any config key can be overridden as --key value "
        "(nested: --loss_params.beta 0.3). See docs/training.md for every key.",
    )
    train.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="[CONFIG.yaml] [--key value ...]",
        help="YAML config file (optional when the required keys are flags), then overrides",
    )
    train.set_defaults(handler=train_command, sft=False)
    sft = commands.add_parser(
        "sft",
        help="supervised fine-tuning of a Hugging Face causal LM (prompt + completion rows, or messages)",
        description="dpolab train with task: sft and loss: sft (token-weighted NLL on completion tokens only). "
        "Same config keys, outputs, checkpoints and resume as dpolab train; see docs/training.md.",
    )
    sft.add_argument("rest", nargs=argparse.REMAINDER, metavar="[CONFIG.yaml] [--key value ...]")
    sft.set_defaults(handler=train_command, sft=True)

    evaluate = commands.add_parser(
        "eval",
        help="greedy-decoding accuracy of a causal LM on maths problems (final number checked)",
        description="Decodes each problem's prompt greedily and compares the final number (#### N or A: N) with the "
        "reference answer's. Rows without the prompt or answer field are named.",
    )
    evaluate.add_argument("data", help=".jsonl of problems, e.g. ../shared/data/gsm8k/test.jsonl")
    evaluate.add_argument("--model", required=True, help="Hugging Face causal LM directory or id")
    evaluate.add_argument("--prompt-field", default="question")
    evaluate.add_argument("--answer-field", default="answer", help="a solution ending in #### N, or a number")
    evaluate.add_argument("--prompt-suffix", default="\n", help="appended to each prompt (default: a newline)")
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N problems")
    evaluate.add_argument("--max-new-tokens", type=int, default=256)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--out", help="JSON with the accuracy and every generation")
    evaluate.add_argument("--allow-pickle", action="store_true")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(handler=eval_command)
    quickstart = commands.add_parser(
        "quickstart",
        help="the Smaug result on a tiny model, offline: data → SFT → low-edit pairs → DPO vs DPOP → accuracy → report",
    )
    quickstart.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    quickstart.add_argument(
        "--size", choices=["small", "full"], default="full", help="full: < 10 min on 2 cores; small: < 2 min"
    )
    quickstart.add_argument("--seed", type=int, default=0, help="seeds the data, the model and every run")
    quickstart.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart in --out")
    quickstart.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    quickstart.set_defaults(handler=quickstart_command)
    report = commands.add_parser(
        "report", help="one self-contained HTML report (inline plots, no network) of training and toy runs"
    )
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="dpolab train output_dir or dpolab toy run folders")
    report.add_argument("--out", required=True, help="the HTML file to write")
    report.add_argument("--title", default="dpolab report")
    report.set_defaults(handler=report_command)

    data = commands.add_parser("data", help="preference data tools")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    check = data_commands.add_parser(
        "check",
        help="list every bad row of a preference file; exit 0 only when it is clean",
        description="Reports per row: invalid JSON or UTF-8 (with line numbers), missing or extra fields, wrong "
        "types, empty prompt or completion, chosen identical to rejected, duplicate pairs, and (with --tokenizer "
        "and --max-length) prompts that alone reach max_length. Ends with a summary table.",
    )
    check.add_argument("file", help=".jsonl, .json, .parquet or .csv file (or a datasets id)")
    check.add_argument("--tokenizer", help="tokenizer directory or id, to check prompt lengths in tokens")
    check.add_argument("--max-length", type=int, default=None, help="as the training config's max_length")
    check.add_argument("--allow-extra", action="store_true", help="accept fields beyond prompt/chosen/rejected")
    check.add_argument("--show", type=int, default=50, help="problems to list before the table (default 50)")
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
    scenarios.add_argument("file", help="../shared/data/gsm8k/model_solutions.jsonl or the same format")
    scenarios.add_argument("--out", required=True, help="folder for scenario1..4.jsonl")
    scenarios.add_argument("--policy", choices=["6b", "175b"], default="6b")
    scenarios.add_argument("--other", choices=["6b", "175b"], default="175b")
    scenarios.set_defaults(handler=data_gsm8k_scenarios_command)

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
        help="score every candidate: math (final number), reward-model, or llm (OpenAI-compatible)",
        description="Adds 'scores' and 'notes' to each line of a sample output. A candidate without a score "
        "(empty, unparsable judge reply) gets null and a note. The llm judge reads its key from the environment "
        "variable named by --api-key-env and never writes it. Resumable like sample.",
    )
    judge.add_argument("file", help="output of dpolab data sample")
    judge.add_argument("--judge", choices=["math", "reward-model", "llm"], required=True)
    judge.add_argument("--out", required=True)
    judge.add_argument("--model", help="reward-model: sequence-classification model directory (num_labels 1)")
    judge.add_argument("--batch-size", type=int, default=16, help="reward-model batch size")
    judge.add_argument("--allow-pickle", action="store_true")
    judge.add_argument("--base-url", help="llm: e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    judge.add_argument("--llm-model", help="llm: the model name the endpoint expects")
    judge.add_argument("--api-key-env", default="OPENAI_API_KEY", help="llm: environment variable with the key")
    judge.add_argument("--rubric", help="llm: a text file with the system prompt (default: the 1-5 maths rubric)")
    judge.add_argument("--retries", type=int, default=4, help="llm: retries with exponential back-off")
    judge.add_argument("--timeout", type=float, default=60.0, help="llm: seconds per request")
    judge.add_argument("--concurrency", type=int, default=4, help="llm: requests in flight")
    judge.add_argument("--restart", action="store_true")
    judge.add_argument("--no-progress", action="store_true")
    judge.set_defaults(handler=data_judge_command)
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
    scenario.set_defaults(handler=data_scenario_command)

    toy = commands.add_parser("toy", help="the 3D-properties toy lab: categorical policy, seconds per run")
    toy_commands = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND", required=True)
    run = toy_commands.add_parser("run", help="one Step-1 + Step-2 run; writes metrics.jsonl/csv and summary.json")
    run.add_argument("--scenario", default="1", help="preset 1-4 or a YAML/JSON scenario file (default: 1)")
    run.add_argument("--loss", nargs="+", default=["dpo"], help="loss name(s) from `dpolab losses`, or rlhf")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a loss parameter, repeatable")
    run.add_argument("--loss-weights", type=float, nargs="+", default=None, help="weights when several losses")
    run.add_argument("--sft-weight", type=float, default=0.0, help="α of the added SFT term (default: 0)")
    run.add_argument("--steps", type=int, default=1000, help="Step-2 steps (default: 1000)")
    run.add_argument("--lr", type=float, default=1e-3, help="Step-2 Adam learning rate (default: 1e-3)")
    run.add_argument("--kl-beta", type=float, default=0.1, help="rlhf: β of the KL penalty (default: 0.1)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", required=True, help="run folder to write")
    run.set_defaults(handler=toy_run_command)
    figures = toy_commands.add_parser("figures", help="every experiment of docs/toy.md: 4 figures + summary.json")
    figures.add_argument("--out", required=True, help="folder for the figures, summary.json and the run folders")
    figures.add_argument("--scenario", default="1", help="scenario of the remedies and the sweep (default: 1)")
    figures.add_argument("--steps", type=int, default=1000, help="Step-2 steps of every run (default: 1000)")
    figures.add_argument("--seed", type=int, default=0)
    figures.set_defaults(handler=toy_figures_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["train"], ["sft"]) and (processes := _processes_asked_of_accelerate_cpu()):
        _relaunch_with_torchrun(processes, argv)
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv[1:]):
        # argparse cannot hand "--key value" pairs of arbitrary keys to a subcommand: route them directly.
        args = argparse.Namespace(command="train", handler=train_command, rest=argv[1:], sft=False)
    elif argv[:1] == ["sft"] and not {"-h", "--help"} & set(argv[1:]):
        args = argparse.Namespace(command="sft", handler=train_command, rest=argv[1:], sft=True)
    else:
        args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a bar per weight load/save: ours say what is happening
    except ImportError:
        pass
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # `dpolab losses | head`
        sys.stderr.close()
        return 0
    except ValueError as error:
        print(f"dpolab {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
