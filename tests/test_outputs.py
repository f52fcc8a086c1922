"""dpolab.outputs: where an output may go, atomic writes, strict JSON."""

from __future__ import annotations

import json
import math
import os

import pytest

from dpolab import outputs
from dpolab.outputs import check_output, check_outputs, exact_dumps, exact_loads, run_kind, strict_json


def test_an_output_may_not_be_hold_or_sit_inside_an_input_even_through_links(tmp_path):
    data = tmp_path / "in" / "pairs.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "alias.jsonl").symlink_to(data)
    os.link(data, tmp_path / "hard.jsonl")
    inputs = {"data": data, "model": model, "hub model": "org/name"}
    for out, message in [
        (data, "is the data"),
        (tmp_path / "alias.jsonl", "is the data"),  # a symbolic link to the input
        (tmp_path / "hard.jsonl", "is the data"),  # a hard link: another name of the same file
        (tmp_path / "in", "contains the data"),
        (tmp_path, "contains the data"),
        (model / "out.json", "is inside the model"),
        (model, "is the model"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_output(out, "data", inputs)
    assert check_output(tmp_path / "elsewhere.jsonl", "data", inputs) == tmp_path / "elsewhere.jsonl"


def test_run_folders_take_only_their_own_kinds_of_output(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("model: m\n")
    (run / "summary.json").write_text("{}")
    assert run_kind(run) == "train"
    check_output(run, "train", {})  # its own command decides (resume, --overwrite)
    check_output(run / "math.json", "eval", {})  # an evaluation of the run, beside its files
    check_output(run / "report.html", "report", {"run folder": run})  # a report of the run, read from it
    with pytest.raises(ValueError, match="which the training run"):
        check_output(run / "summary.json", "eval", {})
    with pytest.raises(ValueError, match="which the training run"):
        check_output(run / "model" / "x.json", "eval", {})
    with pytest.raises(ValueError, match="inside the training run folder"):
        check_output(run / "pairs.jsonl", "data", {})
    with pytest.raises(ValueError, match="is a training run folder"):
        check_output(run, "data", {})
    # a quickstart takes training runs under runs/, but nothing may replace its data
    quickstart = tmp_path / "qs"
    quickstart.mkdir()
    (quickstart / ".dpolab-quickstart").write_text("")
    assert run_kind(quickstart) == "quickstart"
    check_output(quickstart / "runs" / "dpo", "train", {})
    with pytest.raises(ValueError, match="which the quickstart"):
        check_output(quickstart / "data" / "x.jsonl", "eval", {})
    # the innermost run folder decides: an evaluation in a run inside a sweep
    sweep = tmp_path / "sweep"
    (sweep / "logs").mkdir(parents=True)
    (sweep / "spec.yaml").write_text("recipe: toy\n")
    inner = sweep / "runs" / "dpo" / "seed0"
    inner.mkdir(parents=True)
    (inner / "config.yaml").write_text("{}")
    (inner / "metrics.jsonl").write_text("")
    check_output(inner / "math.json", "eval", {})
    with pytest.raises(ValueError, match="inside the training run folder"):
        check_output(inner / "pairs.jsonl", "data", {})
    with pytest.raises(ValueError, match="inside the sweep folder"):
        check_output(sweep / "pairs.jsonl", "data", {})


def test_a_run_that_holds_only_its_lock_is_a_run_but_another_tools_lock_is_not(tmp_path):
    from dpolab.train.guard import RunLock

    starting = tmp_path / "starting"
    starting.mkdir()
    lock = RunLock(starting)  # a run before its config.yaml (or one that failed on a bad row)
    assert run_kind(starting) == "train"
    with pytest.raises(ValueError, match="inside the training run folder"):
        check_output(starting / "pairs.jsonl", "data", {})
    lock.release()
    other = tmp_path / "pytest-7"
    other.mkdir()
    (other / ".lock").write_text("4242")  # pytest's basetemp lock: a pid alone
    assert run_kind(other) is None
    check_output(other / "pairs.jsonl", "data", {})


def test_two_outputs_of_one_command_may_not_be_the_same_file(tmp_path):
    with pytest.raises(ValueError, match="--tokens and --out are the same file"):
        check_outputs({"--out": tmp_path / "a.json", "--tokens": tmp_path / "a.json", "--plot": None}, "eval")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "pairs.jsonl"
    target.write_text("old\n")

    def rows():
        yield {"a": 1}
        raise RuntimeError("a bad row half-way")

    with pytest.raises(RuntimeError):
        outputs.write_jsonl(target, rows())
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]
    assert outputs.write_jsonl(target, [{"a": 1}, {"b": "é"}]) == 2
    assert target.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    with pytest.raises(ValueError, match="is a folder"):
        outputs.write_text(tmp_path, "x")


def test_json_is_strict_and_says_which_keys_were_not_finite(tmp_path):
    notes: list[str] = []
    value = {"loss": float("nan"), "final": {"margin": float("inf"), "ok": 1.5}, "rows": [1.0, -math.inf]}
    outputs.write_json(tmp_path / "summary.json", value, note=notes.append)
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}")) == {
        "loss": None,
        "final": {"margin": None, "ok": 1.5},
        "rows": [1.0, None],
    }
    assert len(notes) == 1 and all(key in notes[0] for key in ("loss (nan)", "final.margin (inf)", "rows[1] (-inf)"))
    assert strict_json({"a": 1}) == ({"a": 1}, [])


def test_checkpoint_state_round_trips_non_finite_numbers_in_strict_json():
    state = {"history": [1.0, float("nan"), float("inf"), -float("inf")], "step": 3, "name": "$float"}
    text = exact_dumps(state)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    back = exact_loads(text)
    assert back["history"][0] == 1.0 and math.isnan(back["history"][1])
    assert back["history"][2:] == [math.inf, -math.inf] and back["step"] == 3 and back["name"] == "$float"


def test_jsonl_rows_stay_one_line_for_readers_that_split_on_every_unicode_line_break(tmp_path):
    rows = [{"text": "a\u2028b\u2029c\x85d\x0be é"}, {"text": "next"}]
    outputs.write_jsonl(tmp_path / "rows.jsonl", rows)
    text = (tmp_path / "rows.jsonl").read_text(encoding="utf-8")
    assert [json.loads(line) for line in text.splitlines()] == rows and "é" in text


def test_a_rerun_of_the_same_command_may_replace_its_own_folder_output_and_nothing_else(tmp_path):
    from dpolab.outputs import claim_folder

    folder = tmp_path / "stats"
    writes = {"summary.json", "histogram.png"}
    claim_folder(check_output(folder, "data", writes=writes, owner="dpolab data edit-stats"), "dpolab data edit-stats")
    (folder / "summary.json").write_text("{}")
    check_output(folder, "data", writes=writes, owner="dpolab data edit-stats")  # its own earlier output
    with pytest.raises(ValueError, match="holds files this command did not write"):
        check_output(folder, "data", writes=writes, owner="dpolab data scenario")


def test_temporary_names_are_short_keep_the_suffix_and_leftovers_of_killed_writers_go(tmp_path):
    long = tmp_path / ("p" * 249 + ".jsonl")  # a legal 255-byte name: its temporary must fit too
    assert outputs.write_jsonl(long, [{"a": 1}]) == 1 and long.read_text() == '{"a": 1}\n'
    target = tmp_path / "pairs.jsonl"
    with outputs.atomic_path(target) as temporary:
        assert temporary.suffix == ".jsonl" and len(temporary.name) < 40
        prefix = temporary.name.rsplit("-", 1)[0]
        temporary.write_text("{}\n")
    dead = tmp_path / f"{prefix}-999999999.jsonl"  # what a writer killed with SIGKILL leaves behind
    dead.write_text("half a file")
    outputs.write_jsonl(target, [{"a": 2}])
    assert not dead.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted([long.name, "pairs.jsonl"])


def test_a_write_that_fails_names_the_output_not_its_temporary_name(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "big.jsonl"
    script = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); "
        f"from dpolab import outputs; outputs.write_jsonl({str(target)!r}, [{{'a': 'x' * 100}}] * 100)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and f"File too large: '{target}'" in result.stderr, result.stderr[-1500:]
    assert not target.exists() and list(tmp_path.iterdir()) == []
