"""``dpolab eval contamination``: was a data set in the model's training data? Min-K% Prob and Min-K%++.

For each text x = (x_1 … x_n), the model gives every token after the first its log-probability
log p(x_t | x_<t) and, from the whole next-token distribution, its mean μ_t = E_{z∼p(·|x_<t)}[log p(z | x_<t)]
and standard deviation σ_t (:class:`dpolab.engine.logps.TokenLogps` ``moments``). Per text:

- ``min_k`` — **Min-K% Prob** (Shi et al. 2023, "Detecting Pretraining Data from Large Language Models",
  §3): the mean of the k% lowest token log-probs. Text seen in training has few very unlikely tokens.
- ``min_k_plus_plus`` — **Min-K%++** (Zhang et al. 2024, "Min-K%++: Improved Baseline for Detecting
  Pre-Training Data from LLMs", Eq. 4): each token's (log p(x_t | x_<t) − μ_t) / σ_t, then the mean of the
  k% lowest. Training pushes seen tokens to local maxima of the likelihood, which this standardisation finds.
- ``loss`` — the mean token log-prob (k = 100%), the plain baseline both papers compare with.

Higher means "more likely seen" for all three. With a ``label`` column (seen/unseen), each score's
**AUROC** separating the two (the Mann–Whitney probability that a seen text outscores an unseen one, ties
counting ½) with a 95% stratified-bootstrap interval. With a reference model (``--reference``), the
Smaug-style comparison (PAPERS.md §4): per text the model's score minus the reference's on the same
text, their mean with an interval, the share of texts the model scores higher, and — with labels —
the AUROC of that difference (the reference-calibrated detector of Shi et al. §5).

The texts are tokenised with the model's tokenizer (its special tokens added, as in training); a text
longer than ``max_tokens`` is cut there. When the tokenizer adds no BOS, the first token has no score.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from dpolab.data.formats import DataError, numbered_rows, where
from dpolab.eval.harness import bootstrap_interval

METHODS = ("min_k", "min_k_plus_plus", "loss")
SEEN = {"seen", "member", "1", "true", "yes", "train"}
UNSEEN = {"unseen", "nonmember", "non-member", "0", "false", "no", "test"}
RESAMPLES = 2000


def lowest_mean(values: torch.Tensor, k: float) -> float:
    """The mean of the ⌈k·n⌉ lowest of ``values`` (at least one)."""
    count = max(1, math.ceil(k * values.numel()))
    return float(torch.topk(values, count, largest=False).values.mean())


def text_scores(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, k: float) -> dict[str, float]:
    """The three scores of one text from its tokens' log-probs and next-token moments (module docstring)."""
    standardised = (values - mean) / std.clamp_min(1e-12)
    return {
        "min_k": lowest_mean(values, k),
        "min_k_plus_plus": lowest_mean(standardised, k),
        "loss": float(values.mean()),
    }


def auroc(seen: list[float], unseen: list[float]) -> float:
    """P(a seen text's score > an unseen one's) + ½ P(equal): the area under the ROC curve (Mann–Whitney U)."""
    seen_array, unseen_array = np.asarray(seen, dtype=np.float64), np.asarray(unseen, dtype=np.float64)
    combined = np.concatenate([seen_array, unseen_array])
    _, group, counts = np.unique(combined, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    ranks = ((last - counts + 1 + last) / 2)[group]  # 1-based ranks, ties sharing their mean rank
    u = ranks[: seen_array.size].sum() - seen_array.size * (seen_array.size + 1) / 2
    return float(u / (seen_array.size * unseen_array.size))


def auroc_interval(seen: list[float], unseen: list[float], seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """95% percentile-bootstrap interval of :func:`auroc`, resampling seen and unseen texts separately."""
    rng = np.random.default_rng(seed)
    seen_array, unseen_array = np.asarray(seen), np.asarray(unseen)
    values = [
        auroc(seen_array[rng.integers(0, seen_array.size, seen_array.size)],
              unseen_array[rng.integers(0, unseen_array.size, unseen_array.size)])
        for _ in range(RESAMPLES)
    ]  # fmt: skip
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def read_texts(path: str | Path, fields: list[str], label_field: str | None) -> tuple[list[str], list[bool] | None]:
    """The texts (``fields`` joined by a newline) and, when ``label_field`` is in the rows, seen (True) / unseen."""
    numbered = numbered_rows(str(path))
    texts, labels = [], []
    has_labels = label_field is not None and any(isinstance(r, dict) and label_field in r for _, r in numbered)
    for number, (line, row) in enumerate(numbered):
        at = where(path, number, line)
        if not isinstance(row, dict):
            raise DataError(f"{at}: not a JSON object" + (f" ({row.reason})" if hasattr(row, "reason") else ""))
        parts = []
        for field in fields:
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise DataError(f"{at}: {field!r} must be a non-empty string (fields read: {fields})")
            parts.append(row[field])
        texts.append("\n".join(parts))
        if has_labels:
            label = str(row.get(label_field, "")).strip().lower()
            if label not in SEEN | UNSEEN:
                raise DataError(
                    f"{at}: {label_field!r} is {row.get(label_field)!r}; use seen/unseen (or 1/0, true/false)"
                )
            labels.append(label in SEEN)
    if has_labels and (all(labels) or not any(labels)):
        raise DataError(
            f"{path}: {label_field!r} needs both seen and unseen rows for an AUROC; all are {'seen' if labels[0] else 'unseen'}"
        )
    return texts, labels if has_labels else None


def token_statistics(model, tokenizer, texts: list[str], max_tokens: int, batch_size: int = 16, progress=None):
    """Per text: (token log-probs, μ_t, σ_t) under ``model``, each a CPU float64 tensor (module docstring)."""
    from dpolab.data.tokenize import TokenizedSequence
    from dpolab.engine.logps import LogpEngine, item_token_logps

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    items = []
    for number, text in enumerate(texts, start=1):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
        if len(ids) < 2:
            raise DataError(f"the text is {len(ids)} token long; at least 2 are needed to score one", row=number - 1)
        items.append(TokenizedSequence(tuple(ids[:1]), tuple(ids[1:]), number - 1))
    engine = LogpEngine(row_tokens=max_tokens, pad_token_id=pad, device=device)
    per_item = item_token_logps(model, items, engine, batch_size, with_moments=True, progress=progress)
    return [branches[0] for branches in per_item]


def score_texts(model, tokenizer, texts: list[str], k: float, max_tokens: int, batch_size: int = 16, progress=None):
    """{method: [score per text]} and the scored token counts (see :func:`text_scores`)."""
    statistics = token_statistics(model, tokenizer, texts, max_tokens, batch_size, progress)
    per_text = [text_scores(values, mean, std, k) for values, mean, std in statistics]
    return {method: [s[method] for s in per_text] for method in METHODS}, [int(v.numel()) for v, _, _ in statistics]


def summarise(scores: dict[str, list[float]], labels: list[bool] | None) -> dict:
    summary = {}
    for method, values in scores.items():
        entry = {"mean": float(np.mean(values))}
        if labels is not None:
            seen = [v for v, label in zip(values, labels, strict=True) if label]
            unseen = [v for v, label in zip(values, labels, strict=True) if not label]
            low, high = auroc_interval(seen, unseen)
            entry.update(mean_seen=float(np.mean(seen)), mean_unseen=float(np.mean(unseen)), auroc=auroc(seen, unseen),
                         auroc_low=low, auroc_high=high)  # fmt: skip
        summary[method] = entry
    return summary


def compare(scores: dict[str, list[float]], reference: dict[str, list[float]], labels: list[bool] | None) -> dict:
    """The model's scores against the reference's, text by text (module docstring)."""
    comparison = {}
    for method in METHODS:
        difference = np.asarray(scores[method]) - np.asarray(reference[method])
        low, high = bootstrap_interval(difference)
        entry = {
            "mean_difference": float(difference.mean()),
            "low": low,
            "high": high,
            "share_higher": float((difference > 0).mean()),
        }
        if labels is not None:
            seen = [d for d, label in zip(difference, labels, strict=True) if label]
            unseen = [d for d, label in zip(difference, labels, strict=True) if not label]
            auroc_low, auroc_high = auroc_interval(seen, unseen)
            entry.update(auroc=auroc(seen, unseen), auroc_low=auroc_low, auroc_high=auroc_high)
        comparison[method] = entry
    return comparison


def check(
    model_dir: str | Path,
    data: str | Path,
    *,
    reference_dir: str | Path | None = None,
    fields: list[str] | None = None,
    label_field: str | None = "label",
    k: float = 0.2,
    max_tokens: int = 512,
    batch_size: int = 16,
    allow_pickle: bool = False,
    progress: bool = True,
) -> dict:
    """The contamination check of ``model_dir`` on ``data`` (and against ``reference_dir``): a JSON-ready dict."""
    from dpolab.console import progress_bar, quiet_libraries
    from dpolab.engine.loading import check_vocabulary, default_device, load_model, load_tokenizer

    if not 0 < k <= 1:
        raise ValueError(f"--k is a fraction of the tokens, in (0, 1]; got {k}")
    if max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2; got {max_tokens}")
    fields = fields or ["text"]
    texts, labels = read_texts(data, fields, label_field)
    result = {"data": str(data), "texts": len(texts), "fields": fields, "k": k, "max_tokens": max_tokens,
              "models": {}}  # fmt: skip
    per_model = {}
    for role, directory in (("model", model_dir), ("reference", reference_dir)):
        if directory is None:
            continue
        with quiet_libraries():
            model = load_model(directory, allow_pickle=allow_pickle, device=default_device(), what=role)
            tokenizer = load_tokenizer(directory)
        check_vocabulary(model, tokenizer, directory)
        try:
            with progress_bar(progress, f"contamination scores ({role})", len(texts)) as advance:
                per_model[role], counts = score_texts(model, tokenizer, texts, k, max_tokens, batch_size, advance)
        except DataError as error:  # a text too short to score: named where it is in the file
            if error.row is None:
                raise
            line = numbered_rows(str(data))[error.row][0]
            raise DataError(f"{where(data, error.row, line)}: {error}") from None
        if role == "model":  # the reference may tokenise differently: the counts are the model's
            tokens = counts
        result["models"][role] = {"path": str(directory), "summary": summarise(per_model[role], labels)}
        del model
    if reference_dir is not None:
        result["comparison"] = compare(per_model["model"], per_model["reference"], labels)
    result["per_text"] = [
        {"row": i, **({"seen": labels[i]} if labels is not None else {}), "tokens": tokens[i],
         **{f"{role}_{method}": per_model[role][method][i] for role in per_model for method in METHODS}}
        for i in range(len(texts))
    ]  # fmt: skip
    return result


def table(result: dict) -> str:
    """A Markdown table of the summary (and the comparison with the reference)."""
    lines = ["| model | score | mean | mean seen | mean unseen | AUROC (95% interval) |", "|---|---|---|---|---|---|"]
    for role, entry in result["models"].items():
        for method, m in entry["summary"].items():
            seen = f"{m['mean_seen']:.3f} | {m['mean_unseen']:.3f} | {m['auroc']:.3f} ({m['auroc_low']:.3f} – {m['auroc_high']:.3f})" \
                if "auroc" in m else "– | – | –"  # fmt: skip
            lines.append(f"| {role} | {method} | {m['mean']:.3f} | {seen} |")
    if "comparison" in result:
        lines += ["", "| score | model − reference (95% interval) | share higher | AUROC of the difference |",
                  "|---|---|---|---|"]  # fmt: skip
        for method, c in result["comparison"].items():
            area = f"{c['auroc']:.3f} ({c['auroc_low']:.3f} – {c['auroc_high']:.3f})" if "auroc" in c else "–"
            lines.append(f"| {method} | {c['mean_difference']:+.3f} ({c['low']:+.3f} – {c['high']:+.3f}) | "
                         f"{100 * c['share_higher']:.0f}% | {area} |")  # fmt: skip
    return "\n".join(lines)
