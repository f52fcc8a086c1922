"""The ``dpolab`` command line: parses arguments and calls one library function per command."""

from __future__ import annotations

import argparse
import os
import sys

from dpolab import __version__
from dpolab.commands import data, losses, quickstart, report, sweep, toy, train
from dpolab.commands import eval as evaluate  # not `eval`: the builtin
from dpolab.commands.train import processes_asked_of_accelerate, relaunch_with_torchrun, train_command


class OneLineParser(argparse.ArgumentParser):
    """argparse with the one-line errors of every other dpolab error: ``dpolab data corrupt-math: error:
    argument --out: expected one argument (dpolab data corrupt-math --help lists the options)``, exit 2, instead
    of the whole usage block."""

    def error(self, message: str):
        from dpolab.console import printable

        self.exit(2, printable(f"{self.prog}: error: {message} ({self.prog} --help lists the options)") + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dpolab",
        description="Preference optimisation for language models: the DPO family, DPO-Positive, "
        "flexible-β, and the diagnostics of the 3D-properties and Smaug papers.",
    )
    parser.add_argument("--version", action="version", version=f"dpolab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (losses, train, evaluate, sweep, quickstart, report, data, toy):  # the order `dpolab --help` lists
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = evaluate.route(sys.argv[1:] if argv is None else list(argv))
    from dpolab.train.registry import COMMANDS

    training = bool(argv) and argv[0] in COMMANDS
    if training:
        try:
            processes, source = processes_asked_of_accelerate()
        except ValueError as error:  # asked of accelerate, not possible here: never train on one process instead
            print(f"dpolab {argv[0]}: error: {one_line(error)}", file=sys.stderr)
            return 2
        if processes:
            relaunch_with_torchrun(processes, argv, source)
    if training and not {"-h", "--help"} & set(argv[1:]):
        # argparse cannot hand "--key value" pairs of arbitrary keys to a subcommand: route them directly.
        args = argparse.Namespace(command=argv[0], handler=train_command, rest=argv[1:])
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
    except ValueError as error:  # bad input: a config key, a file, a row — the message names it
        print(f"dpolab {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training, where Ctrl-C is caught and checkpointed
        print(f"dpolab {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # disk full, permission denied, a file that vanished
        print(f"dpolab {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:
        if os.environ.get("DPOLAB_TRACEBACK"):
            raise
        path = save_traceback()
        print(
            f"dpolab {args.command}: internal error: {type(error).__name__}: {one_line(error)[:500]} "
            f"(a bug in dpolab: please report it with the traceback saved in {path})",
            file=sys.stderr,
        )
        return 1


def one_line(error: BaseException) -> str:
    """An exception's message on one line (an OSError with its file name), its control characters escaped: a
    message may quote a row's key or a file name, and those must not drive the terminal."""
    from dpolab.console import printable

    if isinstance(error, OSError) and error.strerror:
        names = " → ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        return printable(f"{error.strerror}: {names}" if names else error.strerror)
    return printable(" ".join(str(error).split()) or type(error).__name__)


def save_traceback() -> str:
    """The current exception's traceback in a temporary file; its path."""
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile("w", prefix="dpolab-traceback-", suffix=".txt", delete=False) as handle:
        traceback.print_exc(file=handle)
    return handle.name


if __name__ == "__main__":
    raise SystemExit(main())
