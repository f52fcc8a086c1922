"""``dpolab losses``: every loss with its formula, source, parameters and defaults."""

from __future__ import annotations

import argparse
import json
import sys


def _format_default(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def losses_command(args: argparse.Namespace) -> int:
    from dpolab.losses import ALIASES, LOSSES

    rows = []
    for spec in LOSSES.values():
        aliases = [alias for alias, target in ALIASES.items() if target == spec.name]
        rows.append(
            {
                "name": spec.name,
                "formula": spec.formula,
                "source": spec.source,
                "parameters": {k: v for k, v in spec.defaults.items()},
                "reference": spec.needs_reference,
                "token_counts": spec.needs_lengths,
                "inputs": spec.inputs,
                "trl": spec.trl_label,
                "aliases": aliases,
                "summary": spec.summary,
            }
        )
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0

    from rich.console import Console

    width = args.width or _output_width()
    title = f"dpolab losses ({len(rows)}) — r = log π_θ − log π_ref, h = r_w − r_l"
    for row in rows:
        row["needs"] = _needs(row)
        row["defaults"] = [f"{k}={_format_default(v)}" for k, v in row["parameters"].items()] or ["margin (optional)"]
    table = _table(title, rows)
    if _fits(table, rows, width):
        Console(width=width).print(table)
    else:  # a table this narrow would cut cells (defaults among them) with "…": one block per loss instead
        _print_blocks(Console(width=width, soft_wrap=True), title, rows, width)
    return 0


def _output_width() -> int:
    """The terminal's width on a terminal; else ``COLUMNS`` when set; else 200 (CI logs, `make demo | tee`)."""
    import os

    from rich.console import Console

    columns = os.environ.get("COLUMNS", "").strip()
    if sys.stdout.isatty() or columns.isdigit():
        return Console().width
    return 200


def _needs(row: dict) -> str:
    if row["inputs"] != "logps":
        return row["inputs"]
    needs = ["reference" if row["reference"] else "no reference"]
    if row["token_counts"] != "no":
        needs.append(f"token counts ({row['token_counts']})")
    return "; ".join(needs)


def _table(title: str, rows: list[dict]):
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("per-pair loss")
    table.add_column("source")
    table.add_column("parameters (defaults)")
    table.add_column("needs")
    table.add_column("TRL")
    for row in rows:
        name = row["name"] + "".join(f"\n(alias {a})" for a in row["aliases"])
        table.add_row(name, row["formula"], row["source"], ", ".join(row["defaults"]), row["needs"], row["trl"] or "—")
    return table


def _fits(table, rows: list[dict], width: int) -> bool:
    """Whether ``table`` renders at ``width`` without cutting any cell (rich marks a cut with "…")."""
    import io

    from rich.console import Console

    buffer = Console(file=io.StringIO(), width=width)
    buffer.print(table)
    ellipses = sum(str(value).count("…") for row in rows for value in row.values())
    return buffer.file.getvalue().count("…") <= ellipses


def _print_blocks(console, title: str, rows: list[dict], width: int) -> None:
    """The narrow layout: each loss as labelled lines wrapped at spaces, so no default is ever cut."""
    import textwrap

    from rich.text import Text

    for line in textwrap.wrap(title, width=max(20, width), break_long_words=False, break_on_hyphens=False):
        console.print(line, markup=False, highlight=False)
    label_width = len("defaults") + 4
    for row in rows:
        console.print()
        aliases = "".join(f" (alias {a})" for a in row["aliases"])
        console.print(Text(row["name"], style="bold cyan") + Text(aliases), highlight=False)
        fields = (
            ("loss", row["formula"]),
            ("source", row["source"]),
            ("defaults", ", ".join(row["defaults"])),
            ("needs", row["needs"]),
            ("TRL", row["trl"] or "—"),
        )
        for label, value in fields:
            lead = f"  {label}".ljust(label_width)
            lines = textwrap.wrap(
                value,
                width=max(20, width - label_width),
                break_long_words=False,
                break_on_hyphens=False,
            )
            for index, line in enumerate(lines or [""]):
                console.print((lead if index == 0 else " " * label_width) + line, markup=False, highlight=False)


def register(subparsers: argparse._SubParsersAction) -> None:
    losses = subparsers.add_parser("losses", help="list every loss: formula, source, parameters and defaults")
    losses.add_argument("--format", choices=["table", "json"], default="table", help="output format (default: table)")
    losses.add_argument("--width", type=int, default=None, help="table width in characters (default: the terminal's)")
    losses.set_defaults(handler=losses_command)
