"""The accelerator of a run: one process, or what ``accelerate launch``/``torchrun`` set up (FSDP2 on CPU
included), and the dtype its forward passes compute in.
"""

from __future__ import annotations

import torch

from dpolab.train.config import TrainConfig
from dpolab.train.distributed import record_peers


def _reset_single_process_accelerate_state() -> None:
    """Accelerate keeps one process-wide state; let a second run in one process (a notebook, the tests)
    choose its own mixed precision. Never touched under ``accelerate launch``/``torchrun``."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)


def make_accelerator(config: TrainConfig):
    """An ``Accelerator`` for this launch: one process, or what ``accelerate launch``/``torchrun`` set up."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    _reset_single_process_accelerate_state()
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # The scheduler steps once per optimiser step (accelerate would otherwise step it once per process).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=precision, step_scheduler_with_optimizer=False
    )
    if _fsdp_requested_on_cpu(accelerator):
        _switch_to_fsdp(accelerator)
    set_seed(config.seed)
    record_peers(accelerator)  # while every process is alive: a survivor can then name the one that died
    return accelerator


def _fsdp_requested_on_cpu(accelerator) -> bool:
    import os

    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    return asked and accelerator.distributed_type == DistributedType.MULTI_CPU


def _switch_to_fsdp(accelerator) -> None:
    """accelerate sets up FSDP on accelerators only; on CPU it silently falls back to DDP. Torch's FSDP2
    (``fully_shard``) runs on gloo, so dpolab switches accelerate's state to FSDP with the plugin that
    ``accelerate launch --use_fsdp`` described (its environment variables). FSDP2 only: tested on 2 CPU
    processes (tests/train/test_distributed.py)."""
    import os

    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError("FSDP on CPU needs FSDP2: add --fsdp_version 2 to accelerate launch (or fsdp_version: 2)")
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def compute_dtype(accelerator, weights_dtype: torch.dtype) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, weights_dtype)
