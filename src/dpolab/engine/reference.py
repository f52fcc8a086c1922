"""Reference log-probs: computed once before training, cached on disk, reused while inputs are unchanged.

The cache key is a fingerprint of (reference weights, tokenised items, settings that change the
numbers: token weighting, compute dtype). The tokenised items already encode the data, the tokenizer
and max_length. Any change gives a new key, so a stale cache is never read. The number of processes
that computed the values is not part of the key: a cache written by a 2-process run is reused by a
1-process run and the other way round.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpolab.data.packing import Item
from dpolab.engine.logps import LogpEngine, TokenLogps

CACHE_FORMAT = 2  # 2: one (items, branches) tensor "logps"


def weights_fingerprint(model) -> str:
    """BLAKE2b of every parameter and buffer (names, shapes, dtypes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if hasattr(tensor, "full_tensor"):  # an FSDP2 shard: every process calls this, so the gather matches
            tensor = tensor.full_tensor()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def items_fingerprint(items: Sequence[Item]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for item in items:
        for ids in (item.prompt_ids, *item.branches):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(b"".join(i.to_bytes(4, "little") for i in ids))
    return digest.hexdigest()


def cache_key(weights: str, items: str, settings: dict) -> str:
    text = weights + items + repr(sorted({**settings, "format": CACHE_FORMAT}.items()))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def compute_reference_logps(
    model,
    items: Sequence[Item],
    indices: Sequence[int],
    batch_size: int,
    engine: LogpEngine,
    token_weights: Callable[[TokenLogps], torch.Tensor | None] | None = None,
    autocast=nullcontext,
    progress: Callable[..., None] | None = None,
) -> torch.Tensor:
    """Summed log-probs of ``items[i]`` for ``i`` in ``indices``: shape (len(indices), branches), float32.

    ``token_weights`` turns a micro-batch's :class:`TokenLogps` into per-token weights (LD-DPO) or None.
    """
    out = torch.empty(len(indices), len(items[0].branches), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(indices), batch_size):
                ids = list(indices[start : start + batch_size])
                with autocast():
                    tokens = engine.token_logps(model, [items[i] for i in ids], ids)
                    sums = tokens.sums(token_weights(tokens) if token_weights else None)
                out[start : start + len(ids)] = sums.float().cpu()
                if progress:
                    progress(completed=start + len(ids))
    finally:
        model.train(was_training)
    return out


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir).expanduser() / f"reference-{key}.safetensors"


def load_cached(cache_dir: str | Path, key: str) -> torch.Tensor | None:
    """The cached log-probs, or None on a miss. A damaged cache file (truncated by a full disk or a copy)
    counts as a miss, with a note: it is derived data, recomputed and rewritten atomically."""
    path = cache_path(cache_dir, key)
    if not path.exists():
        return None
    try:
        return load_file(str(path))["logps"]
    except Exception as error:  # noqa: BLE001 - safetensors' own error type, OSError, a missing tensor
        detail = " ".join(str(error).split())[:120]
        print(f"note: the reference cache file {path} is unreadable ({detail}); recomputing it", file=sys.stderr)
        return None


def store_cached(cache_dir: str | Path, key: str, logps: torch.Tensor) -> Path:
    """Write atomically (temporary file, then rename): readers see the whole file or none."""
    path = cache_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"logps": logps.contiguous()}, str(temporary))
    os.replace(temporary, path)
    return path
