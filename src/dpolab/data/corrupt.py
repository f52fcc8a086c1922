"""Low-edit-distance rejected solutions: one intermediate result changed (Smaug's MetaMath pairs).

Given a step-by-step solution, :func:`corrupt_solution` picks one intermediate result and changes it,
everywhere it is *written* for that step (the annotation ``<<a*b=c>>c`` or a plain ``= c``), leaving
the rest of the text alone. The result differs from the original in one number, so chosen and
rejected share almost every token: the setting where DPO lowers the chosen likelihood (PAPERS.md §4).

Which step and the new value are drawn from a seeded generator. ``final="keep"`` (default) never
touches the last result or the final-answer line; ``final="change"`` corrupts the final answer
instead (the final line follows).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# GSM8K calculator annotation followed by the written result: "<<16-3-4=9>>9"
ANNOTATED = re.compile(r"<<(?P<expr>[^<>=]+)=(?P<value>-?\d+(?:\.\d+)?)>>(?P<written>-?\d+(?:\.\d+)?)")
# A plain "= 42" result (MetaMath style), not part of an annotation
PLAIN = re.compile(r"(?<![<=])=\s*\$?(?P<value>-?\d+(?:\.\d+)?)(?![\d.]*>>)")
FINAL_LINE = re.compile(r"(####\s*|A:\s*\$?)(-?[\d,]*\.?\d+)\s*$")


@dataclass(frozen=True)
class Corruption:
    text: str
    original_value: str
    new_value: str
    step: int  # 0-based index of the corrupted result among the solution's results
    results: int  # how many results the solution has


def _new_value(value: str, rng: random.Random) -> str:
    if "." in value:
        number = float(value)
        return f"{number + rng.choice([-1, 1]) * rng.choice([0.5, 1.0, 1.5, 2.0]):.{len(value.split('.')[1])}f}"
    number = int(value)
    # Stay non-negative for non-negative results (counts, prices); negative results may stay negative.
    offsets = [d for d in (-3, -2, -1, 1, 2, 3, 10, -10) if number + d >= 0 or number < 0]
    return str(number + rng.choice(offsets))


def corrupt_solution(
    solution: str, rng: random.Random, final: str = "keep", step: int | None = None
) -> Corruption | None:
    """One result changed (see the module docstring); None when the solution has no result to change.

    ``step`` (with ``final="keep"``) picks which intermediate result instead of drawing it: 0 is the first,
    -1 the last before the final one (Python indexing); None when the solution has no such result. The new
    value is drawn the same way whichever step is chosen, so pairs corrupted early and late in the same
    solutions differ by edits of the same size (docs/experiments.md)."""
    if final not in ("keep", "change"):
        raise ValueError(f"final must be 'keep' or 'change'; got {final!r}")
    if step is not None and final != "keep":
        raise ValueError("step chooses an intermediate result; with final='change' the final result is changed")
    annotated = list(ANNOTATED.finditer(solution))
    spans = [(m.start(), m.end()) for m in annotated]
    plain = [m for m in PLAIN.finditer(solution) if not any(start <= m.start() < end for start, end in spans)]
    matches = sorted(annotated + plain, key=lambda m: m.start())  # every written result, in order
    if not matches:
        return None
    candidates = list(range(len(matches) - 1)) if final == "keep" else [len(matches) - 1]
    if not candidates:
        return None
    if step is not None:
        if not -len(candidates) <= step < len(candidates):
            return None
        index = candidates[step]
    else:
        index = rng.choice(candidates)
    match = matches[index]
    old = match.group("value")
    new = _new_value(old, rng)
    if match.re is ANNOTATED:
        replacement = f"<<{match.group('expr')}={new}>>{new}"
    else:
        replacement = match.group(0).replace(old, new)
    text = solution[: match.start()] + replacement + solution[match.end() :]
    if final == "change":
        lines = text.rstrip().split("\n")
        found = FINAL_LINE.search(lines[-1])
        if found:
            lines[-1] = lines[-1][: found.start(2)] + new + lines[-1][found.end(2) :]
            text = "\n".join(lines)
    if text == solution:
        return None
    return Corruption(text, old, new, index, len(matches))


def corrupt_file(
    source: str,
    out: str,
    solution_field: str = "answer",
    prompt_field: str = "question",
    seed: int = 0,
    final: str = "keep",
    step: int | None = None,
) -> dict:
    """Pairs (prompt, chosen = the solution, rejected = the corrupted solution) for every row of ``source``.

    Writes JSONL with provenance (``source_row``, ``corrupted_step``, ``original_value``, ``new_value``).
    Returns counts and the reasons for rows that gave no pair; nothing is dropped silently.
    """
    import json
    from pathlib import Path

    from dpolab.data.formats import BadLine, read_jsonl_lines, read_rows

    path = Path(source)
    if Path(out).is_dir():
        raise ValueError(f"{out}: is a folder; --out must be a file path")
    numbered = read_jsonl_lines(path) if path.suffix == ".jsonl" else list(enumerate(read_rows(source), start=1))
    rng = random.Random(seed)
    written, skipped = 0, []
    with open(out, "w", encoding="utf-8") as handle:
        for row_number, (line, row) in enumerate(numbered):
            where = f"{source}: line {line} (row {row_number})"
            if isinstance(row, BadLine):
                skipped.append(f"{where}: {row.reason}")
                continue
            if (
                not isinstance(row, dict)
                or not isinstance(row.get(solution_field), str)
                or not isinstance(row.get(prompt_field), str)
            ):
                skipped.append(f"{where}: needs string fields {prompt_field!r} and {solution_field!r}")
                continue
            corruption = corrupt_solution(row[solution_field], rng, final, step)
            if corruption is None:
                which = f"intermediate result number {step}" if step is not None else "intermediate result"
                skipped.append(f"{where}: no {which if final == 'keep' else 'result'} to change")
                continue
            pair = {
                "prompt": row[prompt_field] + "\n",
                "chosen": row[solution_field],
                "rejected": corruption.text,
                "source_row": row_number,
                "corrupted_step": corruption.step,
                "original_value": corruption.original_value,
                "new_value": corruption.new_value,
            }
            handle.write(json.dumps(pair) + "\n")
            written += 1
    return {"rows": len(numbered), "pairs": written, "skipped": skipped}
