"""Cost of the 3D monitor: the same dpolab run with the monitor at its defaults and with it off.

    .venv/bin/python benchmarks/monitor_overhead.py --pairs 256 --batch-size 8 --steps 100

Same workspace as benchmarks/dpo_vs_trl.py (5.26M-parameter Llama, GSM8K pairs), fp32, one process.
Each variant runs in its own process; the reference cache is warmed first so both measure training only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import build_workspace  # noqa: E402


def worker(root: Path, name: str, steps: int, batch_size: int) -> dict:
    from dpolab.train import TrainConfig, run

    monitor = {} if name == "monitor" else {"enabled": False}
    config = TrainConfig(
        model=str(root / "model"),
        data=str(root / "pairs.jsonl"),
        output_dir=str(root / name),
        cache_dir=str(root / "cache"),
        batch_size=batch_size,
        max_steps=steps,
        learning_rate=1e-6,
        progress=False,
        tensorboard=False,
        save_model=False,
        seed=0,
        monitor=monitor,
    )
    summary = run(config)
    return {"train_seconds": summary["train_seconds"], "steps": summary["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--worker")
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(Path(args.root), args.worker, args.steps, args.batch_size)))
        return
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        build_workspace(root, args.pairs)
        results = {}
        for name in ("warm-cache", "off", "monitor"):
            command = [
                sys.executable,
                __file__,
                "--worker",
                name if name != "warm-cache" else "off",
                "--root",
                str(root),
                "--steps",
                str(args.steps if name != "warm-cache" else 1),
                "--batch-size",
                str(args.batch_size),
            ]
            output = subprocess.run(command, capture_output=True, text=True)
            line = next((t for t in output.stdout.splitlines() if t.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(output.stderr[-3000:])
            if name != "warm-cache":
                results[name] = json.loads(line[7:])
                r = results[name]
                print(f"{name:8s} {1000 * r['train_seconds'] / r['steps']:8.1f} ms/step over {r['steps']} steps")
            (root / "off").exists() and subprocess.run(["rm", "-rf", str(root / "off")])
        ratio = results["monitor"]["train_seconds"] / results["off"]["train_seconds"]
        print(f"monitor overhead: {100 * (ratio - 1):+.1f}% of training time (defaults: probes every 50 steps)")
        print("JSON " + json.dumps({"settings": vars(args), "results": results}))


if __name__ == "__main__":
    main()
