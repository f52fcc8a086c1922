"""The ``dpolab`` command line: parses arguments and calls one library function per command."""

from __future__ import annotations

import argparse
import sys

from dpolab import __version__
from dpolab.commands import data, losses, quickstart, report, toy, train
from dpolab.commands import eval as evaluate  # not `eval`: the builtin
from dpolab.commands.train import processes_asked_of_accelerate_cpu, relaunch_with_torchrun, train_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpolab",
        description="Preference optimisation for language models: the DPO family, DPO-Positive, "
        "flexible-β, and the diagnostics of the 3D-properties and Smaug papers.",
    )
    parser.add_argument("--version", action="version", version=f"dpolab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (losses, train, evaluate, quickstart, report, data, toy):  # the order `dpolab --help` lists
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["train"], ["sft"]) and (processes := processes_asked_of_accelerate_cpu()):
        relaunch_with_torchrun(processes, argv)
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv[1:]):
        # argparse cannot hand "--key value" pairs of arbitrary keys to a subcommand: route them directly.
        args = argparse.Namespace(command="train", handler=train_command, rest=argv[1:], sft=False)
    elif argv[:1] == ["sft"] and not {"-h", "--help"} & set(argv[1:]):
        args = argparse.Namespace(command="sft", handler=train_command, rest=argv[1:], sft=True)
    else:
        args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a bar per weight load/save: ours say what is happening
    except ImportError:
        pass
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # `dpolab losses | head`
        sys.stderr.close()
        return 0
    except ValueError as error:
        print(f"dpolab {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
