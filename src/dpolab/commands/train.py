"""``dpolab train``, ``dpolab sft``, ``dpolab rm`` and ``dpolab ppo``, and the relaunch of ``accelerate launch --cpu`` under torchrun."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def train_command(args: argparse.Namespace) -> int:
    from dpolab.train import load_config, run
    from dpolab.train.distributed import PeerLost
    from dpolab.train.guard import NonFiniteError, TrainingInterrupted

    rest = list(args.rest)
    if "--resume" in rest and "--overwrite" in rest:
        raise ValueError(
            "--resume and --overwrite contradict each other: --resume continues the run in output_dir, "
            "--overwrite deletes it and starts again; pass one of them"
        )
    if "--keys" in rest:
        from dpolab.train.config import keys_help

        print(keys_help())
        return 0
    config_path = rest.pop(0) if rest and not rest[0].startswith("--") else None
    resume, overwrite = None, False
    if "--overwrite" in rest:
        rest.remove("--overwrite")
        overwrite = True
    if "--resume" in rest:
        at = rest.index("--resume")
        rest.pop(at)
        resume = rest.pop(at) if at < len(rest) and not rest[at].startswith("--") else "latest"
    from dpolab.train.registry import COMMANDS

    config = load_config(config_path, rest, COMMANDS[args.command].defaults)
    try:
        run(config, resume=resume, overwrite=overwrite)
    except TrainingInterrupted as stop:
        return stop.exit_code
    except NonFiniteError as error:
        print(f"dpolab {args.command}: error: {error}", file=sys.stderr)
        return 1
    except PeerLost as lost:
        again = rerun_command(args.command, list(args.rest), resume=lost.checkpoint is not None)
        advice = (
            f"resume from {lost.checkpoint} with: {again}"
            if lost.checkpoint
            else f"it wrote no checkpoint yet: start again with: {again}"
        )
        print(f"dpolab {args.command}: error: {lost.who}, so this process stops too; {advice}", file=sys.stderr)
        return 1
    return 0


def rerun_command(command: str, rest: list[str], resume: bool) -> str:
    """The command that started this run (its launcher, then ``dpolab COMMAND ARGS``), without ``--overwrite``
    and ``--resume [CKPT]``, then with ``--resume`` when asked: what resumes it from its newest checkpoint."""
    import shlex

    words, index = [], 0
    while index < len(rest):
        word = rest[index]
        index += 1
        if word == "--resume" and index < len(rest) and not rest[index].startswith("--"):
            index += 1  # its checkpoint: the newest is taken
        if word not in ("--resume", "--overwrite"):
            words.append(word)
    return shlex.join([*launcher_prefix(), command, *words, *(["--resume"] if resume else [])])


def _parent_command_line() -> list[str]:
    import os

    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def launcher_prefix() -> list[str]:
    """How this process was launched, up to ``dpolab``: the launcher's command line (torchrun or accelerate
    launch, this process's parent) read back, or ``torchrun --standalone`` with this run's number of processes."""
    import os
    import shutil

    parent = _parent_command_line()
    for index, word in enumerate(parent):
        if word == "-m" and parent[index + 1 : index + 2] == ["dpolab"]:
            prefix = parent[: index + 2]
            break
        if index > 0 and Path(word).name == "dpolab" and Path(word).is_file():  # the console script
            prefix = parent[: index + 1]
            break
    else:
        return ["torchrun", "--standalone", f"--nproc_per_node={os.environ.get('WORLD_SIZE', '1')}", "-m", "dpolab"]

    def short(path: str) -> str:  # the bare name when that is what the shell finds
        found = shutil.which(Path(path).name)
        return Path(path).name if found and Path(found).resolve() == Path(path).resolve() else path

    python, *words = prefix
    if Path(python).name.startswith("python"):
        if words[:2] == ["-m", "torch.distributed.run"] and (Path(python).parent / "torchrun").exists():
            torchrun = short(str(Path(python).parent / "torchrun"))
            if torchrun == "torchrun":
                return ["torchrun", *words[2:]]
        elif words and Path(words[0]).name in ("torchrun", "accelerate"):
            return [short(words[0]), *words[1:]]
    return [short(python) if Path(python).name in ("torchrun", "accelerate") else python, *words]


def processes_asked_of_accelerate() -> tuple[int, str]:
    """(N, what asked for it) when ``accelerate launch`` started only this process though N > 1 were asked;
    (0, "") otherwise.

    accelerate's launcher starts a single process (its "simple launcher", with no WORLD_SIZE) for ``--cpu``,
    for ``--num_processes N`` on a machine without GPUs, and for a config file (``--config_file`` or the
    default one) whose ``distributed_type`` is ``MULTI_CPU`` or ``NO`` — whatever ``num_processes`` says (it
    uses mpirun only with ``mpirun_hostfile``). The request survives only in the parent's command line and in
    that file. ``ValueError`` when it cannot be honoured here: several machines, or GPUs the run was not told
    to leave alone.
    """
    import os

    if "WORLD_SIZE" in os.environ or "ACCELERATE_USE_CPU" not in os.environ:
        return 0, ""
    parent = _parent_command_line()
    if "launch" not in parent or not any(Path(word).name == "accelerate" for word in parent[: parent.index("launch")]):
        return 0, ""
    options = parent[parent.index("launch") + 1 :]
    options = options[: options.index("-m")] if "-m" in options else options  # not the script's own arguments
    processes, machines, source = _option(options, "num_processes"), _option(options, "num_machines"), ""
    settings: dict = {}
    file = _option(options, "config_file")
    if file is None and "--cpu" not in options:  # accelerate reads its default file unless --cpu is given
        file = _default_accelerate_config()
    if file is not None:
        settings = _read_accelerate_config(file)
        if settings.get("compute_environment", "LOCAL_MACHINE") != "LOCAL_MACHINE":
            return 0, ""
    if processes is not None:
        source = f"--num_processes {processes}"
    elif settings.get("num_processes") is not None:
        processes, source = settings["num_processes"], f"num_processes: {settings['num_processes']} in {file}"
    machines = machines if machines is not None else settings.get("num_machines", 1)
    try:
        processes, machines = int(processes or 0), int(machines or 1)
    except (TypeError, ValueError):
        raise ValueError(f"accelerate launch: {source or file}: the number of processes is not a number") from None
    if processes <= 1:
        return 0, ""
    if machines > 1:
        raise ValueError(
            f"accelerate launch starts a single process on CPU for {source} with num_machines: {machines}; "
            f"start dpolab on each machine with torchrun --nnodes {machines} --nproc_per_node "
            f"{max(processes // machines, 1)} --rdzv_backend c10d --rdzv_endpoint HOST:PORT -m dpolab …"
        )
    if os.environ["ACCELERATE_USE_CPU"].lower() != "true":
        import torch

        if torch.cuda.is_available():  # torchrun would put its processes on GPUs accelerate was not told to use
            where = (
                f"distributed_type: {settings.get('distributed_type', 'NO')}"
                if source.startswith("num_processes:")
                else f"{torch.cuda.device_count()} GPU(s)"
            )
            raise ValueError(
                f"accelerate launch starts a single process for {source} ({where}); for {processes} GPU "
                f"processes use distributed_type: MULTI_GPU (or --multi_gpu), for {processes} CPU processes "
                "use_cpu: true (or --cpu)"
            )
    return processes, source


def _option(words: list[str], name: str) -> str | None:
    """The value of accelerate launch's ``--name`` (also spelt with hyphens, or ``--name=value``), else None."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    for index, word in enumerate(words):
        key, equals, value = word.partition("=")
        if key in spellings:
            return value if equals else (words[index + 1] if index + 1 < len(words) else None)
    return None


def _default_accelerate_config() -> str | None:
    """accelerate's default config file, as accelerate finds it ($HF_HOME, else $XDG_CACHE_HOME/huggingface)."""
    import os

    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    file = Path(home).expanduser() / "accelerate" / "default_config.yaml"
    return str(file) if file.is_file() else None


def _read_accelerate_config(file: str) -> dict:
    import json

    import yaml

    try:
        text = Path(file).read_text()
        settings = json.loads(text) if file.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return {}  # accelerate itself has already read it, or refused it
    return settings if isinstance(settings, dict) else {}


def relaunch_with_torchrun(processes: int, argv: list[str], source: str = "--cpu") -> None:
    """Replace this process by ``torchrun --standalone --nproc_per_node N -m dpolab ARGV`` (same environment)."""
    import os

    print(
        f"dpolab: accelerate launch starts one process for {source}; starting {processes} with "
        f"torchrun --standalone --nproc_per_node {processes} -m dpolab {' '.join(argv)}",
        file=sys.stderr,
    )
    sys.stderr.flush()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    os.execv(sys.executable, [*command, "-m", "dpolab", *argv])


def register(subparsers: argparse._SubParsersAction) -> None:
    """One command per recipe of :mod:`dpolab.train.registry`, each with dpolab train's keys."""
    from dpolab.train.config import keys_summary
    from dpolab.train.registry import RECIPES

    for recipe in RECIPES.values():
        variant = recipe.command != "train"
        parser = subparsers.add_parser(
            recipe.command,
            help=recipe.help,
            description=recipe.description
            + (" Same config keys, outputs, checkpoints and resume as dpolab train." if variant else ""),
            epilog=keys_summary(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument(
            "rest",
            nargs=argparse.REMAINDER,
            metavar="[CONFIG.yaml] [--key value ...]",
            help="YAML config file (optional when the required keys are flags), then overrides",
        )
        parser.set_defaults(handler=train_command, command=recipe.command)
