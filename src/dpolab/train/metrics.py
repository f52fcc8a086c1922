"""Run outputs: metrics.jsonl (every logged step), TensorBoard events, console lines (via :mod:`dpolab.console`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dpolab.console import console, printable
from dpolab.outputs import dumps


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, directory: Path, tensorboard: bool = True, main: bool = True) -> None:
        self.main = main
        self.path = directory / "metrics.jsonl"
        self.handle = open(self.path, "a") if main else None
        self.writer = None
        if main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(directory / "tensorboard"))
            except ImportError:
                self.info(
                    "TensorBoard events skipped: install the tensorboard package (pip install dpolab[tensorboard])"
                )

    def info(self, message: str) -> None:
        if self.main:
            console.print(printable(message, keep_newlines=True), highlight=False, markup=False)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.main:
            return
        # Strict JSON: a non-finite value (a skipped batch's loss) is null, and the log says which
        self.handle.write(dumps({"step": step, **values}, self.info, source=f"metrics.jsonl, step {step}") + "\n")
        self.handle.flush()
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(name, value, step)

    def alarm(self, alarm: dict) -> None:
        """An alarm: on the console (with its remedy) and as its own line in metrics.jsonl."""
        if not self.main:
            return
        console.print(
            printable(
                f"ALARM at step {alarm['step']}: {alarm['alarm']}: {alarm['message']}\n  remedy: {alarm['remedy']}",
                keep_newlines=True,
            ),
            style="bold red",
            highlight=False,
            markup=False,
        )
        self.handle.write(dumps(alarm, self.info, source="metrics.jsonl") + "\n")
        self.handle.flush()
        if self.writer is not None:
            self.writer.add_text(
                "alarms", f"{alarm['alarm']}: {alarm['message']} — remedy: {alarm['remedy']}", alarm["step"]
            )

    def truncate_after(self, step: int, final: bool = False) -> None:
        """Drop lines logged after the checkpoint of ``step`` (a resumed run redoes those steps).

        ``final``: an evaluation logged at ``step`` came after the checkpoint (the run's last step, or an alarm
        stop) and is redone too. A torn line (the process was killed mid-write) is dropped: it belongs to a step
        after the checkpoint, since lines are flushed before a checkpoint is written.
        """
        if not self.main:
            return
        self.handle.close()
        lines = self.path.read_text().splitlines() if self.path.exists() else []

        def before_checkpoint(row: dict) -> bool:
            at = row.get("step", 0)
            return at < step or (at == step and not (final and any(k.startswith("eval/") for k in row)))

        kept = [line for line in lines if (row := parse_line(line)) is not None and before_checkpoint(row)]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.handle = open(self.path, "a")

    def close(self) -> None:
        if self.handle:
            self.handle.close()
        if self.writer is not None:
            self.writer.close()


def parse_line(line: str) -> dict | None:
    """One metrics.jsonl line as a dict, or None for a blank or torn line."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The rows of a metrics.jsonl, and how many lines were unreadable (torn by a kill mid-write)."""
    rows, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        row = parse_line(line)
        if row is None:
            torn += 1
        else:
            rows.append(row)
    return rows, torn
