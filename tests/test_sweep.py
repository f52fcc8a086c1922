"""`dpolab sweep`: spec errors before any run, a training grid from the CLI, resume, intervals, baseline pairing."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys

import pytest
import yaml

from dpolab.sweep import interval, load_spec, plan_jobs, run_sweep, t_quantile
from tests.tiny import save_tiny_model

PAIRS = [
    {"prompt": f"Q: what is {a} plus {b}? A:", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
    for a in range(5)
    for b in range(4)
]


def write_spec(path, spec: dict):
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def dpolab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dpolab", *args], capture_output=True, text=True, cwd=cwd)


# --- the interval ---------------------------------------------------------------------------------------------


def test_t_quantiles_match_scipy():
    from scipy import stats  # in the dev extra, through scikit-learn (lm-eval)

    for degrees in range(1, 200):
        assert t_quantile(degrees) == pytest.approx(stats.t.ppf(0.975, degrees), abs=1e-3), degrees


def test_interval_covers_the_mean_at_the_nominal_rate():
    # Coverage of the t-interval over 2,000 samples of 3 normal draws: 95% ± 1.5 points. A z-interval (1.96)
    # would cover ~87.5% at n = 3; a wrong degrees-of-freedom or a population sd would miss this band.
    import random

    generator = random.Random(0)
    covered = 0
    for _ in range(2000):
        stats = interval([generator.gauss(1.0, 2.0) for _ in range(3)])
        covered += stats["low"] <= 1.0 <= stats["high"]
    assert 0.935 <= covered / 2000 <= 0.965
    single = interval([4.0])
    assert single["mean"] == 4.0 and single["half_width"] is None
    huge = interval([1e307, 3e307, 5e307])  # the toy's gradient ratios: the naive sum and squares overflow
    assert huge["mean"] == pytest.approx(3e307) and huge["sd"] == pytest.approx(2e307)


# --- spec errors, before anything runs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"recipe": "toy", "grid": {}, "points": []}, "empty grid"),
        ({"recipe": "toy", "grid": {"loss": []}}, "sweep.grid.loss: a non-empty list"),
        ({"recipe": "toy", "grdi": {"loss": ["dpo"]}}, "sweep.grdi: not a sweep key (did you mean 'grid'?)"),
        (
            {"recipe": "toy", "grid": {"learning_rat": [0.1]}},
            "learning_rat: not a toy key (did you mean 'learning_rate'?)",
        ),
        ({"recipe": "toy", "grid": {"steps": ["many"]}}, "steps: expected int; got 'many'"),
        ({"recipe": "toy", "grid": {"seed": [1, 2]}}, "sweep.grid.seed: set by the sweep"),
        ({"recipe": "dpo", "grid": {"loss": ["dpo"]}}, "sweep.recipe: one of train, sft, rm, ppo, toy"),
        ({"recipe": "toy", "grid": {"loss": ["dpo"]}, "seeds": []}, "sweep.seeds: a non-empty list"),
        ({"recipe": "toy", "grid": {"loss": ["dpo"]}, "baseline": {"model": "x"}}, "needs sweep.evaluate"),
        ({"recipe": "toy", "points": [{"name": "a", "loss": "dpo"}, {"name": "a", "loss": "ipo"}]}, "share the folder"),
        (
            {"recipe": "toy", "grid": {"loss": ["dpo"]}, "evaluate": {"command": "score --model {model}"}},
            "sweep.evaluate.command: unknown placeholder {model} (known: {model_dir}",
        ),  # fmt: skip
        ({"recipe": "toy", "grid": {"loss": ["dpo"]}, "evaluate": {"command": ""}}, "sweep.evaluate.command: empty"),
        (
            {"recipe": "toy", "grid": {"loss": ["dpo"]}, "evaluate": [{"command": "a {output}"}, {"command": "b"}]},
            "sweep.evaluate[0]: with several evaluations each needs a name",
        ),  # fmt: skip
        (
            {
                "recipe": "toy",
                "grid": {"loss": ["dpo"]},
                "evaluate": [{"name": "a", "command": "a"}, {"name": "b", "command": "b {out}"}],
            },
            "sweep.evaluate[1].command: unknown placeholder {out}",
        ),  # fmt: skip
        *[
            ({"recipe": "toy", "grid": {"loss": ["dpo"]}, "evaluate": {"command": f"x {word}"}}, message)
            for word, message in [
                ("{config}", "unknown placeholder {config}"),
                ("{config.data}", "unknown placeholder {config.data}"),
                ("{config[a][b]}", "unknown placeholder {config[a][b]}"),
                ("{seed!r}", "unknown placeholder {seed!r}"),
                ("{seed:>4}", "unknown placeholder {seed:>4}"),
                ("{output", "stray brace in '{output'"),
                ("{config[steps]}", "x"),  # valid: the loop below keeps only the failing ones
            ]
            if message != "x"
        ],
        (
            {"recipe": "toy", "grid": {"loss": ["dpo", "ipo"]}, "compare": [{"key": "beta", "a": 1, "b": 2}]},
            "sweep.compare[0]: 'beta' is not a swept key (swept: loss)",
        ),  # fmt: skip
        (
            {"recipe": "toy", "grid": {"loss": ["dpo", "ipo"]}, "compare": [{"key": "loss", "a": "dpop", "b": "dpo"}]},
            "sweep.compare[0].a: 'dpop' is not a value of loss (values: dpo, ipo)",
        ),  # fmt: skip
        (
            {"recipe": "toy", "grid": {"loss": ["dpo"]}, "evaluate": {"command": "x {config[learning_rate]}"}},
            "{config[learning_rate]}: the run's settings have no key 'learning_rate' (set it in base, grid or points",
        ),  # fmt: skip
        (
            {"recipe": "toy", "grid": {"loss": ["dpo"]}, "evaluate": {"command": "x {config[loss_params]}"}},
            "the run's settings have no key 'loss_params'",
        ),  # fmt: skip
        (
            {
                "recipe": "toy",
                "grid": {"loss": ["dpo"]},
                "evaluate": [{"name": "a", "command": "a"}, {"name": "b", "command": "b"}],
            },
            "two evaluations have the output 'evaluate.json'",
        ),  # fmt: skip
        (
            {"recipe": "toy", "grid": {"loss": ["dpo"]}, "plots": [{"x": "beta", "metrics": ["final_chosen_prob"]}]},
            "sweep.plots[0]: 'beta' is not a swept key (swept: loss)",
        ),  # fmt: skip
        (
            {
                "recipe": "toy",
                "grid": {"loss": ["dpo"]},
                "plots": [{"x": "loss", "metrics": ["m"], "where": {"opt": 1}}],
            },
            "sweep.plots[0]: 'opt' is not a swept key",
        ),  # fmt: skip
        (
            {"recipe": "train", "base": {"model": "m", "data": "d"}, "grid": {"learning_rate": ["fast"]}},
            "learning_rate: expected float; got 'fast'",
        ),  # fmt: skip
        (
            {"recipe": "train", "base": {"model": "m", "data": "d"}, "grid": {"los": ["dpo"]}},
            "unknown config key 'los' (did you mean 'loss'?)",
        ),  # fmt: skip
    ],
)
def test_bad_specs_fail_before_anything_runs(tmp_path, spec, message):
    path = write_spec(tmp_path / "spec.yaml", spec)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_sweep(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_spec_from_the_cli_names_the_key_and_the_point(tmp_path):
    path = write_spec(tmp_path / "spec.yaml", {"recipe": "toy", "grid": {"loss_params.beta": [0.1, -1.0]}})
    result = dpolab("sweep", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "sweep point 'loss_params.beta=-1.0' (seed 0)" in result.stderr and "beta" in result.stderr
    assert not (tmp_path / "out").exists()


# --- the toy recipe: intervals and the baseline pairing --------------------------------------------------------

WRITE_VALUE = (  # an evaluation command: writes a number that depends on the model folder's name and the seed
    f'{sys.executable} -c "import json, sys; model, seed = sys.argv[2], int(sys.argv[3]); '
    "json.dump(dict(value=(1.0 if model.endswith('base') else 10.0) * (seed + 1) ** 2), open(sys.argv[1], 'w'))\" "
    "{output} {model_dir} {seed}"
)


def test_toy_sweep_tabulates_each_point_and_pairs_the_baseline_by_seed(tmp_path):
    (tmp_path / "base").mkdir()
    spec = write_spec(
        tmp_path / "spec.yaml",
        {
            "recipe": "toy",
            "base": {"steps": 30, "sft_max_steps": 300},
            "points": [{"name": "dpo", "loss": "dpo"}, {"name": "dpop", "loss": "dpop", "loss_params": {"lam": 5.0}}],
            "grid": {"loss_params.beta": [0.1, 0.5]},
            "seeds": [0, 1, 2],
            "evaluate": {"command": WRITE_VALUE},
            "baseline": {"model": str(tmp_path / "base"), "name": "base"},
            "metrics": ["final_chosen_prob", "evaluate/value"],
            "plots": [{"x": "loss_params.beta", "line": "loss", "metrics": ["final_chosen_prob"]}],
            "compare": [{"key": "name", "a": "dpop", "b": "dpo"}],
        },
    )
    results = run_sweep(spec, tmp_path / "out", progress=False)
    rows = {row["point"]: row for row in results["points"]}
    assert list(rows) == ["base", "dpo loss_params.beta=0.1", "dpo loss_params.beta=0.5", "dpop loss_params.beta=0.1",
                          "dpop loss_params.beta=0.5"]  # fmt: skip
    # Each point's metric over seeds is the interval of the runs' own summaries, read back independently.
    for name, row in rows.items():
        if name == "base":
            continue
        folder = tmp_path / "out" / "runs" / name.replace(" ", "_")
        finals = [
            json.loads((folder / f"seed{s}" / "summary.json").read_text())["final_chosen_prob"] for s in (0, 1, 2)
        ]
        assert row["metrics"]["final_chosen_prob"]["mean"] == pytest.approx(sum(finals) / 3)
        config = json.loads((folder / "seed1" / "config.json").read_text())
        assert config["seed"] == 1 and config["loss_params"]["beta"] == float(name[-3:]) and config["steps"] == 30
        assert config["loss_params"].get("lam") == (5.0 if name.startswith("dpop") else None)
        # evaluate/value is 10(s+1)² for a run, (s+1)² for the baseline: paired by seed the change is 9(s+1)²,
        # whose values differ from any pairing of mismatched seeds.
        change = row["metrics"]["evaluate/value change"]
        assert change["values"] == [9.0, 36.0, 81.0]
    assert rows["dpo loss_params.beta=0.1"]["metrics"]["final_chosen_prob"]["n"] == 3
    with open(tmp_path / "out" / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert {"point", "loss", "loss_params.beta", "metric", "mean", "ci95_low", "ci95_high"} <= set(table[0])
    assert len([r for r in table if r["metric"] == "final_chosen_prob"]) == 4  # the baseline has no such metric
    # compare: dpop − dpo at each beta, paired by seed, from the runs' own summaries
    assert [(c["a"], c["b"]) for c in results["comparisons"]] == [
        ("dpop loss_params.beta=0.1", "dpo loss_params.beta=0.1"),
        ("dpop loss_params.beta=0.5", "dpo loss_params.beta=0.5"),
    ]
    for comparison in results["comparisons"]:
        folders = [tmp_path / "out" / "runs" / comparison[side].replace(" ", "_") for side in ("a", "b")]
        finals = [[json.loads((f / f"seed{s}" / "summary.json").read_text())["final_chosen_prob"] for s in (0, 1, 2)]
                  for f in folders]  # fmt: skip
        assert comparison["metrics"]["final_chosen_prob"]["values"] == pytest.approx(
            [a - b for a, b in zip(*finals, strict=True)]
        )
        assert comparison["at"] == {"loss_params.beta": float(comparison["a"][-3:])}
    assert "Paired by seed:" in (tmp_path / "out" / "results.md").read_text()
    markdown = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert markdown[0].endswith("| loss_params.beta | final_chosen_prob | evaluate/value | evaluate/value change |")
    dpo = next(line for line in markdown if line.startswith("| dpo loss_params.beta=0.1 |"))
    stats = rows["dpo loss_params.beta=0.1"]["metrics"]["final_chosen_prob"]
    assert f"{stats['mean']:.3g} ± {stats['half_width']:.2g}" in dpo
    assert len(markdown[: markdown.index("")]) == 2 + len(rows)
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count("<img") == 1 and "reports/dpo_loss_params.beta=0.1.html" in page
    assert (tmp_path / "out" / "plots" / "final_chosen_prob-vs-loss_params.beta.png").stat().st_size > 1000


def test_several_evaluations_each_give_their_named_metrics_and_baseline_changes(tmp_path):
    (tmp_path / "base").mkdir()
    squared = WRITE_VALUE
    cubed = WRITE_VALUE.replace("** 2", "** 3")
    spec = write_spec(
        tmp_path / "spec.yaml",
        {
            "recipe": "toy",
            "base": {"steps": 5, "sft_max_steps": 50},
            "points": [{"name": "dpo", "loss": "dpo"}],
            "seeds": [0, 1],
            "evaluate": [
                {"name": "square", "command": squared, "output": "square.json"},
                {"name": "cube", "command": cubed, "output": "cube.json"},
            ],
            "baseline": {"model": str(tmp_path / "base"), "name": "base"},
            "metrics": ["evaluate/square/value", "evaluate/cube/value"],
        },
    )
    results = run_sweep(spec, tmp_path / "out", progress=False)
    row = next(r for r in results["points"] if r["point"] == "dpo")
    assert row["metrics"]["evaluate/square/value"]["values"] == [10.0, 40.0]
    assert row["metrics"]["evaluate/cube/value"]["values"] == [10.0, 80.0]
    assert row["metrics"]["evaluate/cube/value change"]["values"] == [9.0, 72.0]  # paired with the base's 1, 8
    assert (tmp_path / "out" / "runs" / "dpo" / "seed1" / "cube.json").exists()


def test_an_evaluation_reads_the_run_s_settings_and_may_skip_the_baseline(tmp_path):
    (tmp_path / "base").mkdir()
    echo = (
        f"{sys.executable} -c \"import json, sys; json.dump(dict(beta=float(sys.argv[2])), open(sys.argv[1], 'w'))\" "
    )
    spec = {
        "recipe": "toy",
        "base": {"steps": 5, "sft_max_steps": 50},
        "grid": {"loss_params.beta": [0.1, 0.4]},
        "seeds": [0],
        "evaluate": [
            {"name": "value", "command": WRITE_VALUE},
            {
                "name": "echo",
                "command": echo + "{output} {config[loss_params.beta]}",
                "output": "echo.json",
                "baseline": False,
            },
        ],  # fmt: skip
        "baseline": {"model": str(tmp_path / "base"), "name": "base"},
    }
    results = run_sweep(write_spec(tmp_path / "spec.yaml", spec), tmp_path / "out", progress=False)
    rows = {row["point"]: row["metrics"] for row in results["points"]}
    assert rows["loss_params.beta=0.4"]["evaluate/echo/beta"]["values"] == [0.4]
    assert rows["loss_params.beta=0.1"]["evaluate/echo/beta"]["values"] == [0.1]
    assert "evaluate/echo/beta" not in rows["base"] and "evaluate/value/value" in rows["base"]
    # Read by the baseline too, the run's setting is missing: the spec fails before any run
    spec["evaluate"][1]["baseline"] = True
    with pytest.raises(
        ValueError, match=r"sweep point 'base' \(seed 0\): sweep.evaluate\[1\].command: .*needs baseline: false"
    ):
        run_sweep(write_spec(tmp_path / "spec2.yaml", spec), tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_a_run_whose_evaluations_changed_is_evaluated_again(tmp_path):
    (tmp_path / "base").mkdir()
    spec = {
        "recipe": "toy",
        "base": {"steps": 5, "sft_max_steps": 50},
        "points": [{"name": "dpo", "loss": "dpo"}],
        "seeds": [0],
        "evaluate": [{"name": "value", "command": WRITE_VALUE}],
        "baseline": {"model": str(tmp_path / "base"), "name": "base"},
    }
    run_sweep(write_spec(tmp_path / "spec.yaml", spec), tmp_path / "out", progress=False)
    spec["evaluate"].append({"name": "cube", "command": WRITE_VALUE.replace("** 2", "** 3"), "output": "cube.json"})
    results = run_sweep(write_spec(tmp_path / "spec.yaml", spec), tmp_path / "out", progress=False)
    rows = {row["point"]: row["metrics"] for row in results["points"]}
    assert rows["dpo"]["evaluate/cube/value"]["values"] == [10.0] and rows["base"]["evaluate/cube/value"]["n"] == 1
    assert rows["dpo"]["evaluate/value/value"]["values"] == [10.0]
    record = json.loads((tmp_path / "out" / "runs" / "dpo" / "seed0" / "sweep_result.json").read_text())
    assert [e["name"] for e in record["evaluations"]] == ["value", "cube"]


def test_an_evaluation_s_nested_numbers_are_metrics_by_path():
    from dpolab.sweep import flat_numbers

    harness_like = {"model": "m", "limit": None, "seed": 0, "ok": True,
                    "tasks": {"arc": {"documents": 300, "metrics": {"acc": {"value": 0.5, "stderr": None}}}},
                    "by_position": [{"offset": 0, "chosen": -1.0}], "bad": float("nan")}  # fmt: skip
    assert flat_numbers(harness_like) == {"seed": 0.0, "tasks/arc/documents": 300.0, "tasks/arc/metrics/acc/value": 0.5}


def test_a_changed_spec_does_not_mix_with_finished_runs(tmp_path):
    spec = {"recipe": "toy", "base": {"steps": 5, "sft_max_steps": 50}, "grid": {"loss": ["dpo"]}, "seeds": [0]}
    run_sweep(write_spec(tmp_path / "spec.yaml", spec), tmp_path / "out", progress=False)
    spec["base"]["steps"] = 6
    with pytest.raises(ValueError, match=r"finished with other settings .*steps: 5 → 6"):
        run_sweep(write_spec(tmp_path / "spec.yaml", spec), tmp_path / "out", progress=False)


# --- the training recipe from the CLI, and resume ---------------------------------------------------------------


@pytest.mark.slow
def test_training_sweep_from_the_cli_runs_evaluates_and_resumes(tmp_path):
    save_tiny_model(tmp_path / "model", seed=0)
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    common = {"batch_size": 4, "learning_rate": 3e-3, "tensorboard": False, "threads": 1,
              "monitor": {"enabled": False}, "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    spec = write_spec(
        tmp_path / "spec.yaml",
        {
            "recipe": "train",
            "base": {
                "model": str(tmp_path / "model"),
                "data": str(tmp_path / "pairs.jsonl"),
                "max_steps": 3,
                "eval_data": str(tmp_path / "pairs.jsonl"),
                "checkpoint_steps": 2,
                **common,
            },  # fmt: skip
            "grid": {"loss": ["dpo", "dpop"]},
            "seeds": [0, 1],
            "metrics": ["eval/logratio/chosen", "steps"],
        },
    )
    out = tmp_path / "out"
    first = dpolab("sweep", str(spec), "--out", str(out), "--no-progress")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "loss=dpop" in first.stdout and "eval/logratio/chosen" in first.stdout
    results = json.loads((out / "results.json").read_text())
    for row in results["points"]:
        assert row["seeds_done"] == [0, 1] and row["metrics"]["steps"]["values"] == [3.0, 3.0]
        for seed in (0, 1):
            summary = json.loads((out / "runs" / row["point"] / f"seed{seed}" / "summary.json").read_text())
            assert row["metrics"]["eval/logratio/chosen"]["values"][seed] == summary["eval"]["eval/logratio/chosen"]
    # Two seeds of the same point train in a different order: different held-out log-ratios.
    dpo_values = results["points"][0]["metrics"]["eval/logratio/chosen"]["values"]
    assert dpo_values[0] != dpo_values[1]

    # A finished sweep started again runs nothing.
    logs = {path: path.read_text() for path in (out / "logs").iterdir()}
    again = dpolab("sweep", str(spec), "--out", str(out), "--no-progress")
    assert again.returncode == 0 and {p: p.read_text() for p in (out / "logs").iterdir()} == logs

    # A run killed after its checkpoint at step 2 (no summary, no result): only it runs again, from step 2.
    killed = out / "runs" / "loss=dpop" / "seed1"
    for name in ("sweep_result.json", "summary.json"):
        (killed / name).unlink()
    for checkpoint in (killed / "checkpoints").iterdir():
        if checkpoint.name.endswith("3"):
            import shutil

            shutil.rmtree(checkpoint)
    resumed = dpolab("sweep", str(spec), "--out", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    changed = [p.name for p in (out / "logs").iterdir() if p.read_text() != logs[p]]
    assert changed == ["loss=dpop-seed1.log"]
    assert "--resume" in (out / "logs" / "loss=dpop-seed1.log").read_text().split("$ ")[-1].splitlines()[0]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["resumed_from"] is not None
    assert math.isfinite(json.loads((out / "results.json").read_text())["points"][1]["metrics"]["steps"]["mean"])


def test_dry_run_lists_the_runs_and_writes_nothing(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", {"recipe": "toy", "grid": {"loss": ["dpo", "ipo"]}, "seeds": [0, 1]})
    result = dpolab("sweep", str(spec), "--out", str(tmp_path / "out"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "4 runs (4 not finished) of 2 points" in result.stdout and "loss=ipo" in result.stdout
    assert not (tmp_path / "out").exists()
    spec_object, folder = load_spec(spec, None)
    assert folder.name == "sweep-spec" and len(plan_jobs(spec_object, folder)) == 4


def test_a_bundle_sets_its_keys_together_and_is_shown_by_name(tmp_path):
    spec = write_spec(
        tmp_path / "spec.yaml",
        {
            "recipe": "toy",
            "points": [{"name": "dpop", "loss": "dpop", "loss_params": {"lam": 5.0}}],
            "grid": {
                "optimizer": [
                    {"name": "adam", "optimizer": "adam", "learning_rate": 0.001},
                    {"name": "sgd", "optimizer": "sgd", "learning_rate": 0.5},
                ],
                "loss_params.beta": [0.1, 0.3],
            },
            "seeds": [4],
        },
    )
    spec_object, folder = load_spec(spec, str(tmp_path / "out"))
    jobs = plan_jobs(spec_object, folder)
    assert [job.point.name for job in jobs] == [
        "dpop optimizer=adam loss_params.beta=0.1",
        "dpop optimizer=adam loss_params.beta=0.3",
        "dpop optimizer=sgd loss_params.beta=0.1",
        "dpop optimizer=sgd loss_params.beta=0.3",
    ]
    sgd = jobs[3]
    assert sgd.config["optimizer"] == "sgd" and sgd.config["learning_rate"] == 0.5 and sgd.config["seed"] == 4
    assert sgd.config["loss_params"] == {"lam": 5.0, "beta": 0.3}  # the point's and the grid's, merged
    assert sgd.point.coordinates == {"name": "dpop", "loss": "dpop", "loss_params": {"lam": 5.0},
                                     "optimizer": "sgd", "loss_params.beta": 0.3}  # fmt: skip


def test_a_run_that_fails_is_listed_and_the_others_go_on(tmp_path):
    # IPO under plain SGD at a huge learning rate diverges within a few steps: the toy lab stops it, naming the step.
    spec = write_spec(
        tmp_path / "spec.yaml",
        {
            "recipe": "toy",
            "base": {"steps": 20, "sft_max_steps": 50, "optimizer": "sgd"},
            "points": [
                {
                    "name": "diverges",
                    "loss": "ipo",
                    "loss_params": {"tau": 0.1, "length_normalized": False},
                    "learning_rate": 1.0e30,
                },  # fmt: skip
                {"name": "fine", "loss": "dpo", "learning_rate": 0.5},
            ],
            "seeds": [0],
        },
    )
    results = run_sweep(spec, tmp_path / "out", progress=False)
    assert [f["point"] for f in results["failures"]] == ["diverges"]
    assert "diverged at step" in results["failures"][0]["error"]
    rows = {row["point"]: row for row in results["points"]}
    assert rows["diverges"]["seeds_done"] == [] and rows["fine"]["seeds_done"] == [0]
    assert "Failed runs" in (tmp_path / "out" / "index.html").read_text()
