"""The dpolab command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from dpolab.losses import LOSSES


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpolab", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "losses" in result.stdout and "usage: dpolab" in result.stdout


def test_losses_table_lists_every_loss_with_its_defaults():
    result = run_cli("losses", "--width", "250")
    assert result.returncode == 0, result.stderr
    for name in LOSSES:
        assert name in result.stdout, name
    assert "lam=50" in result.stdout  # DPOP's λ default
    assert "beta_rejected=0.1" in result.stdout


def test_losses_json_is_machine_readable():
    result = run_cli("losses", "--format", "json")
    rows = json.loads(result.stdout)
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) == set(LOSSES)
    assert by_name["dpop"]["parameters"] == {"beta": 0.1, "lam": 50.0}
    assert by_name["dpo"]["aliases"] == ["sigmoid"]
    assert by_name["simpo"]["reference"] is False


def test_unknown_command_and_bad_format_fail_with_usage():
    assert run_cli("nonsense").returncode == 2
    result = run_cli("losses", "--format", "xml")
    assert result.returncode == 2 and "invalid choice" in result.stderr
