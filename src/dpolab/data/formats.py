"""Preference data formats: files or `datasets` ids → a list of :class:`PreferenceExample`.

Three row formats, as in TRL:

- explicit prompt: ``prompt``, ``chosen``, ``rejected`` strings;
- implicit prompt: ``chosen``, ``rejected`` only; the prompt is their longest common prefix, cut back
  to a clean boundary (the start of the last assistant turn marker, else a line break, else a space);
- conversational: ``prompt`` (optional), ``chosen``, ``rejected`` as lists of ``{"role", "content"}``
  messages; rendered later with the tokenizer's chat template.

Errors name the file and the row in one convention, every command alike (:func:`where`):
``FILE: line L (row R)`` for a .jsonl file, ``FILE: row R`` otherwise, where L is the 1-based line an editor
shows and R the 0-based position of the row among the file's rows (blank lines are not rows).

A row over :data:`MAX_ROW_BYTES` (``max_row_bytes`` in training, ``--max-row-bytes`` in ``dpolab data
check``) is a bad row, named by its line, before it is parsed or tokenised: one 50 MB row used to take
12 GB of memory on its way to the tokenizer. A key given twice in one JSON object (``{"chosen": "a",
"chosen": "b"}``, where JSON readers keep one silently) is a bad row naming the key.

Every text must be a string that UTF-8 can encode: a message's ``role`` and ``content`` are strings
(``123``, ``null``, a dict or a list of parts is refused, never rendered as ``"None"`` or a repr), and a
lone surrogate such as ``"\\ud800"`` is refused. A JSONL line nested more than :data:`MAX_DEPTH` levels
deep is a bad line like invalid JSON. A message's role is one of :data:`ROLES`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
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
    margin: float | None = None  # the optional ``margin`` column: reward-model training's m (dpolab rm)
    line: int | None = None  # the row's line in a .jsonl file (1-based), for messages


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: a prompt and the completion to learn (strings, or message lists when
    ``conversational``: the completion is then the final assistant message)."""

    prompt: str | Messages
    completion: str | Messages
    row: int
    conversational: bool = False
    line: int | None = None  # the row's line in a .jsonl file (1-based), for messages


@dataclass(frozen=True)
class PromptExample:
    """A prompt for RLHF rollouts (``dpolab ppo``): text or messages, and the ``answer`` column when given
    (the reference a verifiable reward checks, e.g. a GSM8K final number)."""

    prompt: str | Messages
    answer: str | None
    row: int
    line: int | None = None  # the row's line in a .jsonl file (1-based), for messages


class DataError(ValueError):
    """Bad input data; the message names the source and the row (``row``, when one row is at fault)."""

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


@dataclass(frozen=True)
class BadLine:
    """A line of a JSONL file that is not a row: invalid UTF-8, invalid JSON or nested too deeply (1-based line
    number; None for a row of a .json file)."""

    line: int | None
    reason: str


MAX_DEPTH = 100  # nesting levels of one row; preference rows use three or four
MAX_ROW_BYTES = 4 * 2**20
"""The default largest row, in bytes of JSON (4 MiB: a pair of 128k-token completions with their prompt is
about 1.5 MB of text)."""
TRAINING_ADVICE = "set on_bad_rows: skip to leave them out"
"""What a training run's user can do about bad rows (the config key); other commands name their own."""
ROLES = ("system", "user", "assistant", "tool")
"""The chat roles a message may have: what chat templates render; another role would be dropped or rendered
as something else by the template, silently."""
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Suffixes that mark a local file name rather than a `datasets` hub id (which has none of them).
_LOCAL_SUFFIXES = {*DATA_SUFFIXES, ".tsv", ".txt", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip"}
_SURROGATE = re.compile("[\ud800-\udfff]")


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_path(source: str) -> bool:
    """Whether ``source`` is a path rather than a hub id by its shape (models and data alike:
    :func:`dpolab.engine.loading.looks_local`): it starts with ``.``, ``/`` or ``~``, has more than one slash,
    exists, ends with a data file suffix (``.jsonl``, ``.csv``, …), or its first folder exists here
    (``data/typo`` when ``data/`` is a local folder)."""
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).exists():
        return True
    if os.sep != "/" and os.sep in source:
        return True
    if Path(source).suffix.lower() in _LOCAL_SUFFIXES:
        return True
    return "/" in source and Path(source.split("/", 1)[0]).is_dir()


def looks_local(source: str) -> bool:
    """Whether ``source`` names a data file on this machine rather than a `datasets` hub id: as
    :func:`looks_like_path`, and also anything not of the form ``org/name`` (``pairs``, a file name mistyped
    without its suffix, is never sent to the hub)."""
    return looks_like_path(source) or not _HUB_ID.fullmatch(source)


def where(source: str | Path, row: int, line: int | None = None) -> str:
    """The one way a message names a row (module docstring): ``FILE: line L (row R)`` or ``FILE: row R``."""
    return f"{source}: line {line} (row {row})" if line is not None else f"{source}: row {row}"


def text_problem(value: str, key: str) -> str | None:
    """Why the string ``value`` of ``key`` cannot be trained on, or None: a lone surrogate UTF-8 cannot encode."""
    found = _SURROGATE.search(value)
    if found is None:
        return None
    return (
        f"{key} contains a lone surrogate {ascii(found.group())[1:-1]} at character {found.start()} "
        "(not valid Unicode text; UTF-8 cannot encode it)"
    )


def messages_problem(value: object, key: str) -> str | None:
    """Why ``value`` is not a list of chat messages, or None.

    A message is an object with string ``role`` and ``content`` (other keys are kept); problems name the
    message, e.g. ``chosen[1].content must be a string, got int``.
    """
    if not isinstance(value, list):
        return f"{key} must be a list of messages, got {type(value).__name__}"
    for index, message in enumerate(value):
        at = f"{key}[{index}]"
        if not isinstance(message, dict):
            return f"{at} must be a message {{role, content}}, got {type(message).__name__}"
        for field in ("role", "content"):
            if field not in message:
                return f"{at}: missing field {field!r} (a message has role and content)"
            if not isinstance(message[field], str):
                return f"{at}.{field} must be a string, got {_type_name(message[field])}"
            problem = text_problem(message[field], f"{at}.{field}")
            if problem:
                return problem
        if message["role"] not in ROLES:
            return f"{at}.role {message['role']!r} is not a chat role (one of {', '.join(ROLES)})"
    return None


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _too_deep(value: object, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests lists/objects more than ``limit`` levels deep (iteratively: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise DuplicateKeyError(f"the key {repeated!r} appears twice in one object (JSON keeps only one)")
    return dict(pairs)


class DuplicateKeyError(ValueError):
    """A JSON object with a key given twice."""


def _parse_json(text: str) -> object:
    """``json.loads`` that reports nesting beyond :data:`MAX_DEPTH` (or the interpreter's limit) and a key given
    twice in one object as a ValueError."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    if _too_deep(value):
        raise ValueError(f"nested too deeply (more than {MAX_DEPTH} levels)")
    return value


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


def example_from_row(row: dict, index: int, source: str = "data", line: int | None = None) -> PreferenceExample:
    """Validate one row and turn it into a :class:`PreferenceExample` (the one validator of the loaders and
    ``dpolab data check``). An optional ``margin`` column (a finite number, or null) is kept for reward models."""
    example = dataclasses.replace(_example_from_row(row, index, where(source, index, line)), line=line)
    margin = row.get("margin")
    if margin is None:
        return example
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DataError(f"{where(source, index, line)}: field 'margin' must be a finite number or null; got {margin!r}")
    return dataclasses.replace(example, margin=float(margin))


def _object_row(row: object, at: str, expected: str = "an object") -> None:
    """``DataError`` naming ``at`` (:func:`where`) unless ``row`` is a parsed JSON object (a bad line says why
    it is not)."""
    if isinstance(row, BadLine):
        raise DataError(f"{at}: {row.reason}")
    if not isinstance(row, dict):
        raise DataError(f"{at}: expected {expected}, got {type(row).__name__}")


def _example_from_row(row: dict, index: int, at: str) -> PreferenceExample:
    _object_row(row, at, "an object with chosen/rejected")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"{at}: missing field {key!r} (fields: {', '.join(sorted(row)) or 'none'})")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise DataError(f"{at}: field {key!r} must be a string or a list of messages, got {_type_name(value)}")
    if isinstance(chosen, list) or isinstance(rejected, list):
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise DataError(
                f"{at}: chosen and rejected must both be strings or both be lists of messages; got "
                f"{type(chosen).__name__} and {type(rejected).__name__}"
            )
        return _conversational_example(prompt, chosen, rejected, index, at)
    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        problem = text_problem(value, f"field {key!r}") if isinstance(value, str) else None
        if problem:
            raise DataError(f"{at}: {problem}")
    if prompt is None:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    elif not isinstance(prompt, str):
        raise DataError(f"{at}: field 'prompt' must be a string, got {_type_name(prompt)}")
    if not prompt.strip():
        raise DataError(f"{at}: empty prompt")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise DataError(f"{at}: empty {key} completion")
    if chosen == rejected:
        raise DataError(f"{at}: chosen and rejected are identical")
    return PreferenceExample(prompt, chosen, rejected, index)


def _conversational_example(prompt, chosen: list, rejected: list, index: int, at: str) -> PreferenceExample:
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        problem = messages_problem(value, key)
        if problem:
            raise DataError(f"{at}: {problem}")
    if chosen == rejected:  # as for strings; checked before the shared messages are split off
        raise DataError(f"{at}: chosen and rejected are identical")
    if prompt is None:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif not isinstance(prompt, list):
        raise DataError(f"{at}: conversational chosen/rejected need a message-list prompt, got {_type_name(prompt)}")
    else:
        problem = messages_problem(prompt, "prompt")
        if problem:
            raise DataError(f"{at}: {problem}")
    if not prompt:
        raise DataError(f"{at}: empty prompt (no shared leading messages)")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value:
            raise DataError(f"{at}: empty {key} (no messages after the prompt)")
        if not any(message["content"].strip() for message in value):
            raise DataError(f"{at}: empty {key} completion (every message's content is blank)")
    return PreferenceExample(prompt, chosen, rejected, index, conversational=True)


def check_max_row_bytes(value: object, key: str = "max_row_bytes") -> None:
    """``ValueError`` naming ``key`` unless ``value`` is a whole number of bytes of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: a whole number of bytes of at least 1; got {value!r}")


def _too_large(row: object, limit: int) -> bool:
    """Whether a row read whole (a .json, .parquet or .csv row) holds more than ``limit`` bytes of text."""
    stack, size = [row], 0
    while stack and size <= limit:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return size > limit


def read_rows(source: str, split: str = "train", max_row_bytes: int = MAX_ROW_BYTES) -> list[dict]:
    """Rows from a .jsonl/.json/.parquet/.csv file, or from a `datasets` id (local or cached).

    A source that looks like a local path (:func:`looks_local`) and does not exist is ``no such file`` at
    once, never tried on the hub. A folder, an empty file and a CSV with only a header are refused, naming
    the file. A .jsonl line or .json row that cannot be read comes back as a :class:`BadLine`.
    """
    path = Path(source).expanduser()
    if path.exists():
        _require_file(path)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return [row for _, row in read_jsonl_lines(path, max_row_bytes)] or _empty(path)
        if suffix == ".json":
            rows = _read_json(path, split)
        elif suffix in (".parquet", ".csv"):
            rows = _read_table(path, suffix)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .csv)")
        if not rows:
            _empty(path)
        check_max_row_bytes(max_row_bytes)
        reason = f"longer than the row size limit ({max_row_bytes:,} bytes of text: max_row_bytes)"
        return [BadLine(None, reason) if _too_large(row, max_row_bytes) else row for row in rows]
    if looks_local(source):
        raise DataError(f"no such file: {source}")
    import datasets

    from dpolab.console import quiet_libraries

    try:
        with quiet_libraries():
            rows = list(datasets.load_dataset(source, split=split))
    except Exception as error:  # noqa: BLE001 - hub errors vary; one clear line
        raise DataError(f"cannot load data set {source!r} (split {split!r}): {_one_line(error)}") from None
    if not rows:
        raise DataError(f"data set {source!r} (split {split!r}): no rows")
    return rows


def _empty(path: Path):
    raise DataError(f"{path}: no rows (the file is empty)")


def _one_line(error: BaseException, limit: int = 300) -> str:
    """The message on one line, at most ``limit`` characters, cut at a word boundary with "…"."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + " …"


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file (give a .jsonl, .json, .parquet or .csv file)")
    if not path.exists():
        raise DataError(f"no such file: {path}")


def _read_json(path: Path, split: str) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 (at byte offset {error.start})") from None
    if not text.strip():
        raise DataError(f"{path}: no rows (the file is empty)")
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from None
    except DuplicateKeyError as error:
        raise DataError(f"{path}: {error}") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply (more than {MAX_DEPTH} levels)") from None
    if isinstance(data, dict) and split in data:
        data = data[split]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows (or a mapping with a {split!r} list)")
    # A row nested too deeply is a bad row (counted, or skipped with on_bad_rows: skip), as in JSONL.
    return [BadLine(None, f"nested too deeply (more than {MAX_DEPTH} levels)") if _too_deep(row) else row
            for row in data]  # fmt: skip


def _read_table(path: Path, suffix: str) -> list:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: no rows (the file is empty)")
    if suffix == ".csv":
        with open(path, "rb") as handle:
            lines = [line for line in handle.read().splitlines() if line.strip()]
        if len(lines) < 2:
            raise DataError(
                f"{path}: no rows (only a header line)" if lines else f"{path}: no rows (the file is empty)"
            )
    import datasets

    from dpolab.console import quiet_libraries

    try:
        with quiet_libraries():
            return list(datasets.load_dataset(suffix[1:], data_files=str(path), split="train"))
    except Exception as error:  # noqa: BLE001 - pandas/pyarrow errors vary; one clear line naming the file
        cause = error.__cause__ or error.__context__ or error
        raise DataError(f"{path}: cannot read as {suffix[1:]}: {_one_line(cause)}") from None


def sft_example_from_row(row: dict, index: int, source: str = "data", line: int | None = None) -> SFTExample:
    """An SFT row: ``prompt`` + ``completion`` strings, or ``messages`` (the last assistant message is the
    completion, the messages before it the prompt)."""
    at = where(source, index, line)
    _object_row(row, at)
    if "messages" in row:
        messages = row["messages"]
        problem = messages_problem(messages, "messages")
        if problem:
            raise DataError(f"{at}: {problem}")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DataError(f"{at}: 'messages' must be a list of role/content messages ending with an assistant turn")
        if not messages[-1]["content"].strip():
            raise DataError(f"{at}: empty completion (last assistant message)")
        return SFTExample(messages[:-1], messages[-1:], index, conversational=True, line=line)
    for key in ("prompt", "completion"):
        if key not in row:
            raise DataError(f"{at}: missing field {key!r} (SFT rows need prompt + completion, or messages)")
        if not isinstance(row[key], str):
            raise DataError(f"{at}: field {key!r} must be a string, got {_type_name(row[key])}")
        problem = text_problem(row[key], f"field {key!r}")
        if problem:
            raise DataError(f"{at}: {problem}")
        if not row[key].strip():
            raise DataError(f"{at}: empty {key}")
    return SFTExample(row["prompt"], row["completion"], index, line=line)


def prompt_example_from_row(row: dict, index: int, source: str = "data", line: int | None = None) -> PromptExample:
    """A prompt row: ``prompt`` (a string or a list of role/content messages), optionally ``answer``."""
    at = where(source, index, line)
    _object_row(row, at)
    prompt = row.get("prompt")
    if isinstance(prompt, list) and prompt:
        problem = messages_problem(prompt, "prompt")
    elif isinstance(prompt, str) and prompt.strip():
        problem = text_problem(prompt, "field 'prompt'")
    else:
        problem = "needs a non-empty field 'prompt' (a string or a list of messages)"
    if problem:
        raise DataError(f"{at}: {problem}")
    answer = row.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{at}: field 'answer' must be a string or a number, got {_type_name(answer)}")
        answer = str(answer)
        problem = text_problem(answer, "field 'answer'")
        if problem:
            raise DataError(f"{at}: {problem}")
    return PromptExample(prompt, answer, index, line=line)


def load_prompt_examples(
    source: str,
    split: str = "train",
    on_bad_rows: str = "error",
    max_row_bytes: int = MAX_ROW_BYTES,
    advice: str = TRAINING_ADVICE,
) -> tuple[list[PromptExample], list[str]]:
    """Prompts (with their optional answers) and the reasons for skipped rows; as :func:`load_examples`."""
    return _load(source, split, on_bad_rows, prompt_example_from_row, max_row_bytes, advice)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write ``rows`` as JSONL (UTF-8, non-ASCII kept, strict JSON), creating the folder; returns how many.
    Written to a temporary name and renamed (:func:`dpolab.outputs.write_jsonl`)."""
    from dpolab import outputs

    return outputs.write_jsonl(path, rows)


REPEATED_PAIR = "the same prompt, chosen and rejected as an earlier pair"


def trainable_pairs(pairs: Iterable[dict]) -> tuple[list[dict], list[tuple[int, str]]]:
    """The pairs a builder may write, and (index, reason) for the others.

    A pair is kept when it passes the loaders' own validator (:func:`example_from_row`: no empty prompt or
    completion, chosen differs from rejected, valid messages and text) and does not repeat an earlier pair
    (:data:`REPEATED_PAIR`). A builder that writes only these writes what ``dpolab data check --allow-extra``
    passes and what ``dpolab train`` trains on without a bad row."""
    kept, dropped = [], []
    seen: set[str] = set()
    for index, pair in enumerate(pairs):
        try:
            example = example_from_row(pair, index, "pair")
        except DataError as error:
            dropped.append((index, str(error).split(": ", 2)[-1]))
            continue
        key = pair_key(example)
        if key in seen:
            dropped.append((index, REPEATED_PAIR))
            continue
        seen.add(key)
        kept.append(pair)
    return kept, dropped


def _bounded_lines(handle, limit: int):
    """(line, bytes or None) for every line of a binary file; None for a line over ``limit`` bytes, which is
    skipped in chunks so that it is never held in memory."""
    number = 0
    while True:
        raw = handle.readline(limit + 1)
        if not raw:
            return
        number += 1
        if len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
            while raw and not raw.endswith(b"\n"):
                raw = handle.readline(2**20)
            yield number, None
            continue
        yield number, raw


def read_jsonl_lines(path: Path, max_row_bytes: int = MAX_ROW_BYTES) -> list[tuple[int, object]]:
    """(1-based line number, parsed row or :class:`BadLine`) for every non-blank line.

    A line that is not UTF-8, not JSON, nested more than :data:`MAX_DEPTH` levels, with a key given twice,
    or longer than ``max_row_bytes`` is a :class:`BadLine`; a missing file or a folder is a :class:`DataError`
    naming it.
    """
    path = Path(path)
    _require_file(path)
    check_max_row_bytes(max_row_bytes)
    rows: list[tuple[int, object]] = []
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from None
    with handle:
        for number, raw in _bounded_lines(handle, max_row_bytes):
            if raw is None:
                reason = f"longer than the row size limit ({max_row_bytes:,} bytes: max_row_bytes)"
                rows.append((number, BadLine(number, reason)))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                rows.append((number, BadLine(number, f"not UTF-8 (at byte offset {error.start})")))
                continue
            if not text.strip():
                continue
            try:
                rows.append((number, _parse_json(text)))
            except json.JSONDecodeError as error:
                rows.append(
                    (number, BadLine(number, f"invalid JSON ({error.msg.removesuffix(' at')}, column {error.colno})"))
                )
            except ValueError as error:  # nested too deeply
                rows.append((number, BadLine(number, str(error))))
    return rows


def pair_key(example: PreferenceExample | SFTExample | PromptExample) -> str:
    """Identity of an example, for finding duplicates."""
    if isinstance(example, PromptExample):
        return json.dumps([example.prompt, example.answer], sort_keys=True)
    if isinstance(example, SFTExample):
        return json.dumps([example.prompt, example.completion], sort_keys=True)
    return json.dumps([example.prompt, example.chosen, example.rejected], sort_keys=True)


def load_examples(
    source: str,
    split: str = "train",
    on_bad_rows: str = "error",
    max_row_bytes: int = MAX_ROW_BYTES,
    advice: str = TRAINING_ADVICE,
) -> tuple[list[PreferenceExample], list[str]]:
    """Preference pairs and the reasons for skipped rows.

    ``on_bad_rows="error"`` (default) raises a :class:`DataError` naming up to ten bad rows;
    ``"skip"`` leaves them out and returns one reason per skipped row. A row over ``max_row_bytes`` is a bad
    row (:data:`MAX_ROW_BYTES`). ``advice`` ends the error: what the caller's user can do (the default names the
    training config's keys; a command without them passes its own).
    """
    return _load(source, split, on_bad_rows, example_from_row, max_row_bytes, advice)


def load_sft_examples(
    source: str,
    split: str = "train",
    on_bad_rows: str = "error",
    max_row_bytes: int = MAX_ROW_BYTES,
    advice: str = TRAINING_ADVICE,
) -> tuple[list[SFTExample], list[str]]:
    """SFT examples (prompt + completion, or messages) and the reasons for skipped rows; as :func:`load_examples`."""
    return _load(source, split, on_bad_rows, sft_example_from_row, max_row_bytes, advice)


def numbered_rows(source: str, split: str = "train", max_row_bytes: int = MAX_ROW_BYTES) -> list[tuple]:
    """(line or None, row) for every row of ``source`` (:func:`read_rows`): the line of a .jsonl file, for
    messages in the one convention (:func:`where`)."""
    path = Path(source).expanduser()
    if path.suffix.lower() == ".jsonl" and path.exists():
        _require_file(path)
        return read_jsonl_lines(path, max_row_bytes) or _empty(path)
    return [(None, row) for row in read_rows(source, split, max_row_bytes)]


def _load(source: str, split: str, on_bad_rows: str, parse, max_row_bytes: int, advice: str) -> tuple[list, list[str]]:
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip'; got {on_bad_rows!r}")
    rows = numbered_rows(source, split, max_row_bytes)
    examples, bad = [], []
    seen: dict[str, int] = {}
    for index, (line, row) in enumerate(rows):
        try:
            example = parse(row, index, source, line)
        except DataError as error:
            bad.append(str(error))
            continue
        key = pair_key(example)
        if key in seen:
            bad.append(f"{where(source, index, line)}: duplicate of row {seen[key]}")
            continue
        seen[key] = index
        examples.append(example)
    if bad and on_bad_rows == "error":
        shown = "\n  ".join(bad[:10])
        more = f"\n  … and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} bad rows ({advice}):\n  {shown}{more}")
    return examples, bad
