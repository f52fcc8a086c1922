"""``dpolab train``, ``dpolab sft``, ``dpolab rm`` and ``dpolab ppo``, and the relaunch of ``accelerate launch --cpu`` under torchrun."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# What each command sets before the config file and flags (which may override it).
COMMAND_DEFAULTS = {
    "train": None,
    "sft": {"task": "sft", "loss": "sft", "loss_params": {"reduction": "batch_token_mean"}},
    "rm": {"task": "reward", "loss": "reward_model"},
    "ppo": {"task": "ppo", "loss": "ppo"},
}


# The commands that are dpolab train with a task set (COMMAND_DEFAULTS): name → (help, description).
VARIANTS = {
    "sft": (
        "supervised fine-tuning of a Hugging Face causal LM (prompt + completion rows, or messages)",
        "dpolab train with task: sft and loss: sft (token-weighted NLL on completion tokens only); see "
        "docs/training.md.",
    ),
    "rm": (
        "train a reward model (Bradley–Terry) on preference pairs: a causal LM with a scalar head",
        "dpolab train with task: reward and loss: reward_model: −log σ(r_w − r_l − margin) + c·(r_w + r_l)², the "
        "score read at the last token of each completion, chosen and rejected in one packed pass. Optional "
        "margin column; loss_params.center_coefficient is c (TRL's center_rewards_coefficient); see docs/rlhf.md.",
    ),
    "ppo": (
        "RLHF-PPO of a causal LM on prompts: sampled responses, a reward (reward model, math judge or rules)",
        "dpolab train with task: ppo. Each step samples responses to batch_size prompts per process, scores them "
        "(ppo.reward: {model: DIR} | {judge: math} | {rules: [...]}), and runs ppo.ppo_epochs passes of the "
        "clipped PPO loss with a KL penalty to the initial policy; ppo.advantage: rloo for the critic-free "
        "variant; the ppo: settings are in docs/rlhf.md.",
    ),
}


def train_command(args: argparse.Namespace) -> int:
    from dpolab.train import load_config, run
    from dpolab.train.guard import NonFiniteError, TrainingInterrupted

    rest = list(args.rest)
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
    defaults = COMMAND_DEFAULTS[args.command]
    config = load_config(config_path, rest, defaults)
    try:
        run(config, resume=resume, overwrite=overwrite)
    except TrainingInterrupted as stop:
        return stop.exit_code
    except NonFiniteError as error:
        print(f"dpolab {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


def processes_asked_of_accelerate_cpu() -> int:
    """N when this process was started by ``accelerate launch --cpu --num_processes N`` (N > 1), else 0.

    accelerate's launcher starts a single process whenever ``--cpu`` is given, whatever
    ``--num_processes`` says; the parent's command line is the only place the request survives.
    """
    import os

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "WORLD_SIZE" in os.environ:
        return 0
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return 0
    if "--cpu" not in parent:
        return 0
    for index, word in enumerate(parent):
        value = word.split("=", 1)[1] if word.startswith("--num_processes=") else None
        if word == "--num_processes" and index + 1 < len(parent):
            value = parent[index + 1]
        if value is not None and value.isdigit():
            return int(value) if int(value) > 1 else 0
    return 0


def relaunch_with_torchrun(processes: int, argv: list[str]) -> None:
    """Replace this process by ``torchrun --standalone --nproc_per_node N -m dpolab ARGV`` (same environment)."""
    import os

    print(
        f"dpolab: accelerate launch --cpu starts one process; starting {processes} with "
        f"torchrun --standalone --nproc_per_node {processes} -m dpolab {' '.join(argv)}",
        file=sys.stderr,
    )
    sys.stderr.flush()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    os.execv(sys.executable, [*command, "-m", "dpolab", *argv])


def register(subparsers: argparse._SubParsersAction) -> None:
    from dpolab.train.config import keys_summary

    train = subparsers.add_parser(
        "train",
        help="preference-train a Hugging Face causal LM from a YAML config",
        description="Train with CONFIG.yaml; any config key can be overridden as --key value "
        "(nested: --loss_params.beta 0.3). --resume [CHECKPOINT] continues a stopped run; --overwrite "
        "replaces a run in output_dir; --keys prints every key with its default and meaning.",
        epilog=keys_summary(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="[CONFIG.yaml] [--key value ...]",
        help="YAML config file (optional when the required keys are flags), then overrides",
    )
    train.set_defaults(handler=train_command, command="train")
    for name, (help_text, description) in VARIANTS.items():
        variant = subparsers.add_parser(
            name,
            help=help_text,
            description=description + " Same config keys, outputs, checkpoints and resume as dpolab train.",
            epilog=keys_summary(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        variant.add_argument("rest", nargs=argparse.REMAINDER, metavar="[CONFIG.yaml] [--key value ...]")
        variant.set_defaults(handler=train_command, command=name)
