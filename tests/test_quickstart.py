"""`dpolab quickstart --size small` end to end, as `make demo` runs it (the full size is documented)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "quickstart", "--size", "small", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_prints_the_table_and_the_report_path(quickstart):
    out, result = quickstart
    for header in ("model", "accuracy", "chosen log-ratio", "rejected log-ratio", "margin"):
        assert header in result.stdout
    for model in ("sft", "dpo", "dpop", "dpo_high_edit"):
        assert f"│ {model} " in result.stdout
    assert f"report: {out / 'report.html'}\n" in result.stdout


def test_the_small_run_shows_the_smaug_direction(quickstart):
    # The Smaug claim at the small size (measured: DPO −1.64, DPOP +0.17, DPO on high-edit pairs −0.81 nats):
    # on low-edit pairs DPO lowers the held-out chosen log-likelihood, DPOP keeps it higher, and high-edit
    # pairs cost the chosen side less than low-edit ones.
    out, _ = quickstart
    results = json.loads((out / "results.json").read_text())
    rows = {row["model"]: row for row in results["table"]}
    assert set(rows) == {"sft", "dpo", "dpop", "dpo_high_edit"}
    assert rows["dpo"]["chosen_logratio"] < -0.5
    assert rows["dpop"]["chosen_logratio"] > rows["dpo"]["chosen_logratio"] + 1.0
    assert rows["dpo_high_edit"]["chosen_logratio"] > rows["dpo"]["chosen_logratio"]
    # DPO still wins its objective on the low-edit pairs: the rejected side falls further.
    assert rows["dpo"]["rejected_logratio"] < rows["dpo"]["chosen_logratio"] and rows["dpo"]["reward_accuracy"] > 0.5
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and all(
            math.isfinite(row[k]) for k in ("chosen_logratio", "rejected_logratio")
        )
    # The pair sets differ as designed: corrupted one number vs a different wrong solution.
    stats = results["data"]["edit_stats"]
    assert stats["low_edit"]["char_distance"]["mean"] < 0.1 < 0.3 < stats["high_edit"]["char_distance"]["mean"]


def test_the_report_opens_with_the_results_table(quickstart):
    out, result = quickstart
    report = (out / "report.html").read_text()
    table = report.index("<h2>Results</h2>")
    assert table < report.index("<img")  # before the training curves
    for model in ("sft", "dpo", "dpop", "dpo_high_edit"):
        assert f"<tr><td>{model}</td>" in report[table:]
    assert "size small is a check of the whole pipeline" in report and "size small" in result.stdout


def test_held_out_problems_and_pairs_are_disjoint_from_sft(quickstart):
    out, _ = quickstart
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    sft = {row["prompt"] for row in read(out / "data" / "sft.jsonl")}
    pairs = {row["prompt"] for kind in ("low_edit", "high_edit") for split in ("train", "eval")
             for row in read(out / "data" / kind / f"{split}.jsonl")}  # fmt: skip
    problems = {row["question"] + "\n" for row in read(out / "data" / "eval_problems.jsonl")}
    assert not sft & pairs and not sft & problems and not pairs & problems
    train = {row["prompt"] for row in read(out / "data" / "low_edit" / "train.jsonl")}
    held_out = {row["prompt"] for row in read(out / "data" / "low_edit" / "eval.jsonl")}
    assert not train & held_out


def test_every_model_directory_loads_with_from_pretrained(quickstart):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = quickstart
    for path in [out / "model" / "init"] + [
        out / "runs" / n / "model" for n in ("sft", "dpo", "dpop", "dpo_high_edit")
    ]:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "llama" and tokenizer.eos_token == "<eos>"
    report = (out / "report.html").read_text()
    assert "dpolab quickstart" in report and report.count("<img") >= 3


def test_refuses_to_replace_an_earlier_quickstart_without_overwrite(quickstart):
    out, _ = quickstart
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "quickstart", "--size", "small", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (out / "results.json").exists()  # nothing was deleted


def test_never_deletes_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("precious")
    from dpolab.quickstart import run_quickstart

    with pytest.raises(ValueError, match="is not a quickstart folder"):
        run_quickstart(tmp_path, "small", overwrite=True, progress=False)
    assert (tmp_path / "data" / "mine.txt").read_text() == "precious"
