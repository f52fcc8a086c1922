"""Greedy-decoding accuracy on maths problems (``dpolab eval``): the quickstart's measure, for any model.

Each problem's prompt is decoded greedily (batched, :mod:`dpolab.engine.generate`). The solution
counts as correct when its final answer (``#### N``, ``A: N`` or ``\\boxed{}``) equals the reference's by
math-verify, where the reference is a solution with a final answer or a bare answer
(:class:`dpolab.eval.judges.MathJudge`).
"""

from __future__ import annotations

from pathlib import Path

from dpolab.console import progress_bar, quiet_libraries


def math_accuracy(
    model_dir: str | Path,
    prompts: list[str],
    references: list[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    progress: bool = True,
    name: str = "",
    allow_pickle: bool = False,
    stop: str | None = None,
) -> dict:
    """Accuracy, counts and every generation of ``model_dir`` on ``prompts`` (greedy). ``stop``: a generation
    is cut at its first occurrence (the few-shot separator: the model would go on with a new problem)."""
    from dpolab.data.answers import parsed_answer
    from dpolab.engine.generate import generate
    from dpolab.engine.loading import check_vocabulary, default_device, load_model, load_tokenizer
    from dpolab.eval.judges import MathJudge

    if len(prompts) != len(references) or not prompts:
        raise ValueError("need equally many, and at least one, prompts and references")
    bad_reference = [i for i, r in enumerate(references) if parsed_answer(r, bare=True) is None]
    if bad_reference:  # before any generation: fail fast
        raise ValueError(f"references without a final answer at rows {bad_reference[:10]}")
    with quiet_libraries():  # no transformers bar per weight load, from the CLI or from Python
        model = load_model(model_dir, allow_pickle=allow_pickle, device=default_device())
        tokenizer = load_tokenizer(model_dir)
    check_vocabulary(model, tokenizer, model_dir)
    with progress_bar(progress, f"greedy accuracy{f' ({name})' if name else ''}", len(prompts)) as advance:
        completions = [
            c[0]
            for c in generate(
                model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=advance
            )
        ]
    if stop:
        completions = [c.split(stop, 1)[0] for c in completions]
    verdicts = MathJudge().score(list(zip(prompts, completions, references, strict=True)))
    correct = sum(v.score == 1.0 for v in verdicts)
    return {
        "accuracy": correct / len(prompts),
        "correct": correct,
        "problems": len(prompts),
        "no_final_answer": sum(v.score is None or (v.note or "").startswith("no final answer") for v in verdicts),
        "generations": [
            {"prompt": p, "generated": c, "reference": r, "correct": v.score == 1.0}
            for p, c, r, v in zip(prompts, completions, references, verdicts, strict=True)
        ],
    }


def evaluate_file(
    model_dir: str,
    data: str,
    prompt_field: str = "question",
    answer_field: str = "answer",
    prompt_suffix: str = "\n",
    limit: int | None = None,
    fewshot_data: str | None = None,
    num_fewshot: int = 0,
    **options,
) -> dict:
    """:func:`math_accuracy` on a JSONL file of problems (e.g. GSM8K's test split or the quickstart's).

    Few-shot (``num_fewshot`` > 0): the first ``num_fewshot`` problems of ``fewshot_data`` (same fields), each
    as prompt + suffix + its solution and a blank line, precede every problem; a generation ends at its first
    blank line. A shot whose prompt is the problem being asked is skipped for it (the next one is taken)."""
    from dpolab.data.onpolicy import read_prompts

    if limit is not None and limit < 1:  # [:-1] would silently drop the last problem
        raise ValueError(f"--limit must be at least 1; got {limit}")
    if num_fewshot < 0 or (num_fewshot and not fewshot_data) or (fewshot_data and not num_fewshot):
        raise ValueError("few-shot prompting needs both --fewshot-data FILE and --num-fewshot K (K >= 1)")
    shots = read_prompts(fewshot_data, prompt_field, answer_field)[: num_fewshot + 1] if num_fewshot else []
    if num_fewshot and len(shots) < num_fewshot:
        raise ValueError(
            f"--fewshot-data {fewshot_data}: {len(shots)} problems, fewer than --num-fewshot {num_fewshot}"
        )
    rows = read_prompts(data, prompt_field, answer_field)[:limit]
    prompts = []
    for row in rows:
        context = [s for s in shots if s.prompt != row.prompt][:num_fewshot]
        prompts.append(
            "".join(f"{s.prompt}{prompt_suffix}{s.reference}\n\n" for s in context) + row.prompt + prompt_suffix
        )
    result = math_accuracy(
        model_dir, prompts, [r.reference for r in rows], stop="\n\n" if num_fewshot else None, **options
    )
    return {**result, "num_fewshot": num_fewshot}
