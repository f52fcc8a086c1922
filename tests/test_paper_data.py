"""experiments/paper_data.py: the data of docs/experiments.md's early-late, multiple-choice and scenario runs."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from dpolab.data.synthetic import make_problems

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "paper_data.py"


@pytest.fixture(scope="module")
def paper_data():
    spec = importlib.util.spec_from_file_location("paper_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def quickstart(tmp_path):
    """A quickstart folder's data files (what the script reads), from a few problems."""
    folder = tmp_path / "qs"
    problems = make_problems(40, seed=9, min_steps=1, max_steps=3, max_value=100, distinct=True)
    write(folder / "data" / "sft.jsonl", [{"prompt": p.question + "\n", "completion": p.answer} for p in problems[:20]])
    pairs = [{"prompt": p.question + "\n", "chosen": p.answer, "rejected": "x"} for p in problems[20:30]]
    write(folder / "data" / "low_edit" / "train.jsonl", pairs)
    write(folder / "data" / "low_edit" / "eval.jsonl", [])
    write(folder / "data" / "high_edit" / "train.jsonl", [{**p, "rejected": f"wrong {i}"} for i, p in enumerate(pairs)])
    write(folder / "data" / "eval_problems.jsonl", [p.as_row() for p in problems[30:]])
    return folder, {p.question for p in problems}


def results(text: str) -> list[str]:
    return re.findall(r">>(\d+)", text)


def test_early_and_late_pairs_share_their_problems_and_differ_in_which_result_changed(paper_data, quickstart, tmp_path):
    folder, used = quickstart
    summary = paper_data.early_late(folder, seed=0, out=tmp_path / "el", train=30, held_out=6)
    early, late = (read(tmp_path / "el" / name / "train.jsonl") for name in ("early", "late"))
    assert len(early) == len(late) == 30 and len(read(tmp_path / "el" / "early" / "eval.jsonl")) == 6
    for first, second in zip(early, late, strict=True):
        assert first["prompt"] == second["prompt"] and first["chosen"] == second["chosen"]
        assert first["prompt"].rstrip("\n") not in used  # new problems, never the quickstart's
        truth = results(first["chosen"])
        assert len(truth) == 3  # three steps: two intermediate results and the final one
        changed_early = [i for i, (a, b) in enumerate(zip(truth, results(first["rejected"]), strict=True)) if a != b]
        changed_late = [i for i, (a, b) in enumerate(zip(truth, results(second["rejected"]), strict=True)) if a != b]
        assert changed_early == [0] and changed_late == [1]
    # edits of one size: the mean normalised distances agree within sampling noise (36 pairs here)
    distances = [summary[name]["char_distance"]["mean"] for name in ("early", "late")]
    assert distances[0] == pytest.approx(distances[1], rel=0.25)
    assert summary["early"]["first_difference_chars"]["mean"] < summary["late"]["first_difference_chars"]["mean"]


def test_the_other_pool_holds_each_prompt_s_high_edit_rejected_as_wrong(paper_data, quickstart, tmp_path):
    folder, _ = quickstart
    paper_data.other_pool(folder, tmp_path / "other.jsonl")
    pool = read(tmp_path / "other.jsonl")
    low = read(folder / "data" / "low_edit" / "train.jsonl")
    assert [r["prompt"] for r in pool] == [r["prompt"] for r in low]
    assert [r["prompt_id"] for r in pool] == list(range(len(low)))
    assert all(r["candidates"] == [f"wrong {i}"] and r["scores"] == [0.0] for i, r in enumerate(pool))


def test_the_position_figure_pools_seeds_weighted_by_token_count():
    spec = importlib.util.spec_from_file_location("position_figure", SCRIPT.parent / "position_figure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def entry(offset, chosen, chosen_tokens, rejected, rejected_tokens):
        return {"offset": offset, "chosen": chosen, "chosen_tokens": chosen_tokens, "rejected": rejected,
                "rejected_tokens": rejected_tokens}  # fmt: skip

    first = {"by_position_shows": "change", "by_position": [entry(0, -1.0, 3, -2.0, 1), entry(1, None, 0, -1.0, 2)]}
    second = {"by_position_shows": "change", "by_position": [entry(0, -2.0, 1, -4.0, 1)]}
    result = module.pooled([first, second])
    assert result["by_position"] == [
        {"offset": 0, "chosen": -5.0 / 4, "rejected": -3.0},
        {"offset": 1, "chosen": None, "rejected": -1.0},
    ]
