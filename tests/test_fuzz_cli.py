"""Fuzzing the command line (hypothesis): whatever the arguments, dpolab exits 0, 1 or 2 with no traceback
and no internal error, and writes nothing outside the output it was given.

Arguments are drawn from each command's own parser (``train``/``sft``: valid base flags, then random
config keys — known, unknown and TRL's names — with random values), over a workspace of real inputs (a
tiny model, pairs, problems, a finished run) and broken ones (a folder, random bytes, a missing file).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpolab.cli import build_parser, main
from dpolab.train.config import TRL_NAMES, TrainConfig
from tests.tiny import save_tiny_model

SCALARS = ["-1", "0", "1", "2", "0.5", "1e-3", ".nan", ".inf", "-.inf", "abc", "", "[1, 2]", "{a: 1}", "null", "true"]
SCALARS += ["[dpo, [ipo]]", "{bogus: 1}", "x" * 300, "1e400", "&a [1]", "*a"]
NOT_FUZZED = {"quickstart", "toy", "losses"}  # quickstart runs for minutes; toy needs no model; losses: no input
JUDGES = ["math", "reward-model", "bogus"]  # llm would wait on retries against an unreachable server


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    inputs = root / "inputs"
    inputs.mkdir()
    save_tiny_model(inputs / "model", seed=0)
    pairs = [{"prompt": f"Q: {a} plus {a}? A:", "chosen": f" {2 * a}", "rejected": f" {2 * a + 1}"} for a in range(6)]
    (inputs / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    sft = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    (inputs / "sft.jsonl").write_text("".join(json.dumps(p) + "\n" for p in sft))
    problems = [
        {"question": f"What is {a} plus {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"} for a in range(3)
    ]
    (inputs / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    (inputs / "noise.jsonl").write_bytes(bytes(range(256)) * 4)
    (inputs / "folder").mkdir()
    arguments = ["--model", inputs / "model", "--data", inputs / "pairs.jsonl", "--output_dir", inputs / "run"]
    arguments += ["--max_steps", "1", "--batch_size", "2", "--progress", "false", "--tensorboard", "false"]
    arguments += ["--save_model", "false", "--cache_dir", root / "out" / "cache"]
    assert main(["train", *map(str, arguments)]) == 0
    return root


def snapshot(folder: Path, outputs: list[Path]) -> dict[str, str]:
    """Every file under ``folder`` but the named outputs → a hash of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(path == out or out in path.parents for out in outputs)
    }


def named_outputs(words: list[str]) -> list[Path]:
    """The folders and files a command line names as its outputs (what it may write)."""
    flags = ("--out", "--output_dir", "--cache_dir")
    return [Path(value).absolute() for flag, value in zip(words, words[1:], strict=False) if flag in flags]


def path_values(root: Path) -> list[str]:
    inputs = root / "inputs"
    names = ["model", "pairs.jsonl", "sft.jsonl", "problems.jsonl", "noise.jsonl", "folder", "missing.jsonl", "run"]
    return [str(inputs / name) for name in names] + ["./no/such/model", "org/no-such-hub-id"]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    found = {}
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        if name in NOT_FUZZED:
            continue
        inner = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        for sub, subparser in inner[0].choices.items() if inner else [(None, command)]:
            found[f"{name} {sub}" if sub else name] = subparser
    return found


COMMANDS = subcommands()


@st.composite
def command_line(draw, root: Path) -> list[str]:
    name = draw(st.sampled_from(sorted(COMMANDS)))
    out = root / "out" / f"o{draw(st.integers(0, 3))}"
    paths = path_values(root)
    value = st.one_of(st.sampled_from(SCALARS), st.sampled_from(paths))
    if name in ("train", "sft"):
        data = root / "inputs" / ("sft.jsonl" if name == "sft" else "pairs.jsonl")
        base = {"model": root / "inputs" / "model", "data": data, "output_dir": out, "max_steps": 1}
        base |= {"batch_size": 2, "progress": "false", "tensorboard": "false", "save_model": "false"}
        base |= {"cache_dir": root / "out" / "cache", "row_tokens": 64}
        keys = sorted(TrainConfig.__dataclass_fields__) + sorted(TRL_NAMES) + ["bogus_key", "loss_params.beta"]
        for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
            base[key] = draw(value)
        words = [word for key, v in base.items() for word in (f"--{key}", str(v))]
        return [name, *words, "--overwrite"]
    words = name.split()
    for action in COMMANDS[name]._actions:
        if action.dest == "help":
            continue
        if not action.option_strings:  # positional: an input
            words += [draw(st.sampled_from(paths))] * (1 if action.nargs in (None, "+") else 0)
            continue
        flag = action.option_strings[0]
        if not (action.required or draw(st.booleans())):
            continue
        if action.nargs == 0:
            words.append(flag)
        elif flag == "--out":
            words += [flag, str(out / draw(st.sampled_from(["x.jsonl", "x.html", "x.json", "dir"])))]
        elif flag == "--judge":
            words += [flag, draw(st.sampled_from(JUDGES))]
        elif flag in ("--base-url",):
            continue
        else:
            words += [flag, draw(value)]
    return words


def run_quietly(words: list[str]) -> tuple[int, str]:
    stderr, stdout = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            try:
                code = main(words)
            except SystemExit as exit:  # argparse's usage errors
                code = exit.code if isinstance(exit.code, int) else 2
    finally:
        torch.set_num_threads(threads)  # a fuzzed `threads` key must not leak into the other tests
    return code, stderr.getvalue()


@pytest.mark.slow
@settings(
    max_examples=int(os.environ.get("DPOLAB_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(data=st.data())
def test_any_command_line_exits_cleanly_and_writes_only_its_output(workspace, data, monkeypatch):
    monkeypatch.chdir(workspace / "inputs" / "folder")  # a default output would land here, and be caught
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id fails at once instead of retrying
    words = data.draw(command_line(workspace))
    outputs = named_outputs(words)
    before = snapshot(workspace / "inputs", outputs)
    code, stderr = run_quietly(words)
    assert code in (0, 1, 2), (words, code, stderr[-2000:])
    assert "Traceback" not in stderr and "internal error" not in stderr, (words, stderr[-2000:])
    assert snapshot(workspace / "inputs", outputs) == before, words
