"""``dpolab data sample``: N candidates per prompt from a causal LM, one JSONL line per prompt (the 3D paper's
on-policy data, :mod:`dpolab.data.onpolicy`). Appends as it goes and skips prompts already in the output, so
an interrupted run continues where it stopped; a prompts file whose contents changed is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from dpolab.data.onpolicy import AppendLog, PromptRow, read_prompts, render_prompt


def sample_file(
    model: str,
    prompts: str | Path,
    out: str | Path,
    *,
    n: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    prompt_field: str = "prompt",
    reference_field: str | None = None,
    allow_pickle: bool = False,
    restart: bool = False,
    chat_template: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> dict:
    """Sample ``n`` candidates per prompt; one line per prompt in ``out``: prompt_id, prompt, candidates.

    Prompts are generated ``batch_size`` at a time (each with ``n`` samples). Batches sit at fixed
    positions of the prompts file with a seed each, so a resumed run (same settings) gives the
    candidates an uninterrupted one would have. ``progress(total, done)`` returns an ``advance(k)``
    callback. ``chat_template``: render each prompt (a string becomes one user message) with the
    tokenizer's chat template, as instruct models expect; prompts that are message lists always are.
    """
    from dpolab.engine.generate import generate
    from dpolab.engine.loading import check_vocabulary, default_device, load_model, load_tokenizer

    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    rows = read_prompts(prompts, prompt_field, reference_field)
    policy = load_model(model, allow_pickle=allow_pickle, device=default_device())
    tokenizer = load_tokenizer(model)
    check_vocabulary(policy, tokenizer, model)
    chat = chat_template or any(isinstance(row.prompt, list) for row in rows)
    # Every prompt is rendered before any sampling: a template that fails on row 900 stops the run at once.
    inputs = [
        render_prompt(tokenizer, row.prompt, f"{prompts}: line {row.line} (prompt_id {row.prompt_id})")
        if chat
        else row.prompt
        for row in rows
    ]
    settings = {
        "chat_template": chat,
        "n": n,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "batch_size": batch_size,
    }
    empty = 0
    fingerprint = prompts_fingerprint(rows)
    sampler = {"model": str(model), **settings, "prompt_rows": len(rows), "prompts_sha256": fingerprint}
    with AppendLog(out, restart) as log:
        require_same_prompts(log, rows, prompts, fingerprint)
        log.require_same("sampler", sampler, ignore=("prompt_rows", "prompts_sha256"))
        todo = [row for row in rows if row.prompt_id not in log.done]
        advance = progress(len(rows), len(rows) - len(todo)) if progress else (lambda k: None)
        # Batches sit at fixed positions of the prompts file and each has its own seed, so a resumed run
        # regenerates an unfinished batch exactly and writes only its missing prompts.
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            missing = [row for row in batch if row.prompt_id not in log.done]
            if not missing:
                continue
            candidates = generate(
                policy,
                tokenizer,
                inputs[start : start + batch_size],
                max_new_tokens=max_new_tokens,
                batch_size=len(batch),
                add_special_tokens=not chat,
                num_return_sequences=n,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                seed=seed * 1_000_003 + batch[0].prompt_id,
            )
            for row, texts in zip(batch, candidates, strict=True):
                if row.prompt_id in log.done:
                    continue
                empty += sum(not text.strip() for text in texts)
                record = {"prompt_id": row.prompt_id, "prompt": row.prompt, "candidates": texts}
                if row.reference is not None:
                    record["reference"] = row.reference
                log.write({**record, **row.extra, "sampler": sampler})
            advance(len(missing))
    return {"prompts": len(rows), "sampled": len(todo), "resumed": len(rows) - len(todo), "empty_candidates": empty}


def prompts_fingerprint(rows: list[PromptRow]) -> str:
    """A digest of every prompt row (id, prompt, reference, other fields): a changed prompts file changes it."""
    content = json.dumps([[r.prompt_id, r.prompt, r.reference, r.extra] for r in rows], sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def require_same_prompts(log: AppendLog, rows: list[PromptRow], prompts: str | Path, fingerprint: str) -> None:
    """Refuse to continue ``log`` from a prompts file whose contents changed since it was started (same path).

    A prompt already sampled whose text or reference differs is named by its line; any other change (rows
    added, removed or edited, other fields) is caught by the fingerprint of the whole file, which each
    record's ``sampler`` stores. A resumed run must give the file an uninterrupted run on this file gives."""
    by_id = {row.prompt_id: row for row in rows}
    advice = "use the same prompts file, another output file, or --restart"
    for prompt_id, record in sorted(log.done.items(), key=lambda item: str(item[0])):
        row = by_id.get(prompt_id)
        if row is None:
            raise ValueError(f"{log.path}: prompt_id {prompt_id} was sampled, but {prompts} has no such prompt row "
                             f"now ({len(rows)} rows): the prompts file changed; {advice}")  # fmt: skip
        where = f"{prompts}: line {row.line} (prompt_id {prompt_id})"
        if record.get("prompt") != row.prompt:
            raise ValueError(f"{where}: the prompt differs from the one already sampled into {log.path} "
                             f"(the prompts file changed); {advice}")  # fmt: skip
        if record.get("reference") != row.reference:
            raise ValueError(f"{where}: the reference differs from the one already sampled into {log.path} "
                             f"(the prompts file changed); {advice}")  # fmt: skip
    for prompt_id, record in log.done.items():
        sampler = record.get("sampler") if isinstance(record.get("sampler"), dict) else {}
        old = sampler.get("prompts_sha256")
        if old is not None and old != fingerprint:
            then = sampler.get("prompt_rows")
            raise ValueError(
                f"{prompts} changed since {log.path} was started ({then} prompt rows then, {len(rows)} now; "
                f"fingerprint {old} then, {fingerprint} now; prompt_id {prompt_id}): a resumed run would mix "
                f"two prompt sets; {advice}"
            )
