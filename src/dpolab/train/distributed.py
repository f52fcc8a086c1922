"""Collectives the recipes need, written once: sums and row gathers across processes, and agreement on flags.

With one process every function is the identity, so a recipe reads the same with or without
``accelerate launch``/``torchrun``.
"""

from __future__ import annotations

import torch


def sum_across(accelerator, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over every process (float64, so counts and sums stay exact)."""
    if accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


def max_across(accelerator, values: list[float]) -> list[float]:
    """Element-wise maximum of ``values`` over every process (a minimum is the maximum of the negated value)."""
    if accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)  # accelerate reduces by sum or mean only
    return tensor.tolist()


def any_across(accelerator, flag: bool) -> bool:
    """True if ``flag`` is true on any process (a stop signal, a non-finite loss)."""
    return sum_across(accelerator, [float(flag)])[0] > 0


def gather_rows(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's rows (first dimension, any length), in process order, on every process."""
    if accelerator.num_processes == 1:
        return tensor
    counts = [int(c) for c in sum_across_each(accelerator, tensor.shape[0])]
    padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=accelerator.device)
    padded[: tensor.shape[0]] = tensor.to(accelerator.device)
    gathered = accelerator.gather(padded).reshape(len(counts), max(counts), *tensor.shape[1:])
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])


def sum_across_each(accelerator, value: int) -> list[int]:
    """Every process's ``value``, in process order."""
    slots = [0.0] * accelerator.num_processes
    slots[accelerator.process_index] = float(value)
    return [int(v) for v in sum_across(accelerator, slots)]


def broadcast_object(accelerator, value):
    """The main process's ``value`` on every process (a decision, a path, an error message)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]
