"""Low-edit-distance rejected solutions: one intermediate result changed (Smaug's MetaMath pairs).

Given a step-by-step solution, :func:`corrupt_solution` picks one intermediate result and changes it,
everywhere it is *written* for that step (the annotation ``<<a*b=c>>c`` or a plain ``= c``), leaving
the rest of the text alone. The result differs from the original in one number, so chosen and
rejected share almost every token: the setting where DPO lowers the chosen likelihood (PAPERS.md §4).

A number is taken whole (:data:`NUMBER`): a sign and a ``$`` in either order, digits with or without
thousands separators (``450,000``), decimals (``1.5``, ``.4``) and ``%``. The new value is written in
each copy's own format: ``<<22500*20=450000>>450,000`` becomes ``<<22500*20=449997>>449,997``, ``$1,150.00``
stays a dollar amount with separators and two decimals. A solution where an annotation's value and the
number written after it are not the same number (``<<2*3=6>>7``, or no number after it) is not corrupted:
changing one copy or both would make rejected differ from chosen in a way the pair does not claim, so
the row is skipped with that reason. A plain ``= c`` is a result only when ``c`` ends the expression
(``= 12 * 150 = …``, ``= 1/5`` and ``= 2:10`` are not results).

Which step and the new value are drawn from a seeded generator. ``final="keep"`` (default) never
touches the last result or the final-answer line; ``final="change"`` corrupts the final answer
instead: the last result and the ``#### N`` / ``A: N`` line change together, which needs that line to be
the last result (skipped with a reason otherwise).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal

# Sign and currency in either order ("-$5", "$-5"); separators only in groups of three; ".5" as well as "0.5".
NUMBER = r"(?:-\$|\$-|-|\$)?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)%?"
# Without this, "1,2345" or "3.5.1" would give a prefix ("1", "3.5") and the rest would stay behind.
WHOLE = r"(?![.,]?\d)"
# GSM8K calculator annotation and the written result after it: "<<16-3-4=9>>9", "<<22500*20=450000>>450,000".
# ``written`` is None when no whole number follows the annotation.
ANNOTATED = re.compile(rf"<<(?P<expr>[^<>=]+)=(?P<value>{NUMBER})>>(?:(?P<written>{NUMBER}){WHOLE})?")
ANY_ANNOTATION = re.compile(r"<<[^<>]*>>")
# A plain "= 42" result (MetaMath style) outside annotations. The number must end the expression: followed
# by an operator and an operand ("= 12 * 150 = …"), a fraction or clock time ("= 1/5", "= 2:10") or a
# space-separated digit group ("= $16 000") it is only the start of something else. ">=", "<=", "!=" compare.
PLAIN = re.compile(rf"(?<![<>=!])=\s*(?P<value>{NUMBER}){WHOLE}(?![\d.,%]*>>)(?!\s*[-+*/x×÷^:−]\s*[\d.($])(?! \d)")
FINAL_LINE = re.compile(rf"(####\s*|A:\s*)({NUMBER}){WHOLE}\s*$")
_PARTS = re.compile(r"(?P<lead>-\$|\$-|-|\$)?(?P<digits>[\d,]*)(?:\.(?P<decimals>\d+))?(?P<percent>%?)")


@dataclass(frozen=True)
class Corruption:
    text: str
    original_value: str
    new_value: str
    step: int  # 0-based index of the corrupted result among the solution's results
    results: int  # how many results the solution has


@dataclass(frozen=True)
class Skip:
    """Why a row gives no pair: ``reason`` is the same for every row skipped for it, so rows are counted by
    it; ``message`` says more about this row when there is more to say."""

    reason: str
    message: str = ""

    def __str__(self) -> str:
        return self.message or self.reason


def _plain(number: str) -> str:
    """A written number as GSM8K annotations write it: sign, digits, decimals ("-$1,150.00" -> "-1150.00")."""
    return re.sub(r"[$,%]", "", number)


def _value(number: str) -> Decimal:
    """The value a written number denotes; ``%`` and ``$`` are units, so "50%" and "$50" denote 50."""
    return Decimal(_plain(number))


def _write(number: Decimal, like: str, places: int | None = None) -> str:
    """``number`` written the way ``like`` is: sign position, currency, separators, decimals, percent;
    ``places`` decimals instead of ``like``'s when given."""
    parts = _PARTS.fullmatch(like)
    lead = parts.group("lead") or ""
    if places is None:
        places = len(parts.group("decimals") or "")
    body = format(abs(number), f"{',' if ',' in parts.group('digits') else ''}.{places}f")
    if not parts.group("digits") and body.startswith("0."):
        body = body[1:]  # ".4" is written without its zero; keep that style
    currency = "$" if "$" in lead else ""
    if number < 0:
        sign = "$-" if lead == "$-" else "-" + currency
    else:
        sign = currency
    return sign + body + parts.group("percent")


def _new_value(value: str, rng: random.Random, whole: bool = False) -> str:
    """A new value for the plain number ``value``, in the same format (decimals, leading zero or not).

    ``whole``: a copy of the number is written without decimals (``<<10/2=5.00>>5``), so the new value must
    be whole too, or the copies would show different numbers (4.50 and 4)."""
    if "." in value and not whole:
        number = Decimal(value)
        offset = rng.choice([-1, 1]) * Decimal(str(rng.choice([0.5, 1.0, 1.5, 2.0])))
        if number >= 0 > number + offset:
            offset = -offset  # stay non-negative: the same draw, the other way, so the edit keeps its size
        return _write(number + offset, value)
    number = int(Decimal(value))
    # Stay non-negative for non-negative results (counts, prices); negative results may stay negative.
    offsets = [d for d in (-3, -2, -1, 1, 2, 3, 10, -10) if number + d >= 0 or number < 0]
    return str(number + rng.choice(offsets))


MISMATCH = "an annotation's value is not the number written after it"
FINAL_NOT_LAST = "the final answer is not the last result"


def _results(solution: str) -> list[list[tuple[int, int]]] | Skip:
    """Every result in text order, each as the spans of its copies (annotation value and written result, or
    the plain number); or the annotation whose written result is another number."""
    results = []
    for match in ANNOTATED.finditer(solution):
        written = match.group("written")
        if written is None or _value(written) != _value(match.group("value")):
            after = solution[match.end("value") + 2 : match.end("value") + 14]
            where = f"<<{match.group('expr')}={match.group('value')}>> is followed by {after!r}"
            return Skip(MISMATCH, f"{MISMATCH}: {where}")
        results.append([match.span("value"), match.span("written")])
    inside = [m.span() for m in ANY_ANNOTATION.finditer(solution)]
    for match in PLAIN.finditer(solution):
        if not any(start <= match.start() < end for start, end in inside):
            results.append([match.span("value")])
    return sorted(results)


def _corrupt(solution: str, rng: random.Random, final: str, step: int | None) -> Corruption | Skip:
    if final not in ("keep", "change"):
        raise ValueError(f"final must be 'keep' or 'change'; got {final!r}")
    if step is not None and final != "keep":
        raise ValueError("step chooses an intermediate result; with final='change' the final result is changed")
    nothing = Skip(
        "no result to change"
        if final == "change"
        else f"no intermediate result {'' if step is None else f'number {step} '}to change"
    )
    results = _results(solution)
    if isinstance(results, Skip):
        return results
    candidates = list(range(len(results) - 1)) if final == "keep" else list(range(len(results)))[-1:]
    if not candidates:
        return nothing
    final_number = FINAL_LINE.search(solution.rstrip().split("\n")[-1]) if final == "change" else None
    if final_number:
        last = solution[slice(*results[-1][0])]
        if _value(final_number.group(2)) != _value(last):
            return Skip(FINAL_NOT_LAST, f"{FINAL_NOT_LAST}: {final_number.group(2)!r}, last result {last!r}")
    # Decided before any draw, so a skipped row leaves the generator where it was for the next row.
    if step is not None:
        if not -len(candidates) <= step < len(candidates):
            return nothing
        index = candidates[step]
    else:
        index = rng.choice(candidates)
    copies = results[index]
    old = _plain(solution[slice(*copies[0])])
    whole = any(not _PARTS.fullmatch(solution[start:end]).group("decimals") for start, end in copies)
    new = _new_value(old, rng, whole)
    text = solution
    for start, end in reversed(copies):
        text = text[:start] + _write(Decimal(new), text[start:end]) + text[end:]
    if final_number:
        lines = text.rstrip().split("\n")
        final_number = FINAL_LINE.search(lines[-1])  # found again: a result on the last line may have moved it
        like = final_number.group(2)
        # The final line may show fewer decimals than the result ("#### 144" for 144.00): as many as the
        # new value needs, at least the line's own.
        needed = max(0, -Decimal(new).normalize().as_tuple().exponent)
        places = max(len(_PARTS.fullmatch(like).group("decimals") or ""), needed)
        start, end = final_number.span(2)
        lines[-1] = lines[-1][:start] + _write(Decimal(new), like, places) + lines[-1][end:]
        text = "\n".join(lines)
    return Corruption(text, old, new, index, len(results))


def corrupt_solution(
    solution: str, rng: random.Random, final: str = "keep", step: int | None = None
) -> Corruption | None:
    """One result changed (see the module docstring); None when the solution has no result to change.

    ``step`` (with ``final="keep"``) picks which intermediate result instead of drawing it: 0 is the first,
    -1 the last before the final one (Python indexing); None when the solution has no such result. The new
    value is drawn the same way whichever step is chosen, so pairs corrupted early and late in the same
    solutions differ by edits of the same size (docs/experiments.md). None too when the solution cannot be
    changed exactly (module docstring); :func:`corrupt_file` reports why."""
    corruption = _corrupt(solution, rng, final, step)
    return None if isinstance(corruption, Skip) else corruption


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
    Returns counts and the reasons for rows that gave no pair; nothing is dropped silently: ``skipped`` lists
    one message per row, ``skipped_by_reason`` counts them by reason.
    """
    from pathlib import Path

    from dpolab.data.formats import BadLine, numbered_rows, trainable_pairs, where, write_jsonl

    path = Path(source)
    if Path(out).is_dir():
        raise ValueError(f"{out}: is a folder; --out must be a file path")
    numbered = numbered_rows(str(path))
    rng = random.Random(seed)
    pairs, origins, skipped, by_reason = [], [], [], Counter()
    for row_number, (line, row) in enumerate(numbered):
        at = where(source, row_number, line)
        if isinstance(row, BadLine):
            outcome = Skip(row.reason.split(" (")[0], row.reason)  # "invalid JSON (…, column 3)": count the kind
        elif (
            not isinstance(row, dict)
            or not isinstance(row.get(solution_field), str)
            or not isinstance(row.get(prompt_field), str)
        ):
            outcome = Skip(f"needs string fields {prompt_field!r} and {solution_field!r}")
        else:
            outcome = _corrupt(row[solution_field], rng, final, step)
        if isinstance(outcome, Skip):
            by_reason[outcome.reason] += 1
            skipped.append(f"{at}: {outcome}")
            continue
        corruption = outcome
        pair = {
            "prompt": row[prompt_field] + "\n",
            "chosen": row[solution_field],
            "rejected": corruption.text,
            "source_row": row_number,
            "corrupted_step": corruption.step,
            "original_value": corruption.original_value,
            "new_value": corruption.new_value,
        }
        pairs.append(pair)
        origins.append(at)
    # Only what training reads without a bad row: an empty question, or a row repeated in the file, gives none
    pairs, dropped = trainable_pairs(pairs)
    for index, reason in dropped:
        by_reason[reason] += 1
        skipped.append(f"{origins[index]}: {reason}")
    if not pairs:
        shown = "; ".join(f"{count} {reason}" for reason, count in by_reason.most_common(3))
        raise ValueError(f"{source}: no pair to write ({len(numbered)} rows: {shown}); nothing written to {out}")
    write_jsonl(out, pairs)  # to a temporary name, renamed when complete
    return {"rows": len(numbered), "pairs": len(pairs), "skipped": skipped, "skipped_by_reason": dict(by_reason)}
