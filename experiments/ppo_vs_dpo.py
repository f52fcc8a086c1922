"""3D paper Table 3 on a small language model: RLHF-PPO against DPO and DPOP from the same SFT model.

    .venv/bin/python experiments/ppo_vs_dpo.py --out runs/ppo_vs_dpo --seeds 3

From the quickstart's pieces (:mod:`dpolab.quickstart`, size ``--size``): procedural maths problems, the
low-edit pairs, a random-init Llama and its SFT model (one, shared by every run). Then per seed (the data
order, the samples and the RM's head):

- ``dpo``, ``dpop``: the quickstart's preference runs (β 0.1, λ 50, 1 epoch) on the low-edit pairs;
- ``rm``: a reward model (``dpolab rm``) on the same pairs, from the SFT model;
- ``ppo_math``: ``dpolab ppo`` on the pairs' prompts, reward = the ``math`` judge (1 when the final number is
  right), from the SFT model, one pass over the prompts;
- ``ppo_rm``: the same with reward = the ``rm`` run's score.

Each run's policy is measured on the held-out problems: greedy accuracy (its change from SFT), and KL(π ‖
π_SFT) estimated on one sampled response per problem (mean over problems of Σ_t log π − log π_SFT, nats per
response); and on the held-out low-edit pairs: the mean log-ratios r_w and r_l against the SFT model, the same
measure for every method. Every run has the 3D monitor on (probes every 10 steps on 32 pairs, 8 sampled
prompts); the PPO runs read the held-out pairs through ``monitor.pairs``, the preference runs their training
batches and their eval pairs. Each run's alarms are listed; PPO's time split (generation, reward, log-prob
passes, update) and peak memory come from each run's summary. Writes ``results.json`` under ``--out`` and prints the
table of docs/rlhf.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
METHODS = ("dpo", "dpop", "ppo_math", "ppo_rm")
MONITOR = {"probe_steps": 10, "probe_pairs": 32, "sample_prompts": 8}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of the 95% t-interval over seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T_975[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5


def prepare(out: Path, size: str) -> dict:
    """Data, model and SFT (quickstart settings), once; the PPO prompts with their answers."""
    from dpolab.data.formats import write_jsonl
    from dpolab.data.synthetic import final_answer
    from dpolab.quickstart import SIZES, TRAINING, build_data, build_model
    from dpolab.train import TrainConfig, run

    spec = SIZES[size]
    if not (out / "sft" / "summary.json").exists():
        build_data(out, spec, 0)
        init = build_model(out, spec, 0)
        run(TrainConfig(task="sft", loss="sft", loss_params={"reduction": "batch_token_mean"}, model=str(init),
                        data=str(out / "data" / "sft.jsonl"), epochs=spec.sft_epochs, output_dir=str(out / "sft"),
                        row_tokens=TRAINING["row_tokens"], seed=0, progress=False, tensorboard=False,
                        cache_dir=str(out / "cache"), **TRAINING["sft"]), overwrite=True)  # fmt: skip
    pairs = [json.loads(line) for line in (out / "data" / "low_edit" / "train.jsonl").read_text().splitlines()]
    write_jsonl(out / "data" / "ppo_prompts.jsonl",
                [{"prompt": p["prompt"], "answer": final_answer(p["chosen"])} for p in pairs])  # fmt: skip
    return {"pairs": len(pairs)}


def train_one(out: Path, method: str, seed: int, args) -> dict:
    """One run (reused when finished); its summary."""
    from dpolab.quickstart import TRAINING
    from dpolab.train import TrainConfig, run

    folder = out / f"{method}-seed{seed}"
    if (folder / "summary.json").exists():
        return json.loads((folder / "summary.json").read_text())
    pairs = out / "data" / "low_edit"
    monitor = {**MONITOR, **({"pairs": str(pairs / "eval.jsonl")} if method.startswith("ppo") else {})}
    common = dict(model=str(out / "sft" / "model"), output_dir=str(folder), seed=seed, progress=False,
                  tensorboard=False, cache_dir=str(out / "cache"), row_tokens=TRAINING["row_tokens"],
                  monitor=monitor)  # fmt: skip
    if method in ("dpo", "dpop", "rm"):
        extra = dict(data=str(pairs / "train.jsonl"), eval_data=str(pairs / "eval.jsonl"), **TRAINING["preference"])
        if method == "rm":
            config = TrainConfig(task="reward", loss="reward_model", **common, **extra)
        else:
            params = {"beta": TRAINING["beta"], **({"lam": TRAINING["dpop_lambda"]} if method == "dpop" else {})}
            config = TrainConfig(loss=method, loss_params=params, **common, **extra)
    else:
        reward = {"judge": "math"} if method == "ppo_math" else {"model": str(out / f"rm-seed{seed}" / "model")}
        config = TrainConfig(
            task="ppo", loss="ppo", data=str(out / "data" / "ppo_prompts.jsonl"), epochs=1.0,
            batch_size=args.ppo_batch, learning_rate=args.ppo_lr, lr_scheduler="constant",
            ppo={"reward": reward, "max_new_tokens": args.max_new_tokens, "kl_coef": args.kl_coef,
                 "ppo_epochs": 4, "minibatches": 2, "missing_eos_penalty": 1.0, "sample_steps": 4},
            **common,
        )  # fmt: skip
    return run(config, overwrite=(folder / "metrics.jsonl").exists())


def kl_from_sft(model_dir: Path, sft_dir: Path, prompts: list[str], max_new_tokens: int, seed: int) -> float:
    """Mean over prompts of Σ_t log π(a_t) − log π_SFT(a_t) on one response per prompt sampled from π (T = 1):
    the k1 estimate of KL(π ‖ π_SFT) per response, in nats."""
    import torch

    from dpolab.engine.generate import sample_responses
    from dpolab.engine.loading import load_model, load_tokenizer
    from dpolab.engine.policy_value import Rollout, rollout_outputs

    policy, sft = load_model(model_dir).eval(), load_model(sft_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    device = torch.device("cpu")
    encoded = [tuple(tokenizer(p)["input_ids"]) for p in prompts]
    totals = []
    for start in range(0, len(encoded), 64):
        chunk = encoded[start : start + 64]
        samples = sample_responses(policy, chunk, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, device=device,
                                   seeds=[seed * 100_003 + start + i for i in range(len(chunk))])  # fmt: skip
        items = [Rollout(p, (s.ids,)) for p, s in zip(chunk, samples, strict=True)]
        with torch.no_grad():
            ours = rollout_outputs(policy, items, list(range(len(items))), tokenizer.pad_token_id, device)
            theirs = rollout_outputs(sft, items, list(range(len(items))), tokenizer.pad_token_id, device)
        totals += (ours.dense(ours.logps) - ours.dense(theirs.logps)).sum(1).tolist()
    return statistics.fmean(totals)


def held_out_logratios(model_dir: Path, sft_dir: Path, pairs_file: Path) -> tuple[float, float]:
    """Mean r_w and r_l = Σ_t log π − log π_SFT over the completions of the held-out pairs (nats)."""
    import torch

    from dpolab.data.formats import load_examples
    from dpolab.data.tokenize import tokenize_pairs
    from dpolab.engine.loading import load_model, load_tokenizer
    from dpolab.engine.policy_value import rollout_outputs

    tokenizer = load_tokenizer(model_dir)
    pairs, _ = tokenize_pairs(tokenizer, load_examples(str(pairs_file))[0])
    sums = []
    for directory in (model_dir, sft_dir):
        model = load_model(directory).eval()
        with torch.no_grad():
            out = rollout_outputs(model, pairs, list(range(len(pairs))), tokenizer.pad_token_id, torch.device("cpu"))
        sums.append(out.dense(out.logps).sum(1).view(-1, 2).double())
    ratios = (sums[0] - sums[1]).mean(0)
    return float(ratios[0]), float(ratios[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/ppo_vs_dpo")
    parser.add_argument("--size", default="small", choices=("small", "full"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ppo-batch", type=int, default=16)
    parser.add_argument("--ppo-lr", type=float, default=1e-4)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    from dpolab.console import configure_threads
    from dpolab.quickstart import TRAINING, greedy_accuracy

    configure_threads(None)
    info = prepare(out, args.size)
    problems = [json.loads(line) for line in (out / "data" / "eval_problems.jsonl").read_text().splitlines()]
    prompts = [p["question"] + "\n" for p in problems]
    sft_accuracy = greedy_accuracy(out / "sft" / "model", problems, TRAINING["max_new_tokens"], False, "sft")
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    methods = [m for m in METHODS if m in args.methods.split(",")]
    per_seed: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(args.seeds):
        for method in ["rm"] * ("ppo_rm" in methods) + methods:  # the RM first: ppo_rm reads it
            summary = train_one(out, method, seed, args)
            if method == "rm":
                continue
            model = out / f"{method}-seed{seed}" / "model"
            accuracy = greedy_accuracy(model, problems, TRAINING["max_new_tokens"], False, method)["accuracy"]
            row = {
                "seed": seed,
                "accuracy_change": 100 * (accuracy - sft_accuracy["accuracy"]),
                "kl_from_sft": kl_from_sft(model, out / "sft" / "model", prompts, args.max_new_tokens, seed),
                "alarms": [a["alarm"] for a in summary.get("alarms", [])],
            }
            row["heldout_logratio_chosen"], row["heldout_logratio_rejected"] = held_out_logratios(
                model, out / "sft" / "model", out / "data" / "low_edit" / "eval.jsonl"
            )
            if method.startswith("ppo"):
                row.update(phase_seconds=summary["phase_seconds"], peak_rss_mib=summary["peak_rss_mib"],
                           train_seconds=summary["train_seconds"], final_reward=summary["final"]["rewards/mean"])  # fmt: skip
            per_seed[method].append(row)
            print(f"seed {seed} {method}: {json.dumps(row)}", flush=True)
    table = {}
    for method, rows in per_seed.items():
        keys = ("accuracy_change", "kl_from_sft", "heldout_logratio_chosen", "heldout_logratio_rejected")
        table[method] = {key: interval([r[key] for r in rows]) for key in keys}
        table[method]["alarm_runs"] = sum(bool(r["alarms"]) for r in rows)
        table[method]["alarms"] = sorted({a for r in rows for a in r["alarms"]})
        if method.startswith("ppo"):
            for phase in rows[0]["phase_seconds"]:
                table[method][f"share_{phase}"] = interval(
                    [r["phase_seconds"][phase] / sum(r["phase_seconds"].values()) for r in rows]
                )
            table[method]["peak_rss_mib"] = interval([r["peak_rss_mib"] for r in rows])
    results = {"args": vars(args), "data": info, "sft_accuracy": sft_accuracy["accuracy"], "runs": per_seed,
               "table": table, "seconds": time.perf_counter() - started}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"SFT greedy accuracy {100 * sft_accuracy['accuracy']:.1f}% on {len(problems)} problems")
    print("| run | accuracy change from SFT (points) | KL(π ‖ π_SFT), nats per response | held-out r_w | held-out r_l "
          "| runs with a 3D alarm |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for method, row in table.items():
        (a, da), (k, dk) = row["accuracy_change"], row["kl_from_sft"]
        (w, dw), (lo, dl) = row["heldout_logratio_chosen"], row["heldout_logratio_rejected"]
        alarms = f"{row['alarm_runs']} of {args.seeds}" + (f" ({', '.join(row['alarms'])})" if row["alarms"] else "")
        print(f"| {method} | {a:+.1f} ± {da:.1f} | {k:.2f} ± {dk:.2f} | {w:+.2f} ± {dw:.2f} | {lo:+.2f} ± {dl:.2f} "
              f"| {alarms} |")  # fmt: skip
    print(f"total {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
