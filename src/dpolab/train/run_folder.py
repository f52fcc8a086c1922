"""The run folder: its lock, the decision between a new run, a resume and an overwrite (made by the main process
for all), the files written at the start (``config.yaml``, ``data_report.json``) and at the end (the final
model, ``summary.json``), and the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dpolab.outputs import write_json, write_text
from dpolab.train.checkpoint import check_process_count, config_differences, verify_checkpoint
from dpolab.train.config import TrainConfig, upgrade_saved_config
from dpolab.train.distributed import broadcast_object
from dpolab.train.guard import RunLock, prepare_output_dir
from dpolab.train.metrics import MetricsLog


@dataclass
class RunFolder:
    """``output_dir`` for one run: locked by the main process, the checkpoint to resume (if any), the log."""

    path: Path
    resume_from: Path | None
    log: MetricsLog
    lock: RunLock | None = None
    closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Release the lock and close the log; safe to call twice (every exit path calls it)."""
        if self.closed:
            return
        self.closed = True
        self.log.close()
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_run(config: TrainConfig, accelerator, resume: str | None, overwrite: bool) -> RunFolder:
    """Lock ``output_dir`` and decide what happens to an earlier run there; the main process decides for all."""
    out = Path(config.output_dir)
    decision: dict = {}
    lock = None
    if accelerator.is_main_process:
        try:
            lock, resume_from = prepare_output_dir(out, resume, overwrite)
            if resume_from is not None:
                state = verify_checkpoint(resume_from)
                # Here, before the data is read and tokenised: a refusal after minutes of work helps nobody.
                check_process_count(resume_from, state, accelerator.num_processes, out)
                saved = upgrade_saved_config(state.get("config", {}))
                changed = config_differences(saved, config.to_dict())
                if changed:
                    details = ", ".join(f"{k}: {saved.get(k)!r} → {config.to_dict().get(k)!r}" for k in changed)
                    raise ValueError(
                        f"cannot resume {resume_from}: the config changed in keys that change the result "
                        f"({details}); use a new output_dir or --overwrite"
                    )
            decision = {"resume_from": None if resume_from is None else str(resume_from)}
        except Exception as error:  # noqa: BLE001 - every process must hear of it, or the others wait forever
            if lock is not None:
                lock.release()
            decision = {"error": str(error), "type": type(error).__name__, "usage": isinstance(error, ValueError)}
    decision = broadcast_object(accelerator, decision)
    if "error" in decision:
        if decision["usage"]:
            raise ValueError(decision["error"])
        raise RuntimeError(f"{decision['type']}: {decision['error']}")
    accelerator.wait_for_everyone()
    try:
        log = MetricsLog(out, tensorboard=config.tensorboard, main=accelerator.is_main_process)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    resume_from = Path(decision["resume_from"]) if decision["resume_from"] else None
    return RunFolder(out, resume_from, log, lock)


def write_run_inputs(folder: RunFolder, accelerator, config: TrainConfig, data_report: dict) -> None:
    if accelerator.is_main_process:
        write_json(folder.path / "data_report.json", data_report, note=folder.log.info)
        write_text(folder.path / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


def log_skipped_rows(log: MetricsLog, bad_rows: list[str]) -> None:
    for reason in bad_rows[:10]:
        log.info(f"skipped {reason}")
    if len(bad_rows) > 10:
        log.info(f"skipped {len(bad_rows) - 10} more bad rows")


def announce(folder: RunFolder, accelerator, config: TrainConfig, command: str) -> None:
    folder.log.info(
        f"dpolab {command} → {folder.path} ({accelerator.device.type}, {config.dtype}, "
        f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value.lower()})"
    )


def write_summary(folder: RunFolder, accelerator, summary: dict) -> None:
    if accelerator.is_main_process:
        write_json(folder.path / "summary.json", summary, note=folder.log.info)
