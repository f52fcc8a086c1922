"""Run outputs: metrics.jsonl (every logged step), TensorBoard events, console lines, progress bars."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


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
            console.print(message, highlight=False, markup=False)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.main:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in values.items()}
        self.handle.write(json.dumps({"step": step, **clean}) + "\n")
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
            f"ALARM at step {alarm['step']}: {alarm['alarm']}: {alarm['message']}\n  remedy: {alarm['remedy']}",
            style="bold red",
            highlight=False,
            markup=False,
        )
        self.handle.write(json.dumps(alarm) + "\n")
        self.handle.flush()
        if self.writer is not None:
            self.writer.add_text(
                "alarms", f"{alarm['alarm']}: {alarm['message']} — remedy: {alarm['remedy']}", alarm["step"]
            )

    def truncate_after(self, step: int, final: bool = False) -> None:
        """Drop lines logged after the checkpoint of ``step`` (a resumed run redoes those steps).

        ``final``: ``step`` was the last one, so its evaluation came after the checkpoint and is redone too.
        """
        if not self.main:
            return
        self.handle.close()
        lines = self.path.read_text().splitlines() if self.path.exists() else []

        def before_checkpoint(row: dict) -> bool:
            at = row.get("step", 0)
            return at < step or (at == step and not (final and any(k.startswith("eval/") for k in row)))

        kept = [line for line in lines if line.strip() and before_checkpoint(json.loads(line))]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.handle = open(self.path, "a")

    def close(self) -> None:
        if self.handle:
            self.handle.close()
        if self.writer is not None:
            self.writer.close()


@contextmanager
def progress_bar(enabled: bool, description: str, total: int, show_metrics: bool = False):
    """Yields ``advance(n=1, **metrics)``; a rich bar with ETA (and loss/margin/accuracy) when enabled."""
    if not enabled:
        yield lambda *args, **kwargs: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    if show_metrics:
        columns.append(TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, completed: int | None = None, **metrics) -> None:
            status = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            if completed is not None:
                progress.update(task, completed=completed, status=status)
            else:
                progress.update(task, advance=n, status=status)

        yield advance
