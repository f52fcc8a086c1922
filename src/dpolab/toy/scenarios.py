"""The toy model's data scenarios (3D-properties paper §3.2, Figure 3 / Table 4).

4 prompts, 10 responses. For prompt i (0-based here; the paper counts from 1): response i is the
chosen one, responses 4–7 are the rejected ones (the paper's 5–8), responses 8–9 never appear in
the data (the paper's "unseen" 9–10). The other prompts' chosen responses are in no pair of prompt
i either.

A scenario fixes the Step-1 (SFT) target distribution of every prompt. "On-policy" means likely
under that initial model; "off-policy" means rare.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

NUM_PROMPTS = 4
NUM_RESPONSES = 10
REJECTED = (4, 5, 6, 7)
UNSEEN = (8, 9)

# Initial probabilities of the presets (written down in docs/toy.md).
ON_POLICY_CHOSEN = 0.30  # the chosen response is the most likely single response
OFF_POLICY_CHOSEN = 0.02
ON_POLICY_REJECTED = 0.15  # each of the 4 rejected responses: 0.60 together
OFF_POLICY_REJECTED = 0.01  # each: 0.04 together


def chosen_index(prompt: int) -> int:
    return prompt


def other_indices(prompt: int) -> list[int]:
    """Responses that are in no pair of this prompt: the other prompts' chosen ones and the unseen ones."""
    return [r for r in range(NUM_RESPONSES) if r != prompt and r not in REJECTED]


@dataclass(frozen=True)
class Scenario:
    """Step-1 target probabilities, one row per prompt, each summing to 1."""

    name: str
    targets: tuple[tuple[float, ...], ...]
    description: str = ""

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.targets, dtype=torch.float64)


def grouped_targets(chosen: float, rejected_each: float) -> tuple[tuple[float, ...], ...]:
    """Targets with π(chosen) = ``chosen``, each rejected = ``rejected_each``, the rest spread evenly
    over the 5 responses that are in no pair of the prompt (3 other-chosen + 2 unseen)."""
    rest = 1.0 - chosen - len(REJECTED) * rejected_each
    if rest <= 0:
        raise ValueError(f"chosen + 4 × rejected_each must be below 1; got {chosen} + 4 × {rejected_each}")
    rows = []
    for prompt in range(NUM_PROMPTS):
        row = [0.0] * NUM_RESPONSES
        row[chosen_index(prompt)] = chosen
        for r in REJECTED:
            row[r] = rejected_each
        others = other_indices(prompt)
        for r in others:
            row[r] = rest / len(others)
        rows.append(tuple(row))
    return tuple(rows)


PRESETS: dict[str, Scenario] = {
    "1": Scenario("1", grouped_targets(ON_POLICY_CHOSEN, ON_POLICY_REJECTED), "chosen on-policy, rejected on-policy"),
    "2": Scenario("2", grouped_targets(OFF_POLICY_CHOSEN, ON_POLICY_REJECTED), "chosen off-policy, rejected on-policy"),
    "3": Scenario("3", grouped_targets(ON_POLICY_CHOSEN, OFF_POLICY_REJECTED), "chosen on-policy, rejected off-policy"),
    "4": Scenario(
        "4", grouped_targets(OFF_POLICY_CHOSEN, OFF_POLICY_REJECTED), "chosen off-policy, rejected off-policy"
    ),
}


def validate_targets(targets: object, source: str = "scenario") -> tuple[tuple[float, ...], ...]:
    """Check a 4 × 10 matrix of probabilities; ``ValueError`` naming the field otherwise."""
    if not isinstance(targets, (list, tuple)) or len(targets) != NUM_PROMPTS:
        raise ValueError(f"{source}: targets must be a list of {NUM_PROMPTS} rows (one per prompt)")
    rows = []
    for i, row in enumerate(targets):
        field = f"{source}: targets[{i}]"
        if not isinstance(row, (list, tuple)) or len(row) != NUM_RESPONSES:
            raise ValueError(f"{field} must list {NUM_RESPONSES} probabilities")
        values = []
        for j, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{field}[{j}] must be a number; got {value!r}")
            if not (0.0 <= value <= 1.0):
                raise ValueError(f"{field}[{j}] must lie in [0, 1]; got {value}")
            values.append(float(value))
        total = sum(values)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"{field} sums to {total:.6g}, not 1")
        if values[chosen_index(i)] <= 0 or any(values[r] <= 0 for r in REJECTED):
            raise ValueError(f"{field}: the chosen and rejected responses need positive probability")
        rows.append(tuple(values))
    return tuple(rows)


def load_scenario(spec: str) -> Scenario:
    """A preset name (``1``–``4``) or a YAML/JSON file.

    The file holds either ``targets`` (4 rows of 10 probabilities) or the grouped form
    ``chosen`` + ``rejected_each`` (see :func:`grouped_targets`), plus an optional ``name``.
    """
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"scenario {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            from dpolab import safe_yaml

            data = safe_yaml.load(text, str(path))  # no aliases, no key given twice
        else:
            from dpolab.data.formats import _parse_json

            data = _parse_json(text)
    except ValueError as error:  # a parse error becomes one line naming the file
        raise ValueError(error.args[0] if str(path) in str(error) else f"{path}: cannot parse: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'targets' or 'chosen' + 'rejected_each'")
    allowed = {"name", "description", "targets", "chosen", "rejected_each"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    name = str(data.get("name", path.stem))
    if "targets" in data:
        targets = validate_targets(data["targets"], str(path))
    elif "chosen" in data and "rejected_each" in data:
        for key in ("chosen", "rejected_each"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{path}: {key} must be a number in (0, 1); got {value!r}")
        try:
            targets = grouped_targets(float(data["chosen"]), float(data["rejected_each"]))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    else:
        raise ValueError(f"{path}: give 'targets' or both 'chosen' and 'rejected_each'")
    return Scenario(name, targets, str(data.get("description", "")))
