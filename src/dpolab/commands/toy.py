"""``dpolab toy``: the 3D-properties toy lab (``run`` and ``figures``)."""

from __future__ import annotations

import argparse

from dpolab.console import say


def _parse_params(items: list[str]) -> dict:
    """``key=value`` pairs; values are read as YAML scalars (numbers, true/false, strings)."""
    import yaml

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects key=value; got {item!r}")
        params[key] = yaml.safe_load(value)
    return params


def toy_run_command(args: argparse.Namespace) -> int:
    from dpolab.outputs import RUN_FILES, check_output
    from dpolab.toy.lab import ToyConfig, run_toy
    from dpolab.toy.scenarios import PRESETS

    config = ToyConfig(
        scenario=args.scenario,
        loss=args.loss if len(args.loss) > 1 else args.loss[0],
        loss_params=_parse_params(args.param),
        loss_weights=args.loss_weights,
        sft_weight=args.sft_weight,
        steps=args.steps,
        learning_rate=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        kl_beta=args.kl_beta,
    )
    inputs = {"scenario file": args.scenario if args.scenario not in PRESETS else None}
    args.out = check_output(args.out, "toy", inputs, writes=RUN_FILES["toy"])
    run = run_toy(config)
    directory = run.save(args.out)
    summary = run.summary()
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from dpolab.console import printable

    # Text, not str: the scenario's name comes from a file; rich would read "[…]" in it as markup
    table = Table(title=Text(printable(f"toy run: {config.label}, scenario {run.scenario.name}")))
    table.add_column("quantity")
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    table.add_row("π(chosen)", f"{summary['initial_chosen_prob']:.4f}", f"{summary['final_chosen_prob']:.4f}")
    table.add_row(
        "π(rejected), each", f"{summary['initial_rejected_prob']:.3g}", f"{summary['final_rejected_prob']:.3g}"
    )
    table.add_row("π(unseen 9–10)", f"{summary['initial_unseen_mass']:.4f}", f"{summary['final_unseen_mass']:.4f}")
    table.add_row(
        "mass outside the pairs", f"{1 - summary['initial_data_mass']:.4f}", f"{1 - summary['final_data_mass']:.4f}"
    )
    table.add_row("|∂L/∂π_l| / |∂L/∂π_w|", f"{summary['initial_grad_ratio']:.3g}", f"{summary['final_grad_ratio']:.3g}")
    Console().print(table)
    say(f"peak π(chosen) {summary['peak_chosen_prob']:.4f} at step {summary['peak_step']}; run folder: {directory}")
    return 0


def toy_figures_command(args: argparse.Namespace) -> int:
    import contextlib
    import time

    from dpolab.console import progress_bar
    from dpolab.outputs import RUN_FILES, check_output
    from dpolab.toy.figures import make_figures
    from dpolab.toy.scenarios import PRESETS

    inputs = {"scenario file": args.scenario if args.scenario not in PRESETS else None}
    args.out = check_output(args.out, "toy-figures", inputs, writes=RUN_FILES["toy-figures"])
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:  # the one progress module: a live bar, or plain lines in a pipe
        bar = []

        def report(done: int, total: int, name: str) -> None:
            if not bar:
                bar.append(stack.enter_context(progress_bar(True, "toy lab", total)))
            bar[0](completed=done)

        summary = make_figures(args.out, scenario=args.scenario, steps=args.steps, seed=args.seed, progress=report)
    elapsed = time.perf_counter() - start
    say(
        f"wrote {len(summary['figures'])} figures, summary.json and {len(summary['runs'])} run folders "
        f"to {args.out} in {elapsed:.1f} s"
    )
    for name in summary["figures"].values():
        say(f"  {name}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    toy = subparsers.add_parser("toy", help="the 3D-properties toy lab: categorical policy, seconds per run")
    toy_commands = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND", required=True)
    run = toy_commands.add_parser("run", help="one Step-1 + Step-2 run; writes metrics.jsonl/csv and summary.json")
    run.add_argument("--scenario", default="1", help="preset 1-4 or a YAML/JSON scenario file (default: 1)")
    run.add_argument("--loss", nargs="+", default=["dpo"], help="loss name(s) from `dpolab losses`, or rlhf")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a loss parameter, repeatable")
    run.add_argument("--loss-weights", type=float, nargs="+", default=None, help="weights when several losses")
    run.add_argument("--sft-weight", type=float, default=0.0, help="α of the added SFT term (default: 0)")
    run.add_argument("--steps", type=int, default=1000, help="Step-2 steps (default: 1000)")
    run.add_argument("--lr", type=float, default=1e-3, help="Step-2 learning rate (default: 1e-3)")
    run.add_argument(
        "--optimizer",
        choices=["adam", "sgd"],
        default="adam",
        help="Step-2 optimiser (default: adam; sgd: try --lr 0.5)",
    )
    run.add_argument("--kl-beta", type=float, default=0.1, help="rlhf: β of the KL penalty (default: 0.1)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", required=True, help="run folder to write")
    run.set_defaults(handler=toy_run_command)
    figures = toy_commands.add_parser("figures", help="every experiment of docs/toy.md: 4 figures + summary.json")
    figures.add_argument("--out", required=True, help="folder for the figures, summary.json and the run folders")
    figures.add_argument("--scenario", default="1", help="scenario of the remedies and the sweep (default: 1)")
    figures.add_argument("--steps", type=int, default=1000, help="Step-2 steps of every run (default: 1000)")
    figures.add_argument("--seed", type=int, default=0)
    figures.set_defaults(handler=toy_figures_command)
