"""What a run shows on the terminal, and how it shares the machine: the one home for console output.

- :data:`console`: the rich console on stderr every module prints its lines to (stdout is for results).
- :func:`progress_bar`: a live bar on an interactive terminal; plain, periodic, never-truncated lines in a
  pipe, in CI (``CI`` set) or on ``TERM=dumb``.
- :func:`quiet_libraries`: transformers' and the Hub's own bars and transformers' load report off, and one
  peft FutureWarning filtered, while a run loads and trains (the Python API path as well as the CLI).
- :func:`configure_threads`: torch threads when several processes of one run share the machine.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

PLAIN_INTERVAL = 10.0
"""Seconds between two plain progress lines (the first and the last are always printed)."""

BAR_WIDTH = (10, 40)
"""The bar graphic's narrowest and widest; narrower than this, the graphic is dropped."""

LABELS = {"margins": "margin", "accuracies": "acc"}
"""Short names of the metrics the training bar shows."""


def live_terminal(stream=None) -> bool:
    """Whether ``stream`` (stderr) is an interactive terminal that can redraw a bar in place.

    No in a pipe or a file, under CI (``CI`` set to anything but 0/false/no) or on ``TERM=dumb``.
    """
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    if os.environ.get("TERM", "") == "dumb":
        return False
    try:
        return (stream or sys.stderr).isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


# Off a terminal, rich would wrap long lines (paths) at its 80-column fallback: soft wrap prints them whole.
console = Console(stderr=True, soft_wrap=not live_terminal())


# --- progress --------------------------------------------------------------------------------


def clock_text(seconds: float | None) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def number_text(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgressState:
    """Counts, times and the latest metrics of one bar; ETA from the steps done since the bar started
    (a resumed run's earlier steps do not count)."""

    def __init__(self, description: str, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.description, self.total, self.clock = description, max(0, int(total)), clock
        self.completed = self.initial = 0
        self.started = clock()
        self.finished_at: float | None = None
        self.advanced = self.touched = False
        self.metrics: dict[str, object] = {}

    def update(self, n: int = 1, completed: int | None = None, **metrics) -> None:
        """Advance by ``n``, or set ``completed`` (on the very first call: the starting point, not progress)."""
        if completed is not None:
            if not self.touched:
                self.initial = completed
            self.advanced = self.advanced or completed > self.initial
            self.completed = completed
        else:
            self.completed += n
            self.advanced = self.advanced or n > 0
        self.touched = True
        if metrics:
            self.metrics = {LABELS.get(k, k): v for k, v in metrics.items()}
        if self.finished_at is None and self.done:
            self.finished_at = self.clock()

    @property
    def done(self) -> bool:
        return self.completed >= self.total

    def elapsed(self) -> float:
        return (self.finished_at if self.finished_at is not None else self.clock()) - self.started

    def remaining(self) -> float | None:
        if self.done:
            return 0.0
        steps = self.completed - self.initial
        return None if steps <= 0 else self.elapsed() / steps * (self.total - self.completed)

    def counts(self) -> str:
        return f"{self.completed}/{self.total}"

    def percent(self) -> str:
        return f"{100 * self.completed // self.total if self.total else 100}%"

    def metric_texts(self) -> list[str]:
        return [f"{name} {number_text(value)}" for name, value in self.metrics.items()]

    def plain_line(self) -> str:
        """``training  12/60  20%  loss 0.6931  margin 0.01  acc 0.5  elapsed 0:12  eta 0:48``."""
        parts = [self.description, self.counts(), self.percent(), *self.metric_texts()]
        parts += [f"elapsed {clock_text(self.elapsed())}", f"eta {clock_text(self.remaining())}"]
        return "  ".join(parts)


def line_length(description: str, bar: int, counts: str, elapsed: str, eta: str, metrics: list[str]) -> int:
    """Cells of ``description ━━━ counts elapsed eta  metric  metric`` (empty parts and their spaces left out)."""
    parts = [p for p in (description, "━" * bar, counts, elapsed, eta) if p]
    length = sum(cell_len(p) for p in parts) + len(parts) - 1
    return length + sum(2 + cell_len(m) for m in metrics)


def fit_line(description: str, counts: str, elapsed: str, eta: str, metrics: list[str], width: int):
    """What of a bar line fits in ``width`` cells: (description, bar width or 0, elapsed or "", metrics kept).

    The step count and the ETA always stay; the metrics go first (last one first), then the bar graphic,
    then the elapsed time, then the end of the description.
    """
    for keep in range(len(metrics), -1, -1):
        room = width - line_length(description, 0, counts, elapsed, eta, metrics[:keep]) - 1
        if room >= BAR_WIDTH[0]:
            return description, min(room, BAR_WIDTH[1]), elapsed, metrics[:keep]
    if line_length(description, 0, counts, elapsed, eta, []) <= width:
        return description, 0, elapsed, []
    if line_length(description, 0, counts, "", eta, []) <= width:
        return description, 0, "", []
    room = width - line_length("", 0, counts, "", eta, []) - 1
    if room < 2:
        return "", 0, "", []
    return description[: room - 1] + "…", 0, "", []


class LiveLine:
    """A rich renderable: the bar's line, laid out afresh for the console's width at every refresh."""

    def __init__(self, state: ProgressState) -> None:
        self.state = state

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        s = self.state
        eta = f"eta {clock_text(s.remaining())}"
        description, bar, elapsed, metrics = fit_line(
            s.description, s.counts(), clock_text(s.elapsed()), eta, s.metric_texts(), options.max_width
        )
        line = Text(no_wrap=True, overflow="crop")
        if description:
            line.append(description + " ")
        if bar:
            filled = bar if s.done else bar * s.completed // max(1, s.total)
            line.append("━" * filled, style="bar.finished" if s.done else "bar.complete")
            line.append("━" * (bar - filled) + " ", style="bar.back")
        line.append(s.counts(), style="progress.download")
        if elapsed:
            line.append(" " + elapsed, style="progress.elapsed")
        line.append(" " + eta, style="progress.remaining")
        if metrics:
            line.append("".join("  " + m for m in metrics))
        yield line


class PlainLines:
    """Plain progress lines: the first advance, then at most one per ``interval`` seconds, and the last."""

    def __init__(self, state: ProgressState, interval: float, write: Callable[[str], None]) -> None:
        self.state, self.interval, self.write = state, interval, write
        self.printed_at: float | None = None
        self.printed: int | None = None

    def update(self) -> None:
        s = self.state
        if not s.advanced or s.completed == self.printed:
            return
        now = s.clock()
        if s.done or self.printed_at is None or now - self.printed_at >= self.interval:
            self.emit(now)

    def close(self) -> None:
        """The state the bar stopped at (an interrupted run), if not already printed."""
        if self.state.advanced and self.state.completed != self.printed:
            self.emit(self.state.clock())

    def emit(self, now: float) -> None:
        self.write(self.state.plain_line())
        self.printed_at, self.printed = now, self.state.completed


def _print_plain(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True, emoji=False)


@contextmanager
def progress_bar(
    enabled: bool, description: str, total: int, show_metrics: bool = False, interval: float = PLAIN_INTERVAL
) -> Iterator[Callable[..., None]]:
    """Yields ``advance(n=1, completed=None, **metrics)``.

    On an interactive terminal, a live bar that keeps its step count and ETA at any width (it drops the
    metrics, then the bar graphic first). Elsewhere (:func:`live_terminal` false), plain lines as
    :meth:`ProgressState.plain_line` writes them: never truncated, no escape codes.
    ``completed`` before the first advance is where the count starts (a resumed run).
    """
    if not enabled:
        yield lambda *args, **kwargs: None
        return
    state = ProgressState(description, total)

    def keep(metrics: dict) -> dict:
        return metrics if show_metrics else {}

    if not live_terminal(console.file):
        plain = PlainLines(state, interval, _print_plain)

        def advance_plain(n: int = 1, completed: int | None = None, **metrics) -> None:
            state.update(n, completed, **keep(metrics))
            plain.update()

        try:
            yield advance_plain
        finally:
            plain.close()
        return

    from rich.live import Live

    with Live(LiveLine(state), console=console, refresh_per_second=4, transient=False) as live:

        def advance_live(n: int = 1, completed: int | None = None, **metrics) -> None:
            state.update(n, completed, **keep(metrics))
            if state.done:
                live.refresh()

        yield advance_live


# --- third-party noise and threads -----------------------------------------------------------


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """For the duration: transformers' (and the Hub's) and datasets' progress bars off — a bar per weight load
    and save, or per file read, would bury ours — every other tqdm bar too off a terminal (lm-evaluation-
    harness's), the hub client's retry messages quiet, transformers' load report dropped (a table with colour codes even in a pipe; dpolab's
    loader refuses or names what it would say, :mod:`dpolab.engine.loading`), and the FutureWarning that peft
    triggers in transformers by reading the deprecated ``is_gradient_checkpointing`` (only that one) filtered.
    All are restored afterwards."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        transformers_logging = None
    bars_were_on = transformers_logging is not None and transformers_logging.is_progress_bar_enabled()
    if bars_were_on:
        transformers_logging.disable_progress_bar()
    # datasets' bars ("Generating train split", a CSV or parquet file read) are tqdm lines with carriage returns:
    # in a pipe or a log file they are noise, and our own messages say what is being read
    datasets = sys.modules.get("datasets")
    datasets_bars_were_on = datasets is not None and not datasets.are_progress_bars_disabled()
    if datasets_bars_were_on:
        datasets.disable_progress_bars()
    report_logger = logging.getLogger("transformers.modeling_utils")
    no_report = _NoLoadReport()  # one per call: a nested call removes only its own
    report_logger.addFilter(no_report)
    # The hub client logs each retry of an unreachable host ("Retrying in 8s [Retry 3/5]"): the error that
    # follows says what failed, in one line
    hub_logger = logging.getLogger("huggingface_hub")
    hub_level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    restore_tqdm = _tqdm_off() if not live_terminal() else None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=r"`is_gradient_checkpointing` is deprecated",
                category=FutureWarning,
                module=r"transformers\.modeling_utils",
            )
            yield
    finally:
        report_logger.removeFilter(no_report)
        hub_logger.setLevel(hub_level)
        if restore_tqdm is not None:
            restore_tqdm()
        if bars_were_on:
            transformers_logging.enable_progress_bar()
        if datasets_bars_were_on:
            datasets.enable_progress_bars()


def _tqdm_off():
    """Every tqdm bar disabled (lm-evaluation-harness draws its own, with ``disable=False``, and a bar is lines
    of carriage returns in a pipe or a file); returns what restores tqdm."""
    try:
        import tqdm.std
    except ImportError:
        return lambda: None
    original = tqdm.std.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = quiet_init

    def restore() -> None:
        tqdm.std.tqdm.__init__ = original

    return restore


class _NoLoadReport(logging.Filter):
    """Drops the record of transformers' ``log_state_dict_report`` (its "LOAD REPORT" table)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "log_state_dict_report" and "LOAD REPORT" not in str(record.msg)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _positive_env(name: str) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 0


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads for this process and return how many it uses.

    ``requested`` (the ``threads`` setting) wins. Otherwise an explicit ``OMP_NUM_THREADS`` is respected
    (torchrun sets it to 1); otherwise, when several processes of one run share this machine
    (``LOCAL_WORLD_SIZE``, else ``WORLD_SIZE``, above 1), each gets max(1, CPUs // processes) so they do
    not fight over the cores; a single process keeps torch's default (every core).
    """
    import torch

    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be a whole number of at least 1; got {requested!r}")
        torch.set_num_threads(requested)
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    processes = _positive_env("LOCAL_WORLD_SIZE") or _positive_env("WORLD_SIZE")
    if processes > 1:
        torch.set_num_threads(max(1, available_cpus() // processes))
    return torch.get_num_threads()


# --- text from user data ---------------------------------------------------------------------------


def printable(text: object, keep_newlines: bool = False) -> str:
    """``text`` with every control character escaped (``\\x1b`` → ``\\x1b`` as four visible characters): a row,
    key or file name from user data must not drive the terminal (rename the window, clear the screen, move
    the cursor, hide text with a carriage return or reorder it with a bidirectional override).

    Tabs stay; newlines stay with ``keep_newlines``. Everything else in Unicode's Cc category (C0, DEL, C1)
    and the bidirectional formatting characters are written as Python escapes."""
    text = str(text)
    if not any(_unsafe(c, keep_newlines) for c in text):
        return text
    return "".join(ascii(c)[1:-1] if _unsafe(c, keep_newlines) else c for c in text)


_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _unsafe(character: str, keep_newlines: bool) -> bool:
    if character == "\t" or (keep_newlines and character == "\n"):
        return False
    code = ord(character)
    return code < 0x20 or 0x7F <= code <= 0x9F or character in _BIDI


def say(*values: object, sep: str = " ", end: str = "\n", file=None, flush: bool = False) -> None:
    """``print`` for the commands' result lines: the text escaped by :func:`printable` (newlines and tabs
    kept), since those lines name files and values that came from the user's data or arguments."""
    print(printable(sep.join(str(value) for value in values), keep_newlines=True), end=end, file=file, flush=flush)
