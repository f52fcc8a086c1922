"""``dpolab report``: one self-contained HTML report of training and toy runs."""

from __future__ import annotations

import argparse

from dpolab.console import say


def report_command(args: argparse.Namespace) -> int:
    import time

    from dpolab.report.html import write_report

    start = time.perf_counter()
    out = write_report(args.runs, args.out, args.title)
    say(
        f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(args.runs)} run(s)) in {time.perf_counter() - start:.1f} s"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report", help="one self-contained HTML report (inline plots, no network) of training and toy runs"
    )
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="dpolab train output_dir or dpolab toy run folders")
    report.add_argument("--out", required=True, help="the HTML file to write")
    report.add_argument("--title", default="dpolab report")
    report.set_defaults(handler=report_command)
