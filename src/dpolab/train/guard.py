"""What keeps a run safe: stop signals, non-finite guards, and output folders that are never clobbered."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dpolab.train.checkpoint import latest_checkpoint


class NonFiniteError(RuntimeError):
    """NaN or inf in the loss or the gradients; the message names the step and the data rows."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: the current step was finished and a checkpoint written."""

    def __init__(self, signum: int) -> None:
        self.signal = signum
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@dataclass
class StopFlag:
    signal: int = 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


@contextmanager
def catch_stop_signals():
    """While active, SIGINT and SIGTERM only set a flag: the loop finishes its step, checkpoints, then stops."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        flag.signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


class RunLock:
    """An exclusive lock on ``output_dir/.lock`` (released at exit, even after SIGKILL)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".lock"
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise ValueError(f"output_dir {directory} is in use by another run (pid {holder})") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


RUN_OUTPUTS = (
    "metrics.jsonl",
    "summary.json",
    "checkpoints",
    "tensorboard",
    "model",
    "config.yaml",
    "data_report.json",
)


def prepare_output_dir(out: Path, resume: str | None, overwrite: bool, main: bool = True):
    """Lock ``out`` and decide what happens to what is already there. Returns (lock, checkpoint to resume or None).

    - a finished run (summary.json) is not overwritten without ``overwrite``;
    - an unfinished one (checkpoints, no summary) needs ``resume`` or ``overwrite``;
    - ``resume="latest"`` takes the newest checkpoint, or a path names one.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out) if main else None
    try:
        finished = (out / "summary.json").exists()
        started = (out / "metrics.jsonl").exists() or latest_checkpoint(out) is not None
        if resume:
            checkpoint = latest_checkpoint(out) if resume == "latest" else Path(resume)
            if checkpoint is None:
                raise ValueError(f"nothing to resume: {out} has no checkpoint")
            if not (checkpoint / "state.json").exists():
                raise ValueError(f"{checkpoint} is not a dpolab checkpoint (no state.json)")
            if finished:
                (out / "summary.json").unlink()  # it is being continued; a new summary will be written
            return lock, checkpoint
        if overwrite:
            for name in RUN_OUTPUTS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            return lock, None
        if finished:
            raise ValueError(f"output_dir {out} holds a finished run; pass --overwrite to replace it")
        if started:
            raise ValueError(
                f"output_dir {out} holds an unfinished run; pass --resume to continue it or --overwrite to start again"
            )
        return lock, None
    except BaseException:
        if lock:
            lock.release()
        raise
