"""Pieces shared by the benchmark scripts: run one contender in its own process, read ``--set`` values."""

from __future__ import annotations

import json
import os
import subprocess


def run_contender(command: list[str], name: str, env: dict | None = None) -> dict | None:
    """Run a worker process; the dict it printed on its ``RESULT`` line, or None (its error is printed)."""
    output = subprocess.run(
        command, capture_output=True, text=True, env=env or {**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    line = next((text for text in output.stdout.splitlines() if text.startswith("RESULT ")), None)
    if line is None:
        print(f"{name} failed:\n{output.stderr[-3000:]}")
        return None
    return json.loads(line[len("RESULT ") :])


def setting_value(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--set``: the value read as YAML (``true``, ``256``, ``segments``)."""
    import yaml

    key, equals, value = item.partition("=")
    if not equals or not key:
        raise SystemExit(f"--set {item}: expected KEY=VALUE, e.g. attention_kernel=dense")
    return key, yaml.safe_load(value)
