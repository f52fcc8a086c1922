"""``dpolab sweep SPEC.yaml``: a grid of runs over config keys and seeds, with a table of intervals."""

from __future__ import annotations

import argparse

from dpolab.console import say


def sweep_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from dpolab.console import printable
    from dpolab.report.sweep import cell, comparison_table, table_columns
    from dpolab.sweep import run_sweep

    results = run_sweep(args.spec, args.out, progress=not args.no_progress, dry_run=args.dry_run or args.metrics)
    if args.dry_run or args.metrics:
        say(f"{results['runs']} runs ({results['pending']} not finished) of {len(results['points'])} points "
              f"into {results['folder']}:")  # fmt: skip
        for name in results["points"]:
            say(f"  {printable(name)}")  # the spec's names: text from a file, shown, never executed
        if args.metrics:
            available = results["available_metrics"]
            say("metrics of the finished runs:" if available else "no finished run yet: no metrics to list")
            for name in available:
                say(f"  {name}")
        return 0
    columns = table_columns(results)
    # Text, not str: rich would read "[…]" in a point or metric name as markup (and fail on "[/x]")
    table = Table(title=Text(printable(f"sweep: mean ± 95% interval over seeds ({results['folder']})")))
    for column in ["point", *columns]:
        table.add_column(Text(printable(column)), justify="left" if column == "point" else "right")
    for row in results["points"]:
        table.add_row(Text(printable(row["point"])), *[Text(cell(row["metrics"].get(c))) for c in columns])
    Console(width=max(120, 24 * (len(columns) + 1))).print(table)
    if results.get("comparisons"):
        say("paired by seed (a − b, mean ± 95% interval, seeds with a − b > 0):")
        say(comparison_table(results))
    if results["missing_metrics"]:
        say(f"metrics no run has: {', '.join(results['missing_metrics'])} (dpolab sweep SPEC --metrics lists them)")
    say(f"table: {results['folder']}/results.csv; page: {results['folder']}/index.html")
    if results["failures"]:
        say(f"{len(results['failures'])} run(s) failed (listed in results.json and index.html; logs of training runs in {results['folder']}/logs); "
              "run the sweep again to retry them")  # fmt: skip
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser(
        "sweep",
        help="a grid of training runs over config keys and seeds: table with 95%% intervals, plots, HTML; resumable",
        description="Run every point of SPEC.yaml's grid for each seed through dpolab train/sft/rm/ppo (or the toy "
        "lab), evaluate each, and write results.csv/json, plots and index.html. Finished runs are skipped when "
        "started again; unfinished ones resume from their checkpoint. Spec keys: docs/experiments.md.",
    )
    sweep.add_argument("spec", help="the sweep spec (YAML)")
    sweep.add_argument("--out", help="the sweep's folder (default: the spec's out:, else runs/sweep-<spec name>)")
    sweep.add_argument("--dry-run", action="store_true", help="check the spec and every run's config; list the points")
    sweep.add_argument("--metrics", action="store_true", help="list the metrics the finished runs have, run nothing")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.set_defaults(handler=sweep_command)
