"""Edit distance between chosen and rejected: how "low-edit" a preference data set is (Smaug §3–5).

Per pair: the normalised Levenshtein distance in characters (and in tokens, given a tokenizer), and
the position of the first difference, absolute (characters) and relative (÷ the longer completion).
Summary: mean, median, quantiles, and the share of pairs below thresholds. Uses rapidfuzz's C
implementation; 400k pairs of a few hundred characters take seconds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from rapidfuzz.distance import Levenshtein

from dpolab.outputs import atomic_path, write_json

THRESHOLDS = (0.05, 0.1, 0.2, 0.5)


@dataclass
class EditStats:
    char_distance: list[float]
    first_difference: list[int]
    first_difference_relative: list[float]
    token_distance: list[float] | None = None

    def summary(self) -> dict:
        def describe(values: list[float]) -> dict:
            ordered = sorted(values)
            n = len(ordered)
            quantile = lambda q: ordered[min(n - 1, int(q * n))]  # noqa: E731
            return {
                "mean": statistics.fmean(ordered),
                "median": statistics.median(ordered),
                "p10": quantile(0.1),
                "p25": quantile(0.25),
                "p75": quantile(0.75),
                "p90": quantile(0.9),
                "share_below": {str(t): sum(v < t for v in ordered) / n for t in THRESHOLDS},
            }

        out = {
            "pairs": len(self.char_distance),
            "char_distance": describe(self.char_distance),
            "first_difference_chars": describe([float(v) for v in self.first_difference]),
            "first_difference_relative": describe(self.first_difference_relative),
        }
        if self.token_distance is not None:
            out["token_distance"] = describe(self.token_distance)
        return out


def _first_difference(a: str, b: str) -> int:
    limit = min(len(a), len(b))
    for index in range(limit):
        if a[index] != b[index]:
            return index
    return limit


def edit_stats(chosen: list[str], rejected: list[str], tokenizer=None) -> EditStats:
    """Statistics over aligned lists of chosen and rejected completions (prompts excluded)."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError("need equally many, and at least one, chosen and rejected completions")
    char = [Levenshtein.normalized_distance(a, b) for a, b in zip(chosen, rejected, strict=True)]
    first = [_first_difference(a, b) for a, b in zip(chosen, rejected, strict=True)]
    relative = [f / max(len(a), len(b), 1) for f, a, b in zip(first, chosen, rejected, strict=True)]
    tokens = None
    if tokenizer is not None:
        encoded_chosen = tokenizer(chosen, add_special_tokens=False)["input_ids"]
        encoded_rejected = tokenizer(rejected, add_special_tokens=False)["input_ids"]
        tokens = [Levenshtein.normalized_distance(a, b) for a, b in zip(encoded_chosen, encoded_rejected, strict=True)]
    return EditStats(char, first, relative, tokens)


def write_outputs(stats: EditStats, out_dir: str | Path, title: str) -> dict:
    """summary.json and histogram.png in ``out_dir``; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = stats.summary()
    write_json(out / "summary.json", summary)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("normalised edit distance (characters)", stats.char_distance),
        ("first difference (share of the longer completion)", stats.first_difference_relative),
    ]
    if stats.token_distance is not None:
        panels.insert(1, ("normalised edit distance (tokens)", stats.token_distance))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4))
    for ax, (label, values) in zip(axes, panels, strict=True):
        ax.hist(values, bins=40, range=(0, 1), color="#1b9e77")
        ax.set(xlabel=label, ylabel="pairs")
    fig.suptitle(f"{title}: {len(stats.char_distance)} pairs")
    fig.tight_layout()
    with atomic_path(out / "histogram.png") as temporary:
        fig.savefig(temporary, dpi=100)
    plt.close(fig)
    return summary
