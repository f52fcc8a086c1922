"""``dpolab eval tokens``: each completion token's log-prob, and where a trained model changed it.

The Smaug paper's mechanism (PAPERS.md §4): when chosen and rejected share a prefix and differ in a few
tokens, DPO can lower its loss while lowering log π(y_w), because the tokens *after* the first difference
lose probability in both completions. This tool measures it on any pair file.

Each pair is tokenised as in training (:func:`dpolab.data.tokenize.tokenize_pairs`: prompt, then each
completion with the EOS token). Its *first difference* f is the length of the two completions' common
token prefix; a chosen token at position t is at offset t − f from it: negative in the shared prefix
(the same tokens, with the same prefixes, in both completions), 0 at the first token that differs,
positive after it. Every completion token gets its log-prob under the model and, with a reference (the
model the run started from), under the reference; the *change* of a token is the difference.

The summary's numbers are flat (a sweep reads them as ``evaluate/<name>``); ``S`` is ``chosen`` or
``rejected``:

- ``S_logp``, ``S_logp_reference``: mean over pairs of the completion's summed log-prob (the 3D paper's
  Table 1 columns "after" and "before", which are per token: ``S_logp_per_token`` and
  ``S_logp_reference_per_token``, the summed log-probs over the number of tokens); ``S_logratio``: the
  difference of the means;
- ``S_change_before``, ``S_change_at``, ``S_change_after``: the mean change per token before, at and after
  the first difference (pooled over the pairs' tokens); ``S_change_before_sum``, ``S_change_from_sum``:
  the mean over the pairs that differ of the summed change before it and from it on (the differing token
  included), which add up to their ``S_logratio``;
- without a reference there is no change: ``S_logp_before``, ``S_logp_at``, ``S_logp_after`` are the mean
  log-probs per token there instead, and the ``_sum``, ``_reference`` and ``_logratio`` keys are absent;
- ``first_difference``: the mean f; ``chosen_tokens``: the mean chosen length; ``pairs``;
  ``pairs_without_difference`` (identical completions: in the sums, not in the positional numbers).

``by_position`` (a list, which a sweep does not read) gives, per offset in [−window, window], the mean
change (or log-prob) of the chosen and of the rejected tokens there, and how many tokens each averages
(``chosen_tokens``, ``rejected_tokens``; the two completions may differ in length).

Pairs are tokenised with the model's tokenizer as ``dpolab train`` does, with its ``max_length``,
``max_prompt_length`` and ``truncation_mode`` when given; pairs cut or dropped by them are counted in the
summary's ``tokenize`` entry and printed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpolab.data.tokenize import TokenizedPair

SIDES = ("chosen", "rejected")


def first_difference(pair: TokenizedPair) -> int | None:
    """The first token position where the two completions differ (their common prefix length); None when
    they are the same token for token."""
    chosen, rejected = pair.chosen_ids, pair.rejected_ids
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    return None if shared == len(chosen) == len(rejected) else shared


def pair_token_logps(
    model, tokenizer, pairs: list[TokenizedPair], batch_size: int = 16, row_tokens: int | None = None, progress=None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair: (chosen, rejected) completion-token log-probs under ``model``, CPU float64, in order."""
    from dpolab.engine.logps import LogpEngine, item_token_logps

    if not pairs:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    longest = max(p.unique_tokens for p in pairs)
    engine = LogpEngine(row_tokens=max(row_tokens or 512, longest), pad_token_id=pad, device=device)
    per_item = item_token_logps(model, pairs, engine, batch_size, progress=progress)
    return [(branches[0][0], branches[1][0]) for branches in per_item]


def summarise(
    pairs: list[TokenizedPair],
    model_logps: list[tuple[torch.Tensor, torch.Tensor]],
    reference_logps: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    window: int = 40,
) -> dict:
    """The summary of the module docstring, from the per-token log-probs of :func:`pair_token_logps`."""
    if not pairs:
        raise ValueError("no pairs to summarise")
    if len(model_logps) != len(pairs) or (reference_logps is not None and len(reference_logps) != len(pairs)):
        raise ValueError("one entry of log-probs per pair is needed")
    summary: dict = {"pairs": len(pairs), "pairs_without_difference": 0}
    sums = {f"{side}_{what}": 0.0 for side in SIDES for what in ("logp", "logp_reference")}
    parts = {f"{side}_{part}": [0.0, 0] for side in SIDES for part in ("before", "at", "after")}  # [total, tokens]
    part_sums = {f"{side}_change_{part}_sum": 0.0 for side in SIDES for part in ("before", "from")}
    positions: dict[int, dict[str, list[float]]] = {}
    firsts, positioned = 0.0, 0
    for index, pair in enumerate(pairs):
        first = first_difference(pair)
        for side_index, side in enumerate(SIDES):
            values = model_logps[index][side_index]
            sums[f"{side}_logp"] += float(values.sum())
            if reference_logps is not None:
                sums[f"{side}_logp_reference"] += float(reference_logps[index][side_index].sum())
            if first is None:
                continue
            shown = values - reference_logps[index][side_index] if reference_logps is not None else values
            for part, selected in (
                ("before", shown[:first]),
                ("at", shown[first : first + 1]),
                ("after", shown[first + 1 :]),
            ):
                parts[f"{side}_{part}"][0] += float(selected.sum())
                parts[f"{side}_{part}"][1] += selected.numel()
            part_sums[f"{side}_change_before_sum"] += float(shown[:first].sum())
            part_sums[f"{side}_change_from_sum"] += float(shown[first:].sum())
            for position, value in enumerate(shown.tolist()):
                offset = position - first
                if -window <= offset <= window:
                    entry = positions.setdefault(offset, {s: [0.0, 0] for s in SIDES})
                    entry[side][0] += value
                    entry[side][1] += 1
        if first is None:
            summary["pairs_without_difference"] += 1
        else:
            firsts += first
            positioned += 1
    n = len(pairs)
    summary.update({f"{side}_logp": sums[f"{side}_logp"] / n for side in SIDES})
    side_tokens = {side: sum(len(p.branches[i]) for p in pairs) for i, side in enumerate(SIDES)}
    summary.update({f"{side}_logp_per_token": sums[f"{side}_logp"] / side_tokens[side] for side in SIDES})
    summary["chosen_tokens"] = sum(len(p.chosen_ids) for p in pairs) / n
    summary["first_difference"] = firsts / positioned if positioned else None
    what = "change" if reference_logps is not None else "logp"
    for key, (total, tokens) in parts.items():
        side, part = key.split("_")
        summary[f"{side}_{what}_{part}"] = total / tokens if tokens else None
    if reference_logps is not None:
        for side in SIDES:
            summary[f"{side}_logp_reference"] = sums[f"{side}_logp_reference"] / n
            summary[f"{side}_logp_reference_per_token"] = sums[f"{side}_logp_reference"] / side_tokens[side]
            summary[f"{side}_logratio"] = summary[f"{side}_logp"] - summary[f"{side}_logp_reference"]
        summary.update({key: value / positioned if positioned else None for key, value in part_sums.items()})
    summary["by_position"] = [
        {
            "offset": offset,
            **{side: (entry[side][0] / entry[side][1] if entry[side][1] else None) for side in SIDES},
            **{f"{side}_tokens": entry[side][1] for side in SIDES},
        }
        for offset, entry in sorted(positions.items())
    ]
    summary["by_position_shows"] = "change (model - reference)" if reference_logps is not None else "log-prob"
    return summary


def token_report(
    model_dir: str,
    data: str,
    reference_dir: str | None = None,
    window: int = 40,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> tuple[dict, list[dict]]:
    """Load the pairs and models, score every token; returns (summary, one row per pair with its tokens)."""
    from dpolab.console import progress_bar, quiet_libraries
    from dpolab.data.formats import load_examples
    from dpolab.data.tokenize import tokenize_pairs
    from dpolab.engine.loading import check_vocabulary, default_device, load_model, load_tokenizer

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1; got {limit}")
    if window < 0:
        raise ValueError(f"--window must be >= 0; got {window}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1; got {batch_size}")
    examples, _ = load_examples(data, advice=f"dpolab data check {data} lists them; fix or remove them")
    examples = examples[:limit]
    if not examples:
        raise ValueError(f"{data}: no pairs")
    with quiet_libraries():
        tokenizer = load_tokenizer(model_dir)
    pairs, report = tokenize_pairs(
        tokenizer, examples, max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode
    )
    if not pairs:
        raise ValueError(f"{data}: no pair left after tokenisation: " + "; ".join(report.lines()))
    scored = {}
    for role, directory in (("model", model_dir), ("reference", reference_dir)):
        if directory is None:
            continue
        with quiet_libraries():
            model = load_model(directory, allow_pickle=allow_pickle, device=default_device(), what=role)
        check_vocabulary(model, tokenizer, directory, model_dir)
        with progress_bar(progress, f"token log-probs ({role})", len(pairs)) as bar:
            scored[role] = pair_token_logps(model, tokenizer, pairs, batch_size, progress=bar)
        del model
    summary = summarise(pairs, scored["model"], scored.get("reference"), window)
    summary.update(model=str(model_dir), reference=str(reference_dir) if reference_dir else None, data=str(data))
    summary["tokenize"] = {"lines": report.lines(), **report.as_dict()}
    rows = []
    for index, pair in enumerate(pairs):
        row = {"row": pair.row, "first_difference": first_difference(pair)}
        for side_index, side in enumerate(SIDES):
            ids = pair.branches[side_index]
            row[f"{side}_tokens"] = tokenizer.convert_ids_to_tokens(list(ids))
            row[f"{side}_logps"] = [round(v, 6) for v in scored["model"][index][side_index].tolist()]
            if "reference" in scored:
                row[f"{side}_logps_reference"] = [round(v, 6) for v in scored["reference"][index][side_index].tolist()]
        rows.append(row)
    return summary, rows


def plot_positions(summaries: dict[str, dict], out: str | Path, title: str = "") -> None:
    """One line per summary (label → summary): the chosen tokens' mean change by offset from the first difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for axis, side in zip(axes, SIDES, strict=True):
        for label, summary in summaries.items():
            points = [(e["offset"], e[side]) for e in summary["by_position"] if e[side] is not None]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
        axis.axvline(0, color="grey", linewidth=0.8)
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_xlabel("token offset from the first differing token")
        axis.set_title(side)
    shows = next(iter(summaries.values()))["by_position_shows"]
    axes[0].set_ylabel(f"mean {shows}")
    axes[0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    from dpolab.outputs import atomic_path

    with atomic_path(out) as temporary:
        figure.savefig(temporary, dpi=110)
    plt.close(figure)


def table(summary: dict) -> str:
    """A few lines for the console."""
    lines = [f"{summary['pairs']} pairs ({summary['pairs_without_difference']} without a difference); "
             f"first difference at token {summary['first_difference']:.1f} of {summary['chosen_tokens']:.1f} on average"
             if summary["first_difference"] is not None else f"{summary['pairs']} pairs, none with a difference"]  # fmt: skip
    tokenize = summary.get("tokenize") or {}
    if tokenize.get("pairs_truncated") or tokenize.get("pairs_dropped") or tokenize.get("prompts_cut"):
        lines += tokenize["lines"]
    reference = summary.get("chosen_logp_reference") is not None
    what = "change" if reference else "logp"
    for side in SIDES:
        line = f"{side:>8}: mean log-prob {summary[f'{side}_logp']:.3f}"
        if reference:
            line += (
                f" (reference {summary[f'{side}_logp_reference']:.3f}, log-ratio {summary[f'{side}_logratio']:+.3f})"
            )
        cells = [f"{part} {summary[f'{side}_{what}_{part}']:+.4f}" for part in ("before", "at", "after")
                 if summary.get(f"{side}_{what}_{part}") is not None]  # fmt: skip
        if cells:
            line += f"; per-token {'change' if reference else 'log-prob'} " + ", ".join(cells)
        lines.append(line)
    return "\n".join(lines)
