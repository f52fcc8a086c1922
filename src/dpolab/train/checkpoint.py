"""Checkpoints that resume bitwise-exactly, on one process or many: every stateful component, registered once.

A checkpoint is a folder ``output_dir/checkpoints/step-NNNNNNN`` holding:

- what accelerate's ``save_state`` writes for the prepared model, optimiser and scheduler and for each
  process's random generators (Python, NumPy, torch CPU and CUDA): ``model.safetensors`` (with LoRA:
  the adapter's parameters only), ``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl``;
  under FSDP the model and optimiser state are sharded folders written by every process. accelerate
  reads these back with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects;
- ``state.json``: the step, the number of processes, the resolved config, and the ``state_dict()`` of
  every other registered component (data position, counters, the 3D monitor, …) as JSON.

Every process writes into a temporary folder; after all have finished, the main process fsyncs every
file and renames the folder into place, so a crash leaves either the old set of checkpoints or the new
one, never a partial folder under a step name. The newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

import torch

from dpolab.outputs import exact_dumps, exact_loads
from dpolab.train.distributed import any_across

PREFIX = "step-"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.exists():
        return []
    # A checkpoint folder appears under its step name only once complete (written as .tmp-…, then renamed): a
    # step folder without its state.json is a damaged checkpoint, named as such when it is resumed, not skipped.
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_state(path: Path) -> dict:
    """A checkpoint's state.json; ``ValueError`` naming the file when it is missing or unreadable."""
    file = path / "state.json"
    try:
        state = exact_loads(file.read_text())
    except FileNotFoundError:
        if path.parent.name == "checkpoints" and path.name.startswith(PREFIX):
            raise DamagedCheckpoint(path, file, "the file is missing") from None
        raise ValueError(f"{path} is not a dpolab checkpoint (no state.json)") from None
    except (OSError, ValueError) as error:
        raise DamagedCheckpoint(path, file, error) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise DamagedCheckpoint(path, file, "not a checkpoint state")
    return state


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk); the partial folder is removed."""


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read (a truncated copy, a full disk); names it and an older checkpoint."""

    def __init__(self, checkpoint: Path, file: Path, error: object) -> None:
        older = [c for c in list_checkpoints(checkpoint.parent.parent) if c.name < checkpoint.name]
        detail = " ".join(str(error).split())[:200]
        advice = (
            f"resume from the one before it with --resume {older[-1]}"
            if older
            else "there is no earlier checkpoint: start again with --overwrite"
        )
        name = file.relative_to(checkpoint).as_posix() if checkpoint in file.parents else file.name
        super().__init__(f"checkpoint {checkpoint} is damaged: {name} cannot be read ({detail}); {advice}")


def verify_checkpoint(path: Path) -> dict:
    """Open every file of a checkpoint far enough to notice truncation, before anything is restored.

    state.json is parsed; every file it lists (checkpoints written since December 2026) must be there with the
    size it was written with; safetensors headers are checked against the file size; torch files (zip
    archives) must have their central directory, which sits at the end. An older checkpoint without the
    list must at least hold its weights: ``model.safetensors``, or FSDP's ``pytorch_model_fsdp_0/``. Returns
    the state.
    """
    import zipfile

    from safetensors import safe_open

    state = read_state(path)
    listed = state.get("files")
    if isinstance(listed, dict):
        for name, size in listed.items():
            file = path / name
            if not file.is_file():
                raise DamagedCheckpoint(path, file, "the file is missing")
            if file.stat().st_size != size:
                raise DamagedCheckpoint(path, file, f"{file.stat().st_size} bytes, written with {size}")
    elif not any(path.glob("pytorch_model_fsdp_*")) and not (path / "model.safetensors").exists():
        raise DamagedCheckpoint(path, path / "model.safetensors", "the file is missing")
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as handle:
                    handle.keys()
            elif file.suffix in (".bin", ".pkl", ".pt"):
                with zipfile.ZipFile(file) as archive:
                    archive.namelist()
        except Exception as error:  # noqa: BLE001 - any failure to open means the same to the user
            raise DamagedCheckpoint(path, file, error) from None
    return state


def _corrupt_file(path: Path) -> Path | None:
    """The file of the checkpoint ``path`` whose bytes changed after it was written (same size, other content),
    found when a restore has failed: each torch file's zip entries are read against their CRC-32. Read only
    on failure, since it reads every byte."""
    import zipfile

    for file in sorted(path.rglob("*")):
        if file.suffix not in (".bin", ".pkl", ".pt"):
            continue
        try:
            with zipfile.ZipFile(file) as archive:
                if archive.testzip() is not None:
                    return file
        except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
            return file
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(directory)


# The command of each task (config.task), to name in a command to run.


def check_process_count(path: Path, state: dict, processes: int, output_dir: str | Path) -> None:
    """``ValueError`` when the checkpoint ``path`` (its ``state``) was written by another number of processes
    than ``processes``, with the command that resumes it on this machine: torchrun works everywhere; accelerate
    launch runs several processes only on as many GPUs (on CPU only with --cpu, which dpolab hands to torchrun)."""
    saved = state.get("num_processes", 1)
    if saved == processes:
        return
    from dpolab.train.registry import RECIPES

    task = state.get("config", {}).get("task")
    command = RECIPES[task].command if task in RECIPES else "train"
    arguments = f"{command} {Path(output_dir) / 'config.yaml'} --resume"
    if saved == 1:
        relaunch = f"dpolab {arguments}"
    elif torch.cuda.is_available() and torch.cuda.device_count() >= saved:
        relaunch = (
            f"accelerate launch --num_processes {saved} -m dpolab {arguments} "
            f"(or torchrun --standalone --nproc_per_node {saved} -m dpolab {arguments})"
        )
    else:
        relaunch = (
            f"torchrun --standalone --nproc_per_node {saved} -m dpolab {arguments} "
            f"(or accelerate launch --cpu --num_processes {saved} -m dpolab {arguments})"
        )
    raise ValueError(
        f"{path} was written by {saved} process(es) and this run has {processes}: exact resume needs the same "
        f"number; relaunch with {saved}: {relaunch}; or start a new run in a new output_dir"
    )


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """This process's values of a parameter (its shard under FSDP2, where parameters are DTensors)."""
    data = parameter.detach()
    return data.to_local() if hasattr(data, "to_local") else data


class Checkpointer:
    """Saves and restores a run: the accelerator's prepared objects plus named :class:`Stateful` components.

    ``trainable_only``: write only the parameters that train (LoRA adapters), not the frozen base (not under
    FSDP, whose sharded checkpoints hold the whole model).
    """

    def __init__(self, accelerator, output_dir: str | Path, keep: int, model, trainable_only: bool = False) -> None:
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.keep = keep
        self.model = model
        self.components: dict[str, Stateful] = {}
        self.trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        # Under FSDP accelerate writes sharded folders of the whole model; the filter applies to model.safetensors.
        self.trainable_only = trainable_only and accelerator.distributed_type.value != "FSDP"
        if trainable_only:
            accelerator.register_save_state_pre_hook(self._keep_trainable)

    def register(self, name: str, component: Stateful) -> None:
        if name in self.components:
            raise ValueError(f"a component named {name!r} is already registered")
        self.components[name] = component

    def _keep_trainable(self, models, weights, output_dir) -> None:  # noqa: ARG002 - accelerate's hook signature
        for state in weights:
            for name in [n for n in state if n not in self.trainable]:
                del state[name]

    def save(self, step: int, config: dict) -> Path:
        """Write the checkpoint of ``step`` (every process calls this); returns its final path."""
        finite = all(bool(torch.isfinite(_local(p)).all()) for p in self.model.parameters() if p.requires_grad)
        if any_across(self.accelerator, not finite):
            raise FloatingPointError("refusing to write a checkpoint with non-finite weights")
        root = checkpoint_root(self.output_dir)
        final = root / f"{PREFIX}{step:07d}"
        temporary = root / f".tmp-{final.name}"
        if self.accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
        self.accelerator.wait_for_everyone()
        from safetensors import SafetensorError

        try:
            self.accelerator.save_state(str(temporary), safe_serialization=True)
        except (OSError, RuntimeError, SafetensorError) as error:  # a full disk: torch's and safetensors' writers
            shutil.rmtree(temporary, ignore_errors=True)
            detail = " ".join(str(error).split())[:200]
            raise CheckpointWriteError(
                f"cannot write the checkpoint of step {step} in {root} ({detail}); is the disk full? "
                "Earlier checkpoints are untouched"
            ) from None
        state = {
            "step": step,
            "num_processes": self.accelerator.num_processes,
            "components": {name: component.state_dict() for name, component in self.components.items()},
            "config": config,
        }
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            # Every file of the checkpoint with its size: a resume names a missing or truncated one, whatever the
            # format (model.safetensors, or FSDP's sharded folders), before anything is restored.
            state["files"] = {
                file.relative_to(temporary).as_posix(): file.stat().st_size
                for file in sorted(temporary.rglob("*"))
                if file.is_file()
            }
            (temporary / "state.json").write_text(exact_dumps(state, indent=2))
            _fsync_tree(temporary)
            if final.exists():  # the same step written again (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(temporary, final)
            _fsync(root)
            for old in list_checkpoints(self.output_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in root.glob(".tmp-*"):  # left by a run killed while writing
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def load(self, path: Path) -> dict:
        """Restore everything saved in ``path``; returns its state.json. Same number of processes required."""
        state = read_state(path)
        if "components" not in state:
            raise ValueError(
                f"{path} was written by an older dpolab (before accelerate checkpoints) and cannot be resumed; "
                "start a new run from its weights or from the original model"
            )
        check_process_count(path, state, self.accelerator.num_processes, self.output_dir)
        if self.trainable_only:
            self._check_trainable_saved(path)
        missing = sorted(set(self.components) - set(state["components"]))
        if missing:
            raise ValueError(f"{path}: checkpoint has no state for {missing[0]!r}")
        for name, component in self.components.items():  # first: a component may refuse the resume
            component.load_state_dict(state["components"][name])
        try:
            self.accelerator.load_state(str(path), strict=not self.trainable_only)
        except (OSError, RuntimeError, ValueError, EOFError) as error:  # e.g. a damaged FSDP shard
            raise DamagedCheckpoint(path, _corrupt_file(path) or path, error) from None
        return state

    def _check_trainable_saved(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            saved = set(handle.keys())
        if saved != self.trainable:
            name = sorted(saved ^ self.trainable)[0]
            raise ValueError(f"{path}: checkpoint does not match the model (parameter {name!r})")


# Keys whose change cannot change the trained weights: resuming with them changed is allowed.
HARMLESS_KEYS = frozenset(
    {
        "max_row_bytes",  # a limit on reading; rows it changes change the data fingerprint, which is compared
        "logging_steps",
        "eval_steps",
        "progress",
        "tensorboard",
        "cache_dir",
        "checkpoint_steps",
        "keep_checkpoints",
        "save_model",
        "output_dir",
        "max_nonfinite",
        "threads",  # changes the rounding of CPU reductions only (bitwise resume needs the same count)
        "skip_nonfinite",  # a run that went on without it met no non-finite batch, so the result is the same
        "eval_data",
        "eval_harness",  # evaluates in eval mode and restores every random generator it seeds
    }
)


PATH_KEYS = ("model", "tokenizer", "reference", "data", "eval_data")
# What a key added later meant in checkpoints written before it existed.
# What a checkpoint written before a key existed ran with (the engine options: issue 16's dense mask, full head).
LEGACY_DEFAULTS = {
    "truncation_mode": "drop",
    "max_prompt_length": None,
    "attention_kernel": "dense",
    "logit_chunk_tokens": 0,
    "gradient_checkpointing": False,
    "compile": False,
}


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ and that would change the result.

    Paths compare as the files they name (checkpoints of older versions hold them relative to where
    the run started; newer ones absolute)."""
    keys = (set(saved) | set(current)) - HARMLESS_KEYS

    def same(key: str) -> bool:
        before, now = saved.get(key, LEGACY_DEFAULTS.get(key)), current.get(key)
        if before == now:
            return True
        if key in PATH_KEYS and isinstance(before, str) and isinstance(now, str):
            return Path(before).expanduser().absolute() == Path(now).expanduser().absolute()
        return False

    return sorted(k for k in keys if not same(k))
