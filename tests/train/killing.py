"""A run killed with SIGKILL after a given checkpoint, then resumed: the shared part of the resume tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_to_end(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_after_checkpoint_then_resume(command, out: Path, checkpoint: str) -> subprocess.CompletedProcess:
    """Start ``command(out)``, SIGKILL it once ``out/checkpoints/<checkpoint>`` exists (before the run ends), then
    run ``command(out, "--resume")`` to the end; the resumed run's result."""
    process = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not (out / "checkpoints" / checkpoint).exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists(), "the kill must land before the end"
    resumed = run_to_end(command(out, "--resume"))
    assert "resumed from" in resumed.stderr
    return resumed
