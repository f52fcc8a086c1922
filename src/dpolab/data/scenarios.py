"""The 3D paper's four data scenarios on real data (PAPERS.md §5), and the ``math`` judge.

From GSM8K's ``model_solutions.jsonl`` (test questions, a ground-truth solution, and solutions by a 6B
and a 175B model), taking the 6B model as "the policy" and the 175B model as "another model":

| scenario | chosen | rejected |
|---|---|---|
| 1 | a correct solution of the policy (on-policy) | a wrong solution of the policy (on-policy) |
| 2 | the data set's reference solution (off-policy) | a wrong solution of the policy |
| 3 | a correct solution of the policy | a wrong solution of the other model (off-policy) |
| 4 | the reference solution | a wrong solution of the other model |

Correctness comes from the ``math`` judge (final-answer match with the reference, by math-verify); a question enters
a scenario only when both sides exist. Choice within a pool is deterministic (the first in the
file's order of solvers).
"""

from __future__ import annotations

from pathlib import Path

from dpolab.data.answers import answers_match, parsed_answer

SOLVERS = {"6b": ("6b_finetuning", "6b_verification"), "175b": ("175b_finetuning", "175b_verification")}


def math_judge(solution: str, reference: str) -> bool | None:
    """True when the final answers agree (:func:`dpolab.data.answers.answers_match`: math-verify on the
    ``#### N`` / ``A: N`` / ``\\boxed{}`` answers); None when either has no answer one can read."""
    if parsed_answer(solution) is None:
        return None
    return answers_match(solution, reference)


def gsm8k_scenarios(
    rows: list[dict], policy: str = "6b", other: str = "175b", source: str = "data", lines: list[int] | None = None
) -> tuple[dict[int, list[dict]], dict]:
    """The four scenarios' pairs, and counts (including how often the judge disagrees with ``is_correct``).
    A row that is not in the model_solutions format is a ``ValueError`` naming ``source`` and the row (with its
    line, given ``lines``)."""
    from dpolab.data.formats import where

    scenarios: dict[int, list[dict]] = {1: [], 2: [], 3: [], 4: []}
    counts = {"questions": len(rows), "judge_unparsable": 0, "judge_disagrees_with_is_correct": 0, "solutions": 0}
    for index, row in enumerate(rows):
        at = where(source, index, lines[index] if lines else None)
        needed = ["question", "ground_truth", *SOLVERS[policy], *SOLVERS[other]]
        missing = [key for key in needed if key not in row] if isinstance(row, dict) else needed
        if missing:
            raise ValueError(f"{at}: missing field {missing[0]!r} (model_solutions.jsonl format)")
        for key in ("question", "ground_truth"):
            if not isinstance(row[key], str):
                raise ValueError(f"{at}: {key} must be a string, got {type(row[key]).__name__}")
        for solver in (*SOLVERS[policy], *SOLVERS[other]):
            entry = row[solver]
            if not isinstance(entry, dict) or not isinstance(entry.get("solution"), str) or "is_correct" not in entry:
                raise ValueError(f"{at}: {solver!r} must be {{solution: str, is_correct: bool}}")
            if not isinstance(entry["is_correct"], bool):  # "false" or 0 would count as correct (or be guessed)
                raise ValueError(f"{at}: {solver}.is_correct must be true or false; got {entry['is_correct']!r}")
        reference = row["ground_truth"]
        pools: dict[str, dict[bool, list[str]]] = {}
        for model in (policy, other):
            pools[model] = {True: [], False: []}
            for solver in SOLVERS[model]:
                solution = row[solver]["solution"]
                verdict = math_judge(solution, reference)
                counts["solutions"] += 1
                if verdict is None:
                    counts["judge_unparsable"] += 1
                    continue
                if verdict != row[solver]["is_correct"]:
                    counts["judge_disagrees_with_is_correct"] += 1
                pools[model][verdict].append(solution)
        prompt = row["question"] + "\n"
        on_policy_good = pools[policy][True][:1]
        on_policy_bad = pools[policy][False][:1]
        other_bad = pools[other][False][:1]
        choices = {
            1: (on_policy_good, on_policy_bad),
            2: ([reference], on_policy_bad),
            3: (on_policy_good, other_bad),
            4: ([reference], other_bad),
        }
        for scenario, (chosen, rejected) in choices.items():
            if chosen and rejected:
                scenarios[scenario].append(
                    {
                        "prompt": prompt,
                        "chosen": chosen[0],
                        "rejected": rejected[0],
                        "source_row": index,
                        "scenario": scenario,
                    }
                )
    return scenarios, counts


def write_scenarios(source: str | Path, out_dir: str | Path, policy: str = "6b", other: str = "175b") -> dict:
    from dpolab.data.formats import BadLine, read_jsonl_lines, trainable_pairs, where, write_jsonl

    if policy == other:
        raise ValueError("--policy and --other must be different models")
    path = Path(source)
    if not path.exists():
        raise ValueError(f"no such file: {source}")
    numbered = read_jsonl_lines(path)
    for index, (line, row) in enumerate(numbered):
        if isinstance(row, BadLine):
            raise ValueError(f"{where(source, index, line)}: {row.reason}")
    rows, lines = [row for _, row in numbered], [line for line, _ in numbered]
    scenarios, counts = gsm8k_scenarios(rows, policy, other, str(source), lines)
    counts["dropped"] = {}
    for scenario, pairs in scenarios.items():
        # an empty question, or a question repeated in the file: refused here, as training would refuse them
        scenarios[scenario], dropped = trainable_pairs(pairs)
        counts["dropped"][scenario] = [
            f"{where(source, pairs[index]['source_row'], lines[pairs[index]['source_row']])}: {reason}"
            for index, reason in dropped
        ]
        target = Path(out_dir) / f"scenario{scenario}.jsonl"
        if scenarios[scenario]:  # a scenario without pairs gets no file (an empty file is no training data)
            write_jsonl(target, scenarios[scenario])
        elif target.exists():
            target.unlink()  # an earlier run's file would pass for this run's
    counts["pairs"] = {scenario: len(pairs) for scenario, pairs in scenarios.items()}
    return counts
