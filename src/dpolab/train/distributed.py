"""Collectives the recipes need, written once: sums and row gathers across processes, and agreement on flags.

With one process every function is the identity, so a recipe reads the same with or without
``accelerate launch``/``torchrun``.
"""

from __future__ import annotations

from contextlib import contextmanager

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


# --- a process that dies ------------------------------------------------------------------------

# (hostname, pid) of every process, by rank, recorded at start-up while all are alive: once one is gone, the
# survivors can name it. Empty with one process.
PEERS: list[tuple[str, int]] = []


def record_peers(accelerator) -> None:
    """Gather every process's (hostname, pid) into :data:`PEERS`."""
    import os
    import socket

    PEERS.clear()
    if accelerator.num_processes > 1:
        table: list = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(table, (socket.gethostname(), os.getpid()))
        PEERS.extend(tuple(entry) for entry in table)


class PeerLost(RuntimeError):
    """Another process of the run died (killed, out of memory): this one cannot go on without it.

    ``who`` names it (its rank, and its pid and host when known); ``checkpoint`` is the newest checkpoint of
    ``output_dir`` (None before the first), set by :func:`stop_when_a_peer_dies`.
    """

    def __init__(self, who: str, checkpoint=None) -> None:
        self.who, self.checkpoint = who, checkpoint
        advice = f"resume from {checkpoint} with --resume" if checkpoint else "no checkpoint yet: start again"
        super().__init__(f"{who}; this process stops too; {advice}")


def _gone(pid: int) -> bool:
    """True if ``pid`` no longer runs; a zombie (dead, its launcher has not collected it yet) counts as gone."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def lost_peer(wait: float = 0.0, remote: bool = True) -> str | None:
    """Which other process of the run is gone: the first on this host found dead within ``wait`` seconds
    (its socket closes a moment before its pid is gone); else, with ``remote``, the processes on other hosts,
    which cannot be checked from here; None when none is known to be gone."""
    import os
    import socket
    import time

    if not PEERS:
        return None
    here, me = socket.gethostname(), os.getpid()
    local = [(rank, pid) for rank, (host, pid) in enumerate(PEERS) if host == here and pid != me]
    deadline = time.monotonic() + wait
    while True:
        for rank, pid in local:
            if _gone(pid):
                return f"process rank {rank} of {len(PEERS)} (pid {pid} on host {here}) died"
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    hosts = sorted({host for host, _ in PEERS if host != here})
    if remote and hosts:
        return f"a process on host {' or '.join(hosts)} died or lost its connection"
    return None


def _collective_failure(error: BaseException | None) -> bool:
    """Whether ``error`` (or what it was raised from) is a collective that failed: gloo and NCCL raise plain
    RuntimeErrors naming themselves or the closed connection; torch's own are DistError."""
    markers = ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer", "Broken pipe")
    for _ in range(8):  # a few links of the chain: a recipe may have wrapped it (a checkpoint write)
        if error is None:
            return False
        if isinstance(error, PeerLost) or any(kind.__name__ == "DistError" for kind in type(error).__mro__):
            return True
        if isinstance(error, RuntimeError) and any(marker in str(error) for marker in markers):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def stop_when_a_peer_dies(newest_checkpoint):
    """Turn the death of another process into :class:`PeerLost`, which names it and the checkpoint to resume
    from (``newest_checkpoint()``, or None), instead of the error of whichever collective noticed it.

    Under torchrun the launcher sends SIGTERM to the survivors as soon as it sees a worker die: outside the
    training loop (which only flags signals) that would end this process before it could say why, so while
    this is active a SIGTERM that comes after a peer's death raises :class:`PeerLost`, and any other SIGTERM
    ends the process as it always did. Once a peer is known lost, SIGTERM stays ignored: the process is
    about to exit with its message, and the launcher would otherwise cut it short.
    """
    import os
    import signal
    import threading

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_terminate(signum, frame):  # noqa: ARG001 - signal handler signature
        who = lost_peer(remote=False)
        if who is None:  # a SIGTERM of its own: end as without this handler
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise PeerLost(who)

    previous = signal.signal(signal.SIGTERM, on_terminate)
    lost = False
    try:
        yield
    except Exception as error:
        if _collective_failure(error):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            who = error.who if isinstance(error, PeerLost) else lost_peer(wait=3.0)
            if who is not None:
                lost = True
                raise PeerLost(who, newest_checkpoint()) from None
        raise
    finally:
        if not lost:
            signal.signal(signal.SIGTERM, previous)
