"""Final answers of maths solutions and whether two agree: the one answer checker of dpolab.

*Where* the answer is, is a format question: GSM8K's ``#### N`` (the last such line), the ``A: N`` form
of dpolab's synthetic data, or MATH's ``\\boxed{...}``; a reference may also be a bare answer (``72``,
``\\frac{1}{2}``). A candidate with none of these has no final answer (a model that never states one is
wrong, not guessed at from its last number).

*What* the answer is and whether two are equal is HF's math-verify: it parses LaTeX and plain
expressions into sympy and compares them symbolically and numerically (``1,200`` = ``1200``,
``0.5`` = ``\\frac{1}{2}`` = ``1/2``, ``\\frac{\\sqrt2}{2}`` = ``\\frac{1}{\\sqrt2}``). No normalisation
is written here.
"""

from __future__ import annotations

import re
import threading

PROSE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
MARKED = re.compile(r"(?:####|(?<![A-Za-z])A:)[ \t]*([^\n]*)")


def _timeout() -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=_timeout())


def answer_span(text: str) -> str | None:
    """The text of the final answer: after the last ``####`` (else the last ``A:``) up to the line's end,
    else the whole text when it has a ``\\boxed{}``; None when the solution marks no answer."""
    for marker in ("####", "A:"):
        found = [m.group(1) for m in MARKED.finditer(text) if m.group(0).startswith(marker)]
        if found and found[-1].strip():
            return found[-1].strip()
    return text if "\\boxed" in text else None


def parsed_answer(text: str, bare: bool = False) -> list | None:
    """math-verify's reading of a solution's final answer (None when there is none or it does not parse).
    ``bare``: a text with no marked answer is itself the answer (a reference such as ``72`` or ``x^2+1``)."""
    span = answer_span(text)
    if span is not None:
        return _parse(span) or None
    if not bare:
        return None
    whole = text.strip()
    # A bare expression (no word outside a LaTeX command) is read as LaTeX first, since 1+x^2 would read as its
    # first number; a text with words is read as text (as LaTeX, "no answer" would be the product n·o·a·…).
    expression = "$" not in whole and PROSE.search(whole) is None
    return (_parse(f"${whole}$") if expression else []) or _parse(whole) or None


def answers_match(candidate: str, reference: str) -> bool | None:
    """True when the candidate's final answer equals the reference's (math-verify), False when it differs
    or the candidate states none; None when the reference has no answer one can read."""
    from math_verify import verify

    gold = parsed_answer(reference, bare=True)
    if gold is None:
        return None
    target = parsed_answer(candidate)
    return target is not None and verify(gold, target, timeout_seconds=_timeout())
