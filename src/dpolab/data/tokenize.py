"""Tokenisation of preference pairs and SFT examples, with TRL 1.16's conventions so results are comparable.

Both are a prompt with branches: a pair has two (chosen, rejected), an SFT example one (the
completion). The tokenizer sees ``prompt`` and ``prompt + branch + eos`` for each branch (for
conversational rows: the chat template, the prompt with the generation prompt). The prompt is the
longest token prefix common to all of them, so the branches share exactly one tokenised prompt: the
engine computes it once.

Truncation (``max_length`` = most tokens in prompt + one completion; ``max_prompt_length`` = most
tokens in the prompt; ``truncation_mode`` = how a prompt too long for them is cut):

1. ``max_prompt_length`` set: a longer prompt is cut to that many tokens.
2. Otherwise, with ``max_length``: a prompt is cut when it leaves the completions fewer than
   ``reserve = max(1, min(longest completion, max_length // 2))`` tokens; it is cut to
   ``max_length - reserve`` tokens. A completion of at most half of ``max_length`` then fits whole; a
   longer one gets at least half. A prompt that leaves ``reserve`` tokens or more is never cut.
3. Completions still longer than ``max_length - len(prompt)`` are cut at the end (as before).

``keep_end`` (the default) keeps the last prompt tokens, the end of a long dialogue, and drops tokens
from its start; a leading BOS token stays first. ``keep_start`` keeps the first prompt tokens.
``drop`` never cuts a prompt: a pair whose prompt is longer than ``max_prompt_length``, or alone
reaches ``max_length``, is dropped (the behaviour before these options). Prompts are cut on tokens,
after the chat template for conversational rows. Every cut, truncation and drop is counted, with its
reason, in :class:`TokenizeReport` and reported, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpolab.data.formats import DataError, PreferenceExample, PromptExample, SFTExample, _one_line


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair: one prompt, two branches (chosen, rejected)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    row: int
    margin: float | None = None  # the row's ``margin`` column, for reward models

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


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt for rollouts: its token ids (chat template applied, generation prompt added), and the prompt as
    written and its answer, for the reward."""

    prompt_ids: tuple[int, ...]
    row: int
    prompt: str | list[dict]
    answer: str | None

    @property
    def branches(self) -> tuple[tuple[int, ...], ...]:
        return ()

    @property
    def unique_tokens(self) -> int:
        return len(self.prompt_ids)


TRUNCATION_MODES = ("keep_end", "keep_start", "drop")

# Why a pair or example was dropped → how the report says it.
DROP_REASONS = {
    "prompt_reaches_max_length": "the prompt alone reaches max_length",
    "prompt_over_max_prompt_length": "the prompt is longer than max_prompt_length",
    "empty": "nothing left of the prompt or a completion after the shared prefix",
    "identical_tokens": "chosen and rejected are the same tokens after tokenisation and truncation",
}

_CUT_WAY = {"keep_end": "its first tokens removed", "keep_start": "its last tokens removed"}


@dataclass
class TokenizeReport:
    total: int = 0
    kept: int = 0
    truncated_rows: list[int] = field(default_factory=list)
    dropped_by: dict[str, list[int]] = field(default_factory=dict)  # reason (a DROP_REASONS key) → rows
    prompt_cut_rows: list[int] = field(default_factory=list)
    prompt_tokens_cut: int = 0
    prompt_not_prefix: int = 0

    unit: str = "pairs"
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"

    @property
    def dropped_rows(self) -> list[int]:
        return sorted(row for rows in self.dropped_by.values() for row in rows)

    def drop(self, reason: str, row: int) -> None:
        self.dropped_by.setdefault(reason, []).append(row)

    def lines(self) -> list[str]:
        out = [f"{self.kept} of {self.total} {self.unit} kept"]
        if self.prompt_cut_rows:
            limit = (
                f"max_prompt_length={self.max_prompt_length} tokens"
                if self.max_prompt_length is not None
                else f"fit max_length={self.max_length} tokens"
            )
            out.append(
                f"{len(self.prompt_cut_rows)} {self.unit} had the prompt cut to {limit} "
                f"(truncation_mode {self.truncation_mode}: {_CUT_WAY[self.truncation_mode]}; "
                f"{self.prompt_tokens_cut:,} prompt tokens removed in all) (rows {_first(self.prompt_cut_rows)})"
            )
        if self.truncated_rows:
            out.append(
                f"{len(self.truncated_rows)} {self.unit} had a completion truncated to max_length "
                f"(rows {_first(self.truncated_rows)})"
            )
        for reason, rows in self.dropped_by.items():
            text = DROP_REASONS[reason]
            if reason not in ("empty", "identical_tokens"):
                limit = self.max_length if reason == "prompt_reaches_max_length" else self.max_prompt_length
                text = f"{text}={limit} tokens (truncation_mode {self.truncation_mode})"
            out.append(f"{len(rows)} {self.unit} dropped: {text} (rows {_first(rows)})")
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
            "pairs_dropped_by_reason": {reason: len(rows) for reason, rows in self.dropped_by.items()},
            "prompts_cut": len(self.prompt_cut_rows),
            "prompt_tokens_cut": self.prompt_tokens_cut,
            "truncation_mode": self.truncation_mode,
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


def check_truncation(max_length: int | None, max_prompt_length: int | None, truncation_mode: str) -> None:
    """``ValueError`` naming the key unless the three truncation settings are valid together."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode: must be one of {', '.join(TRUNCATION_MODES)}; got {truncation_mode!r}")
    if max_prompt_length is None:
        return
    if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ValueError(f"max_prompt_length: must be a positive integer or null; got {max_prompt_length!r}")
    if max_length is not None and max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length: must be smaller than max_length ({max_length}) to leave room for a completion; "
            f"got {max_prompt_length}"
        )


def _cut_prompt(ids: list[int], keep: int, mode: str, bos: int | None) -> list[int]:
    """The first ``keep`` tokens (keep_start) or the last ones (keep_end), a leading BOS kept first."""
    if mode == "keep_start":
        return ids[:keep]
    if bos is not None and ids[0] == bos:
        return ids[:1] + ids[len(ids) - keep + 1 :]
    return ids[len(ids) - keep :]


def _prompt_limit(prompt: int, longest: int, max_length: int | None, max_prompt_length: int | None):
    """(most prompt tokens, drop reason if the prompt may not be cut) — or (None, None): no cut needed."""
    if max_prompt_length is not None:
        return (max_prompt_length, "prompt_over_max_prompt_length") if prompt > max_prompt_length else (None, None)
    if max_length is None:
        return None, None
    reserve = max(1, min(longest, max_length // 2))
    if prompt <= max_length - reserve:
        return None, None
    return max_length - reserve, "prompt_reaches_max_length"


def _split(tokenizer, prompt, completions: list, limits: dict, report: TokenizeReport, row: int):
    """(prompt ids, [completion ids]) with the shared-prefix rule and the truncation policy; None if dropped."""
    try:
        prompt_ids, full = _encode(tokenizer, prompt, completions)
    except Exception as error:  # noqa: BLE001 - a chat template is user code (jinja): any failure is the row's
        if not isinstance(prompt, list):
            raise
        detail = _one_line(error, 200)
        raise DataError(
            f"row {row}: the tokenizer's chat template fails: {type(error).__name__}: {detail}", row=row
        ) from None
    shared = min(_common_prefix(prompt_ids, ids) for ids in full)
    if shared < len(prompt_ids):
        report.prompt_not_prefix += 1
    prompt_ids, branches = prompt_ids[:shared], [ids[shared:] for ids in full]
    if not prompt_ids or not all(branches):
        report.drop("empty", row)
        return None
    max_length, mode = limits["max_length"], limits["truncation_mode"]
    keep, reason = _prompt_limit(len(prompt_ids), max(map(len, branches)), max_length, limits["max_prompt_length"])
    if keep is not None:
        if mode == "drop":
            # Before these options: only a prompt that leaves no room at all was dropped.
            if reason == "prompt_over_max_prompt_length" or len(prompt_ids) >= max_length:
                report.drop(reason, row)
                return None
        elif keep < 1:  # max_length 1: no prompt fits beside a completion token
            report.drop(reason, row)
            return None
        else:
            report.prompt_cut_rows.append(row)
            report.prompt_tokens_cut += len(prompt_ids) - keep
            prompt_ids = _cut_prompt(prompt_ids, keep, mode, tokenizer.bos_token_id)
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if any(len(ids) > room for ids in branches):
            report.truncated_rows.append(row)
            branches = [ids[:room] for ids in branches]
    if len(branches) > 1 and all(ids == branches[0] for ids in branches):
        # Pairs that differ only past max_length (or in text the tokenizer maps to the same ids): the loss's
        # two log-probs would be equal, a pair that teaches nothing and counts in every mean.
        report.drop("identical_tokens", row)
        return None
    return tuple(prompt_ids), [tuple(ids) for ids in branches]


def _tokenize(tokenizer, examples, limits: dict, progress, fields, build):
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: completions must end with one")
    check_truncation(**limits)
    report = TokenizeReport(total=len(examples), unit="pairs" if len(fields) == 2 else "examples", **limits)
    items = []
    for number, example in enumerate(examples):
        if progress and number % 256 == 0:
            progress(number, len(examples))
        split = _split(tokenizer, example.prompt, [getattr(example, f) for f in fields], limits, report, example.row)
        if split is not None:
            extra = {"margin": example.margin} if getattr(example, "margin", None) is not None else {}
            items.append(build(split[0], *split[1], example.row, **extra))
    report.kept = len(items)
    if progress:
        progress(len(examples), len(examples))
    return items, report


def tokenize_pairs(
    tokenizer,
    examples: list[PreferenceExample],
    max_length: int | None = None,
    progress=None,
    *,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Tokenise every pair; apply the truncation policy (module docstring); report what was cut or dropped."""
    limits = dict(max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode)
    return _tokenize(tokenizer, examples, limits, progress, ("chosen", "rejected"), TokenizedPair)


def tokenize_sft(
    tokenizer,
    examples: list[SFTExample],
    max_length: int | None = None,
    progress=None,
    *,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> tuple[list[TokenizedSequence], TokenizeReport]:
    """Tokenise SFT examples (prompt + completion) with the same conventions and truncation policy."""
    limits = dict(max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode)
    return _tokenize(tokenizer, examples, limits, progress, ("completion",), TokenizedSequence)


def tokenize_prompts(
    tokenizer,
    examples: list[PromptExample],
    max_length: int | None = None,
    progress=None,
    *,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> tuple[list[TokenizedPrompt], TokenizeReport]:
    """Tokenise prompts as the policy will see them before its response; a prompt longer than
    ``max_prompt_length`` is cut per ``truncation_mode`` (or dropped with ``drop``) and counted."""
    check_truncation(max_length, max_prompt_length, truncation_mode)
    limits = dict(max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode)
    report = TokenizeReport(total=len(examples), unit="prompts", **limits)
    items = []
    for number, example in enumerate(examples):
        if progress and number % 256 == 0:
            progress(number, len(examples))
        try:
            prompt_ids, _ = _encode(tokenizer, example.prompt, [])
        except Exception as error:  # noqa: BLE001 - a chat template is user code (jinja): any failure is the row's
            if not isinstance(example.prompt, list):
                raise
            detail = _one_line(error, 200)
            raise DataError(
                f"row {example.row}: the tokenizer's chat template fails: {type(error).__name__}: {detail}",
                row=example.row,
            ) from None
        if not prompt_ids:
            report.drop("empty", example.row)
            continue
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            if truncation_mode == "drop":
                report.drop("prompt_over_max_prompt_length", example.row)
                continue
            report.prompt_cut_rows.append(example.row)
            report.prompt_tokens_cut += len(prompt_ids) - max_prompt_length
            prompt_ids = _cut_prompt(prompt_ids, max_prompt_length, truncation_mode, tokenizer.bos_token_id)
        items.append(TokenizedPrompt(tuple(prompt_ids), example.row, example.prompt, example.answer))
    report.kept = len(items)
    if progress:
        progress(len(examples), len(examples))
    return items, report
