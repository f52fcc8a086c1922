"""Tokenisation of preference pairs and SFT examples, with TRL 1.16's conventions so results are comparable.

Both are a prompt with branches: a pair has two (chosen, rejected), an SFT example one (the
completion). The tokenizer sees ``prompt`` and ``prompt + branch + eos`` for each branch (for
conversational rows: the chat template, the prompt with the generation prompt). The prompt is the
longest token prefix common to all of them, so the branches share exactly one tokenised prompt: the
engine computes it once.

Truncation (``max_length`` = most tokens in prompt + one completion): completions are cut at the end
to fit; a pair whose prompt alone leaves no room for a completion token is dropped. Both are counted
in :class:`TokenizeReport` and reported, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpolab.data.formats import PreferenceExample, SFTExample


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair: one prompt, two branches (chosen, rejected)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    row: int

    @property
    def branches(self) -> tuple[tuple[int, ...], ...]:
        return (self.chosen_ids, self.rejected_ids)

    @property
    def unique_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass(frozen=True)
class TokenizedSequence:
    """An SFT example: one prompt, one branch (the completion)."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    row: int

    @property
    def branches(self) -> tuple[tuple[int, ...], ...]:
        return (self.completion_ids,)

    @property
    def unique_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class TokenizeReport:
    total: int = 0
    kept: int = 0
    truncated_rows: list[int] = field(default_factory=list)
    dropped_rows: list[int] = field(default_factory=list)
    prompt_not_prefix: int = 0

    unit: str = "pairs"

    def lines(self) -> list[str]:
        out = [f"{self.kept} of {self.total} {self.unit} kept"]
        if self.truncated_rows:
            out.append(
                f"{len(self.truncated_rows)} {self.unit} had a completion truncated to max_length "
                f"(rows {_first(self.truncated_rows)})"
            )
        if self.dropped_rows:
            out.append(
                f"{len(self.dropped_rows)} {self.unit} dropped: prompt alone reaches max_length "
                f"(rows {_first(self.dropped_rows)})"
            )
        if self.prompt_not_prefix:
            out.append(
                f"{self.prompt_not_prefix} {self.unit}: the tokenised prompt is not a prefix of prompt+completion "
                "(tokens merge across the boundary); the completion starts where they diverge"
            )
        return out

    def as_dict(self) -> dict:
        return {
            "pairs_total": self.total,
            "pairs_kept": self.kept,
            "pairs_truncated": len(self.truncated_rows),
            "pairs_dropped": len(self.dropped_rows),
            "prompt_not_prefix": self.prompt_not_prefix,
        }


def _first(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f", … ({len(rows) - limit} more)" if len(rows) > limit else "")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer, prompt, completions: list) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt and of prompt + each completion (chat template for message lists)."""
    if isinstance(prompt, list):

        def render(messages, generation_prompt=False):
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
            return list(ids if isinstance(ids, list) else ids["input_ids"])  # a list, or a BatchEncoding

        return render(prompt, True), [render(prompt + completion) for completion in completions]
    eos = tokenizer.eos_token or ""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text)["input_ids"])

    def with_eos(text: str) -> str:
        return text if text.endswith(eos) else text + eos

    return encode(prompt), [encode(prompt + with_eos(completion)) for completion in completions]


def _split(tokenizer, prompt, completions: list, max_length: int | None, report: TokenizeReport, row: int):
    """(prompt ids, [completion ids]) with the shared-prefix rule and the truncation policy; None if dropped."""
    prompt_ids, full = _encode(tokenizer, prompt, completions)
    shared = min(_common_prefix(prompt_ids, ids) for ids in full)
    if shared < len(prompt_ids):
        report.prompt_not_prefix += 1
    prompt_ids, branches = prompt_ids[:shared], [ids[shared:] for ids in full]
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room <= 0 or not prompt_ids:
            report.dropped_rows.append(row)
            return None
        if any(len(ids) > room for ids in branches):
            report.truncated_rows.append(row)
            branches = [ids[:room] for ids in branches]
    if not prompt_ids or not all(branches):
        report.dropped_rows.append(row)
        return None
    return tuple(prompt_ids), [tuple(ids) for ids in branches]


def _tokenize(tokenizer, examples, max_length, progress, fields, build):
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: completions must end with one")
    report = TokenizeReport(total=len(examples), unit="pairs" if len(fields) == 2 else "examples")
    items = []
    for number, example in enumerate(examples):
        if progress and number % 256 == 0:
            progress(number, len(examples))
        split = _split(
            tokenizer, example.prompt, [getattr(example, f) for f in fields], max_length, report, example.row
        )
        if split is not None:
            items.append(build(split[0], *split[1], example.row))
    report.kept = len(items)
    if progress:
        progress(len(examples), len(examples))
    return items, report


def tokenize_pairs(
    tokenizer, examples: list[PreferenceExample], max_length: int | None = None, progress=None
) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Tokenise every pair; apply the truncation policy; report what was truncated or dropped."""
    return _tokenize(tokenizer, examples, max_length, progress, ("chosen", "rejected"), TokenizedPair)


def tokenize_sft(
    tokenizer, examples: list[SFTExample], max_length: int | None = None, progress=None
) -> tuple[list[TokenizedSequence], TokenizeReport]:
    """Tokenise SFT examples (prompt + completion) with the same conventions and truncation policy."""
    return _tokenize(tokenizer, examples, max_length, progress, ("completion",), TokenizedSequence)
