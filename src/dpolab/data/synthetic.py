"""Procedural maths word problems with GSM8K-style step-by-step solutions: deterministic, no downloads.

Each problem is a chain of ``steps`` arithmetic operations on a quantity. The solution has one line per
step with a calculator annotation ``<<a+b=c>>`` and ends with ``#### N``, as GSM8K's answers do::

    Mia has 12 marbles. She buys 5 more. Then she gives away 3. Then she doubles what she has.
    How many marbles does Mia have now?

    Mia starts with 12 marbles and buys 5 more: 12 + 5 = <<12+5=17>>17.
    She gives away 3: 17 - 3 = <<17-3=14>>14.
    She doubles them: 14 * 2 = <<14*2=28>>28.
    #### 28
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Iris", "Theo", "Lena", "Ravi", "Sara", "Hugo"]
ITEMS = ["marbles", "apples", "stickers", "books", "coins", "pencils", "shells", "cards"]


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # GSM8K style: steps with <<…>> annotations, then "#### N"
    result: int

    def as_row(self) -> dict:
        return {"question": self.question, "answer": self.answer}


def _step(rng: random.Random, value: int, max_value: int) -> tuple[str, str, str, int]:
    """One operation: (question phrase, solution phrase, operator text, new value)."""
    choices = ["add", "sub", "mul"] if value * 2 <= max_value else ["add", "sub"]
    if value <= 2:
        choices = [c for c in choices if c != "sub"]
    kind = rng.choice(choices)
    if kind == "add":
        amount = rng.randint(2, max(2, min(20, max_value - value)))
        return f"buys {amount} more", f"buys {amount} more", f"{value} + {amount}", value + amount
    if kind == "sub":
        amount = rng.randint(1, value - 1)
        return f"gives away {amount}", f"gives away {amount}", f"{value} - {amount}", value - amount
    factor = rng.randint(2, max(2, min(4, max_value // max(value, 1))))
    word = {2: "doubles", 3: "triples", 4: "quadruples"}[factor]
    return f"{word} what they have", f"{word} them", f"{value} * {factor}", value * factor


def make_problem(rng: random.Random, steps: int = 3, max_value: int = 200) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(3, 30)
    question = [f"{name} has {value} {item}."]
    lines = []
    for index in range(steps):
        asked, told, expression, new = _step(rng, value, max_value)
        question.append(f"Then {name} {asked}." if index else f"{name} {asked}.")
        lead = f"{name} starts with {value} {item} and {told}" if index == 0 else f"Then {name} {told}"
        compact = expression.replace(" ", "")
        lines.append(f"{lead}: {expression} = <<{compact}={new}>>{new}.")
        value = new
    question.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(question), "\n".join(lines + [f"#### {value}"]), value)


def make_problems(
    count: int,
    seed: int = 0,
    min_steps: int = 2,
    max_steps: int = 4,
    max_value: int = 200,
    distinct: bool = False,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[Problem]:
    """``count`` problems, deterministic for ``seed``; difficulty = number of steps and size of numbers.

    ``distinct``: no two problems share a question. ``exclude``: questions never to produce (e.g. the
    training set's, so that held-out problems are really held out). Either raises ``ValueError`` when
    the settings cannot give ``count`` such problems.
    """
    if count < 0 or min_steps < 1 or max_steps < min_steps or max_value < 10:
        raise ValueError("need count >= 0, 1 <= min_steps <= max_steps and max_value >= 10")
    rng = random.Random(seed)
    if not distinct and not exclude:
        return [make_problem(rng, rng.randint(min_steps, max_steps), max_value) for _ in range(count)]
    problems, seen = [], set(exclude)
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 20 * count + 1000:
            raise ValueError(
                f"could only make {len(problems)} of {count} distinct problems with steps {min_steps}-{max_steps} "
                f"and max_value {max_value}; allow more steps or larger numbers"
            )
        problem = make_problem(rng, rng.randint(min_steps, max_steps), max_value)
        if problem.question in seen:
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def wrong_solution(problem: Problem, rng: random.Random) -> str:
    """A wrong solution of a *different shape* (the high-edit-distance rejected of the quickstart).

    It misreads the problem: one line that combines the numbers written in the question in a way the
    problem does not ask for (adds them all, subtracts the rest from the first, or multiplies the first
    two), with its own wording, and a final answer different from the correct one.
    """
    import re

    numbers = [int(n) for n in re.findall(r"\d+", problem.question)]
    first, rest = numbers[0], numbers[1:]
    if rest:
        strategies = [
            ("Adding up every number in the question", " + ".join(map(str, numbers)), sum(numbers)),
            ("Taking the others away from the first number", " - ".join(map(str, numbers)), first - sum(rest)),
            ("Multiplying the first two numbers", f"{first} * {rest[0]}", first * rest[0]),
            ("Adding the first two numbers and one more", f"{first} + {rest[0]} + 1", first + rest[0] + 1),
        ]
    else:  # every operation is a word ("doubles"): misread it
        strategies = [
            ("Doubling the number in the question", f"{first} * 2", first * 2),
            ("Adding ten to the number in the question", f"{first} + 10", first + 10),
        ]
    rng.shuffle(strategies)
    wrong = [s for s in strategies if s[2] != problem.result and s[2] >= 0]
    # Should every strategy happen to hit the answer: be off by ten.
    lead, expression, value = (wrong or [("Adding ten to the answer", f"{problem.result} + 10", problem.result + 10)])[
        0
    ]
    compact = expression.replace(" ", "")
    return f"{lead}: {expression} = <<{compact}={value}>>{value}.\nThe answer is {value}.\n#### {value}"


def final_answer(text: str) -> str | None:
    """The final number of a solution: GSM8K's ``#### N`` or the ``A: N`` form; None if absent."""
    import re

    for pattern in (r"####\s*(-?[\d,]*\.?\d+)", r"A:\s*\$?(-?[\d,]*\.?\d+)"):
        found = re.findall(pattern, text)
        if found:
            return found[-1].replace(",", "")
    return None


LABELS = "ABCDEFGH"


def choice_question(problem: Problem, rng: random.Random, choices: int = 4, number: int = 0) -> dict:
    """A multiple-choice version of ``problem`` in ARC's schema (``dpolab data from-choices --schema arc``,
    ``dpolab eval harness --tasks arc``): the correct final number among ``choices - 1`` wrong ones.

    The wrong numbers are the mistakes a solver makes on these problems, drawn without repeats: the value
    before the last step (stopping early), the results of :func:`wrong_solution`'s misreadings (adding every
    number, subtracting the rest from the first, ...), and the answer off by 1, 2 or 10; all different from
    the answer and non-negative. The correct choice's position is drawn uniformly."""
    import re

    if not 2 <= choices <= len(LABELS):
        raise ValueError(f"choices must be between 2 and {len(LABELS)}; got {choices}")
    results = [int(m) for m in re.findall(r">>(-?\d+)", problem.answer)]
    numbers = [int(n) for n in re.findall(r"\d+", problem.question)]
    first, rest = numbers[0], numbers[1:]
    pool = [results[-2]] if len(results) >= 2 else []
    pool += [sum(numbers), first - sum(rest)] + ([first * rest[0], first + rest[0] + 1] if rest else [first * 2])
    pool += [problem.result + d for d in (1, -1, 2, -2, 10, -10)]
    wrong = list(dict.fromkeys(v for v in pool if v != problem.result and v >= 0))
    rng.shuffle(wrong)
    if len(wrong) < choices - 1:
        raise ValueError(
            f"problem {problem.question!r}: only {len(wrong)} distinct wrong answers for {choices} choices"
        )
    options = wrong[: choices - 1]
    answer = rng.randrange(choices)
    options.insert(answer, problem.result)
    return {
        "id": f"synthetic-{number}",
        "question": problem.question,
        "choices": {"text": [str(v) for v in options], "label": list(LABELS[:choices])},
        "answerKey": LABELS[answer],
    }
