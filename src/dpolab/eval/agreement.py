"""Agreement between two judges' scores of the same candidates (``dpolab data agreement``).

Cohen's κ (Cohen 1960): κ = (p_o − p_e) / (1 − p_e), where p_o is the share of candidates both judges put
in the same category and p_e the share expected by chance, Σ_c p_A(c) · p_B(c) from each judge's own
category frequencies. κ = 1 is full agreement, 0 is chance level, below 0 is worse than chance. The
categories are the scores themselves (1-5 for the LLM judge, 0/1 for math, …), or "score ≥ threshold"
per judge, so judges on different scales can be compared (the 3D paper's "correct means score ≥ 4"
against the math judge's 0/1). The interval is a percentile bootstrap over prompts (a prompt's candidates
move together, as they share the prompt).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dpolab.eval.harness import BOOTSTRAP_RESAMPLES


def cohen_kappa(first: list, second: list) -> float:
    """Cohen's κ of two equally long label lists; nan when chance agreement is total (one label only)."""
    if len(first) != len(second) or not first:
        raise ValueError("need two equally long, non-empty lists of labels")
    table = confusion(first, second, sorted(set(first) | set(second)))
    total = table.sum()
    observed = np.trace(table) / total
    expected = float((table.sum(axis=1) / total) @ (table.sum(axis=0) / total))
    return float("nan") if expected == 1.0 else float((observed - expected) / (1.0 - expected))


def confusion(first: list, second: list, labels: list) -> np.ndarray:
    """Counts: rows are the first judge's labels, columns the second's, in ``labels``' order."""
    index = {label: i for i, label in enumerate(labels)}
    table = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for a, b in zip(first, second, strict=True):
        table[index[a], index[b]] += 1
    return table


def _category(score: float, threshold: float | None):
    return score if threshold is None else float(score >= threshold)


def paired_scores(first: str | Path, second: str | Path) -> tuple[list[tuple[float, float]], list[int], dict]:
    """The (first, second) scores of every candidate both judges scored, its prompt's number, and counts.

    The files are ``dpolab data judge`` outputs of the same candidates: matched by prompt_id, and each
    prompt's candidates must be the same texts in the same order (else it is an error naming the prompt)."""
    from dpolab.data.onpolicy import read_records

    need = ["prompt_id", "candidates", "scores"]
    a_rows = {r["prompt_id"]: r for r in read_records(first, need)}
    b_rows = {r["prompt_id"]: r for r in read_records(second, need)}
    shared = [p for p in a_rows if p in b_rows]
    if not shared:
        raise ValueError(f"{first} and {second} share no prompt_id: they are not judgements of the same candidates")
    pairs: list[tuple[float, float]] = []
    groups: list[int] = []
    unscored = 0
    for number, prompt_id in enumerate(shared):
        a, b = a_rows[prompt_id], b_rows[prompt_id]
        if a["candidates"] != b["candidates"]:
            raise ValueError(
                f"prompt_id {prompt_id!r}: the two files judge different candidates (or in another order); "
                "agreement needs both judges' scores of the same candidates"
            )
        for path, row in ((first, a), (second, b)):
            if len(row["scores"]) != len(row["candidates"]):
                raise ValueError(
                    f"{path}: prompt_id {prompt_id!r}: {len(row['scores'])} scores for "
                    f"{len(row['candidates'])} candidates"
                )
        for x, y in zip(a["scores"], b["scores"], strict=True):
            if x is None or y is None:
                unscored += 1
                continue
            pairs.append((float(x), float(y)))
            groups.append(number)
    counts = {
        "prompts": len(shared),
        "only_first": len(a_rows) - len(shared),
        "only_second": len(b_rows) - len(shared),
        "candidates": len(pairs),
        "unscored": unscored,
    }
    return pairs, groups, counts


def kappa_interval(
    first: list, second: list, groups: list[int], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of κ, resampling prompts (clusters) with replacement: each resample's
    confusion table is the sum of the drawn prompts' own tables."""
    labels = sorted(set(first) | set(second))
    index = {label: i for i, label in enumerate(labels)}
    size = len(labels)
    cells = np.array([index[a] * size + index[b] for a, b in zip(first, second, strict=True)])
    prompts, cluster = np.unique(np.asarray(groups), return_inverse=True)
    per_prompt = np.zeros((len(prompts), size * size))
    np.add.at(per_prompt, (cluster, cells), 1)
    draws = np.random.default_rng(seed).integers(0, len(prompts), size=(resamples, len(prompts)))
    times = np.zeros((resamples, len(prompts)))  # how often each prompt is drawn in each resample
    np.add.at(times, (np.arange(resamples)[:, None], draws), 1)
    tables = (times @ per_prompt).reshape(resamples, size, size)
    total = tables.sum(axis=(1, 2))
    observed = np.trace(tables, axis1=1, axis2=2) / total
    expected = np.einsum("ri,ri->r", tables.sum(axis=2), tables.sum(axis=1)) / total**2
    defined = expected < 1.0  # a resample with one category only has no κ
    if not defined.any():
        return float("nan"), float("nan")
    kappas = (observed[defined] - expected[defined]) / (1.0 - expected[defined])
    return float(np.quantile(kappas, 0.025)), float(np.quantile(kappas, 0.975))


def agreement(
    first: str | Path, second: str | Path, threshold_first: float | None = None, threshold_second: float | None = None
) -> dict:
    """κ with its interval, the observed agreement and the confusion table of two judge outputs."""
    pairs, groups, counts = paired_scores(first, second)
    if not pairs:
        raise ValueError(f"no candidate has a score from both {first} and {second}")
    a = [_category(x, threshold_first) for x, _ in pairs]
    b = [_category(y, threshold_second) for _, y in pairs]
    labels = sorted(set(a) | set(b))
    table = confusion(a, b, labels)
    low, high = kappa_interval(a, b, groups)
    kappa = cohen_kappa(a, b)
    undefined = None
    if math.isnan(kappa):  # one category only: p_e = 1, and κ = (p_o − p_e) / (1 − p_e) is 0 / 0
        shown = ", ".join(f"{label:g}" if isinstance(label, float) else str(label) for label in labels)
        undefined = (
            f"both judges put all {len(a)} candidates in one category ({shown}): chance agreement is then 1 and "
            "κ = (p_o − p_e) / (1 − p_e) is 0/0; judge candidates of mixed quality, or binarise with a threshold"
        )
    return {
        "first": str(first),
        "second": str(second),
        "thresholds": [threshold_first, threshold_second],
        **counts,
        "kappa": None if undefined else kappa,
        "kappa_undefined": undefined,
        "kappa_interval": [None, None] if undefined or math.isnan(low) else [low, high],
        "observed_agreement": float(np.trace(table) / table.sum()),
        "labels": labels,
        "confusion": table.tolist(),
    }


def table(result: dict) -> str:
    """The confusion table (rows: the first judge) in Markdown, then κ."""

    def shown(label) -> str:
        return f"{label:g}" if isinstance(label, float) else str(label)

    labels = [shown(label) for label in result["labels"]]
    lines = ["| first \\ second | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for label, row in zip(labels, result["confusion"], strict=True):
        lines.append(f"| {label} | " + " | ".join(str(n) for n in row) + " |")
    low, high = result["kappa_interval"]
    if result.get("kappa_undefined"):
        kappa = f"Cohen's κ is undefined: {result['kappa_undefined']}"
    elif low is None:
        kappa = f"Cohen's κ = {result['kappa']:.3f} (no interval: every bootstrap resample has one category only)"
    else:
        kappa = f"Cohen's κ = {result['kappa']:.3f} (95% interval {low:.3f} to {high:.3f}, bootstrap over prompts)"
    lines.append(
        f"\n{kappa}; observed agreement {result['observed_agreement']:.1%} over {result['candidates']} candidates of "
        f"{result['prompts']} prompts ({result['unscored']} left out: unscored by one judge or both)"
    )
    return "\n".join(lines)
