"""Checkpoints that resume bitwise-exactly: written atomically, the last K kept.

A checkpoint is a folder ``output_dir/checkpoints/step-NNNNNNN`` holding:

- ``model.safetensors``: the trainable weights (the whole model, or the LoRA adapter's parameters);
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict``s (tensors and numbers only; loaded with
  ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects);
- ``rng.safetensors`` + ``rng.json``: Python, NumPy and torch (CPU and CUDA) generator states;
- ``state.json``: step, micro-batches consumed, counters, and the resolved config.

It is written to a temporary folder, every file fsynced, then renamed into place: a crash leaves
either the old set of checkpoints or the new one, never a partial folder under a step name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_rng_state(directory: Path) -> None:
    """Generator states as tensors (safetensors) and plain JSON: no pickle."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    save_file(tensors, str(directory / "rng.safetensors"))
    meta = {"python": [version, list(internal), gauss], "numpy": [kind, int(position), int(has_gauss), float(cached)]}
    (directory / "rng.json").write_text(json.dumps(meta))


def load_rng_state(directory: Path) -> None:
    tensors = load_file(str(directory / "rng.safetensors"))
    meta = json.loads((directory / "rng.json").read_text())
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, position, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (all, or only the adapter's with LoRA), detached, contiguous."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write the checkpoint of ``step`` atomically; keep the newest ``keep`` checkpoints."""
    weights = trainable_state(model)
    bad = [name for name, tensor in weights.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise FloatingPointError(f"refusing to write a checkpoint with non-finite weights ({bad[0]})")
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    temporary = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file(weights, str(temporary / "model.safetensors"))
    torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
    torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
    save_rng_state(temporary)
    (temporary / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for file in temporary.iterdir():
        _fsync(file)
    _fsync(temporary)
    if final.exists():  # the same step written again (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync(root)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``path``; return its state.json."""
    weights = load_file(str(path / "model.safetensors"))
    parameters = dict(model.named_parameters())
    missing = sorted(set(weights) ^ {n for n, p in parameters.items() if p.requires_grad})
    if missing:
        raise ValueError(f"{path}: checkpoint does not match the model (parameter {missing[0]!r})")
    with torch.no_grad():
        for name, tensor in weights.items():
            parameters[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    load_rng_state(path)
    return json.loads((path / "state.json").read_text())


# Keys whose change cannot change the trained weights: resuming with them changed is allowed.
HARMLESS_KEYS = frozenset(
    {
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
        "eval_data",
    }
)


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ and that would change the result."""
    keys = (set(saved) | set(current)) - HARMLESS_KEYS
    return sorted(k for k in keys if saved.get(k) != current.get(k))
