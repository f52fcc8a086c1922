"""Preference data formats: files or `datasets` ids → a list of :class:`PreferenceExample`.

Three row formats, as in TRL:

- explicit prompt: ``prompt``, ``chosen``, ``rejected`` strings;
- implicit prompt: ``chosen``, ``rejected`` only; the prompt is their longest common prefix, cut back
  to a clean boundary (the start of the last assistant turn marker, else a line break, else a space);
- conversational: ``prompt`` (optional), ``chosen``, ``rejected`` as lists of ``{"role", "content"}``
  messages; rendered later with the tokenizer's chat template.

Errors name the file and the row (0-based, as in the file's line order).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

Messages = list[dict]


@dataclass(frozen=True)
class PreferenceExample:
    """One pair. ``prompt``/``chosen``/``rejected`` are strings, or message lists when ``conversational``."""

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    row: int
    conversational: bool = False


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: a prompt and the completion to learn (strings, or message lists when
    ``conversational``: the completion is then the final assistant message)."""

    prompt: str | Messages
    completion: str | Messages
    row: int
    conversational: bool = False


class DataError(ValueError):
    """Bad input data; the message names the source and the row."""


@dataclass(frozen=True)
class BadLine:
    """A line of a JSONL file that is not a row: invalid UTF-8 or invalid JSON (1-based line number)."""

    line: int
    reason: str


# Where an implicit prompt may end (the text after it starts the completion), most specific first.
_BOUNDARIES = ("\n\nAssistant:", "\nAssistant:", "Assistant:", "\n", " ")


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) from two texts sharing a prefix.

    The shared prefix is cut back to the end of the last boundary marker it contains so that the
    completions start at a clean place (HH-RLHF: right after the last ``"\\n\\nAssistant:"``).
    """
    limit = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        limit += 1
    shared = chosen[:limit]
    if limit == len(chosen) or limit == len(rejected):
        # One text is a prefix of the other: cut at a boundary strictly inside it.
        shared = shared[:-1]
    for marker in _BOUNDARIES:
        cut = shared.rfind(marker)
        if cut > 0 or (cut == 0 and marker.strip()):
            end = cut + len(marker)
            return chosen[:end], chosen[end:], rejected[end:]
    return "", chosen, rejected


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def example_from_row(row: dict, index: int, source: str = "data") -> PreferenceExample:
    """Validate one row and turn it into a :class:`PreferenceExample`."""
    where = f"{source}: row {index}"
    if isinstance(row, BadLine):
        raise DataError(f"{where} (line {row.line}): {row.reason}")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with chosen/rejected, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (fields: {', '.join(sorted(row)) or 'none'})")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if _is_messages(chosen) and _is_messages(rejected):
        if prompt is None:
            shared = 0
            while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        elif not _is_messages(prompt):
            raise DataError(
                f"{where}: conversational chosen/rejected need a message-list prompt, got {type(prompt).__name__}"
            )
        if not prompt:
            raise DataError(f"{where}: empty prompt (no shared leading messages)")
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not value:
                raise DataError(f"{where}: empty {key} (no messages after the prompt)")
        return PreferenceExample(prompt, chosen, rejected, index, conversational=True)
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field {key!r} must be a string or a list of messages, got {type(value).__name__}"
            )
    if prompt is None:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise DataError(f"{where}: empty prompt")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise DataError(f"{where}: empty {key} completion")
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical")
    return PreferenceExample(prompt, chosen, rejected, index)


def read_rows(source: str, split: str = "train") -> list[dict]:
    """Rows from a .jsonl/.json/.parquet/.csv file, or from a `datasets` id (local or cached)."""
    path = Path(source)
    if path.exists():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return [row for _, row in read_jsonl_lines(path)]
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from None
            if isinstance(data, dict) and split in data:
                data = data[split]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a list of rows (or a mapping with a {split!r} list)")
            return data
        if suffix in (".parquet", ".csv"):
            import datasets

            dataset = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
            return list(dataset)
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .csv)")
    if source.count("/") <= 1 and not source.startswith((".", "/")):
        import datasets

        try:
            return list(datasets.load_dataset(source, split=split))
        except Exception as error:  # noqa: BLE001 - hub errors vary; one clear line
            raise DataError(f"cannot load data set {source!r} (split {split!r}): {error}") from None
    raise DataError(f"data file not found: {source}")


def sft_example_from_row(row: dict, index: int, source: str = "data") -> SFTExample:
    """An SFT row: ``prompt`` + ``completion`` strings, or ``messages`` (the last assistant message is the
    completion, the messages before it the prompt)."""
    where = f"{source}: row {index}"
    if isinstance(row, BadLine):
        raise DataError(f"{where} (line {row.line}): {row.reason}")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not _is_messages(messages) or len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise DataError(
                f"{where}: 'messages' must be a list of role/content messages ending with an assistant turn"
            )
        if not str(messages[-1]["content"]).strip():
            raise DataError(f"{where}: empty completion (last assistant message)")
        return SFTExample(messages[:-1], messages[-1:], index, conversational=True)
    for key in ("prompt", "completion"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (SFT rows need prompt + completion, or messages)")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
        if not row[key].strip():
            raise DataError(f"{where}: empty {key}")
    return SFTExample(row["prompt"], row["completion"], index)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write ``rows`` as JSONL (UTF-8, non-ASCII kept), creating the folder; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl_lines(path: Path) -> list[tuple[int, object]]:
    """(1-based line number, parsed row or :class:`BadLine`) for every non-blank line."""
    rows: list[tuple[int, object]] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                rows.append((number, BadLine(number, f"not UTF-8 (at byte offset {error.start})")))
                continue
            if not text.strip():
                continue
            try:
                rows.append((number, json.loads(text)))
            except json.JSONDecodeError as error:
                rows.append((number, BadLine(number, f"invalid JSON ({error.msg}, column {error.colno})")))
    return rows


def pair_key(example: PreferenceExample | SFTExample) -> str:
    """Identity of an example, for finding duplicates."""
    if isinstance(example, SFTExample):
        return json.dumps([example.prompt, example.completion], sort_keys=True)
    return json.dumps([example.prompt, example.chosen, example.rejected], sort_keys=True)


def load_examples(
    source: str, split: str = "train", on_bad_rows: str = "error"
) -> tuple[list[PreferenceExample], list[str]]:
    """Preference pairs and the reasons for skipped rows.

    ``on_bad_rows="error"`` (default) raises a :class:`DataError` naming up to ten bad rows;
    ``"skip"`` leaves them out and returns one reason per skipped row.
    """
    return _load(source, split, on_bad_rows, example_from_row)


def load_sft_examples(
    source: str, split: str = "train", on_bad_rows: str = "error"
) -> tuple[list[SFTExample], list[str]]:
    """SFT examples (prompt + completion, or messages) and the reasons for skipped rows; as :func:`load_examples`."""
    return _load(source, split, on_bad_rows, sft_example_from_row)


def _load(source: str, split: str, on_bad_rows: str, parse) -> tuple[list, list[str]]:
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip'; got {on_bad_rows!r}")
    rows = read_rows(source, split)
    if not rows:
        raise DataError(f"{source}: no rows")
    examples, bad = [], []
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        try:
            example = parse(row, index, source)
        except DataError as error:
            bad.append(str(error))
            continue
        key = pair_key(example)
        if key in seen:
            bad.append(f"{source}: row {index}: duplicate of row {seen[key]}")
            continue
        seen[key] = index
        examples.append(example)
    if bad and on_bad_rows == "error":
        shown = "\n  ".join(bad[:10])
        more = f"\n  … and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} bad rows (set on_bad_rows: skip to leave them out):\n  {shown}{more}")
    return examples, bad
