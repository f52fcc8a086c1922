"""The 3D paper's on-policy pipeline (PAPERS.md §5): sample → judge → pairs, and the four scenarios.

- :func:`sample_file`: N candidates per prompt from a causal LM (one JSONL line per prompt).
- :func:`judge_file`: a score per candidate from a judge (:mod:`dpolab.eval.judges`).
- :func:`pairs_file`: best vs worst candidate per prompt; prompts whose candidates all score the same
  are dropped and counted.
- :func:`scenario_files`: the four chosen/rejected source combinations (chosen from the policy or the
  data set's reference, rejected from the policy or another model's pool).

``sample`` and ``judge`` append one line per prompt as they go and skip prompts already in the output,
so an interrupted run continues where it stopped (a torn last line is dropped first). Every prompt that
gives no pair is counted with its reason, nothing silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dpolab.data.formats import (
    BadLine,
    _one_line,
    _parse_json,
    messages_problem,
    read_jsonl_lines,
    text_problem,
    trainable_pairs,
    write_jsonl,
)
from dpolab.data.formats import where as place
from dpolab.outputs import dumps, write_json


@dataclass(frozen=True)
class PromptRow:
    prompt_id: int  # the row number in the prompts file (0-based, bad lines included)
    prompt: str | list[dict]  # text, or a list of {role, content} messages (rendered with the chat template)
    reference: str | None  # the data set's reference solution or answer, if given
    extra: dict  # every other field of the row, carried along as provenance
    line: int | None = None  # the 1-based line in the prompts file


def read_prompts(path: str | Path, prompt_field: str = "prompt", reference_field: str | None = None) -> list[PromptRow]:
    """The rows of a JSONL prompts file; a bad row is a ``ValueError`` naming the file, line and field."""
    rows, problems = [], []
    for number, (line, row) in enumerate(read_jsonl_lines(Path(path))):
        where = place(path, number, line)
        if isinstance(row, BadLine):
            problems.append(f"{where}: {row.reason}")
            continue
        value = row.get(prompt_field) if isinstance(row, dict) else None
        if isinstance(value, list) and value:
            problem = messages_problem(value, prompt_field)
        elif isinstance(value, str) and value.strip():
            problem = text_problem(value, f"field {prompt_field!r}")
        else:
            problem = f"needs a non-empty field {prompt_field!r} (a string or a list of messages)"
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        reference = None
        if reference_field is not None:
            reference = row.get(reference_field)
            if not isinstance(reference, (str, int, float)) or isinstance(reference, bool):
                problems.append(f"{where}: needs the reference field {reference_field!r} (a string or number)")
                continue
            reference = str(reference)
            problem = text_problem(reference, f"field {reference_field!r}")
            if problem:
                problems.append(f"{where}: {problem}")
                continue
        extra = {k: v for k, v in row.items() if k not in (prompt_field, reference_field)}
        rows.append(PromptRow(number, row[prompt_field], reference, extra, line))
    if problems:
        more = f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"{len(problems)} bad prompt rows:\n  " + "\n  ".join(problems[:10]) + more)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def as_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as chat messages: a string becomes one user message."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def render_prompt(tokenizer, prompt: str | list[dict], where: str = "prompt") -> str:
    """The text the model sees for a prompt under its chat template, ending with the assistant's turn.

    A template that raises (a jinja error, or ``raise_exception`` in the template, e.g. for a role it does
    not support) is a one-line ``ValueError`` naming ``where`` (the prompt's file and line)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat prompts need a tokenizer with a chat template; this one has none")
    try:
        text = tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)
    except Exception as error:  # noqa: BLE001 - jinja and template errors vary; one line naming the prompt
        raise ValueError(f"{where}: the tokenizer's chat template fails: {type(error).__name__}: "
                         f"{_one_line(error)}") from None  # fmt: skip
    if not isinstance(text, str):
        raise ValueError(f"{where}: the tokenizer's chat template gave {type(text).__name__}, not text")
    return text


def prompt_text(prompt: str | list[dict]) -> str:
    """A prompt as plain text for a judge: message lists as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def judged_prompt(record: dict) -> str | list[dict]:
    """The prompt as a judge sees it: messages when sampled with a chat template, else the text."""
    chat = record.get("sampler", {}).get("chat_template") or isinstance(record["prompt"], list)
    return as_messages(record["prompt"]) if chat else record["prompt"]


def preference_row(record: dict, chosen: str, rejected: str) -> dict:
    """prompt/chosen/rejected in the format ``dpolab train`` reads: conversational when sampled with a chat
    template (so training renders the same template), plain text otherwise."""
    if record.get("sampler", {}).get("chat_template") or isinstance(record["prompt"], list):
        return {
            "prompt": as_messages(record["prompt"]),
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    return {"prompt": record["prompt"], "chosen": chosen, "rejected": rejected}


class AppendLog:
    """A JSONL output that an interrupted run continues: completed ``prompt_id``\\s are read back first.

    A torn last line (the process died mid-write) is cut off; any other unreadable line is an error,
    since it means the file is not ours to append to.
    """

    def __init__(self, path: str | Path, restart: bool = False) -> None:
        self.path = Path(path)
        self.done: dict[int, dict] = {}
        if self.path.is_dir():
            raise ValueError(f"{self.path}: is a folder; --out must be a file path")
        if restart and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            raw = self.path.read_bytes()
            lines = raw.split(b"\n")
            keep = len(raw)
            for index, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    row = _parse_json(line.decode("utf-8"))
                    prompt_id = row["prompt_id"]
                    hash(prompt_id)
                except (ValueError, KeyError, TypeError):
                    if index == len(lines) - 1:  # torn by an interruption: drop it
                        keep = len(raw) - len(line)
                        break
                    raise ValueError(
                        f"{self.path}: line {index + 1} is not a record of this command; "
                        "use another output file or --restart"
                    ) from None
                self.done[prompt_id] = row
            if keep != len(raw):
                with open(self.path, "r+b") as handle:
                    handle.truncate(keep)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a", encoding="utf-8")

    def require_same(self, key: str, value: dict, ignore: tuple[str, ...] = ()) -> None:
        """Refuse to continue a file written with other settings: the rows would mix two experiments.

        ``ignore``: settings that may change without changing the result (an endpoint's URL)."""
        for prompt_id, row in self.done.items():
            old = row.get(key) or {}
            if not isinstance(old, dict):
                raise ValueError(f"{self.path}: prompt_id {prompt_id}: {key!r} is not a record of this command; "
                                 "use another output file or --restart")  # fmt: skip
            changed = sorted(k for k in set(old) | set(value) if k not in ignore and old.get(k) != value.get(k))
            if changed:
                details = ", ".join(f"{k}: {old.get(k)!r} → {value.get(k)!r}" for k in changed)
                raise ValueError(
                    f"{self.path}: prompt_id {prompt_id} was written with other settings ({details}); "
                    "use the same settings, another output file, or --restart"
                )

    def write(self, row: dict) -> None:
        self.handle.write(dumps(row, source=str(self.path), ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.done[row["prompt_id"]] = row

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(path: str | Path, need: Iterable[str]) -> list[dict]:
    """The records of a ``sample`` / ``judge`` output, checked for the fields the next step needs: an integer
    ``prompt_id``, a text or message-list ``prompt``, ``candidates`` as strings and ``scores`` as finite
    numbers or null (one per candidate); a bad record is a ``ValueError`` naming the file, line and key, and so
    is a ``prompt_id`` given twice (one of the two would be dropped silently)."""
    return numbered_records(path, need)[0]


def numbered_records(path: str | Path, need: Iterable[str]) -> tuple[list[dict], list[str]]:
    """:func:`read_records`, and where each record is (``FILE: line L (row R)``), for messages."""
    records, places = [], []
    need = list(need)
    first: dict[object, str] = {}
    for number, (line, row) in enumerate(read_jsonl_lines(Path(path))):
        where = place(path, number, line)
        if isinstance(row, BadLine):
            raise ValueError(f"{where}: {row.reason}")
        missing = [key for key in need if not isinstance(row, dict) or key not in row]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(map(repr, missing))}")
        problem = _record_problem(row, need)
        if problem:
            raise ValueError(f"{where}: {problem}")
        if "prompt_id" in need:
            if row["prompt_id"] in first:
                raise ValueError(f"{where}: prompt_id {row['prompt_id']} again (first at {first[row['prompt_id']]})")
            first[row["prompt_id"]] = where.split(": ", 1)[1]
        records.append(row)
        places.append(where)
    return records, places


def _record_problem(row: dict, need: list[str]) -> str | None:
    if "prompt_id" in need and (not isinstance(row["prompt_id"], int) or isinstance(row["prompt_id"], bool)):
        return f"'prompt_id' must be an integer, got {type(row['prompt_id']).__name__}"
    if "prompt" in need:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            problem = messages_problem(prompt, "prompt")
        elif isinstance(prompt, str):
            problem = text_problem(prompt, "prompt")
        else:
            problem = f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}"
        if problem:
            return problem
    if "candidates" in need:
        candidates = row["candidates"]
        if not isinstance(candidates, list):
            return f"'candidates' must be a list of strings, got {type(candidates).__name__}"
        for index, candidate in enumerate(candidates):
            if not isinstance(candidate, str):
                return f"candidates[{index}] must be a string, got {type(candidate).__name__}"
    if "scores" in need:
        problem = scores_problem(row["scores"])
        if problem:
            return problem
        if "candidates" in need and len(row["scores"]) != len(row["candidates"]):
            return (
                f"prompt_id {row.get('prompt_id')}: {len(row['scores'])} scores for {len(row['candidates'])} candidates"
            )
    return None


def scores_problem(scores: object) -> str | None:
    """Why ``scores`` is not a list of finite numbers or nulls, or None. A bool is not a number, and a numeric
    string ("5") is refused: compared as text, "10" < "9"."""
    if not isinstance(scores, list):
        return f"'scores' must be a list of numbers (null for unscored), got {type(scores).__name__}"
    for index, score in enumerate(scores):
        if score is None:
            continue
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            hint = ' (write numbers, not strings: 5, not "5")' if isinstance(score, str) else ""
            return f"scores[{index}] must be a number or null, got {type(score).__name__} {score!r}{hint}"
        if isinstance(score, float) and not math.isfinite(score):
            return f"scores[{index}] must be a finite number or null, got {score}"
    return None


# --- sample ------------------------------------------------------------------------------------


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


# --- judge -------------------------------------------------------------------------------------


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


# --- pairs -------------------------------------------------------------------------------------


def best_and_worst(scores: list[float | None]) -> tuple[int, int] | None:
    """Indices of the best and the worst scored candidate; ties go to the lowest index; None if all equal."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None
    top = max(s for s, _ in scored)
    bottom = min(s for s, _ in scored)
    if top == bottom:
        return None
    return min(i for s, i in scored if s == top), min(i for s, i in scored if s == bottom)


def _keep_trainable(pairs: list[dict], count) -> list[dict]:
    """The pairs training reads without a bad row (:func:`dpolab.data.formats.trainable_pairs`); ``count(pair,
    reason)`` is told of each other one (chosen = rejected, an empty candidate or prompt, a repeated pair)."""
    kept, dropped = trainable_pairs(pairs)
    for index, reason in dropped:
        count(pairs[index], reason)
    return kept


def pairs_file(source: str | Path, out: str | Path) -> dict:
    """Best vs worst candidate per prompt of a ``judge`` output; writes preference JSONL with provenance.

    Only valid training input is written: a prompt whose best and worst candidates are the same text (two
    samples alike, scored differently by a noisy judge), whose pair has an empty side, or whose pair repeats
    an earlier prompt's is dropped and counted by its reason, like prompts without two differently scored
    candidates. No pair at all is an error: nothing is written."""
    records = read_records(source, ["prompt_id", "prompt", "candidates", "scores"])
    pairs: list[dict] = []
    dropped: dict[str, list[int]] = {"all candidates scored the same": [], "fewer than two scored candidates": []}
    for record in records:
        scores = record["scores"]
        if len(scores) != len(record["candidates"]):
            raise ValueError(f"{source}: prompt_id {record['prompt_id']}: {len(scores)} scores for "
                             f"{len(record['candidates'])} candidates")  # fmt: skip
        chosen = best_and_worst(scores)
        if chosen is None:
            scored = sum(s is not None for s in scores)
            reason = "fewer than two scored candidates" if scored < 2 else "all candidates scored the same"
            dropped[reason].append(record["prompt_id"])
            continue
        best, worst = chosen
        pair = {
            **preference_row(record, record["candidates"][best], record["candidates"][worst]),
            "prompt_id": record["prompt_id"],
            "chosen_index": best,
            "rejected_index": worst,
            "chosen_score": scores[best],
            "rejected_score": scores[worst],
            "judge": record.get("judge"),
        }
        pairs.append(pair)
    pairs = _keep_trainable(pairs, lambda pair, reason: dropped.setdefault(reason, []).append(pair["prompt_id"]))
    if not pairs:
        reasons = "; ".join(f"{len(ids)} {reason}" for reason, ids in dropped.items() if ids)
        raise ValueError(f"{source}: no pair to write ({len(records)} prompts: {reasons}); nothing written to {out}")
    write_jsonl(out, pairs)
    return {"prompts": len(records), "pairs": len(pairs), "dropped": dropped}


# --- scenarios ---------------------------------------------------------------------------------

SCENARIOS = {  # number: (chosen from, rejected from) — the 3D paper's Table 4 / PAPERS.md §3
    1: ("policy", "policy"),
    2: ("reference", "policy"),
    3: ("policy", "other"),
    4: ("reference", "other"),
}


def scenario_files(
    policy: str | Path,
    other: str | Path,
    out_dir: str | Path,
    good_score: float | None = None,
    same_prompts: bool = False,
) -> dict:
    """The four scenarios from two judged candidate pools (the policy's and another model's) and references.

    A candidate is *good* when its score is at least ``good_score`` (default: the highest score in
    either pool, e.g. 1 for the math judge, 5 for the rubric) and *bad* otherwise; the reference
    solution counts as good. Per prompt and scenario: chosen = the best good candidate of its source
    (lowest index among equals), rejected = the worst bad candidate of its source. A prompt without a
    good chosen or a bad rejected is dropped from that scenario and counted.

    ``same_prompts``: keep only the prompts that have a pair in all four scenarios, so the four files hold
    the same prompts and as many pairs (a comparison of the scenarios not confounded by their sizes); the
    prompts left out are counted as ``not in every scenario``.
    """
    if good_score is not None and not math.isfinite(good_score):
        raise ValueError(f"--good-score must be a finite number; got {good_score}")
    pools = {
        "policy": {r["prompt_id"]: r for r in read_records(policy, ["prompt_id", "prompt", "candidates", "scores"])},
        "other": {r["prompt_id"]: r for r in read_records(other, ["prompt_id", "prompt", "candidates", "scores"])},
    }
    for prompt_id, record in pools["other"].items():
        mine = pools["policy"].get(prompt_id)
        if mine is not None and mine["prompt"] != record["prompt"]:
            raise ValueError(f"prompt_id {prompt_id}: the two pools hold different prompts ({policy} vs {other})")
    every = [s for pool in pools.values() for r in pool.values() for s in r["scores"] if s is not None]
    if not every:
        raise ValueError("no scored candidate in either pool")
    threshold = max(every) if good_score is None else good_score
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[int, dict] = {}
    scenario_pairs: dict[int, list[dict]] = {}
    for number, (chosen_from, rejected_from) in SCENARIOS.items():
        pairs, dropped = [], {"no good chosen": 0, "no bad rejected": 0, "prompt missing from a pool": 0}
        for prompt_id, record in sorted(pools["policy"].items()):
            sources = {"policy": record, "other": pools["other"].get(prompt_id)}
            if sources["other"] is None and "other" in (chosen_from, rejected_from):
                dropped["prompt missing from a pool"] += 1
                continue
            if chosen_from == "reference":
                chosen = record.get("reference")
                chosen_score, chosen_index = None, None
            else:
                good = [(s, i) for i, s in enumerate(record["scores"]) if s is not None and s >= threshold]
                chosen_score, chosen_index = (
                    (max(good)[0], min(i for s, i in good if s == max(good)[0])) if good else (None, None)
                )
                chosen = record["candidates"][chosen_index] if good else None
            if chosen is None:
                dropped["no good chosen"] += 1
                continue
            pool = sources[rejected_from]
            bad = [(s, i) for i, s in enumerate(pool["scores"]) if s is not None and s < threshold]
            if not bad:
                dropped["no bad rejected"] += 1
                continue
            low = min(bad)[0]
            rejected_index = min(i for s, i in bad if s == low)
            pairs.append(
                {
                    **preference_row(record, chosen, pool["candidates"][rejected_index]),
                    "prompt_id": prompt_id,
                    "scenario": number,
                    "chosen_source": chosen_from,
                    "rejected_source": rejected_from,
                    "chosen_score": chosen_score,
                    "chosen_index": chosen_index,
                    "rejected_score": low,
                    "rejected_index": rejected_index,
                }
            )

        def count(pair, reason, dropped=dropped):
            dropped[reason] = dropped.get(reason, 0) + 1

        scenario_pairs[number] = pairs = _keep_trainable(pairs, count)
        counts[number] = {"pairs": len(pairs), "dropped": dropped}
    if same_prompts:
        shared = set.intersection(*({p["prompt_id"] for p in pairs} for pairs in scenario_pairs.values()))
        for number, pairs in scenario_pairs.items():
            scenario_pairs[number] = [p for p in pairs if p["prompt_id"] in shared]
            counts[number]["dropped"]["not in every scenario"] = len(pairs) - len(scenario_pairs[number])
            counts[number]["pairs"] = len(scenario_pairs[number])
    for number, pairs in scenario_pairs.items():
        target = out / f"scenario{number}.jsonl"
        if pairs:  # a scenario without pairs gets no file: an empty file is no training data
            write_jsonl(target, pairs)
        elif target.exists():
            target.unlink()  # an earlier run's file would pass for this run's
    summary = {
        "good_score": threshold,
        "prompts": len(pools["policy"]),
        "same_prompts": same_prompts,
        "scenarios": counts,
    }
    write_json(out / "summary.json", summary)
    return summary
