"""``dpolab quickstart``: the Smaug result on a laptop, offline, in minutes (docs/quickstart.md).

One recipe composed of the library's blocks, in order:

1. **data**: procedural GSM8K-style problems (:mod:`dpolab.data.synthetic`), disjoint sets for SFT,
   preference pairs, held-out pairs and the accuracy evaluation; a BPE tokenizer trained on them.
2. **model**: a small Llama-architecture model with random weights, saved in Hugging Face format.
3. **SFT**: ``dpolab sft`` on the SFT problems (loss on the solution tokens only).
4. **pairs**: *low edit distance* (the correct solution vs the same with one intermediate result
   corrupted, Smaug's MetaMath construction) and *high edit distance* (the correct solution vs a wrong
   solution of a different shape); their edit statistics.
5. **preference runs** from the SFT model, same seed and steps: DPO and DPOP on the low-edit pairs, and
   DPO on the high-edit pairs as the contrast.
6. **evaluation**: greedy-decoding accuracy on held-out problems (final number checked) for the SFT
   model and each run; chosen / rejected log-ratios and implicit-reward accuracy on held-out pairs.
7. **report**: the HTML report of the runs (their 3D monitor included), a table, results.json.

The settings are fixed in :data:`SIZES` and :data:`TRAINING`; they were chosen once, not tuned to make
any result appear (docs/quickstart.md reports three seeds).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dpolab.outputs import atomic_path, check_output, write_json, write_text
from dpolab.train.metrics import console


@dataclass(frozen=True)
class Size:
    sft_problems: int
    sft_epochs: float
    pair_problems: int  # training pairs of each kind
    eval_pairs: int  # held-out pairs of each kind
    eval_problems: int  # held-out problems for greedy accuracy
    hidden_size: int
    layers: int
    heads: int
    vocab_size: int = 512
    max_steps: int = 3  # reasoning steps per problem (1..max_steps; pairs need >= 2)
    max_value: int = 100


SIZES = {
    # Under a minute on 2 CPU cores (a check of the pipeline; used by the test suite).
    "small": Size(
        sft_problems=2000, sft_epochs=2, pair_problems=192, eval_pairs=48, eval_problems=64, hidden_size=64, layers=2,
        heads=4,
    ),
    # About 5 minutes on 2 CPU cores; the results in docs/quickstart.md.
    "full": Size(
        sft_problems=8000, sft_epochs=3, pair_problems=1000, eval_pairs=100, eval_problems=300, hidden_size=128,
        layers=4, heads=4,
    ),
}  # fmt: skip

# Shared by every size. SFT: a fresh model needs a large learning rate. Preference runs: DPO's usual
# β = 0.1, DPOP's λ = 50 (the Smaug paper's value), one epoch, the same seed and data order for all.
TRAINING = {
    "sft": {"learning_rate": 3e-3, "batch_size": 32, "warmup_ratio": 0.05, "lr_scheduler": "cosine"},
    "preference": {"learning_rate": 1e-4, "batch_size": 16, "epochs": 1.0, "lr_scheduler": "linear"},
    "row_tokens": 256,  # fastest for this tiny model with the dense mask (docs/quickstart.md); kept so results stay comparable
    "beta": 0.1,
    "dpop_lambda": 50.0,
    "max_new_tokens": 160,
}

RUNS = [  # name, loss, loss parameters, pairs
    ("dpo", "dpo", {"beta": TRAINING["beta"]}, "low_edit"),
    ("dpop", "dpop", {"beta": TRAINING["beta"], "lam": TRAINING["dpop_lambda"]}, "low_edit"),
    ("dpo_high_edit", "dpo", {"beta": TRAINING["beta"]}, "high_edit"),
]

MARKER = ".dpolab-quickstart"
OUTPUTS = ("data", "model", "runs", "cache", "results.json", "report.html", "logratios.png")


def build_data(out: Path, size: Size, seed: int) -> dict:
    """Problems and pairs under ``out/data``; returns counts and the two pair sets' edit statistics."""
    from dpolab.data.corrupt import corrupt_solution
    from dpolab.data.edit_stats import edit_stats, write_outputs
    from dpolab.data.formats import write_jsonl
    from dpolab.data.synthetic import make_problems, wrong_solution

    data = out / "data"
    sft = make_problems(size.sft_problems, seed, 1, size.max_steps, size.max_value, distinct=True)
    seen = {p.question for p in sft}
    # Pairs need an intermediate result to corrupt: at least two steps. Never an SFT question.
    pair_problems = make_problems(
        size.pair_problems + size.eval_pairs, seed + 1, 2, size.max_steps, size.max_value, exclude=seen
    )
    seen |= {p.question for p in pair_problems}
    eval_problems = make_problems(size.eval_problems, seed + 2, 1, size.max_steps, size.max_value, exclude=seen)
    write_jsonl(data / "sft.jsonl", [{"prompt": p.question + "\n", "completion": p.answer} for p in sft])
    write_jsonl(data / "eval_problems.jsonl", [{**p.as_row(), "result": p.result} for p in eval_problems])

    rng = random.Random(seed)
    low, high = [], []
    for problem in pair_problems:
        corruption = corrupt_solution(problem.answer, rng, final="keep")
        assert corruption is not None, "a problem with two or more steps has an intermediate result"
        prompt = problem.question + "\n"
        low.append({"prompt": prompt, "chosen": problem.answer, "rejected": corruption.text})
        high.append({"prompt": prompt, "chosen": problem.answer, "rejected": wrong_solution(problem, rng)})
    stats = {}
    for name, pairs in (("low_edit", low), ("high_edit", high)):
        write_jsonl(data / name / "train.jsonl", pairs[: size.pair_problems])
        write_jsonl(data / name / "eval.jsonl", pairs[size.pair_problems :])
        summary = write_outputs(
            edit_stats([p["chosen"] for p in pairs], [p["rejected"] for p in pairs]),
            data / name / "edit_stats",
            f"quickstart {name.replace('_', '-')} pairs",
        )
        stats[name] = summary
    return {
        "sft_problems": len(sft),
        "pairs": size.pair_problems,
        "eval_pairs": size.eval_pairs,
        "eval_problems": len(eval_problems),
        "edit_stats": stats,
    }


def build_model(out: Path, size: Size, seed: int) -> Path:
    """The tokenizer (BPE, one token per digit) and a random-init Llama, saved to ``out/model/init``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpolab.data.tokenizer import train_bpe_tokenizer

    texts = [json.loads(line) for line in (out / "data" / "sft.jsonl").read_text().splitlines()]
    tokenizer = train_bpe_tokenizer(
        (row["prompt"] + row["completion"] for row in texts), size.vocab_size, split_digits=True
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=3 * size.hidden_size,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path = out / "model" / "init"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def greedy_accuracy(model_dir: Path, problems: list[dict], max_new_tokens: int, progress: bool, name: str) -> dict:
    """Share of ``problems`` whose greedy solution ends in the right number (``#### N``)."""
    from dpolab.eval.maths import math_accuracy

    result = math_accuracy(
        model_dir,
        [p["question"] + "\n" for p in problems],
        [str(p["result"]) for p in problems],
        max_new_tokens=max_new_tokens,
        progress=progress,
        name=name,
    )
    examples = [{**g, "expected": p["result"]} for g, p in zip(result.pop("generations")[:3], problems, strict=False)]
    return {**result, "examples": examples}


def _train(config: dict) -> dict:
    from dpolab.train import TrainConfig, run

    return run(TrainConfig(**config), overwrite=True)


def run_quickstart(out: str | Path = "runs/quickstart", size: str = "full", seed: int = 0, overwrite: bool = False,
                   progress: bool = True) -> dict:  # fmt: skip
    """Run every step (module docstring); returns and writes ``out/results.json``; prints the table."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}; got {size!r}")
    out = check_output(out, "quickstart", option="--out")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not (out / MARKER).exists():  # never delete what this command did not write
        raise ValueError(f"{out} holds {', '.join(existing)} but is not a quickstart folder; choose another --out")
    if existing and not overwrite:
        raise ValueError(f"{out} already holds a quickstart ({', '.join(existing)}); pass --overwrite to replace it")
    for name in existing:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / MARKER, "written by dpolab quickstart; --overwrite replaces this folder's outputs\n")
    spec = SIZES[size]
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per weight load and save would bury ours
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def stage(number: int, text: str) -> None:
        console.print(f"[bold cyan][{number}/6][/] {text}")

    stage(1, f"data: procedural maths problems and low-/high-edit pairs ({size})")
    clock = time.perf_counter()
    data = build_data(out, spec, seed)
    for name, stats in data["edit_stats"].items():
        c, r = stats["char_distance"], stats["first_difference_relative"]
        console.print(
            f"  {name.replace('_', '-')} pairs: normalised edit distance mean {c['mean']:.3f} "
            f"(median {c['median']:.3f}); first difference at {100 * r['median']:.0f}% of the solution (median)"
        )
    timings["data"] = time.perf_counter() - clock

    stage(2, f"model: Llama {spec.layers}×{spec.hidden_size} with random weights, BPE tokenizer")
    clock = time.perf_counter()
    init = build_model(out, spec, seed)
    timings["model"] = time.perf_counter() - clock

    common = {
        "row_tokens": TRAINING["row_tokens"],
        "seed": seed,
        "progress": progress,
        "tensorboard": False,
        "logging_steps": 1,
        "cache_dir": str(out / "cache"),
    }
    stage(3, f"SFT on {data['sft_problems']} problems, {spec.sft_epochs:g} epochs")
    clock = time.perf_counter()
    sft_dir = out / "runs" / "sft"
    _train(
        {
            **common,
            **TRAINING["sft"],
            "model": str(init),
            "data": str(out / "data" / "sft.jsonl"),
            "task": "sft",
            "loss": "sft",
            "sft_reduction": "batch_token_mean",
            "epochs": spec.sft_epochs,
            "output_dir": str(sft_dir),
        }
    )
    timings["sft"] = time.perf_counter() - clock

    summaries = {}
    stage(
        4,
        f"preference runs ({spec.pair_problems} pairs each) from the SFT model: DPO and DPOP on low-edit pairs, DPO on high-edit pairs",
    )
    for name, loss, params, pairs in RUNS:
        clock = time.perf_counter()
        run_dir = out / "runs" / name
        summaries[name] = _train(
            {
                **common,
                **TRAINING["preference"],
                "model": str(sft_dir / "model"),
                "data": str(out / "data" / pairs / "train.jsonl"),
                "eval_data": str(out / "data" / pairs / "eval.jsonl"),
                "loss": loss,
                "loss_params": params,
                "output_dir": str(run_dir),
            }
        )
        timings[name] = time.perf_counter() - clock

    stage(5, f"evaluation: greedy accuracy on {data['eval_problems']} held-out problems")
    clock = time.perf_counter()
    problems = [json.loads(line) for line in (out / "data" / "eval_problems.jsonl").read_text().splitlines()]
    accuracy = {
        name: greedy_accuracy(path, problems, TRAINING["max_new_tokens"], progress, name)
        for name, path in [("sft", sft_dir / "model")] + [(n, out / "runs" / n / "model") for n, *_ in RUNS]
    }
    timings["evaluation"] = time.perf_counter() - clock

    stage(6, "report")
    from dpolab.report.html import write_report

    rows = [table_row("sft", "—", "—", accuracy["sft"], None)]
    for name, loss, _, pairs in RUNS:
        rows.append(table_row(name, loss, pairs.replace("_", "-"), accuracy[name], summaries[name]))
    report = write_report(
        [out / "runs" / name for name, *_ in RUNS],
        out / "report.html",
        "dpolab quickstart",
        table_html(rows, size),
        own=True,
    )
    plot_logratios(out)
    timings["total"] = time.perf_counter() - started
    results = {
        "size": size,
        "seed": seed,
        "settings": {"size": asdict(spec), "training": TRAINING},
        "data": data,
        "table": rows,
        "accuracy": accuracy,
        "alarms": {name: summaries[name]["alarms"] for name in summaries},
        "seconds": timings,
        "report": str(report),
    }
    write_json(out / "results.json", results)
    print_table(rows, size)
    print(f"report: {report}\nresults: {out / 'results.json'}\ntotal: {timings['total']:.0f} s", flush=True)
    return results


def plot_logratios(out: Path) -> Path:
    """``out/logratios.png``: the training batches' mean chosen and rejected log-ratios of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    colours = {"dpo": "#1b9e77", "dpop": "#d95f02", "dpo_high_edit": "#7570b3"}
    for name, *_ in RUNS:
        rows = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        rows = [row for row in rows if "logratio/chosen" in row]
        steps = [row["step"] for row in rows]
        for ax, key in zip(axes, ("logratio/chosen", "logratio/rejected"), strict=True):
            ax.plot(steps, [row[key] for row in rows], label=name, color=colours[name])
    axes[0].set(title="chosen: log π_θ(y_w|x) − log π_SFT(y_w|x)", xlabel="step", ylabel="nats (batch mean)")
    axes[1].set(title="rejected: log π_θ(y_l|x) − log π_SFT(y_l|x)", xlabel="step", yscale="symlog")
    for ax in axes:
        ax.axhline(0, color="#888", linewidth=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = out / "logratios.png"
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100)
    plt.close(fig)
    return path


def table_row(name: str, loss: str, pairs: str, accuracy: dict, summary: dict | None) -> dict:
    """One row: accuracy, and the held-out pairs' mean log-ratios, margin and implicit-reward accuracy."""
    row = {"model": name, "loss": loss, "pairs": pairs, "accuracy": accuracy["accuracy"]}
    if summary is None:  # the SFT model is the reference: log-ratios are 0 by definition
        row.update({"chosen_logratio": 0.0, "rejected_logratio": 0.0, "margin": 0.0, "reward_accuracy": None})
        row["alarms"] = []
        return row
    evaluation = summary["eval"]
    chosen, rejected = evaluation["eval/logratio/chosen"], evaluation["eval/logratio/rejected"]
    row.update(
        {
            "chosen_logratio": chosen,
            "rejected_logratio": rejected,
            "margin": chosen - rejected,
            "reward_accuracy": evaluation["eval/rewards/accuracies"],
            "alarms": [alarm["alarm"] for alarm in summary["alarms"]],
        }
    )
    return row


COLUMNS = ("model", "pairs", "accuracy", "chosen log-ratio", "rejected log-ratio", "margin", "reward acc.", "alarms")
TABLE_TITLE = (
    "quickstart: held-out problems (accuracy) and held-out pairs of the run's kind "
    "(log-ratio = log π_θ(y|x) − log π_SFT(y|x), nats per completion)"
)
# What each size can show; printed under the table and at the top of the report.
SIZE_NOTES = {
    "small": "size small is a check of the whole pipeline in under a minute. Its 0.13M-parameter models "
    "cannot solve the problems yet (the accuracy column is about the same for every model), so read the "
    "log-ratio columns: DPO on low-edit pairs lowers the chosen log-ratio, DPOP keeps it higher. The full "
    "size (about 5 minutes) shows the effect on accuracy too.",
    "full": "Accuracy: greedy decoding on the held-out problems. Log-ratios: the held-out pairs of each run's "
    "kind. docs/quickstart.md has three seeds with intervals.",
}


def table_cells(row: dict) -> list[str]:
    """One row of the table as text, for the console and the report."""
    return [
        row["model"],
        row["pairs"],
        f"{100 * row['accuracy']:.1f}%",
        f"{row['chosen_logratio']:+.2f}",
        f"{row['rejected_logratio']:+.2f}",
        f"{row['margin']:+.2f}",
        "—" if row["reward_accuracy"] is None else f"{100 * row['reward_accuracy']:.0f}%",
        ", ".join(row["alarms"]) or "—",
    ]


def print_table(rows: list[dict], size: str) -> None:
    """The results table, on stdout (the progress and logs go to stderr)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=TABLE_TITLE)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("model", "pairs", "alarms") else "right")
    for row in rows:
        table.add_row(*table_cells(row))
    console = Console(width=max(Console().width, 118))
    console.print(table)
    console.print(SIZE_NOTES[size])


def table_html(rows: list[dict], size: str) -> str:
    """The same table and note as HTML, for the top of the report."""
    import html

    header = "".join(f"<th>{html.escape(column)}</th>" for column in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(text)}</td>" for text in table_cells(row)) + "</tr>" for row in rows
    )
    return (
        f"<h2>Results</h2><p>{html.escape(TABLE_TITLE)}</p><table><tr>{header}</tr>{body}</table>"
        f"<p class='verdict'>{html.escape(SIZE_NOTES[size])}</p>"
    )
