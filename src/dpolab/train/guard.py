"""What keeps a run safe: stop signals, non-finite guards, and output folders that are never clobbered."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dpolab.outputs import LOCK_MARK
from dpolab.train.checkpoint import latest_checkpoint


class NonFiniteError(RuntimeError):
    """NaN or inf in the loss or the gradients; the message names the step and the data rows."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM/SIGHUP: the current step was finished and a checkpoint written."""

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
    """While active, SIGINT, SIGTERM and SIGHUP only set a flag: the loop finishes its step, checkpoints, then stops."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        flag.signal = signum

    # SIGHUP: the terminal closed; without a handler the run would die without a checkpoint.
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
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
            holder = self.handle.read().strip().removeprefix(LOCK_MARK) or "unknown"
            self.handle.close()
            raise ValueError(f"output_dir {directory} is in use by another run (pid {holder})") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{LOCK_MARK}{os.getpid()}")  # marked: other tools (pytest) name their locks .lock too
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
    - an unfinished one (a checkpoint, no summary) needs ``resume`` or ``overwrite``;
    - an attempt that stopped before its first checkpoint (a bad row, a kill during the reference pass, a full
      disk) left nothing to resume: a new run replaces its outputs, saying so;
    - ``resume="latest"`` takes the newest checkpoint, or a path names one.

    Temporary checkpoint folders of a run killed while writing one are removed (the lock is held).
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out) if main else None
    try:
        for stale in (out / "checkpoints").glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        finished = (out / "summary.json").exists()
        checkpoint = latest_checkpoint(out)
        if resume:
            if resume != "latest":
                checkpoint = Path(resume)
            if checkpoint is None:
                raise ValueError(
                    f"nothing to resume: {out} has no checkpoint (an earlier attempt stopped before its first one); "
                    "run again without --resume to start over"
                )
            if not checkpoint.is_dir():
                raise ValueError(f"--resume: no such checkpoint folder: {checkpoint}")
            if finished:
                (out / "summary.json").unlink()  # it is being continued; a new summary will be written
            return lock, checkpoint
        if finished and not overwrite:
            raise ValueError(f"output_dir {out} holds a finished run; pass --overwrite to replace it")
        if checkpoint is not None and not overwrite:
            raise ValueError(
                f"output_dir {out} holds an unfinished run; pass --resume to continue it or --overwrite to start again"
            )
        # config.yaml stays: it may be the file this run was started from, and the run writes it again
        leftovers = [name for name in RUN_OUTPUTS if name != "config.yaml" and (out / name).exists()]
        if leftovers and not overwrite:
            print(
                f"note: {out} holds the outputs of an attempt that stopped before its first checkpoint "
                f"({', '.join(leftovers)}); starting over",
                file=sys.stderr,
            )
        for name in leftovers:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        return lock, None
    except BaseException:
        if lock:
            lock.release()
        raise
