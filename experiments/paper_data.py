"""Data for the papers' experiments on the quickstart model (docs/experiments.md), from a quickstart's folder.

    python experiments/paper_data.py early-late runs/qs0 --seed 0 --out runs/exp/early_late/seed0
    python experiments/paper_data.py choices runs/qs0 --seed 0 --out runs/exp/choices/seed0
    python experiments/paper_data.py other-pool runs/qs0 --out runs/exp/scenarios/seed0/other.jsonl

- ``early-late``: new 3-step problems (none of the quickstart's SFT, pair or evaluation questions), each
  corrupted twice with ``corrupt_solution(step=...)``: at its first result (``early``) and at its second
  (``late``, the last before the final answer). The same problems and prompts in both sets; the edit
  statistics of both are written beside them, to show the edits are of the same size.
- ``choices``: procedural multiple-choice questions in ARC's schema (``choice_question``) from new problems
  of the quickstart's distribution (1–3 steps): ``train.jsonl`` and ``test.jsonl`` (questions), and
  ``pairs.jsonl`` / ``eval_pairs.jsonl`` made by ``dpolab data from-choices --schema arc`` (3 per question).
- ``other-pool``: "another model's" candidates for ``dpolab data scenario``: for each pair prompt of the
  quickstart, its high-edit rejected (a misreading of the problem, :func:`wrong_solution`: off-policy),
  scored 0 (wrong), with the ``prompt_id`` of the quickstart's ``low_edit/train.jsonl`` row.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from dpolab.data.corrupt import corrupt_solution
from dpolab.data.edit_stats import edit_stats, write_outputs
from dpolab.data.formats import write_jsonl
from dpolab.data.synthetic import choice_question, make_problems
from dpolab.quickstart import SIZES


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def seen_questions(quickstart: Path) -> set[str]:
    """Every question the quickstart used: SFT, pairs (train and held out) and the accuracy evaluation."""
    data = quickstart / "data"
    seen = {row["prompt"].rstrip("\n") for row in read_jsonl(data / "sft.jsonl")}
    for name in ("low_edit/train.jsonl", "low_edit/eval.jsonl"):
        seen |= {row["prompt"].rstrip("\n") for row in read_jsonl(data / name)}
    seen |= {row["question"] for row in read_jsonl(data / "eval_problems.jsonl")}
    return seen


def early_late(quickstart: Path, seed: int, out: Path, train: int, held_out: int) -> dict:
    size = SIZES["full"]
    problems = make_problems(train + held_out, 1000 + seed, 3, 3, size.max_value, exclude=seen_questions(quickstart))
    sets: dict[str, list[dict]] = {"early": [], "late": []}
    for index, problem in enumerate(problems):
        prompt = problem.question + "\n"
        for name, step in (("early", 0), ("late", -1)):
            corruption = corrupt_solution(problem.answer, random.Random(f"{seed}-{index}"), step=step)
            if corruption is None:
                raise RuntimeError(
                    f"problem {index}: a 3-step problem has two intermediate results: {problem.answer!r}"
                )
            sets[name].append({"prompt": prompt, "chosen": problem.answer, "rejected": corruption.text})
    summary = {}
    for name, pairs in sets.items():
        write_jsonl(out / name / "train.jsonl", pairs[:train])
        write_jsonl(out / name / "eval.jsonl", pairs[train:])
        summary[name] = write_outputs(
            edit_stats([p["chosen"] for p in pairs], [p["rejected"] for p in pairs]),
            out / name / "edit_stats",
            f"{name} corruption",
        )
    return summary


def choices(quickstart: Path, seed: int, out: Path, train: int, held_out: int, test: int) -> dict:
    size = SIZES["full"]
    problems = make_problems(
        train + held_out + test, 2000 + seed, 1, size.max_steps, size.max_value, exclude=seen_questions(quickstart)
    )
    rng = random.Random(seed)
    rows = [choice_question(p, rng, number=i) for i, p in enumerate(problems)]
    out.mkdir(parents=True, exist_ok=True)
    parts = {"train": rows[:train], "held_out": rows[train : train + held_out], "test": rows[train + held_out :]}
    for name, part in parts.items():
        write_jsonl(out / f"{name}.jsonl", part)
    for source, target in (("train", "pairs"), ("held_out", "eval_pairs")):
        command = [sys.executable, "-m", "dpolab", "data", "from-choices", str(out / f"{source}.jsonl"),
                   "--schema", "arc", "--out", str(out / f"{target}.jsonl")]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)  # its errors go to stderr
    return {name: len(part) for name, part in parts.items()}


def other_pool(quickstart: Path, out: Path) -> dict:
    rows = read_jsonl(quickstart / "data" / "high_edit" / "train.jsonl")
    low = read_jsonl(quickstart / "data" / "low_edit" / "train.jsonl")
    if [r["prompt"] for r in rows] != [r["prompt"] for r in low]:
        raise ValueError(f"{quickstart}: the high- and low-edit pairs do not hold the same prompts in order")
    records = [
        {"prompt_id": index, "prompt": row["prompt"], "candidates": [row["rejected"]], "scores": [0.0]}
        for index, row in enumerate(rows)
    ]
    write_jsonl(out, records)
    return {"prompts": len(records)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("early-late", "choices", "other-pool"):
        command = commands.add_parser(name)
        command.add_argument("quickstart", type=Path, help="a `dpolab quickstart` output folder")
        command.add_argument("--out", type=Path, required=True)
        if name != "other-pool":
            command.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()
    if args.command == "early-late":
        result = early_late(args.quickstart, args.seed, args.out, train=1000, held_out=100)
    elif args.command == "choices":
        result = choices(args.quickstart, args.seed, args.out, train=400, held_out=50, test=300)
    else:
        result = other_pool(args.quickstart, args.out)
    print(json.dumps(result, indent=1, default=str)[:2000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
