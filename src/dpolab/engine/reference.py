"""Reference log-probs: computed once before training, cached on disk, reused while inputs are unchanged.

The cache key is a fingerprint of (reference weights, tokenised pairs, settings that change the
numbers: ld_alpha, compute dtype). The tokenised pairs already encode the data, the tokenizer and
max_length. Any change gives a new key, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpolab.data.packing import pack
from dpolab.data.tokenize import TokenizedPair
from dpolab.engine.logps import naive_logps, packed_logps


def weights_fingerprint(model) -> str:
    """BLAKE2b of every parameter and buffer (names, shapes, dtypes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pairs_fingerprint(pairs: list[TokenizedPair]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(b"".join(i.to_bytes(4, "little") for i in ids))
    return digest.hexdigest()


def cache_key(weights: str, pairs: str, settings: dict) -> str:
    text = weights + pairs + repr(sorted(settings.items()))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def compute_reference_logps(
    model,
    pairs: list[TokenizedPair],
    batch_size: int,
    row_tokens: int,
    pad_token_id: int,
    device,
    ld_alpha: float | None = None,
    autocast=None,
    naive: bool = False,
    progress: Callable[..., None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) reference log-probs of every pair, in data-set order (float32).

    ``naive=True`` uses separate padded rows (no ``ld_alpha`` weighting there: the trainer refuses
    ``ld_alpha`` without the packed path).
    """
    chosen = torch.empty(len(pairs), dtype=torch.float32)
    rejected = torch.empty(len(pairs), dtype=torch.float32)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            ids = list(range(start, min(start + batch_size, len(pairs))))
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                if naive:  # the model cannot take the packed mask (see dpolab.train.loop.check_packing)
                    out = naive_logps(model, [pairs[i] for i in ids], pad_token_id, device)
                else:
                    batch = pack([pairs[i] for i in ids], ids, row_tokens, pad_token_id).to(device)
                    out = packed_logps(model, batch, ld_alpha=ld_alpha)
            chosen[ids] = out.chosen.float().cpu()
            rejected[ids] = out.rejected.float().cpu()
            if progress:
                progress(completed=ids[-1] + 1)
    model.train(was_training)
    return chosen, rejected


def cached_reference_logps(
    cache_dir: str | Path, key: str, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Load (chosen, rejected) for ``key`` from ``cache_dir`` or compute and store them atomically.

    Returns the tensors and whether they came from the cache.
    """
    path = Path(cache_dir).expanduser() / f"reference-{key}.safetensors"
    if path.exists():
        tensors = load_file(str(path))
        return tensors["chosen"], tensors["rejected"], True
    chosen, rejected = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(temporary))
    os.replace(temporary, path)
    return chosen, rejected, False
