"""dpolab vs TRL 1.16 DPO training on a GPU: tokens/s, pairs/s, MFU and peak memory, side by side, as ratios.

Run by hand on a CUDA machine (not in CI):

    python benchmarks/gpu_dpo.py --model qwen2.5-0.5b --pairs 512 --batch-size 16 --steps 40
    python benchmarks/gpu_dpo.py --model llama-3.2-1b --pairs 512 --batch-size 16 --steps 40
    python benchmarks/gpu_dpo.py --model qwen2.5-0.5b --variant long-prompt --batch-size 8 --steps 40

``--smoke`` runs the whole script on CPU with a tiny model in seconds (that run is in the test suite).

**Models.** Random-init models built from the configs of real architectures (nothing downloaded): the
shapes of Qwen2.5-0.5B (24 layers, hidden 896, 14 query / 2 key-value heads, vocabulary 151,936, tied
embeddings) and Llama-3.2-1B (16 layers, hidden 2,048, 32 / 8 heads, vocabulary 128,256, tied). Weights
are bf16 for every contender (pure bf16 training, AdamW on bf16 weights) on the GPU, fp32 under ``--smoke``.

**Pairs.** The HH-RLHF slice in data/ (1,800 harmless-base dialogues; the prompt is the shared
dialogue prefix, as :func:`dpolab.data.formats.split_implicit_prompt` cuts it), tokenised by a BPE
(32,000 tokens) trained on those dialogues, so the token-length distribution is the data set's.
``--variant long-prompt`` prefixes each prompt with the prompts of the next eight pairs (a long shared
context, 1–2k tokens). Both contenders get the same explicit ``prompt``/``chosen``/``rejected`` rows,
the same global batch and steps, and a ``max_length`` that truncates nothing.

**Contenders**, each in its own process:

- ``dpolab``: its defaults (the prefix-shared packed forward with the automatic attention kernel: flex on
  CUDA; reference log-probs computed once before training), plus ``--set`` settings;
- ``dpolab-gc``: the same with ``gradient_checkpointing: true`` (TRL's default);
- ``trl``: ``DPOTrainer`` with its defaults (the reference model runs every step; gradient checkpointing on);
- ``trl-precompute``: the same with ``precompute_ref_log_probs=True``.

**Measures.** Timed steps exclude the first ``--warmup`` steps (compilation, allocator warm-up):
pairs/s and tokens/s over the timed steps, where tokens are each pair's *unique* tokens (prompt once,
chosen, rejected; the same count for every contender, so the ratio of tokens/s is the ratio of useful
work). MFU = model FLOPs of the timed steps ÷ (time × the GPU's peak dense bf16 FLOP/s), with the FLOPs
of one pair's training step counted as 3 × the forward FLOPs (forward + backward), the forward being

    2 × N_layers_params × T  +  2 × vocab × hidden × C  +  4 × layers × hidden × K

where T = prompt + chosen + rejected tokens, C = chosen + rejected tokens (the head is needed only
where a completion token is predicted), and K = the number of (query, key) pairs that attention must
score: prompt P(P+1)/2, plus for each completion of n tokens n·P + n(n+1)/2. Padding, a prompt computed
twice and the reference forward are not useful work and are not counted, whoever pays them. Peak memory
is ``torch.cuda.max_memory_allocated`` (peak RSS under ``--smoke``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import run_contender, setting_value

HERE = Path(__file__).resolve().parent
HH = HERE.parent / "data" / "hh-rlhf" / "harmless_base_test_part.jsonl"
CONTENDERS = ("dpolab", "dpolab-gc", "trl", "trl-precompute")

# Shapes of the published configs (config.json of each model), not their weights.
ARCHITECTURES = {
    "qwen2.5-0.5b": dict(
        family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=32768,
    ),
    "llama-3.2-1b": dict(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=131072,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    "tiny": dict(
        family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
}  # fmt: skip

# Peak dense bf16 tensor FLOP/s by device name (vendor data sheets, without sparsity).
PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def build_model(name: str, directory: Path, tokenizer) -> dict:
    """A random-init model of the named shape saved in ``directory`` with ``tokenizer``; its shape facts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(ARCHITECTURES[name])
    family = shape.pop("family")
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[
        family
    ]
    config = config_class(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    model = model_class(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    embedding = shape["vocab_size"] * shape["hidden_size"]
    total = sum(p.numel() for p in model.parameters())
    return {
        "parameters": total,
        "layer_parameters": total - embedding * (1 if shape["tie_word_embeddings"] else 2),
        "vocab": shape["vocab_size"],
        "hidden": shape["hidden_size"],
        "layers": shape["num_hidden_layers"],
    }


def build_pairs(path: Path, count: int, variant: str) -> list[dict]:
    from dpolab.data.formats import split_implicit_prompt

    rows = []
    with open(HH) as handle:
        for line in handle:
            record = json.loads(line)
            prompt, chosen, rejected = split_implicit_prompt(record["chosen"], record["rejected"])
            if prompt and chosen.strip() and rejected.strip():
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if variant == "long-prompt":
        rows = [
            {**row, "prompt": "".join(rows[(i + k) % len(rows)]["prompt"] for k in range(1, 9)) + row["prompt"]}
            for i, row in enumerate(rows)
        ]
    rows = rows[:count]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def pair_statistics(root: Path, meta: dict) -> dict:
    """Per pair: unique tokens and forward FLOPs (module docstring), from dpolab's tokenisation of the pairs."""
    from transformers import AutoTokenizer

    from dpolab.data.formats import load_examples
    from dpolab.data.tokenize import tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    pairs, _ = tokenize_pairs(tokenizer, load_examples(str(root / "pairs.jsonl"))[0], 1_000_000)
    tokens, flops, longest = [], [], 0
    for pair in pairs:
        prompt, completions = len(pair.prompt_ids), (len(pair.chosen_ids), len(pair.rejected_ids))
        total = prompt + sum(completions)
        attended = prompt * (prompt + 1) // 2 + sum(n * prompt + n * (n + 1) // 2 for n in completions)
        forward = (
            2 * meta["layer_parameters"] * total
            + 2 * meta["vocab"] * meta["hidden"] * sum(completions)
            + 4 * meta["layers"] * meta["hidden"] * attended
        )
        tokens.append(total)
        flops.append(3 * forward)
        longest = max(longest, prompt + max(completions))
    return {
        "tokens": tokens,
        "train_flops": flops,
        "longest": longest,
        "mean_prompt": sum(len(p.prompt_ids) for p in pairs) / len(pairs),
        "mean_chosen": sum(len(p.chosen_ids) for p in pairs) / len(pairs),
        "mean_rejected": sum(len(p.rejected_ids) for p in pairs) / len(pairs),
    }


def build_workspace(root: Path, args) -> dict:
    from dpolab.data.tokenizer import train_bpe_tokenizer

    rows = build_pairs(root / "pairs.jsonl", args.pairs, args.variant)
    texts = [row[key] for row in rows for key in ("prompt", "chosen", "rejected")]
    vocabulary = min(32000, ARCHITECTURES[args.model]["vocab_size"])
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocabulary)
    meta = build_model(args.model, root / "model", tokenizer)
    meta.update(pair_statistics(root, meta))
    meta["max_length"] = meta["longest"] + 8
    (root / "meta.json").write_text(json.dumps(meta))
    return meta


# --- workers: each contender in its own process ---------------------------------------------------


def worker_dpolab(root: Path, args, meta: dict, checkpointing: bool) -> dict:
    from dpolab.train import TrainConfig, run

    settings = dict(setting_value(item) for item in args.set)
    config = TrainConfig(
        model=str(root / "model"),
        data=str(root / "pairs.jsonl"),
        output_dir=str(root / f"dpolab-{checkpointing}"),
        cache_dir=str(root / "dpolab-cache"),
        batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-6,
        max_length=meta["max_length"],
        progress=False,
        tensorboard=False,
        save_model=False,
        dtype="float32" if args.smoke else "bfloat16",
        mixed_precision="no",
        seed=0,
        gradient_checkpointing=checkpointing,
        **settings,
    )
    summary = run(config)
    metrics = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    elapsed = {m["step"]: m["elapsed_seconds"] for m in metrics if "elapsed_seconds" in m}
    return {
        "timed_seconds": elapsed[args.steps] - elapsed[args.warmup],
        "forward": summary["forward"],
        "attention_kernel": summary.get("attention_kernel"),
    }


def worker_trl(root: Path, args, meta: dict, precompute: bool) -> dict:
    import warnings

    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    warnings.simplefilter("ignore")

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: dict[int, float] = {}

        def on_step_end(self, _args, state, _control, **_kwargs):
            synchronize()
            self.ends[state.global_step] = time.perf_counter()

    dtype = "float32" if args.smoke else "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    dataset = load_dataset("json", data_files=str(root / "pairs.jsonl"), split="train")
    config = trl.DPOConfig(
        output_dir=str(root / f"trl-{precompute}"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-6,
        logging_steps=max(1, args.steps),
        report_to=[],
        use_cpu=args.smoke,
        bf16=not args.smoke,
        save_strategy="no",
        max_length=meta["max_length"],
        seed=0,
        precompute_ref_log_probs=precompute,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    clock = StepClock()
    trainer = trl.DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock]
    )
    trainer.train()
    return {"timed_seconds": clock.ends[args.steps] - clock.ends[args.warmup], "gradient_checkpointing": True}


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mib() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(args) -> None:
    root = Path(args.root)
    meta = json.loads((root / "meta.json").read_text())
    runner = {
        "dpolab": lambda: worker_dpolab(root, args, meta, False),
        "dpolab-gc": lambda: worker_dpolab(root, args, meta, True),
        "trl": lambda: worker_trl(root, args, meta, False),
        "trl-precompute": lambda: worker_trl(root, args, meta, True),
    }
    result = runner[args.worker]()
    result["peak_memory_mib"] = peak_memory_mib()
    print("RESULT " + json.dumps(result))


# --- the driver --------------------------------------------------------------------------------


def timed_work(meta: dict, args) -> tuple[int, int, float]:
    """(pairs, unique tokens, training FLOPs) of the timed steps: steps warmup+1 … steps, consumed in data
    order. Both trainers shuffle with their own generators; over many steps the means agree, so the
    pair count of the timed steps times the mean per pair is used."""
    pairs = (args.steps - args.warmup) * args.batch_size
    mean_tokens = sum(meta["tokens"]) / len(meta["tokens"])
    mean_flops = sum(meta["train_flops"]) / len(meta["train_flops"])
    return pairs, round(pairs * mean_tokens), pairs * mean_flops


def device_description() -> tuple[str, float | None]:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return name, peak_tflops(name)
    return f"CPU ({os.cpu_count()} cores)", None


def table(results: dict, meta: dict, args, device: str, peak: float | None) -> str:
    pairs, tokens, flops = timed_work(meta, args)
    memory = "peak GPU memory (MiB)" if "CPU" not in device else "peak RSS (MiB)"
    lines = [
        f"| contender | pairs/s | tokens/s | MFU | {memory} |",
        "|---|---|---|---|---|",
    ]
    for name, result in results.items():
        seconds = result["timed_seconds"]
        mfu = f"{100 * flops / seconds / (peak * 1e12):.1f}%" if peak else "—"
        lines.append(
            f"| {name} | {pairs / seconds:.2f} | {tokens / seconds:,.0f} | {mfu} | {result['peak_memory_mib']:,.0f} |"
        )
    if "dpolab" in results:
        ours = results["dpolab"]
        lines += ["", "| ratio | pairs/s | peak memory |", "|---|---|---|"]
        for name in ("trl", "trl-precompute"):
            if name in results:
                other = results[name]
                lines.append(
                    f"| dpolab ÷ {name} | {other['timed_seconds'] / ours['timed_seconds']:.2f}× "
                    f"| {ours['peak_memory_mib'] / other['peak_memory_mib']:.2f}× |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[name for name in ARCHITECTURES if name != "tiny"], default="qwen2.5-0.5b")
    parser.add_argument("--variant", choices=["hh", "long-prompt"], default="hh")
    parser.add_argument("--pairs", type=int, default=512, help="pairs in the data set")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimiser step (one GPU)")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per contender")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--only", nargs="*", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dpolab training settings")
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny model, 32 pairs, 4 steps: checks the script")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dict(setting_value(item) for item in args.set)  # a malformed --set fails here, before any work
    if args.smoke:
        args.model, args.pairs, args.batch_size, args.steps, args.warmup = "tiny", 32, 4, 4, 1
    if args.worker:
        run_worker(args)
        return
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or --smoke to check the script on CPU")
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")

    device, peak = device_description()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        meta = build_workspace(root, args)
        print(
            f"device: {device}; model: {args.model} shape, {meta['parameters'] / 1e6:.0f}M parameters, random init; "
            f"{len(meta['tokens'])} HH-RLHF pairs ({args.variant}): prompt {meta['mean_prompt']:.0f}, chosen "
            f"{meta['mean_chosen']:.0f}, rejected {meta['mean_rejected']:.0f} tokens on average; batch "
            f"{args.batch_size}; steps {args.steps} (first {args.warmup} untimed); dpolab settings {args.set or 'default'}"
        )
        results = {}
        for name in args.only:
            command = [sys.executable, __file__, "--worker", name, "--root", str(root), "--batch-size",
                       str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--set", *args.set]  # fmt: skip
            if args.smoke:
                command.append("--smoke")
            result = run_contender(command, name)
            if result is not None:
                results[name] = result
        print()
        print(table(results, meta, args, device, peak))
        failed = [name for name in args.only if name not in results]
        if args.json:
            Path(args.json).write_text(json.dumps({"device": device, "settings": vars(args), "results": results}))
        if failed:
            sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
