"""dpolab vs TRL 1.16 DPO training speed and memory, side by side, on the same machine and data.

Run by hand (not in CI):

    .venv/bin/python benchmarks/dpo_vs_trl.py --pairs 256 --batch-size 8 --steps 24

It builds, in a temporary folder: a BPE tokenizer (4,096 tokens) trained on GSM8K's training text; a
random-init Llama (4 layers, hidden 256, ≈5M parameters); and GSM8K preference pairs from
data/gsm8k/model_solutions.jsonl (prompt = question, chosen = ground-truth solution,
rejected = the first wrong model solution). Then each contender runs in its own process (so peak
RSS is its own), fp32, one process, the same pairs, batch size and step count:

- ``dpolab``: ``dpolab.train.run``, reference log-probs computed in a pass before training (counted).
- ``trl``: TRL ``DPOTrainer`` with its defaults (reference model run every step).
- ``trl-precompute``: TRL with ``precompute_ref_log_probs=True`` (precompute pass counted).
- ``plain``: one plain causal-LM forward + backward over the same unique tokens per step (each pair's
  prompt + chosen + rejected as one sequence, packed into rows of the same budget): the floor.

It prints pairs/s end to end (data preparation, reference pass, training; model loading excluded),
training-only step time, peak RSS, and the ratios. Copy the table into docs/performance.md.

``--processes 2`` runs ``dpolab`` and ``trl`` on 2 CPU processes instead (``torchrun``, gloo, one
thread each, the batch split in two so the global batch is the same): multi-process training, side by
side. Peak RSS is then the main process's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import setting_value

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "data" / "gsm8k"
SOLVERS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def build_workspace(root: Path, pairs: int, vocab: int = 4096) -> None:
    """Tokenizer, model and pairs in ``root`` (deterministic). ``vocab`` > 4,096 widens the model's embedding and
    LM head to that many rows (the tokenizer still uses the first 4,096): the log-softmax runs over all of them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpolab.data.tokenizer import train_bpe_tokenizer

    texts = []
    with open(SHARED / "train.jsonl") as handle:
        for line in handle:
            row = json.loads(line)
            texts.append(row["question"] + "\n" + row["answer"])
    hf_tokenizer = train_bpe_tokenizer(texts, vocab_size=4096)
    config = LlamaConfig(
        vocab_size=max(vocab, 4096),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model", safe_serialization=True)
    hf_tokenizer.save_pretrained(root / "model")

    rows = []
    with open(SHARED / "model_solutions.jsonl") as handle:
        for line in handle:
            row = json.loads(line)
            wrong = next((row[s]["solution"] for s in SOLVERS if not row[s]["is_correct"]), None)
            if wrong is not None:
                rows.append({"prompt": row["question"] + "\n", "chosen": row["ground_truth"], "rejected": wrong})
            if len(rows) == pairs:
                break
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    parameters = sum(p.numel() for p in model.parameters())
    (root / "meta.json").write_text(json.dumps({"parameters": parameters, "pairs": len(rows)}))


def token_layouts(root: Path, batch_size: int) -> dict:
    """Tokens per batch in TRL's layout (chosen and rejected rows, prompt repeated, padded to the batch's
    longest row) and in dpolab's (each token once), over consecutive batches of the data set."""
    from transformers import AutoTokenizer

    from dpolab.data.formats import load_examples
    from dpolab.data.tokenize import tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    pairs, _ = tokenize_pairs(tokenizer, load_examples(str(root / "pairs.jsonl"))[0], 1024)
    trl = unique = completion = 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in batch)
        trl += 2 * len(batch) * longest
        unique += sum(p.unique_tokens for p in batch)
        completion += sum(len(p.chosen_ids) + len(p.rejected_ids) for p in batch)
    return {
        "trl_tokens": trl,
        "unique_tokens": unique,
        "completion_tokens": completion,
        "mean_prompt": sum(len(p.prompt_ids) for p in pairs) / len(pairs),
        "mean_chosen": sum(len(p.chosen_ids) for p in pairs) / len(pairs),
        "mean_rejected": sum(len(p.rejected_ids) for p in pairs) / len(pairs),
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_dpolab(root: Path, args) -> dict:
    from dpolab.train import TrainConfig, run

    config = TrainConfig(
        model=str(root / "model"),
        data=str(root / "pairs.jsonl"),
        output_dir=str(root / "dpolab"),
        cache_dir=str(root / "dpolab-cache"),
        batch_size=args.batch_size // args.processes,
        max_steps=args.steps,
        learning_rate=1e-6,
        max_length=1024,
        progress=False,
        tensorboard=False,
        save_model=False,
        dtype="float32",
        seed=0,
        row_tokens=args.row_tokens,
        **dict(setting_value(item) for item in args.set),
    )
    start = time.perf_counter()
    summary = run(config)
    wall = time.perf_counter() - start
    return {
        "wall_seconds": wall,
        "train_seconds": summary["train_seconds"],
        "pairs": summary["pairs_seen"],
        "tokens": summary["tokens_seen"],
        "forward": summary["forward"],
        "attention_kernel": summary.get("attention_kernel"),
        "reference_seconds": summary["reference_seconds"],
    }


def worker_trl(root: Path, args, precompute: bool) -> dict:
    import warnings

    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warnings.simplefilter("ignore")
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    dataset = load_dataset("json", data_files=str(root / "pairs.jsonl"), split="train")
    config = trl.DPOConfig(
        output_dir=str(root / f"trl-{precompute}"),
        per_device_train_batch_size=args.batch_size // args.processes,
        max_steps=args.steps,
        learning_rate=1e-6,
        logging_steps=max(1, args.steps),
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        max_length=1024,
        seed=0,
        precompute_ref_log_probs=precompute,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    start = time.perf_counter()
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    output = trainer.train()
    wall = time.perf_counter() - start
    return {
        "wall_seconds": wall,
        "train_seconds": output.metrics["train_runtime"],
        "pairs": args.steps * args.batch_size,
    }


def worker_plain(root: Path, args) -> dict:
    """Plain causal-LM forward + backward over each step's unique tokens (prompt + chosen + rejected)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpolab.data.formats import load_examples
    from dpolab.data.packing import plan_rows
    from dpolab.data.tokenize import tokenize_pairs

    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype="float32").train()
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    pairs, _ = tokenize_pairs(tokenizer, load_examples(str(root / "pairs.jsonl"))[0], 1024)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    for step in range(args.steps):
        ids = [order[(step * args.batch_size + k) % len(order)] for k in range(args.batch_size)]
        batch = [pairs[i] for i in ids]
        rows = plan_rows(batch, args.row_tokens)
        sequences = [
            sum((batch[i].prompt_ids + batch[i].chosen_ids + batch[i].rejected_ids for i in row), ()) for row in rows
        ]
        length = max(len(s) for s in sequences)
        input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
        attention = torch.zeros(len(sequences), length, dtype=torch.long)
        for r, sequence in enumerate(sequences):
            input_ids[r, : len(sequence)] = torch.tensor(sequence)
            attention[r, : len(sequence)] = 1
        labels = input_ids.masked_fill(attention == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    wall = time.perf_counter() - start
    return {"wall_seconds": wall, "train_seconds": wall, "pairs": args.steps * args.batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256, help="GSM8K pairs in the data set")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24, help="optimiser steps per contender")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: all cores)")
    parser.add_argument(
        "--only",
        nargs="*",
        default=["dpolab", "trl", "trl-precompute", "plain"],
        help="contenders to run (none: only the token statistics)",
    )
    parser.add_argument(
        "--row-tokens",
        type=int,
        default=None,
        help="dpolab's (and the plain floor's) packed row budget (default: dpolab's default)",
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="processes per contender (dpolab, trl), launched with torchrun"
    )
    parser.add_argument("--vocab", type=int, default=4096, help="rows of the model's embedding and LM head")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dpolab training settings, e.g. attention_kernel=dense logit_chunk_tokens=256 gradient_checkpointing=true",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dict(setting_value(item) for item in args.set)  # a malformed --set fails here, before any work
    if args.row_tokens is None:
        from dpolab.train import TrainConfig

        args.row_tokens = TrainConfig.row_tokens

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        root = Path(args.root)
        runner = {
            "dpolab": lambda: worker_dpolab(root, args),
            "trl": lambda: worker_trl(root, args, False),
            "trl-precompute": lambda: worker_trl(root, args, True),
            "plain": lambda: worker_plain(root, args),
        }
        result = runner[args.worker]()
        result["peak_rss_mib"] = peak_rss_mib()
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        build_workspace(root, args.pairs, args.vocab)
        meta = json.loads((root / "meta.json").read_text())
        print(
            f"model: Llama, {meta['parameters'] / 1e6:.2f}M parameters, vocabulary {max(args.vocab, 4096):,}; "
            f"{meta['pairs']} GSM8K pairs; dpolab settings {args.set or 'default'}; "
            f"batch {args.batch_size}; {args.steps} steps; fp32; {os.cpu_count()} CPU cores; "
            f"{args.processes} process(es) per contender"
        )
        layout = token_layouts(root, args.batch_size)
        meta["tokens"] = layout
        print(
            f"tokens per pair: prompt {layout['mean_prompt']:.0f}, chosen {layout['mean_chosen']:.0f}, "
            f"rejected {layout['mean_rejected']:.0f}; TRL's padded batches hold "
            f"{layout['trl_tokens'] / layout['unique_tokens']:.2f}× the unique tokens"
        )
        results = {}
        for name in args.only:
            launcher = [sys.executable]
            if args.processes > 1:
                if name not in ("dpolab", "trl"):
                    continue
                launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}"]
            command = [
                *launcher,
                __file__,
                "--worker",
                name,
                "--root",
                str(root),
                "--batch-size",
                str(args.batch_size),
                "--steps",
                str(args.steps),
                "--row-tokens",
                str(args.row_tokens),
                "--processes",
                str(args.processes),
                "--vocab",
                str(args.vocab),
                "--set",
                *args.set,
            ]
            if args.threads:
                command += ["--threads", str(args.threads)]
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            if args.processes > 1:  # one thread per process; accelerate sees the CPU processes with this set
                env.update(OMP_NUM_THREADS=str(args.threads or 1), ACCELERATE_USE_CPU="true")
            output = subprocess.run(command, capture_output=True, text=True, env=env)
            line = next((text for text in output.stdout.splitlines() if text.startswith("RESULT ")), None)
            if line is None:
                print(f"{name} failed:\n{output.stderr[-3000:]}")
                continue
            results[name] = json.loads(line[7:])
            r = results[name]
            print(
                f"  {name:15s} {r['pairs'] / r['wall_seconds']:8.2f} pairs/s end to end   "
                f"{1000 * r['train_seconds'] / args.steps:8.1f} ms/step training   peak RSS {r['peak_rss_mib']:7.0f} MiB"
                + (f"   ({r['forward']}, {r['attention_kernel']})" if name == "dpolab" else "")
            )
        if "dpolab" in results:
            ours = results["dpolab"]
            print("\nratios (dpolab / other):")
            for name in ("trl", "trl-precompute"):
                if name in results:
                    other = results[name]
                    print(
                        f"  vs {name:15s} pairs/s end to end {(ours['pairs'] / ours['wall_seconds']) / (other['pairs'] / other['wall_seconds']):5.2f}×   "
                        f"training step {other['train_seconds'] / ours['train_seconds']:5.2f}× faster   "
                        f"peak RSS {ours['peak_rss_mib'] / other['peak_rss_mib']:5.2f}×"
                    )
            if "plain" in results:
                print(
                    f"  dpolab training step / plain forward+backward over the same unique tokens: "
                    f"{ours['train_seconds'] / results['plain']['train_seconds']:.2f}×"
                )
        print("\nJSON " + json.dumps({"settings": vars(args), "meta": meta, "results": results}))


if __name__ == "__main__":
    main()
