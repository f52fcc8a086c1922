"""What a run shows on the terminal (dpolab.console): plain lines off a terminal, a bar that keeps its
step count and ETA in a narrow terminal, no bar for a cached reference pass, `dpolab losses` at 80
columns, quiet third-party libraries on the Python path, torch threads on a shared machine."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from rich.cells import cell_len
from rich.console import Console

from dpolab.console import (
    LiveLine,
    PlainLines,
    ProgressState,
    configure_threads,
    fit_line,
    live_terminal,
    quiet_libraries,
)
from dpolab.losses import LOSSES
from tests.tiny import save_tiny_model

ANSI = "\x1b["
PAIRS = [
    {"prompt": f"Q: what is {a} plus {b}? A:", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
    for a in range(6)
    for b in range(4)
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- unit: the layout of a line ---------------------------------------------------------------


def test_plain_lines_are_whole_periodic_and_always_show_the_first_and_the_last():
    clock, lines = FakeClock(), []
    state = ProgressState("training", 60, clock)
    plain = PlainLines(state, 10.0, lines.append)
    for _ in range(60):
        clock.now += 1.0
        state.update(1, loss=0.6931, margins=0.0123, accuracies=0.5)
        plain.update()
    plain.close()
    assert lines[0] == "training  1/60  1%  loss 0.6931  margin 0.0123  acc 0.5  elapsed 0:01  eta 0:59"
    assert [line.split()[1] for line in lines] == ["1/60", "11/60", "21/60", "31/60", "41/60", "51/60", "60/60"]
    assert lines[-1].endswith("elapsed 1:00  eta 0:00")


def test_plain_lines_of_a_resumed_run_count_from_where_it_resumed_and_end_on_an_interruption():
    clock, lines = FakeClock(), []
    state = ProgressState("training", 100, clock)
    plain = PlainLines(state, 10.0, lines.append)
    state.update(0, completed=40)  # resumed at step 41: not progress, and no line yet
    plain.update()
    assert lines == []
    for _ in range(3):
        clock.now += 2.0
        state.update(1)
        plain.update()
    plain.close()  # stopped (Ctrl-C) after step 43: its last state is printed
    assert lines == [
        "training  41/100  41%  elapsed 0:02  eta 1:58",  # 2 s per step over this session's steps only
        "training  43/100  43%  elapsed 0:06  eta 1:54",
    ]


@pytest.mark.parametrize("width", [120, 80, 60, 40, 30, 24])
def test_a_narrow_terminal_keeps_the_step_count_and_the_eta(width):
    clock = FakeClock()
    state = ProgressState("training", 60, clock)
    clock.now = 12.0
    state.update(12, loss=0.6931, margins=0.0123, accuracies=0.5)
    buffer = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    buffer.print(LiveLine(state))
    line = buffer.file.getvalue().rstrip("\n")
    assert "\n" not in line and cell_len(line) <= width, line
    assert "12/60" in line and "eta 0:48" in line, line
    assert "…" not in line or width < 30, line
    if width >= 120:
        assert "loss 0.6931  margin 0.0123  acc 0.5" in line and "━" in line and "0:12" in line


def test_the_metrics_go_before_the_bar_graphic():
    metrics = ["loss 0.6931", "margin 0.0123", "acc 0.5"]
    _, bar, _, kept = fit_line("training", "12/60", "0:12", "eta 0:48", metrics, 60)
    assert bar >= 10 and kept == metrics[:1]  # acc and margin dropped, the bar stays
    _, bar, elapsed, kept = fit_line("training", "12/60", "0:12", "eta 0:48", metrics, 36)
    assert (bar, kept, elapsed) == (0, [], "0:12")  # no room for a 10-cell bar: no graphic


def test_a_terminal_is_live_only_when_interactive_and_not_ci_and_not_dumb(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    for name in ("CI", "TERM"):
        monkeypatch.delenv(name, raising=False)
    assert live_terminal(Tty()) and not live_terminal(io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not live_terminal(Tty())
    monkeypatch.setenv("CI", "false")
    assert live_terminal(Tty())
    monkeypatch.setenv("TERM", "dumb")
    assert not live_terminal(Tty())


# --- end to end: `dpolab train` in a pipe and in a 60-column terminal -------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    save_tiny_model(root / "llama", seed=0)
    return root


def train_args(workspace, out: str) -> list[str]:
    return [sys.executable, "-m", "dpolab", "train", "--model", str(workspace / "llama"),
            "--data", str(workspace / "pairs.jsonl"), "--output_dir", str(workspace / out),
            "--cache_dir", str(workspace / "cache"), "--max_steps", "6", "--batch_size", "4",
            "--tensorboard", "false", "--save_model", "false"]  # fmt: skip


def quiet_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TERM", "COLUMNS", "FORCE_COLOR")}
    return {**env, **extra}


@pytest.mark.slow
def test_piped_training_prints_plain_whole_lines_and_a_cached_reference_pass_shows_no_bar(workspace):
    runs = []
    for out in ("piped", "piped_cached"):
        result = subprocess.run(
            train_args(workspace, out), capture_output=True, text=True, timeout=300, env=quiet_env()
        )
        assert result.returncode == 0, result.stderr
        runs.append(result.stderr)
    for stderr in runs:
        assert ANSI not in stderr and "…" not in stderr and "\r" not in stderr, stderr
        training = [line for line in stderr.splitlines() if line.startswith("training  ")]
        assert training[0].startswith("training  1/6  16%  loss ") and "eta " in training[0], stderr
        assert re.fullmatch(
            r"training  6/6  100%  loss \S+  margin \S+  acc \S+  elapsed \d+:\d\d  eta 0:00", training[-1]
        ), stderr
        assert f"in {workspace / 'cache'}\n" in stderr  # a long path is never wrapped mid-line
    first, cached = runs
    assert re.search(r"^reference log-probs \(train\)  6/6  100%", first, re.M), first
    assert "reference log-probs (train): reused from cache" in cached
    assert [line for line in cached.splitlines() if line.startswith("reference log-probs")] == [
        f"reference log-probs (train): reused from cache in {workspace / 'cache'}"
    ], cached
    assert not re.search(r"\b0/\d", cached), cached  # no bar stuck at 0/N


def run_in_terminal(argv: list[str], columns: int, env: dict) -> tuple[int, str]:
    """``argv`` with a pseudo-terminal of ``columns`` as stdin, stdout and stderr; (exit code, output)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    process.wait(timeout=300)
    os.close(leader)
    return process.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_a_60_column_terminal_keeps_the_step_count_and_eta(workspace):
    code, output = run_in_terminal(
        train_args(workspace, "terminal"), 60, quiet_env(COLUMNS="60", TERM="xterm-256color")
    )
    assert code == 0, output
    frames = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frame) for frame in re.split(r"[\r\n]+", output)]
    bars = [frame for frame in frames if frame.startswith("training ")]
    assert bars, output
    assert all(cell_len(frame) <= 60 for frame in bars), bars
    assert "…" not in "".join(bars), bars
    assert re.search(r"training ━+ 6/6 \d+:\d\d eta 0:00", bars[-1]), bars[-1]
    # every frame drawn (how many depends on the machine's speed) keeps the step count and the ETA
    assert all(re.search(r" [0-6]/6 \d+:\d\d eta (\d+:\d\d|\?)", frame) for frame in bars), bars


# --- `dpolab losses` at 80 columns ------------------------------------------------------------


def default_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize("args", [[], ["--width", "80"]])
def test_losses_at_80_columns_shows_every_default_in_full(args):
    result = subprocess.run(
        [sys.executable, "-m", "dpolab", "losses", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=quiet_env(COLUMNS="80"),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(cell_len(line) for line in lines) <= 80
    assert "…" not in result.stdout
    words = set(re.split(r"[\s,]+", result.stdout))
    for spec in LOSSES.values():
        assert spec.name in words
        for key, value in spec.defaults.items():
            assert f"{key}={default_text(value)}" in words, (spec.name, key)


# --- the Python API path: quiet libraries, threads --------------------------------------------


def test_quiet_libraries_filters_exactly_peft_s_warning_and_restores_transformers_bars():
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_libraries():
            assert not transformers_logging.is_progress_bar_enabled()
            namespace = {"__name__": "transformers.modeling_utils", "warnings": warnings}
            exec(  # noqa: S102 - a warning attributed to transformers.modeling_utils, as peft triggers it
                "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6.', FutureWarning)\n"
                "warnings.warn('something else is deprecated', FutureWarning)",
                namespace,
            )
            warnings.warn("`is_gradient_checkpointing` is deprecated, from elsewhere", FutureWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert messages == ["something else is deprecated", "`is_gradient_checkpointing` is deprecated, from elsewhere"]
    assert transformers_logging.is_progress_bar_enabled()


@pytest.mark.slow
def test_the_python_api_shows_no_transformers_bar_and_no_peft_warning(workspace, tmp_path):
    script = (
        "from dpolab.train import TrainConfig, run\n"
        f"run(TrainConfig(model={str(workspace / 'llama')!r}, data={str(workspace / 'pairs.jsonl')!r},"
        f" output_dir={str(tmp_path / 'run')!r}, cache_dir={str(tmp_path / 'cache')!r}, max_steps=2,"
        " batch_size=4, tensorboard=False, lora={'r': 4, 'alpha': 8, 'target_modules': ['q_proj', 'v_proj']}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, timeout=300, env=quiet_env()
    )
    assert result.returncode == 0, result.stderr
    assert "Loading weights" not in result.stderr and "it/s]" not in result.stderr, result.stderr
    assert "is_gradient_checkpointing" not in result.stderr and "FutureWarning" not in result.stderr, result.stderr


@pytest.fixture
def torch_threads(monkeypatch):
    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("dpolab.console.available_cpus", lambda: 8)
    yield
    torch.set_num_threads(before)


def test_processes_of_one_run_share_the_cores(torch_threads, monkeypatch):
    torch.set_num_threads(8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert configure_threads(None) == 4 and torch.get_num_threads() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert configure_threads(None) == 1


def test_an_explicit_thread_setting_wins(torch_threads, monkeypatch):
    torch.set_num_threads(3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # torchrun's, or the user's
    assert configure_threads(None) == 3
    assert configure_threads(2) == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(5)
    assert configure_threads(None) == 5  # one process alone keeps torch's default
    with pytest.raises(ValueError, match="threads"):
        configure_threads(0)
