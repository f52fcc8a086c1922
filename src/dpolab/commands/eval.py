"""``dpolab eval``: greedy-decoding accuracy of a causal LM on maths problems."""

from __future__ import annotations

import argparse


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


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
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
