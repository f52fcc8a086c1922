"""The quickstart's models through ``dpolab eval harness`` and ``dpolab eval contamination`` (docs/evaluation.md).

    .venv/bin/python experiments/evaluation.py --runs runs/ppo_vs_dpo --out runs/evaluation

``--runs`` is the output of ``experiments/ppo_vs_dpo.py --size full`` (the quickstart's full-size pieces:
its data, the SFT model, and DPO and DPOP runs over seeds). From its local files this builds:

- ``gsm8k`` and ``gsm8k_plain``: the held-out problems (GSM8K schema), few-shot examples from the first 200
  SFT problems; the leaderboard's "Question: … Answer:" format and dpolab's plain "question\\n" format;
- ``arc`` (a multiple-choice task in ARC's schema): each held-out problem with four candidate solutions,
  the right one, the same with one intermediate result changed (Smaug's low-edit corruption), the same
  with the final answer changed, and a wrong solution of another shape (seeded order).

Each model (SFT; DPO and DPOP per seed) is evaluated on the three; then the contamination check on the
SFT model: its first ``--texts`` SFT problems (seen, 3 epochs) against as many held-out problems
(unseen), with the random-init model as the reference. Writes ``results.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from dpolab.data.corrupt import corrupt_solution
from dpolab.data.synthetic import Problem, wrong_solution
from dpolab.eval.contamination import check
from dpolab.eval.contamination import table as contamination_table
from dpolab.eval.harness import evaluate_directory, table
from dpolab.eval.tasks import TaskFiles

FEWSHOT_PROBLEMS = 200


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path.resolve()


def solution_choice(problems: list[dict], seed: int = 0) -> list[dict]:
    """ARC-schema rows: the right solution among three wrong ones (see the module docstring)."""
    rng = random.Random(seed)
    rows = []
    for i, p in enumerate(problems):
        low = corrupt_solution(p["answer"], rng)
        final = corrupt_solution(p["answer"], rng, final="change")
        other = wrong_solution(Problem(p["question"], p["answer"], p["result"]), rng)
        candidates = [p["answer"], *(c.text for c in (low, final) if c is not None), other]
        if len(set(candidates)) != 4:
            continue
        order = rng.sample(range(4), 4)
        rows.append({"id": f"solution-{i}", "question": p["question"],
                     "choices": {"text": [candidates[j] for j in order], "label": list("ABCD")},
                     "answerKey": "ABCD"[order.index(0)]})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/ppo_vs_dpo")
    parser.add_argument("--out", default="runs/evaluation")
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    problems = read(runs / "data" / "eval_problems.jsonl")
    sft_rows = read(runs / "data" / "sft.jsonl")
    fewshot = [{"question": r["prompt"].strip(), "answer": r["completion"]} for r in sft_rows[:FEWSHOT_PROBLEMS]]
    test = write(
        out / "data" / "gsm8k" / "test.jsonl", [{"question": p["question"], "answer": p["answer"]} for p in problems]
    )
    train = write(out / "data" / "gsm8k" / "train.jsonl", fewshot)
    choice = write(out / "data" / "solution_choice" / "test.jsonl", solution_choice(problems))
    files = {"gsm8k": TaskFiles(test, train), "gsm8k_plain": TaskFiles(test, train), "arc": TaskFiles(choice)}
    shots = {"gsm8k": args.shots, "gsm8k_plain": 0}
    models = {"sft": runs / "sft" / "model"}
    for method in ("dpo", "dpop"):
        for folder in sorted(runs.glob(f"{method}-seed*")):
            models[folder.name] = folder / "model"
    results = {"models": {}, "shots": shots}
    for name, model in models.items():
        result = evaluate_directory(model, files, num_fewshot=shots, batch_size=args.batch_size, max_new_tokens=160)
        results["models"][name] = result
        print(table(result, title=name), flush=True)
    seen = [{"text": r["prompt"] + r["completion"], "label": "seen"} for r in sft_rows[: args.texts]]
    unseen = [{"text": p["question"] + "\n" + p["answer"], "label": "unseen"} for p in problems[: args.texts]]
    data = write(out / "data" / "contamination.jsonl", seen + unseen)
    results["contamination"] = check(models["sft"], data, reference_dir=runs / "model" / "init", progress=False)
    print(contamination_table(results["contamination"]))
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
