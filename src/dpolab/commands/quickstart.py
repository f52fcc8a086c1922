"""``dpolab quickstart``: the Smaug result on a tiny model, offline."""

from __future__ import annotations

import argparse


def quickstart_command(args: argparse.Namespace) -> int:
    from dpolab.quickstart import run_quickstart

    run_quickstart(args.out, args.size, args.seed, args.overwrite, progress=not args.no_progress)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    quickstart = subparsers.add_parser(
        "quickstart",
        help="the Smaug result on a tiny model, offline: data → SFT → low-edit pairs → DPO vs DPOP → accuracy → report",
    )
    quickstart.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    quickstart.add_argument(
        "--size",
        choices=["small", "full"],
        default="full",
        help="full: about 5 minutes on 2 CPU cores; small: under a minute, a check of the pipeline (log-ratios only)",
    )
    quickstart.add_argument("--seed", type=int, default=0, help="seeds the data, the model and every run")
    quickstart.add_argument("--overwrite", action="store_true", help="replace an earlier quickstart in --out")
    quickstart.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    quickstart.set_defaults(handler=quickstart_command)
