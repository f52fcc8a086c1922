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
                "trl": spec.trl_name,
                "aliases": aliases,
                "summary": spec.summary,
            }
        )
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dpolab losses ({len(rows)}) — r = log π_θ − log π_ref, h = r_w − r_l", show_lines=True)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("per-pair loss")
    table.add_column("source")
    table.add_column("parameters (defaults)")
    table.add_column("needs")
    table.add_column("TRL")
    for row in rows:
        needs = []
        if row["inputs"] != "logps":
            needs.append(row["inputs"])
        else:
            needs.append("reference" if row["reference"] else "no reference")
            if row["token_counts"] != "no":
                needs.append(f"token counts ({row['token_counts']})")
        params = ", ".join(f"{k}={_format_default(v)}" for k, v in row["parameters"].items()) or "margin (optional)"
        name = row["name"] + "".join(f"\n(alias {a})" for a in row["aliases"])
        table.add_row(name, row["formula"], row["source"], params, "; ".join(needs), row["trl"] or "—")
    # Piped output (CI logs, `make demo | tee`) would otherwise wrap at rich's 80-column fallback.
    width = args.width or (None if sys.stdout.isatty() else 200)
    Console(width=width).print(table)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    losses = subparsers.add_parser("losses", help="list every loss: formula, source, parameters and defaults")
    losses.add_argument("--format", choices=["table", "json"], default="table", help="output format (default: table)")
    losses.add_argument("--width", type=int, default=None, help="table width in characters (default: the terminal's)")
    losses.set_defaults(handler=losses_command)
