"""The GPU benchmark's smoke run: the whole script (workspace, every contender, the table) on CPU with a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_every_contender_and_prints_the_table(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_dpo.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"dpolab", "dpolab-gc", "trl", "trl-precompute"}
    for name, values in results.items():
        assert values["timed_seconds"] > 0 and values["peak_memory_mib"] > 0, name
        assert f"| {name} |" in result.stdout
    assert results["dpolab"]["forward"] == "packed" and results["dpolab"]["attention_kernel"] == "segments"
    assert "| dpolab ÷ trl |" in result.stdout and "| dpolab ÷ trl-precompute |" in result.stdout
