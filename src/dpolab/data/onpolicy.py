"""The 3D paper's on-policy pipeline (PAPERS.md §5): sample → judge → pairs, and the four scenarios; the parts
that need no model. Sampling and judging, which run one, are :mod:`dpolab.pipeline.sample` and
:mod:`dpolab.pipeline.judge`; they read and write through the pieces here.

- :func:`read_prompts`, :class:`AppendLog`, :func:`read_records`: the prompts, and the resumable JSONL outputs of
  ``sample`` and ``judge`` (one line per prompt, a torn last line dropped first).
- :func:`pairs_file`: best vs worst candidate per prompt; prompts whose candidates all score the same
  are dropped and counted.
- :func:`scenario_files`: the four chosen/rejected source combinations (chosen from the policy or the
  data set's reference, rejected from the policy or another model's pool).

Every prompt that gives no pair is counted with its reason, nothing silently.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
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
