"""3D paper §5.3 on small language models: held-out preference accuracy per step over 2 epochs, a reward
model (``dpolab rm``) against DPO's implicit reward (``dpolab train``), several seeds, mean ± 95% interval.

    .venv/bin/python experiments/rm_vs_dpo_accuracy.py --out runs/rm_vs_dpo --seeds 3

For each data set (the HH-RLHF harmless-base slice and GSM8K pairs, from the repository's data/):

1. a fixed split: ``--train`` training pairs and ``--eval`` held-out pairs, the same for every run;
2. a BPE tokenizer (2,000 tokens) trained on the training text, a random-init Llama (3 layers, width 96),
   then SFT on the training pairs' chosen responses: one SFT model per data set, shared by every run;
3. per seed (it sets the data order and the RM's new head): DPO (β 0.1, reference = the SFT model) and
   an RM started from the SFT model, with the same learning rate, batch size and 2 epochs, and the
   held-out accuracy every ``--eval-every`` steps (DPO: r_w > r_l of its implicit reward β·log-ratio;
   RM: r(x, y_w) > r(x, y_l)).

It writes ``results.json`` and ``accuracy.png`` under ``--out`` and prints the table of docs/rlhf.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / "data"
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def hh_pairs() -> list[dict]:
    with (SHARED / "hh-rlhf" / "harmless_base_test_part.jsonl").open() as handle:
        rows = [json.loads(line) for line in handle]
    return [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def gsm8k_pairs() -> list[dict]:
    solvers = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
    rows = []
    with (SHARED / "gsm8k" / "model_solutions.jsonl").open() as handle:
        for line in handle:
            row = json.loads(line)
            wrong = next((row[s]["solution"] for s in solvers if not row[s]["is_correct"]), None)
            if wrong is not None:
                rows.append({"prompt": row["question"] + "\n", "chosen": row["ground_truth"], "rejected": wrong})
    return rows


def usable(rows: list[dict]) -> list[dict]:
    """The rows dpolab accepts (HH-RLHF has a few with an empty final turn)."""
    from dpolab.data.formats import DataError, example_from_row

    kept = []
    for index, row in enumerate(rows):
        try:
            example_from_row(row, index)
        except DataError:
            continue
        kept.append(row)
    return kept


def prepare(name: str, rows: list[dict], root: Path, args) -> Path:
    """Split, tokenizer, base model and SFT model of one data set, in ``root/name`` (reused when present)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpolab.data.formats import example_from_row
    from dpolab.data.tokenizer import train_bpe_tokenizer
    from dpolab.train import TrainConfig, run

    folder = root / name
    if (folder / "sft" / "summary.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rows = usable(rows)
    random.Random(0).shuffle(rows)
    train, held_out = rows[: args.train], rows[args.train : args.train + args.eval]
    for file, part in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (folder / file).write_text("\n".join(json.dumps(r) for r in part) + "\n")
    examples = [example_from_row(r, i) for i, r in enumerate(train)]
    sft_rows = [{"prompt": e.prompt, "completion": e.chosen} for e in examples]
    (folder / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in sft_rows) + "\n")
    tokenizer = train_bpe_tokenizer([e.prompt + e.chosen + e.rejected for e in examples], vocab_size=2000)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    run(
        TrainConfig(
            task="sft", loss="sft", loss_params={"reduction": "batch_token_mean"}, model=str(folder / "base"),
            data=str(folder / "sft.jsonl"), output_dir=str(folder / "sft"), epochs=args.sft_epochs, batch_size=16,
            learning_rate=2e-3, max_length=args.max_length, tensorboard=False, progress=False,
            cache_dir=str(root / "cache"),
        )
    )  # fmt: skip
    return folder


def train_one(folder: Path, method: str, seed: int, args) -> list[tuple[int, float]]:
    """(step, held-out accuracy) of one run; the run folder is reused when finished."""
    from dpolab.train import TrainConfig, run

    out = folder / f"{method}-seed{seed}"
    if not (out / "summary.json").exists():
        common = dict(
            model=str(folder / "sft" / "model"), data=str(folder / "train.jsonl"), eval_data=str(folder / "eval.jsonl"),
            output_dir=str(out), epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
            max_length=args.max_length, eval_steps=args.eval_every, seed=seed, save_model=False, tensorboard=False,
            progress=False, cache_dir=str(folder.parent / "cache"), warmup_ratio=0.1,
        )  # fmt: skip
        if method == "rm":
            config = TrainConfig(task="reward", loss="reward_model", **common)
        else:
            config = TrainConfig(loss="dpo", loss_params={"beta": 0.1}, monitor={"enabled": False}, **common)
        run(config, overwrite=(out / "metrics.jsonl").exists())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval/rewards/accuracies"]) for r in rows if "eval/rewards/accuracies" in r]


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of the 95% t-interval over seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T_975[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5


def summarise(curves: dict[str, list[list[tuple[int, float]]]], steps_per_epoch: int) -> dict:
    """Per method: the curve (mean, half-width per step), the peak, the end of epoch 1 and 2, and the fall from
    the peak to the end (over seeds)."""
    out = {}
    for method, runs in curves.items():
        steps = [s for s, _ in runs[0]]
        per_step = [interval([run[i][1] for run in runs]) for i in range(len(steps))]
        epoch1 = max(i for i, s in enumerate(steps) if s <= steps_per_epoch)
        out[method] = {
            "steps": steps,
            "mean": [m for m, _ in per_step],
            "half_width": [h for _, h in per_step],
            "end_of_epoch_1": interval([run[epoch1][1] for run in runs]),
            "end_of_epoch_2": interval([run[-1][1] for run in runs]),
            "peak": interval([max(a for _, a in run) for run in runs]),
            "fall_from_peak": interval([max(a for _, a in run) - run[-1][1] for run in runs]),
            "epoch_2_change": interval([run[-1][1] - run[epoch1][1] for run in runs]),
            "step_to_step_spread": interval(
                [statistics.pstdev([b - a for (_, a), (_, b) in zip(run, run[1:], strict=False)]) for run in runs]
            ),
        }
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.6), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        for method, colour in (("rm", "#1b7837"), ("dpo", "#b2182b")):
            curve = result["summary"][method]
            low = [m - h for m, h in zip(curve["mean"], curve["half_width"], strict=True)]
            high = [m + h for m, h in zip(curve["mean"], curve["half_width"], strict=True)]
            label = "reward model" if method == "rm" else "DPO implicit reward"
            ax.plot(curve["steps"], curve["mean"], color=colour, label=label)
            ax.fill_between(curve["steps"], low, high, color=colour, alpha=0.2)
        ax.axvline(result["steps_per_epoch"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{name}: held-out preference accuracy (mean, 95% interval, {result['seeds']} seeds)", fontsize=9)
        ax.set_xlabel("step (dotted: end of epoch 1)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/rm_vs_dpo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train", type=int, default=480, help="training pairs per data set")
    parser.add_argument("--eval", type=int, default=160, help="held-out pairs per data set")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--sft-epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=5, help="steps between held-out evaluations")
    parser.add_argument("--datasets", nargs="*", default=["hh-rlhf", "gsm8k"])
    args = parser.parse_args()

    root = Path(args.out)
    sources = {"hh-rlhf": hh_pairs, "gsm8k": gsm8k_pairs}
    results = {}
    for name in args.datasets:
        folder = prepare(name, sources[name](), root, args)
        curves = {
            method: [train_one(folder, method, seed, args) for seed in range(args.seeds)] for method in ("rm", "dpo")
        }
        steps_per_epoch = -(-args.train // args.batch_size)
        results[name] = {
            "seeds": args.seeds,
            "steps_per_epoch": steps_per_epoch,
            "summary": summarise(curves, steps_per_epoch),
        }
        print(
            f"\n{name}: {args.train} training pairs, {args.eval} held out, {args.seeds} seeds, {steps_per_epoch} steps per epoch"
        )
        print(
            "| method | end of epoch 1 | end of epoch 2 | peak | fall from peak to end | epoch-2 change | step-to-step spread |"
        )
        print("|---|---|---|---|---|---|---|")
        for method, s in results[name]["summary"].items():
            cells = [f"{m:.3f} ± {h:.3f}" for m, h in (s[k] for k in ("end_of_epoch_1", "end_of_epoch_2", "peak",
                     "fall_from_peak", "epoch_2_change", "step_to_step_spread"))]  # fmt: skip
            print(f"| {'RM' if method == 'rm' else 'DPO'} | " + " | ".join(cells) + " |")
    (root / "results.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    plot(results, root / "accuracy.png")
    print(f"\nwrote {root / 'results.json'} and {root / 'accuracy.png'}")


if __name__ == "__main__":
    main()
