"""dpolab vs TRL 1.16 reward-model training speed and memory, side by side, on the same machine and data.

Run by hand (not in CI):

    .venv/bin/python benchmarks/rm_vs_trl.py --pairs 256 --batch-size 8 --steps 24

The workspace is dpo_vs_trl.py's: a 4,096-token BPE trained on GSM8K's training text, a random-init
Llama (4 layers, hidden 256, ≈5M parameters) and GSM8K pairs (ground truth vs the first wrong model
solution) from data/gsm8k/model_solutions.jsonl. Both contenders load that causal LM as a
one-label sequence classifier (a new score head), fp32, one process, the same pairs, batch size and
step count, each in its own process (so peak RSS is its own):

- ``dpolab``: ``dpolab.train.run`` with ``task: reward`` (what ``dpolab rm`` runs): chosen and rejected
  in one prefix-shared packed pass, the score at each branch's last token.
- ``trl``: TRL ``RewardTrainer`` with its defaults (chosen and rejected as two padded rows each).

It prints pairs/s end to end (dpolab: the whole ``run()`` call, model loading included; TRL: trainer
construction and training, the model loaded before), training-only step time, peak RSS, and the
ratios. Copy the table into docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import run_contender

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import build_workspace, peak_rss_mib, token_layouts  # noqa: E402 - the shared workspace


def worker_dpolab(root: Path, args) -> dict:
    from dpolab.train import TrainConfig, run

    config = TrainConfig(
        task="reward",
        loss="reward_model",
        model=str(root / "model"),
        data=str(root / "pairs.jsonl"),
        output_dir=str(root / "dpolab"),
        cache_dir=str(root / "dpolab-cache"),
        batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-5,
        max_length=1024,
        progress=False,
        tensorboard=False,
        save_model=False,
        dtype="float32",
        seed=0,
    )
    start = time.perf_counter()
    summary = run(config)
    wall = time.perf_counter() - start
    return {
        "wall_seconds": wall,
        "train_seconds": summary["train_seconds"],
        "pairs": summary["pairs_seen"],
        "forward": summary["forward"],
        "final_loss": summary["final"]["loss"],
    }


def worker_trl(root: Path, args) -> dict:
    import warnings

    import trl
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    warnings.simplefilter("ignore")
    import torch

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(root / "model", num_labels=1, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    model.config.pad_token_id = tokenizer.pad_token_id
    dataset = load_dataset("json", data_files=str(root / "pairs.jsonl"), split="train")
    config = trl.RewardConfig(
        output_dir=str(root / "trl"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-5,
        logging_steps=max(1, args.steps),
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        max_length=1024,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    start = time.perf_counter()
    trainer = trl.RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    output = trainer.train()
    wall = time.perf_counter() - start
    return {
        "wall_seconds": wall,
        "train_seconds": output.metrics["train_runtime"],
        "pairs": args.steps * args.batch_size,
        "final_loss": output.metrics.get("train_loss"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256, help="GSM8K pairs in the data set")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24, help="optimiser steps per contender")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: all cores)")
    parser.add_argument("--only", nargs="*", default=["dpolab", "trl"], help="contenders to run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        root = Path(args.root)
        result = {"dpolab": worker_dpolab, "trl": worker_trl}[args.worker](root, args)
        result["peak_rss_mib"] = peak_rss_mib()
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        build_workspace(root, args.pairs)
        meta = json.loads((root / "meta.json").read_text())
        layout = token_layouts(root, args.batch_size)
        meta["tokens"] = layout
        print(
            f"model: Llama with a score head, {meta['parameters'] / 1e6:.2f}M parameters; {meta['pairs']} GSM8K "
            f"pairs; batch {args.batch_size}; {args.steps} steps; fp32; {os.cpu_count()} CPU cores; 1 process"
        )
        print(
            f"tokens per pair: prompt {layout['mean_prompt']:.0f}, chosen {layout['mean_chosen']:.0f}, "
            f"rejected {layout['mean_rejected']:.0f}; TRL's padded batches hold "
            f"{layout['trl_tokens'] / layout['unique_tokens']:.2f}× the unique tokens"
        )
        results = {}
        for name in args.only:
            command = [sys.executable, __file__, "--worker", name, "--root", str(root)]
            command += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            r = run_contender(command, name)
            if r is None:
                continue
            results[name] = r
            print(
                f"  {name:8s} {r['pairs'] / r['wall_seconds']:8.2f} pairs/s end to end   "
                f"{1000 * r['train_seconds'] / args.steps:8.1f} ms/step training   peak RSS {r['peak_rss_mib']:7.0f} MiB"
            )
        if {"dpolab", "trl"} <= set(results):
            ours, other = results["dpolab"], results["trl"]
            print(
                "\nratios (dpolab / trl): "
                f"pairs/s end to end {(ours['pairs'] / ours['wall_seconds']) / (other['pairs'] / other['wall_seconds']):.2f}×   "
                f"training step {other['train_seconds'] / ours['train_seconds']:.2f}× faster   "
                f"peak RSS {ours['peak_rss_mib'] / other['peak_rss_mib']:.2f}×"
            )
        print("\nJSON " + json.dumps({"settings": vars(args), "meta": meta, "results": results}))


if __name__ == "__main__":
    main()
