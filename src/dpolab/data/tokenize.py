"""Tokenisation of preference pairs, with TRL 1.16's conventions so results are comparable.

For each pair the tokenizer sees ``prompt``, ``prompt + chosen + eos`` and ``prompt + rejected + eos``
(for conversational rows: the chat template, the prompt with the generation prompt). The prompt is
the longest token prefix common to all three, so chosen and rejected share exactly one tokenised
prompt: the engine computes it once.

Truncation (``max_length`` = most tokens in prompt + one completion): completions are cut at the end
to fit; a pair whose prompt alone leaves no room for a completion token is dropped. Both are counted
in :class:`TokenizeReport` and reported, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpolab.data.formats import PreferenceExample


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    row: int

    @property
    def unique_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class TokenizeReport:
    total: int = 0
    kept: int = 0
    truncated_rows: list[int] = field(default_factory=list)
    dropped_rows: list[int] = field(default_factory=list)
    prompt_not_prefix: int = 0

    def lines(self) -> list[str]:
        out = [f"{self.kept} of {self.total} pairs kept"]
        if self.truncated_rows:
            out.append(
                f"{len(self.truncated_rows)} pairs had a completion truncated to max_length "
                f"(rows {_first(self.truncated_rows)})"
            )
        if self.dropped_rows:
            out.append(
                f"{len(self.dropped_rows)} pairs dropped: prompt alone reaches max_length "
                f"(rows {_first(self.dropped_rows)})"
            )
        if self.prompt_not_prefix:
            out.append(
                f"{self.prompt_not_prefix} pairs: the tokenised prompt is not a prefix of prompt+completion "
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


def _encode(tokenizer, example: PreferenceExample) -> tuple[list[int], list[int], list[int]]:
    if example.conversational:

        def render(messages, generation_prompt=False):
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
            return list(ids if isinstance(ids, list) else ids["input_ids"])  # a list, or a BatchEncoding

        prompt = render(example.prompt, True)
        rejected = render(example.prompt + example.rejected) if example.rejected else list(prompt)
        return prompt, render(example.prompt + example.chosen), rejected
    eos = tokenizer.eos_token or ""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text)["input_ids"])

    def with_eos(text: str) -> str:
        return text if text.endswith(eos) else text + eos

    prompt = encode(example.prompt)
    rejected = encode(example.prompt + with_eos(example.rejected)) if example.rejected else list(prompt)
    return prompt, encode(example.prompt + with_eos(example.chosen)), rejected


def tokenize_pairs(
    tokenizer, examples: list[PreferenceExample], max_length: int | None = None, progress=None
) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Tokenise every pair; apply the truncation policy; report what was truncated or dropped."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: completions must end with one")
    report = TokenizeReport(total=len(examples))
    pairs = []
    for number, example in enumerate(examples):
        if progress and number % 256 == 0:
            progress(number, len(examples))
        prompt, prompt_chosen, prompt_rejected = _encode(tokenizer, example)
        shared = min(_common_prefix(prompt, prompt_chosen), _common_prefix(prompt, prompt_rejected))
        if shared < len(prompt):
            report.prompt_not_prefix += 1
        prompt_ids, chosen_ids, rejected_ids = prompt[:shared], prompt_chosen[shared:], prompt_rejected[shared:]
        if not example.rejected:  # SFT: no rejected branch, even if tokens merged across the prompt boundary
            rejected_ids = []
        if max_length is not None:
            room = max_length - len(prompt_ids)
            if room <= 0 or not prompt_ids:
                report.dropped_rows.append(example.row)
                continue
            if len(chosen_ids) > room or len(rejected_ids) > room:
                report.truncated_rows.append(example.row)
                chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if not prompt_ids or not chosen_ids or (not rejected_ids and example.rejected):
            report.dropped_rows.append(example.row)
            continue
        pairs.append(TokenizedPair(tuple(prompt_ids), tuple(chosen_ids), tuple(rejected_ids), example.row))
    report.kept = len(pairs)
    if progress:
        progress(len(examples), len(examples))
    return pairs, report
