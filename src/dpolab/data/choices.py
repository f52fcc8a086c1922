"""Multiple-choice data → preference pairs (Smaug's ARC and HellaSwag pairs).

chosen = the correct choice, rejected = each wrong choice: 3 pairs per 4-choice question. Schemas:

- ``arc``: ``question``, ``choices: {text: [...], label: [...]}``, ``answerKey`` (a label such as "B" or "2");
  prompt ``"{question}\\nAnswer:"``, completions ``" {choice}"``;
- ``hellaswag``: ``ctx`` (or ``ctx_a`` + ``ctx_b``), ``endings`` (list), ``label`` (index, int or digit
  string); prompt = the context, completions ``" {ending}"``;
- ``generic``: your column names for the question, the list of choices and the answer (an index, or
  the text of the correct choice).

Rows that cannot give pairs (missing answer, label out of range, choices and labels of different
lengths, fewer than two choices) are reported with their row numbers, never dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dpolab.data.formats import BadLine, trainable_pairs, where


@dataclass(frozen=True)
class Schema:
    name: str
    question: str = "question"
    choices: str = "choices"
    answer: str = "answer"


def _arc(row: dict) -> tuple[str, list[str], int]:
    choices = row.get("choices")
    if (
        not isinstance(choices, dict)
        or not isinstance(choices.get("text"), list)
        or not isinstance(choices.get("label"), list)
    ):
        raise ValueError("'choices' must be {text: [...], label: [...]}")
    texts, labels = choices["text"], [str(label) for label in choices["label"]]
    if len(texts) != len(labels):
        raise ValueError(f"choices have {len(texts)} texts but {len(labels)} labels")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:  # the answer key could name either choice
        raise ValueError(f"the label {repeated[0]!r} is given to two choices (labels {labels})")
    if "answerKey" not in row:
        raise ValueError("missing answerKey")
    key = str(row["answerKey"])
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not among the labels {labels}")
    if not isinstance(row.get("question"), str):
        raise ValueError("missing question")
    return f"{row['question']}\nAnswer:", texts, labels.index(key)


def _hellaswag(row: dict) -> tuple[str, list[str], int]:
    context = row.get("ctx")
    if not isinstance(context, str):
        if isinstance(row.get("ctx_a"), str):
            context = (row["ctx_a"] + " " + str(row.get("ctx_b", ""))).strip()
        else:
            raise ValueError("missing ctx (or ctx_a + ctx_b)")
    endings = row.get("endings")
    if not isinstance(endings, list):
        raise ValueError("'endings' must be a list")
    label = row.get("label")
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool):
        raise ValueError(f"missing or non-integer label ({label!r})")
    if not 0 <= label < len(endings):
        raise ValueError(f"label {label} is out of range for {len(endings)} endings")
    return context, endings, label


def _generic(row: dict, schema: Schema) -> tuple[str, list[str], int]:
    question, choices, answer = row.get(schema.question), row.get(schema.choices), row.get(schema.answer)
    if not isinstance(question, str):
        raise ValueError(f"missing {schema.question!r}")
    if not isinstance(choices, list):
        raise ValueError(f"{schema.choices!r} must be a list")
    choices = [_choice_text(c) or c for c in choices]
    if isinstance(answer, str) and answer in choices:
        return question, choices, choices.index(answer)
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise ValueError(f"{schema.answer!r} = {answer!r} is neither a choice nor an index in range")
    return question, choices, answer


def _choice_text(value: object) -> str | None:
    """A choice as text: a string, or a number written as one; None for null, true/false, an object or a list,
    which would be written as "None", "True" or a Python repr."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def pairs_from_choices(
    rows: list, schema: Schema, source: str = "data", lines: list[int | None] | None = None
) -> tuple[list[dict], list[str]]:
    """(pairs, reasons for what was left out). Pairs carry ``source_row`` and ``wrong_choice`` provenance.

    Every row that gives no pair and every wrong choice that gives none is listed with its reason: an unusable
    row, a wrong choice with the correct choice's text (chosen would equal rejected), a wrong choice whose text
    an earlier wrong choice of the row already has (a duplicate pair)."""
    pairs, skipped, origins = [], [], []
    for index, row in enumerate(rows):
        at = where(source, index, lines[index] if lines else getattr(row, "line", None))
        if isinstance(row, BadLine):
            skipped.append(f"{at}: {row.reason}")
            continue
        try:
            if not isinstance(row, dict):
                raise ValueError(f"expected an object, got {type(row).__name__}")
            if schema.name == "arc":
                prompt, choices, correct = _arc(row)
            elif schema.name == "hellaswag":
                prompt, choices, correct = _hellaswag(row)
            else:
                prompt, choices, correct = _generic(row, schema)
            if len(choices) < 2:
                raise ValueError("fewer than two choices")
        except ValueError as error:
            skipped.append(f"{at}: {error}")
            continue
        answer = _choice_text(choices[correct])
        if answer is None or not answer.strip():
            skipped.append(f"{at}: the correct choice ({correct}) is {'empty' if answer is not None else 'not text'}")
            continue
        seen: set[str] = set()
        for wrong, value in enumerate(choices):
            if wrong == correct:
                continue
            text = _choice_text(value)
            if text is None or not text.strip():
                what = "empty" if text is not None else f"not text ({json.dumps(value)[:40]})"
                skipped.append(f"{at}: choice {wrong} is {what}; no pair")
                continue
            if text.strip() == answer.strip():
                skipped.append(f"{at}: choice {wrong} has the correct choice's text; no pair (chosen = rejected)")
                continue
            if text.strip() in seen:
                skipped.append(f"{at}: choice {wrong} repeats an earlier wrong choice's text; no second pair")
                continue
            seen.add(text.strip())
            origins.append(f"{at}: choice {wrong}")
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": " " + answer.strip(),
                    "rejected": " " + text.strip(),
                    "source_row": index,
                    "wrong_choice": wrong,
                }
            )
    # an empty question or context, or a question repeated in the file: refused here, as training would
    pairs, dropped = trainable_pairs(pairs)
    skipped += [f"{origins[index]}: {reason}; no pair" for index, reason in dropped]
    return pairs, skipped
