"""Judges for ``dpolab data judge``: a score per (prompt, candidate, reference), or None with a reason.

- :class:`MathJudge`: 1 when the candidate's final number equals the reference's (GSM8K ``#### N`` or
  ``A: N``), 0 when it differs or the candidate states none; the reference must have one.
- :class:`RewardModelJudge`: the scalar output of a Hugging Face sequence-classification model
  (``num_labels = 1``) at the last token of prompt + candidate + EOS, e.g. a reward model trained with
  ``dpolab rm`` (scored exactly as it was trained: :mod:`dpolab.engine.scores`).
- :class:`RulesJudge`: the share of format rules (a regex, the answer's presence, word and line counts)
  that the candidate passes.
- :class:`LLMJudge`: an OpenAI-compatible chat-completions endpoint grading with a rubric (by default
  the 3D paper's 1–5 maths rubric, PAPERS.md §5). The API key is read from an environment variable at
  request time and never written; transient failures are retried with exponential back-off; a reply
  without a parsable score is recorded as such (score None, the reply kept in the note), never guessed.
  A reply whose ``content`` is not text (null, a number, an object, a list with other than text parts) is
  such a reply too: score None, the note saying what came back. A list of text parts is read as their text.
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


@dataclass(frozen=True)
class Verdict:
    score: float | None
    note: str | None = None  # why there is no score, or what the judge said


Item = tuple["str | list[dict]", str, "str | None"]  # prompt (text or chat messages), candidate, reference


class MathJudge:
    name = "math"
    needs_reference = True

    def score(self, items: list[Item]) -> list[Verdict]:
        from dpolab.data.scenarios import final_number, reference_number

        verdicts = []
        for _, candidate, reference in items:
            expected = reference_number(reference) if reference is not None else None
            if expected is None:
                verdicts.append(Verdict(None, f"the reference has no final number: {str(reference)[:80]!r}"))
                continue
            if not candidate.strip():
                verdicts.append(Verdict(None, "empty generation"))
                continue
            got = final_number(candidate)
            if got is None:
                verdicts.append(Verdict(0.0, "no final number (scored as wrong)"))
                continue
            verdicts.append(Verdict(float(abs(got - expected) < 1e-6)))
        return verdicts

    def describe(self) -> dict:
        return {"kind": self.name}


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
        from dpolab.engine.loading import default_device, load_model, load_tokenizer

        self.path = path
        self.model = load_model(path, "sequence_classification", allow_pickle=allow_pickle).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has num_labels = 1; this one has {self.model.config.num_labels}")
        self.tokenizer = load_tokenizer(path)
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


RULE_TYPES = ("regex", "contains_answer", "words", "lines")


class RulesJudge:
    """Format rules, each pass or fail; the score is the share passed. A rule is a mapping: ``{type: regex,
    pattern: P}`` (searched in the candidate; ``{answer}`` in P stands for the reference, regex-escaped),
    ``{type: contains_answer}``, ``{type: words, min: A, max: B}`` or ``{type: lines, min: A, max: B}``
    (bounds inclusive, either may be left out; lines are the non-empty ones)."""

    name = "rules"

    def __init__(self, rules: list[dict]) -> None:
        self.rules = rules
        self.needs_reference = any(r["type"] == "contains_answer" or "{answer}" in r.get("pattern", "") for r in rules)

    def _passes(self, rule: dict, candidate: str, reference: str | None) -> bool:
        kind = rule["type"]
        if kind == "regex":
            pattern = rule["pattern"].replace("{answer}", re.escape(reference or ""))
            return re.search(pattern, candidate) is not None
        if kind == "contains_answer":
            return bool(reference) and reference.strip() in candidate
        count = len(candidate.split()) if kind == "words" else sum(1 for line in candidate.splitlines() if line.strip())
        return rule.get("min", 0) <= count <= rule.get("max", count)

    def score(self, items: list[Item]) -> list[Verdict]:
        verdicts = []
        for _, candidate, reference in items:
            if self.needs_reference and reference is None:
                verdicts.append(Verdict(None, "a rule needs the row's answer, and it has none"))
                continue
            failed = [i for i, rule in enumerate(self.rules) if not self._passes(rule, candidate, reference)]
            note = f"failed rules {failed}" if failed else None
            verdicts.append(Verdict(1.0 - len(failed) / len(self.rules), note))
        return verdicts

    def describe(self) -> dict:
        return {"kind": self.name, "rules": self.rules}


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
        rubric: str = MATH_RUBRIC,
        retries: int = 4,
        backoff: float = 1.0,
        timeout: float = 60.0,
        concurrency: int = 4,
        temperature: float = 0.0,
        sleep=time.sleep,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://; got {base_url!r}")
        if retries < 0 or backoff < 0 or timeout <= 0 or concurrency < 1:
            raise ValueError("need retries >= 0, backoff >= 0, timeout > 0 and concurrency >= 1")
        parts = urllib.parse.urlsplit(base_url)
        self.url = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))
        self.public_url = _public(self.url)  # never the query or user info, which may hold a key
        self.model, self.api_key_env, self.rubric = model, api_key_env, rubric
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.concurrency, self.temperature, self.sleep = concurrency, temperature, sleep
        self.requests = 0  # HTTP requests sent, retries included
        self._failed = threading.Event()  # set when a request gave up: queued items then send nothing

    def _request(self, prompt: str | list[dict], candidate: str, reference: str | None) -> object:
        """The reply's ``message.content`` as it came (normally a string)."""
        from dpolab.data.onpolicy import prompt_text

        user = f"Problem:\n{prompt_text(prompt)}\n\nResponse:\n{candidate}\n"
        if reference is not None:
            user += f"\nReference answer:\n{reference}\n"
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

    def _one(self, item: Item) -> Verdict:
        prompt, candidate, reference = item
        if not candidate.strip():
            return Verdict(None, "empty generation")
        if self._failed.is_set():
            return Verdict(None, "not sent: an earlier request gave up")
        try:
            reply = self._request(prompt, candidate, reference)
        except RuntimeError:  # the command stops; nothing of this batch is written, so a rerun redoes it
            self._failed.set()
            raise
        text = reply_text(reply)
        if text is None:
            shown = json.dumps(reply, ensure_ascii=False)
            return Verdict(None, f"judge reply without text content: content = {shown[:200]}")
        score = parse_score(text)
        if score is None:
            return Verdict(None, f"unparsable judge reply: {text[:200]!r}")
        return Verdict(float(score), text[-200:])

    def score(self, items: list[Item]) -> list[Verdict]:
        self._failed.clear()
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, items))

    def describe(self) -> dict:  # the key's variable name, never the key
        import hashlib

        return {
            "kind": self.name,
            "url": self.public_url,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "rubric_sha256": hashlib.sha256(self.rubric.encode()).hexdigest()[:16],
            "temperature": self.temperature,
        }
