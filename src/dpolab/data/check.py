"""``dpolab data check``: every problem of a preference file, per row, before a run starts.

The checks are the ones ``dpolab train`` applies (it refuses such rows unless ``on_bad_rows: skip``),
plus two that need context: extra fields, and prompts that alone reach ``max_length`` tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dpolab.console import printable
from dpolab.data.formats import (
    MAX_ROW_BYTES,
    BadLine,
    DataError,
    _one_line,
    example_from_row,
    numbered_rows,
    pair_key,
)

KNOWN_FIELDS = {"prompt", "chosen", "rejected"}


@dataclass
class Problem:
    line: int | None  # 1-based line in a .jsonl file
    row: int  # 0-based row index
    kind: str
    message: str

    def where(self) -> str:
        """The position in the convention of every command (:func:`dpolab.data.formats.where`), file aside."""
        return f"line {self.line} (row {self.row})" if self.line is not None else f"row {self.row}"


@dataclass
class CheckReport:
    source: str
    rows: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def counts(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    def bad_rows(self) -> int:
        return len({p.row for p in self.problems})


def _kind(message: str) -> str:
    for needle, kind in (
        ("not UTF-8", "non-UTF-8 text"),
        ("lone surrogate", "invalid Unicode text"),
        ("nested too deeply", "nested too deeply"),
        ("max_row_bytes", "row too large"),
        ("appears twice", "duplicate key"),
        ("is not a chat role", "unknown chat role"),
        ("chat template", "chat template error"),
        ("invalid JSON", "invalid JSON"),
        ("missing field", "missing field"),
        ("must be", "wrong type"),
        ("expected an object", "wrong type"),
        ("empty prompt", "empty prompt"),
        ("empty", "empty completion"),
        ("identical", "chosen identical to rejected"),
    ):
        if needle in message:
            return kind
    return "other"


def check_file(
    source: str,
    tokenizer=None,
    max_length: int | None = None,
    allow_extra: bool = False,
    max_row_bytes: int = MAX_ROW_BYTES,
) -> CheckReport:
    """Check every row of ``source``; see the module docstring. A file that cannot be read at all (missing, a
    folder, empty, a CSV with only a header) is a :class:`DataError` naming it."""
    numbered = numbered_rows(source, max_row_bytes=max_row_bytes)
    report = CheckReport(source, rows=len(numbered))
    seen: dict[str, int] = {}
    for index, (line, row) in enumerate(numbered):

        def add(kind: str, message: str, line=line, index=index) -> None:
            report.problems.append(Problem(line, index, kind, message))

        if isinstance(row, BadLine):
            add(_kind(row.reason), row.reason)
            continue
        if isinstance(row, dict) and not allow_extra:
            extra = sorted(set(row) - KNOWN_FIELDS)
            if extra:
                add("extra field", f"extra field(s): {', '.join(extra)} (use --allow-extra to accept them)")
        try:
            example = example_from_row(row, index, source, line)
        except DataError as error:
            message = str(error).split(f"row {index}): " if line is not None else f"row {index}: ", 1)[-1]
            add(_kind(message), message)
            continue
        key = pair_key(example)
        if key in seen:
            add("duplicate pair", f"duplicate of row {seen[key]}")
        else:
            seen[key] = index
        if tokenizer is not None and max_length is not None:
            from dpolab.data.tokenize import tokenize_pairs

            try:
                _, tokenized = tokenize_pairs(tokenizer, [example], max_length, truncation_mode="drop")
            except Exception as error:  # noqa: BLE001 - a template that raises on this row: a problem of the row
                if not example.conversational:
                    raise
                add("chat template error", f"the tokenizer's chat template fails on this row: {_one_line(error)}")
                continue
            if tokenized.dropped_rows:
                add("prompt too long", f"the prompt alone reaches max_length={max_length} tokens")
    return report


def print_report(report: CheckReport, show: int = 50) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for problem in report.problems[:show]:  # a row's text must not drive the terminal: escaped
        console.print(
            printable(f"{report.source}: {problem.where()}: {problem.message}"),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if len(report.problems) > show:
        console.print(f"… {len(report.problems) - show} more problems (use --show to list more)")
    console.print(
        printable(f"{report.source}: {report.rows} rows, {report.bad_rows()} with problems"),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    table = Table()
    table.add_column("problem")
    table.add_column("rows", justify="right")
    for kind, count in sorted(report.counts().items(), key=lambda item: -item[1]):
        table.add_row(kind, str(count))
    if report.clean:
        table.add_row("none", "0")
    console.print(table)
