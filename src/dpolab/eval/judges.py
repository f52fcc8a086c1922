"""Judges and scorers: a score per (prompt, candidate, reference), or None with a reason.

Used by ``dpolab data judge`` (on-policy pairs), by evaluation, and as a PPO reward.

- :class:`MathJudge`: 1 when the candidate's final answer (GSM8K ``#### N``, ``A: N`` or MATH's
  ``\\boxed{}``) equals the reference's by math-verify's symbolic comparison, 0 when it differs or the
  candidate states none (:mod:`dpolab.data.answers`); the reference must have one.
- :class:`RewardModelJudge`: the scalar output of a Hugging Face sequence-classification model
  (``num_labels = 1``) at the last token of prompt + candidate + EOS, e.g. a reward model trained with
  ``dpolab rm`` (scored exactly as it was trained: :mod:`dpolab.engine.scores`).
- :class:`RulesJudge`: the 3D paper's format rules (line count, words, words per line, end-rhyme of line
  pairs through the CMU pronouncing dictionary, keywords, a regex, the answer's presence), each pass or
  fail; the score is the share passed, and every rule's result is kept. Rules come per data set or per
  prompt from a YAML/JSON rule file (:func:`read_rule_file`).
- :class:`LLMJudge`: an OpenAI-compatible chat-completions endpoint. ``mode="grade"`` scores each answer
  alone with a rubric (by default the 3D paper's 1-5 maths rubric, PAPERS.md §5); ``mode="best_worst"`` is
  the 3D paper's App. C: the judge sees all N candidates of a prompt and names the best and the worst
  (scores 1 best, 0 worst, 0.5 the others: a rank, not a grade). The API key is read from an environment
  variable at request time and never written; transient failures are retried with exponential back-off;
  a reply without a parsable score is recorded as such (score None, the reply kept in the note), never
  guessed. A reply whose ``content`` is not text (null, a number, an object, a list with other than text
  parts) is such a reply too: score None, the note saying what came back. A list of text parts is read as
  their text.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class Verdict:
    score: float | None
    note: str | None = None  # why there is no score, or what the judge said
    details: dict | None = None  # per-part results, e.g. each rule's pass/fail


Item = tuple["str | list[dict]", str, "str | None"]  # prompt (text or chat messages), candidate, reference


class MathJudge:
    name = "math"
    needs_reference = True

    def score(self, items: list[Item]) -> list[Verdict]:
        from dpolab.data.answers import answers_match, parsed_answer

        verdicts = []
        for _, candidate, reference in items:
            if not candidate.strip():
                verdicts.append(Verdict(None, "empty generation"))
                continue
            match = answers_match(candidate, reference) if reference is not None else None
            if match is None:
                verdicts.append(Verdict(None, f"the reference has no final answer: {str(reference)[:80]!r}"))
            elif not match and parsed_answer(candidate) is None:
                verdicts.append(Verdict(0.0, "no final answer (scored as wrong)"))
            else:
                verdicts.append(Verdict(float(match)))
        return verdicts

    def describe(self) -> dict:
        return {"kind": self.name, "checker": "math-verify"}


class RewardModelJudge:
    name = "reward-model"
    needs_reference = False

    def __init__(
        self,
        path: str,
        batch_size: int = 16,
        max_length: int = 1024,
        allow_pickle: bool = False,
        score_empty: bool = False,
        device=None,
    ) -> None:
        """``score_empty``: score an empty candidate too (prompt + EOS), as a PPO reward must; else it gets
        no score."""
        from dpolab.engine.loading import check_vocabulary, default_device, load_model, load_tokenizer

        self.path = path
        self.model = load_model(path, "sequence_classification", allow_pickle=allow_pickle).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has num_labels = 1; this one has {self.model.config.num_labels}")
        self.tokenizer = load_tokenizer(path)
        check_vocabulary(self.model, self.tokenizer, path)
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        self.batch_size, self.max_length, self.score_empty = batch_size, max_length, score_empty
        self.device = device if device is not None else default_device()
        self.model.to(self.device)

    def score(self, items: list[Item]) -> list[Verdict]:
        """The score at the last token of prompt + candidate + EOS, tokenised as ``dpolab rm`` trains (the chat
        template for message prompts when the tokenizer has one), so a dpolab reward model is read as trained."""
        import torch

        from dpolab.data.formats import DataError, SFTExample
        from dpolab.data.onpolicy import prompt_text
        from dpolab.data.tokenize import tokenize_sft
        from dpolab.engine.scores import naive_scores

        verdicts: list[Verdict | None] = [None] * len(items)
        examples = []
        for index, (prompt, candidate, _) in enumerate(items):
            if not candidate.strip() and not self.score_empty:
                verdicts[index] = Verdict(None, "empty generation")
            elif isinstance(prompt, list) and getattr(self.tokenizer, "chat_template", None):
                examples.append(SFTExample(prompt, [{"role": "assistant", "content": candidate}], index, True))
            else:
                examples.append(SFTExample(prompt_text(prompt), candidate, index))
        try:
            sequences, report = tokenize_sft(self.tokenizer, examples, self.max_length)
        except DataError as error:  # a chat template that raises: one line naming the prompt
            if error.row is None:
                raise
            detail = str(error).split("chat template fails: ", 1)[-1]
            raise ValueError(
                f"{self.path}: the reward model's chat template fails on the prompt "
                f"{prompt_text(items[error.row][0])[:60]!r}: {detail}"
            ) from None
        for row in report.dropped_rows:
            verdicts[row] = Verdict(None, "nothing left to score after truncation to max_length")
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            with torch.no_grad():
                values = naive_scores(self.model, chunk, self.pad_token_id, self.device)[:, 0].tolist()
            for sequence, value in zip(chunk, values, strict=True):
                verdicts[sequence.row] = Verdict(value)
        return verdicts  # type: ignore[return-value]

    def describe(self) -> dict:
        return {"kind": self.name, "model": str(self.path)}


# Each rule type: (settings it requires, settings it may have). Bounds are inclusive integers.
RULE_SETTINGS: dict[str, tuple[frozenset, frozenset]] = {
    "regex": (frozenset({"pattern"}), frozenset()),
    "contains_answer": (frozenset(), frozenset()),
    "words": (frozenset(), frozenset({"min", "max"})),
    "lines": (frozenset(), frozenset({"min", "max"})),
    "words_per_line": (frozenset(), frozenset({"min", "max"})),
    "rhyme": (frozenset({"pairs"}), frozenset()),
    "keywords": (frozenset({"words"}), frozenset({"mode"})),
}
RULE_TYPES = tuple(RULE_SETTINGS)
KEYWORD_MODES = ("all", "any", "none")


def _bounds_problem(rule: dict, where: str) -> str | None:
    bounds = [rule.get("min"), rule.get("max")]
    if all(b is None for b in bounds) or any(
        b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 0) for b in bounds
    ):
        return f"{where}: needs min and/or max, non-negative integers; got {rule!r}"
    return None


def rule_problem(rule: object, where: str) -> str | None:
    """What is wrong with one rule (a line naming ``where`` and the key), or None."""
    if not isinstance(rule, dict) or "type" not in rule:
        return f"{where}: expected a mapping with a type (one of {', '.join(RULE_TYPES)}); got {rule!r}"
    kind = rule["type"]
    if kind not in RULE_SETTINGS:
        return f"{where}.type: unknown rule {kind!r} (the rules: {', '.join(RULE_TYPES)})"
    required, optional = RULE_SETTINGS[kind]
    allowed = {"type"} | required | optional
    unknown = sorted(set(rule) - allowed)
    if unknown:
        return f"{where}.{unknown[0]}: not a setting of a {kind} rule (allowed: {', '.join(sorted(allowed))})"
    missing = sorted(required - set(rule))
    if missing:
        return f"{where}.{missing[0]}: required by a {kind} rule"
    if kind == "regex":
        if not isinstance(rule["pattern"], str):
            return f"{where}.pattern: required, a regular expression"
        try:
            re.compile(rule["pattern"].replace("{answer}", "0"))
        except re.error as error:
            return f"{where}.pattern: not a regular expression ({error})"
    if kind in ("words", "lines", "words_per_line"):
        return _bounds_problem(rule, where)
    if kind == "rhyme":
        pairs = rule["pairs"]
        if (
            not isinstance(pairs, list)
            or not pairs
            or not all(
                isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in pair)
                for pair in pairs
            )
        ):
            return f"{where}.pairs: expected a list of [i, j] line numbers (from 1), e.g. [[2, 4]]; got {pairs!r}"
    if kind == "keywords":
        words = rule["words"]
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            return f"{where}.words: expected a non-empty list of words; got {words!r}"
        if rule.get("mode", "all") not in KEYWORD_MODES:
            return f"{where}.mode: one of {', '.join(KEYWORD_MODES)}; got {rule['mode']!r}"
    return None


def rules_problem(rules: object, where: str) -> str | None:
    if not isinstance(rules, list) or not rules:
        return f"{where}: expected a non-empty list of rules"
    for index, rule in enumerate(rules):
        problem = rule_problem(rule, f"{where}[{index}]")
        if problem:
            return problem
    return None


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _last_word(line: str) -> str:
    words = re.findall(r"[A-Za-z']+", line)
    return words[-1].lower().strip("'") if words else ""


def _rhymes(first: str, second: str) -> tuple[bool, str | None]:
    """Whether two words share a rhyming part (the last stressed vowel onwards) in some CMU pronunciation."""
    try:
        import pronouncing
    except ImportError:
        raise ImportError("the rhyme rule needs the pronouncing package: pip install 'dpolab[eval]'") from None
    parts = []
    for word in (first, second):
        phones = pronouncing.phones_for_word(word)
        if not phones:
            return False, f"no pronunciation for {word!r}"
        parts.append({pronouncing.rhyming_part(p) for p in phones})
    return bool(parts[0] & parts[1]), None


def _within(count: int, rule: dict) -> bool:
    return rule.get("min", 0) <= count <= rule.get("max", count)


def check_rule(rule: dict, candidate: str, reference: str | None) -> tuple[bool, str]:
    """(passed, what was seen) for one rule on one candidate."""
    kind = rule["type"]
    if kind == "regex":
        pattern = rule["pattern"].replace("{answer}", re.escape(reference or ""))
        return re.search(pattern, candidate) is not None, f"/{rule['pattern']}/"
    if kind == "contains_answer":
        return bool(reference) and reference.strip() in candidate, "answer present"
    if kind == "words":
        count = len(candidate.split())
        return _within(count, rule), f"{count} words"
    lines = _lines(candidate)
    if kind == "lines":
        return _within(len(lines), rule), f"{len(lines)} lines"
    if kind == "words_per_line":
        counts = [len(line.split()) for line in lines]
        return bool(counts) and all(_within(c, rule) for c in counts), f"words per line {counts}"
    if kind == "rhyme":
        for first, second in rule["pairs"]:
            if max(first, second) > len(lines):
                return False, f"lines {first} and {second}: the text has {len(lines)} lines"
            words = _last_word(lines[first - 1]), _last_word(lines[second - 1])
            rhymes, why = _rhymes(*words)
            if not rhymes:
                return False, f"lines {first} and {second}: {why or f'{words[0]!r} and {words[1]!r} do not rhyme'}"
        return True, "rhymes"
    found = {w: re.search(rf"\b{re.escape(w.lower())}\b", candidate.lower()) is not None for w in rule["words"]}
    mode = rule.get("mode", "all")
    passed = all(found.values()) if mode == "all" else any(found.values()) if mode == "any" else not any(found.values())
    return passed, f"{mode} of {rule['words']}: found {[w for w, f in found.items() if f]}"


def needs_answer(rules: list[dict]) -> bool:
    """Whether a rule compares with the row's reference (``contains_answer``, ``{answer}`` in a pattern)."""
    return any(r["type"] == "contains_answer" or "{answer}" in r.get("pattern", "") for r in rules)


def rule_names(rules: list[dict]) -> list[str]:
    """A key per rule for the per-rule results: its type, numbered when a type repeats (``lines``, ``regex#2``)."""
    seen: dict[str, int] = {}
    names = []
    for rule in rules:
        seen[rule["type"]] = seen.get(rule["type"], 0) + 1
        names.append(rule["type"] if seen[rule["type"]] == 1 else f"{rule['type']}#{seen[rule['type']]}")
    return names


@dataclass(frozen=True)
class RuleSet:
    """Rules for every prompt (``rules``) and per prompt (``prompts``: prompt_id → rules, which replace
    ``rules`` for that prompt)."""

    rules: list[dict] | None = None
    prompts: dict[str, list[dict]] | None = None

    def for_prompt(self, prompt_id: object) -> list[dict] | None:
        return (self.prompts or {}).get(str(prompt_id), self.rules)


def rule_set(values: object, where: str) -> RuleSet:
    """A rule file's content as a :class:`RuleSet`: a list of rules (every prompt), or a mapping with
    ``rules`` and/or ``prompts``. ``ValueError`` naming ``where`` and the key when it is wrong."""
    if isinstance(values, list):
        values = {"rules": values}
    if not isinstance(values, dict) or not values:
        raise ValueError(f"{where}: expected a list of rules or a mapping with 'rules' and/or 'prompts'")
    unknown = sorted(set(values) - {"rules", "prompts"})
    if unknown:
        raise ValueError(f"{where}: {unknown[0]!r} is not a key of a rule file (keys: rules, prompts)")
    problem = rules_problem(values["rules"], f"{where}: rules") if "rules" in values else None
    prompts = values.get("prompts")
    if prompts is not None:
        if not isinstance(prompts, dict) or not prompts:
            problem = problem or f"{where}: prompts: expected a mapping of prompt_id to a list of rules"
        else:
            for key, rules in prompts.items():
                problem = problem or rules_problem(rules, f"{where}: prompts.{key}")
    if problem:
        raise ValueError(problem)
    return RuleSet(values.get("rules"), {str(k): v for k, v in prompts.items()} if prompts else None)


def read_rule_file(path: str | Path) -> RuleSet:
    """A YAML or JSON rule file (YAML is a superset of JSON) as a :class:`RuleSet`."""
    from dpolab import safe_yaml

    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"{path}: cannot read the rule file ({error.strerror})") from None
    values = safe_yaml.load(text, str(path))
    return rule_set(values, str(path))


class RulesJudge:
    """Format rules, each pass or fail; the score is the share passed and ``details`` keeps every rule's
    result. The rules (see docs/evaluation.md#rules):

    - ``{type: lines, min: A, max: B}``: the number of non-empty lines (bounds inclusive, either optional);
    - ``{type: words, min, max}``: the number of words (whitespace-separated);
    - ``{type: words_per_line, min, max}``: every non-empty line's number of words;
    - ``{type: rhyme, pairs: [[2, 4]]}``: the last words of those lines (numbered from 1, non-empty lines)
      rhyme: they share the rhyming part (the last stressed vowel onwards) of some CMU dictionary
      pronunciation; a word the dictionary lacks fails the rule, with the word named;
    - ``{type: keywords, words: [...], mode: all|any|none}``: whole-word, case-insensitive;
    - ``{type: regex, pattern: P}``: searched in the candidate; ``{answer}`` in P stands for the reference;
    - ``{type: contains_answer}``: the reference appears verbatim.
    """

    name = "rules"

    def __init__(self, rules: list[dict] | RuleSet) -> None:
        self.rule_set = rules if isinstance(rules, RuleSet) else rule_set(rules, "rules")
        every = [self.rule_set.rules or [], *(self.rule_set.prompts or {}).values()]
        self.needs_reference = any(needs_answer(rules) for rules in every)
        self.per_prompt = self.rule_set.prompts is not None
        if any(r["type"] == "rhyme" for rules in every for r in rules):
            import importlib.util

            if importlib.util.find_spec("pronouncing") is None:  # before any candidate is judged
                raise ValueError("the rhyme rule needs the pronouncing package: pip install 'dpolab[eval]'")

    def check_prompts(self, prompt_ids: list, source: object) -> None:
        """Every prompt has rules, and every prompt the rule file names is in the data."""
        known = {str(p) for p in prompt_ids}
        stray = sorted(set(self.rule_set.prompts or {}) - known)
        if stray:
            raise ValueError(f"the rule file names prompt_id {stray[0]!r}, which is not in {source}")
        if self.rule_set.rules is None:
            bare = [p for p in prompt_ids if str(p) not in (self.rule_set.prompts or {})]
            if bare:
                raise ValueError(
                    f"{source}: prompt_id {bare[0]!r} has no rules (give 'rules' for every prompt in the rule "
                    "file, or an entry for it under 'prompts')"
                )

    def score(self, items: list[Item], prompt_ids: list | None = None) -> list[Verdict]:
        verdicts = []
        for index, (_, candidate, reference) in enumerate(items):
            rules = self.rule_set.for_prompt(prompt_ids[index]) if prompt_ids is not None else self.rule_set.rules
            if not rules:
                verdicts.append(Verdict(None, "no rules for this prompt"))
                continue
            if reference is None and needs_answer(rules):
                verdicts.append(Verdict(None, "a rule needs the row's answer, and it has none"))
                continue
            results = [check_rule(rule, candidate, reference) for rule in rules]
            names = rule_names(rules)
            failed = [f"{name}: {seen}" for name, (passed, seen) in zip(names, results, strict=True) if not passed]
            verdicts.append(
                Verdict(
                    sum(passed for passed, _ in results) / len(rules),
                    "failed " + "; ".join(failed) if failed else None,
                    {name: passed for name, (passed, _) in zip(names, results, strict=True)},
                )
            )
        return verdicts

    def describe(self) -> dict:
        described: dict = {"kind": self.name, "rules": self.rule_set.rules}
        if self.rule_set.prompts is not None:
            described["prompts"] = self.rule_set.prompts
        return described


MATH_RUBRIC = """You grade solutions to maths problems. Compare the response with the reference answer and \
judge both the final answer and the reasoning process. Scores:
5: the final answer is correct and the process is correct and complete.
4: the final answer is correct but the process is missing steps or is very verbose.
3: the final answer is wrong but the process is mostly correct, or the final answer is correct but the \
process has clear errors.
2: the final answer is wrong and the process is mostly wrong.
1: everything is wrong, or there is no final result.
Reply with a one-sentence justification, then a last line of the form "Score: N" with N from 1 to 5."""

SCORE = re.compile(r"score\s*[:=]\s*\**\s*([1-5])\b", re.IGNORECASE)


def reply_text(content: object) -> str | None:
    """The text of a chat completion's ``message.content``: a string, or a list of ``{"type": "text", "text"}``
    parts joined; None for anything else (null, a number, an object, other parts)."""
    if isinstance(content, str):
        return content
    if (
        isinstance(content, list)
        and content
        and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
    ):
        return "".join(part["text"] for part in content)
    return None


def parse_score(reply: str) -> int | None:
    """The last ``Score: N`` (N in 1..5) in a reply; None when there is none."""
    found = SCORE.findall(reply)
    return int(found[-1]) if found else None


BEST_WORST_RUBRIC = """You compare candidate solutions to the same maths problem. Judge both the final answer \
and the reasoning process, as a careful teacher would. Reply with a one-sentence justification, then two last \
lines of the form "Best: N" and "Worst: M", where N and M are candidate numbers and N differs from M."""

BEST = re.compile(r"best\s*[:=]\s*\**\s*(?:candidate\s*)?#?(\d+)", re.IGNORECASE)
WORST = re.compile(r"worst\s*[:=]\s*\**\s*(?:candidate\s*)?#?(\d+)", re.IGNORECASE)


def parse_best_worst(reply: str, candidates: int) -> tuple[int, int] | None:
    """The last ``Best: N`` and ``Worst: M`` of a reply as 0-based indices; None when either is missing, out
    of 1..candidates, or both name the same candidate."""
    best, worst = BEST.findall(reply), WORST.findall(reply)
    if not best or not worst:
        return None
    chosen = int(best[-1]) - 1, int(worst[-1]) - 1
    if chosen[0] == chosen[1] or not all(0 <= c < candidates for c in chosen):
        return None
    return chosen


class RedirectRefused(Exception):
    """The endpoint redirected to another origin: the request (and its API key) is not sent there."""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only within the origin the user named; urllib would re-send Authorization anywhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            raise RedirectRefused(f"{req.full_url} redirected (HTTP {code}) to another origin: {_public(newurl)}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _public(url: str) -> str:
    """``url`` without user info, query or fragment: what may be written to files and logs."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


_OPENER = urllib.request.build_opener(_SameOriginRedirects)


class LLMJudge:
    name = "llm"
    needs_reference = False

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        rubric: str | None = None,
        retries: int = 4,
        backoff: float = 1.0,
        timeout: float = 60.0,
        concurrency: int = 4,
        temperature: float = 0.0,
        sleep=time.sleep,
        mode: Literal["grade", "best_worst"] = "grade",
    ) -> None:
        """``rubric``: the system prompt (default: :data:`MATH_RUBRIC` to grade, :data:`BEST_WORST_RUBRIC` to
        rank). ``mode``: ``grade`` scores each candidate alone (1-5); ``best_worst`` shows the judge all of a
        prompt's candidates and asks for the best and the worst (3D paper, App. C)."""
        if mode not in ("grade", "best_worst"):
            raise ValueError(f"mode: one of grade, best_worst; got {mode!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://; got {base_url!r}")
        if retries < 0 or backoff < 0 or timeout <= 0 or concurrency < 1:
            raise ValueError("need retries >= 0, backoff >= 0, timeout > 0 and concurrency >= 1")
        parts = urllib.parse.urlsplit(base_url)
        self.url = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))
        self.public_url = _public(self.url)  # never the query or user info, which may hold a key
        self.mode, self.groupwise = mode, mode == "best_worst"
        self.rubric = rubric if rubric is not None else BEST_WORST_RUBRIC if self.groupwise else MATH_RUBRIC
        self.model, self.api_key_env = model, api_key_env
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.concurrency, self.temperature, self.sleep = concurrency, temperature, sleep
        self.requests = 0  # HTTP requests sent, retries included
        self._failed = threading.Event()  # set when a request gave up: queued items then send nothing

    def _request(self, user: str) -> object:
        """The reply's ``message.content`` to the rubric and ``user`` as it came (normally a string)."""
        body = json.dumps(
            {
                "model": self.model,
                "temperature": self.temperature,
                "messages": [{"role": "system", "content": self.rubric}, {"role": "user", "content": user}],
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        error: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            self.requests += 1
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read())
                return payload["choices"][0]["message"]["content"]
            except RedirectRefused as refused:
                raise ValueError(
                    f"{refused}; the API key goes only to the origin of --base-url: name the final address"
                ) from None
            except urllib.error.HTTPError as failure:
                error = f"HTTP {failure.code}"
                if failure.code not in (408, 409, 429) and failure.code < 500:
                    hint = f" (is {self.api_key_env} set?)" if failure.code in (401, 403) else ""
                    raise ValueError(f"{self.public_url}: HTTP {failure.code} {failure.reason}{hint}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as failure:
                error = f"{type(failure).__name__}: {getattr(failure, 'reason', failure)}"
            except (ValueError, KeyError, IndexError, TypeError):
                error = "a reply that is not a chat completion"
        raise RuntimeError(f"{self.public_url}: gave up after {self.retries + 1} attempts; last error: {error}")

    def _reply(self, user: str) -> tuple[str | None, str | None]:
        """(the reply's text, None) or (None, why there is none); stops every queued request on give-up."""
        if self._failed.is_set():
            return None, "not sent: an earlier request gave up"
        try:
            reply = self._request(user)
        except RuntimeError:  # the command stops; nothing of this batch is written, so a rerun redoes it
            self._failed.set()
            raise
        text = reply_text(reply)
        if text is None:
            shown = json.dumps(reply, ensure_ascii=False)
            return None, f"judge reply without text content: content = {shown[:200]}"
        return text, None

    def _one(self, item: Item) -> Verdict:
        from dpolab.data.onpolicy import prompt_text

        prompt, candidate, reference = item
        if not candidate.strip():
            return Verdict(None, "empty generation")
        user = f"Problem:\n{prompt_text(prompt)}\n\nResponse:\n{candidate}\n"
        if reference is not None:
            user += f"\nReference answer:\n{reference}\n"
        text, why = self._reply(user)
        if text is None:
            return Verdict(None, why)
        score = parse_score(text)
        if score is None:
            return Verdict(None, f"unparsable judge reply: {text[:200]!r}")
        return Verdict(float(score), text[-200:])

    def _rank(self, group: tuple) -> list[Verdict]:
        """Best 1.0, worst 0.0, the others 0.5, from one request showing every non-empty candidate."""
        from dpolab.data.onpolicy import prompt_text

        prompt, candidates, reference = group
        shown = [i for i, c in enumerate(candidates) if c.strip()]
        verdicts = [Verdict(None, "empty generation") for _ in candidates]
        if len(shown) < 2:
            for i in shown:
                verdicts[i] = Verdict(None, "fewer than two non-empty candidates to compare")
            return verdicts
        user = f"Problem:\n{prompt_text(prompt)}\n"
        if reference is not None:
            user += f"\nReference answer:\n{reference}\n"
        user += "".join(f"\nCandidate {n}:\n{candidates[i]}\n" for n, i in enumerate(shown, start=1))
        text, why = self._reply(user)
        chosen = parse_best_worst(text, len(shown)) if text is not None else None
        if chosen is None:
            why = why or f"unparsable judge reply (need Best: N and Worst: M, N != M): {text[:200]!r}"
            for i in shown:
                verdicts[i] = Verdict(None, why)
            return verdicts
        best, worst = shown[chosen[0]], shown[chosen[1]]
        for i in shown:
            score, role = (1.0, "best") if i == best else (0.0, "worst") if i == worst else (0.5, "neither")
            verdicts[i] = Verdict(score, f"{role}: {text[-160:]}" if role != "neither" else role)
        return verdicts

    def score(self, items: list[Item]) -> list[Verdict]:
        if self.groupwise:
            raise ValueError("the best_worst llm judge ranks a prompt's candidates together: use score_groups")
        self._failed.clear()
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, items))

    def score_groups(self, groups: list[tuple]) -> list[list[Verdict]]:
        """Each (prompt, candidates, reference) ranked in one request (best_worst mode)."""
        self._failed.clear()
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._rank, groups))

    def describe(self) -> dict:  # the key's variable name, never the key
        import hashlib

        return {
            "kind": self.name,
            "url": self.public_url,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "rubric_sha256": hashlib.sha256(self.rubric.encode()).hexdigest()[:16],
            "temperature": self.temperature,
            "mode": self.mode,
        }
