"""Edit statistics: exact values on small cases; real data sets land where they should; CLI outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpolab.data.edit_stats import edit_stats
from tests.paths import DATA as SHARED  # noqa: E402
from tests.tiny import tiny_tokenizer


def test_exact_values():
    stats = edit_stats(["abcd", "same", "xyz"], ["abXd", "same", "xyzw"])
    assert stats.char_distance == pytest.approx([0.25, 0.0, 0.25])
    assert stats.first_difference == [2, 4, 3]
    assert stats.first_difference_relative == pytest.approx([0.5, 1.0, 0.75])
    summary = stats.summary()
    assert summary["pairs"] == 3 and summary["char_distance"]["share_below"]["0.1"] == pytest.approx(1 / 3)


def test_token_distance_uses_the_tokenizer():
    stats = edit_stats(["two plus two is four"], ["two plus two is nine"], tiny_tokenizer())
    assert 0 < stats.token_distance[0] < 1
    with pytest.raises(ValueError, match="equally many"):
        edit_stats(["a"], [])


def test_cli_on_real_data_low_and_high_edit(tmp_path):
    pairs = tmp_path / "gsm8k_pairs.jsonl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dpolab",
            "data",
            "corrupt-math",
            str(SHARED / "gsm8k" / "train.jsonl"),
            "--out",
            str(pairs),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    results = {}
    for name, source in (("gsm8k", pairs), ("hh", SHARED / "hh-rlhf" / "harmless_base_test_part.jsonl")):
        out = tmp_path / name
        result = subprocess.run(
            [sys.executable, "-m", "dpolab", "data", "edit-stats", str(source), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert (out / "histogram.png").stat().st_size > 10_000
        results[name] = json.loads((out / "summary.json").read_text())
    # Measured: corrupted GSM8K mean 0.0108 (all pairs below 0.1); HH-RLHF mean 0.778, differing at the start.
    assert results["gsm8k"]["char_distance"]["mean"] < 0.03
    assert results["gsm8k"]["char_distance"]["share_below"]["0.1"] == 1.0
    assert results["hh"]["char_distance"]["mean"] > 0.5 and results["hh"]["pairs"] == 1796
    assert results["hh"]["first_difference_relative"]["median"] < 0.05


def test_cli_without_usable_pairs_is_one_error(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"prompt": "Q", "chosen": "a"}) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "data", "edit-stats", str(source), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"dpolab data: error: {source}: no usable pairs (1 bad rows)"
