"""``dpolab data judge``: a score per candidate of a ``sample`` output from a judge (:mod:`dpolab.eval.judges`),
appended as it goes and resumable like ``sample``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dpolab.data.onpolicy import AppendLog, judged_prompt, numbered_records


def _judge_batch(judge, batch: list[dict]) -> list[list]:
    """The verdicts of each record's candidates: the judge sees a prompt's candidates together when it ranks
    them (``groupwise``), else every candidate alone (with its prompt_id, for rules set per prompt)."""
    if getattr(judge, "groupwise", False):
        return judge.score_groups([(judged_prompt(r), r["candidates"], r.get("reference")) for r in batch])
    items = [(judged_prompt(r), c, r.get("reference")) for r in batch for c in r["candidates"]]
    if getattr(judge, "per_prompt", False):
        verdicts = judge.score(items, [r["prompt_id"] for r in batch for _ in r["candidates"]])
    else:
        verdicts = judge.score(items)
    grouped, at = [], 0
    for record in batch:
        grouped.append(verdicts[at : at + len(record["candidates"])])
        at += len(record["candidates"])
    return grouped


def judge_file(
    source: str | Path,
    out: str | Path,
    judge,
    *,
    restart: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    batch_prompts: int = 8,
) -> dict:
    """Score every candidate of ``source`` (a ``sample`` output) with ``judge``; adds ``scores`` and ``notes``.

    A score is ``None`` when the judge could not give one (an empty generation, an unparsable reply);
    the note says why. Resumable like ``sample``.
    """
    records, places = numbered_records(source, ["prompt_id", "prompt", "candidates"])
    for at, record in zip(places, records, strict=True):
        if judge.needs_reference and record.get("reference") is None:
            raise ValueError(
                f"{at} (prompt_id {record['prompt_id']}): the {judge.name} judge needs a 'reference' "
                "(sample with --reference-field)"
            )
    if hasattr(judge, "check_prompts"):  # rules per prompt: every prompt has some, every id named exists
        judge.check_prompts([record["prompt_id"] for record in records], source)
    unscored = 0
    with AppendLog(out, restart) as log:
        log.require_same("judge", judge.describe(), ignore=("url",))
        todo = [record for record in records if record["prompt_id"] not in log.done]
        advance = progress(len(records), len(records) - len(todo)) if progress else (lambda k: None)
        for start in range(0, len(todo), batch_prompts):
            batch = todo[start : start + batch_prompts]
            for record, mine in zip(batch, _judge_batch(judge, batch), strict=True):
                unscored += sum(v.score is None for v in mine)
                row = {**record, "scores": [v.score for v in mine], "notes": [v.note for v in mine]}
                if any(v.details is not None for v in mine):
                    row["details"] = [v.details for v in mine]
                log.write({**row, "judge": judge.describe()})
            advance(len(batch))
    return {"prompts": len(records), "judged": len(todo), "resumed": len(records) - len(todo), "unscored": unscored}
