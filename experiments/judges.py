"""The math judge against human-checked labels: GSM8K's model_solutions.jsonl (1,000 test questions, four
model solutions each, every one labelled ``is_correct`` by the data set's authors).

Writes, under --out: ``samples.jsonl`` (each question's four solutions as candidates, the ground truth as
the reference), ``math.jsonl`` (``dpolab data judge --judge math`` of it), ``labels.jsonl`` (the data set's
``is_correct`` as a judge output) and ``agreement.json`` (``dpolab data agreement``: Cohen's κ and the
confusion table). Runs in about a minute on CPU; no model.

    python experiments/judges.py --out runs/judges
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpolab.eval.agreement import agreement, table
from dpolab.eval.judges import MathJudge
from dpolab.pipeline.judge import judge_file

SHARED = Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "model_solutions.jsonl"
SOLVERS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED))
    parser.add_argument("--out", default="runs/judges")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    samples, labels = [], []
    for number, row in enumerate(rows):
        candidates = [row[solver]["solution"] for solver in SOLVERS]
        sample = {"prompt_id": number, "prompt": row["question"], "candidates": candidates}
        samples.append({**sample, "reference": row["ground_truth"]})
        labels.append({**sample, "scores": [float(row[solver]["is_correct"]) for solver in SOLVERS]})
    for name, records in (("samples", samples), ("labels", labels)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    judged = judge_file(out / "samples.jsonl", out / "math.jsonl", MathJudge(), restart=True)
    result = {**agreement(out / "math.jsonl", out / "labels.jsonl"), "judge": judged}
    (out / "agreement.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"math judge unscored: {judged['unscored']} of {4 * len(rows)} solutions")


if __name__ == "__main__":
    main()
