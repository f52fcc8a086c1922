"""The weights each recipe reaches after 8 steps on a tiny model: a refactor of the training core must not move them.

Runs ``dpolab train`` (DPO), ``sft``, ``rm`` and ``ppo`` for 8 optimiser steps each, one process, float32, one
thread, seeded, on a tiny Llama and small GSM8K-style data built here, and writes every final tensor's sha256
and its values to ``--out`` (a folder). With ``--against FOLDER`` (an earlier run of this script) it compares
tensor by tensor and prints the largest absolute difference per recipe; exit 1 when one exceeds ``--atol``.

    python benchmarks/recipe_weights.py --out /tmp/weights-before           # on the commit before a change
    python benchmarks/recipe_weights.py --out /tmp/weights-after --against /tmp/weights-before

Settings that a change documents as changed (a default) are set explicitly here, so the check compares the
same objective on both sides.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRS = [{"prompt": f"Q: {a} plus {b}? A:", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
         for a in range(6) for b in range(4)]  # fmt: skip
RECIPES = {
    "train": ["--loss", "dpo", "--loss_params", "{beta: 0.1}", "--data", "@pairs"],
    "train-dpop-sft": [
        "--loss",
        "dpop",
        "--loss_params",
        "{beta: 0.1, lam: 50}",
        "--sft_weight",
        "0.5",
        "--sft_reduction",
        "token_mean",
        "--data",
        "@pairs",
    ],  # fmt: skip
    "sft": ["--loss_params", "{reduction: batch_token_mean}", "--data", "@sft"],
    "rm": ["--data", "@pairs"],
    "ppo": ["--data", "@prompts", "--ppo", "{reward: {judge: math}, samples_per_prompt: 2, max_new_tokens: 4}"],
}
COMMAND = {"train": "train", "train-dpop-sft": "train", "sft": "sft", "rm": "rm", "ppo": "ppo"}


def build(workspace: Path) -> dict[str, Path]:
    sys.path.insert(0, str(HERE.parent))
    from tests.tiny import save_tiny_model

    workspace.mkdir(parents=True, exist_ok=True)
    save_tiny_model(workspace / "model", seed=0)
    files = {"pairs": workspace / "pairs.jsonl", "sft": workspace / "sft.jsonl", "prompts": workspace / "prompts.jsonl"}
    files["pairs"].write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    files["sft"].write_text(
        "".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n" for p in PAIRS)
    )
    files["prompts"].write_text(
        "".join(json.dumps({"prompt": p["prompt"], "answer": p["chosen"].strip()}) + "\n" for p in PAIRS)
    )
    return files


def run(recipe: str, files: dict[str, Path], workspace: Path) -> Path:
    out = workspace / "runs" / recipe
    words = [sys.executable, "-m", "dpolab", COMMAND[recipe], "--model", str(workspace / "model")]
    words += [str(files[w[1:]]) if w.startswith("@") else w for w in RECIPES[recipe]]
    words += ["--output_dir", str(out), "--max_steps", "8", "--batch_size", "4", "--learning_rate", "1e-3",
              "--seed", "0", "--dtype", "float32", "--progress", "false", "--tensorboard", "false",
              "--cache_dir", str(workspace / "cache"), "--overwrite"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(words, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{recipe} failed:\n{result.stderr[-3000:]}")
    return out / "model"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the weights (one .safetensors per recipe) and hashes")
    parser.add_argument("--against", help="an earlier --out to compare with")
    parser.add_argument("--atol", type=float, default=1e-6, help="largest allowed absolute difference (1e-6)")
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file, save_file

    out = Path(args.out)
    files = build(out / "workspace")
    hashes, worst = {}, 0.0
    for recipe in RECIPES:
        weights = load_file(str(run(recipe, files, out / "workspace") / "model.safetensors"))
        save_file(weights, str(out / f"{recipe}.safetensors"))
        digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
        hashes[recipe] = digest
        line = f"{recipe}: {len(weights)} tensors, sha256 {digest[:16]}"
        if args.against:
            before = load_file(str(Path(args.against) / f"{recipe}.safetensors"))
            if sorted(before) != sorted(weights):
                raise SystemExit(f"{recipe}: the tensor names differ from {args.against}")
            difference = max(float((before[k].double() - weights[k].double()).abs().max()) for k in weights)
            worst = max(worst, difference)
            equal = all(torch.equal(before[k], weights[k]) for k in weights)
            line += f"; against {args.against}: max |Δ| {difference:.3g}" + (" (bitwise equal)" if equal else "")
        print(line, flush=True)
    (out / "hashes.json").write_text(json.dumps(hashes, indent=2) + "\n")
    return 1 if args.against and worst > args.atol else 0


if __name__ == "__main__":
    raise SystemExit(main())
