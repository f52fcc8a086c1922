"""Every file dpolab writes goes through here: one rule for where an output may go, and one way to write it.

**Where.** :func:`check_output` runs before a command writes anything. An output that *is* one of the
command's inputs, *holds* one (an output folder around an input) or *sits inside* one (an output inside the
model folder) is refused, as is an output inside an existing dpolab run folder unless it is that run's own
kind of output (an evaluation or a report of a training run may go into its folder, a data builder may not;
nothing may replace the run's own files, such as ``summary.json`` or ``model/``). A run folder that is an
input (``dpolab report RUN``) is judged by the second rule: a report may go beside the run's files. A run folder is recognised by
what it holds (:func:`run_kind`): a training run, a toy run, the toy figures, a sweep, a quickstart.

**How.** :func:`write_text`, :func:`write_json`, :func:`write_jsonl` and :func:`atomic_path` write to a
temporary name in the same folder and rename it into place, so a failure (a full disk, Ctrl-C, a bad row
half-way) never leaves a half-written file under the real name, and an existing file is replaced only by a
complete one. JSON is strict: NaN and ±Infinity, which Python's ``json`` writes and other readers reject,
are written as ``null``, and the keys that held them are reported (:func:`strict_json`).

This module imports nothing of dpolab's: every layer may use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

OutputKind = Literal["data", "eval", "report", "train", "toy", "toy-figures", "sweep", "quickstart"]
"""What a command writes: a data builder's output, an evaluation, a report, a training run folder, a toy run
folder, the toy figures folder, a sweep folder, a quickstart folder."""

# What each kind of run folder writes itself (a file or folder name at its top level): no other command may
# write there. A run's own command handles its own folder (resume, --overwrite).
RUN_FILES: dict[str, frozenset[str]] = {
    "train": frozenset(
        {
            "metrics.jsonl",
            "summary.json",
            "checkpoints",
            "tensorboard",
            "model",
            "config.yaml",
            "data_report.json",
            ".lock",
        }
    ),  # fmt: skip
    "toy": frozenset({"config.json", "metrics.jsonl", "reward_metrics.jsonl", "metrics.csv", "summary.json"}),
    "toy-figures": frozenset(
        {
            "summary.json",
            "runs",
            "figure2_dpo_3d_properties.png",
            "figure3_scenarios.png",
            "remedies.png",
            "beta_rejected_sweep.png",
        }
    ),  # fmt: skip
    "sweep": frozenset({"spec.yaml", "results.json", "results.csv", "results.md", "index.html", "plots", "logs"}),
    # "runs" is left out: the quickstart's training runs are run folders of their own, inside it
    "quickstart": frozenset(
        {".dpolab-quickstart", "data", "model", "cache", "results.json", "report.html", "logratios.png"}
    ),
}

# The other kinds of output a run folder takes (beside its own command's): the evaluations and reports of a
# training run, the training runs and evaluations a sweep or a quickstart makes inside its folder.
ACCEPTS: dict[str, frozenset[str]] = {
    "train": frozenset({"eval", "report"}),
    "toy": frozenset({"eval", "report"}),
    "toy-figures": frozenset({"report"}),
    "sweep": frozenset({"train", "toy", "eval", "report"}),
    "quickstart": frozenset({"train", "eval", "report"}),
}

RUN_NAMES = {
    "train": "training run",
    "toy": "toy run",
    "toy-figures": "toy figures folder",
    "sweep": "sweep",
    "quickstart": "quickstart",
}


LOCK_MARK = "dpolab run, pid "  # how a run's ``.lock`` begins (dpolab.train.guard.RunLock)


def _dpolab_lock(path: Path) -> bool:
    """Whether ``path`` is the lock of a dpolab run (not another tool's ``.lock``, e.g. pytest's basetemp lock)."""
    if not path.is_file() or path.stat().st_size > 100:
        return False
    return path.read_text(encoding="utf-8", errors="replace").startswith(LOCK_MARK)


def run_kind(folder: Path) -> str | None:
    """The kind of dpolab run ``folder`` holds (a key of :data:`RUN_FILES`), or None."""
    try:
        if not folder.is_dir():
            return None
        if (folder / ".dpolab-quickstart").is_file():
            return "quickstart"
        if (folder / "spec.yaml").is_file() and any((folder / n).exists() for n in ("results.json", "logs")):
            return "sweep"
        if (folder / "config.yaml").is_file() and any(
            (folder / n).exists() for n in ("metrics.jsonl", "summary.json", "checkpoints", ".lock", "model")
        ):
            return "train"
        if _dpolab_lock(folder / ".lock"):
            return "train"  # a run starting, running, or that failed before it wrote its config (a bad row)
        if (folder / "figure2_dpo_3d_properties.png").is_file() and (folder / "runs").is_dir():
            return "toy-figures"
        config = folder / "config.json"
        if config.is_file() and (folder / "metrics.csv").is_file() and config.stat().st_size < 1_000_000:
            try:
                if json.loads(config.read_text(encoding="utf-8")).get("kind") == "toy":
                    return "toy"
            except (ValueError, AttributeError):
                return None
    except OSError:
        return None
    return None


def _paths(value) -> list[Path]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value).expanduser()]
    return [path for item in value for path in _paths(item)]


def _with_adapter_bases(inputs: Mapping[str, object]) -> list[tuple[str, Path]]:
    """(name, path) of every input, and of the base model of every LoRA adapter folder among them (its
    ``adapter_config.json``'s ``base_model_name_or_path``, followed through adapters on adapters): the loader
    reads those too."""
    pairs = [(name, path) for name, value in inputs.items() for path in _paths(value)]
    seen: set[Path] = set()
    for name, path in pairs:  # grows while it runs: a base that is itself an adapter is followed
        config = path / "adapter_config.json"
        if path in seen or not config.is_file() or (path / "config.json").is_file():
            continue
        seen.add(path)
        try:
            base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(base, str) and base:
            pairs.append((f"base model of the {name}", Path(base).expanduser()))
    return pairs


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def check_output(
    out: str | os.PathLike,
    kind: OutputKind,
    inputs: Mapping[str, object] | None = None,
    option: str = "--out",
    file: bool = False,
    writes: Iterable[str] = (),
    owner: str | None = None,
) -> Path:
    """``out`` as a Path, once it is known to be a safe place for an output of ``kind`` (module docstring).

    ``inputs``: name → path (or a list of paths, or None) of everything the command reads; names appear in the
    error (``--model``, ``the data``). Inputs that do not exist here (hub ids) are not compared. ``option``
    names the output in errors (``--out``, ``output_dir``); ``file``: the output is a file, so an existing
    folder there is refused at once, before any work. ``writes``: the names a folder output writes at its
    top level; in an existing folder that is not this command's own earlier output (a run folder of its kind,
    or a folder :func:`claim_folder` marked as ``owner``'s), a file or folder of those names is someone's,
    and is not replaced; nor is anything written through a symbolic link of those names. Returns the output
    with ``~`` expanded: the path to write to. ``ValueError`` with one line otherwise.
    """
    given = Path(out).expanduser()
    resolved = given.resolve()
    if file and given.is_dir():
        raise ValueError(f"{option} {out}: is a folder; name the file to write")
    for name, path in _with_adapter_bases(inputs or {}):
        if not path.exists():
            continue
        source = path.resolve()
        if _same(source, resolved):
            raise ValueError(
                f"{option} {out} is the {name} ({path}): writing there would replace the input; choose another {option}"
            )
        if resolved in source.parents:
            raise ValueError(
                f"{option} {out} contains the {name} ({path}): writing there could overwrite or delete it; "
                f"choose an {option} outside every input"
            )
        if source in resolved.parents and run_kind(source) is None:  # inside a run folder: its own rule below
            raise ValueError(f"{option} {out} is inside the {name} ({path}); choose an {option} outside every input")
    _check_run_folders(given, resolved, kind, option)
    _check_folder_contents(given, kind, option, frozenset(writes), owner)
    return given


OWNER = ".dpolab-output"
"""The file a command leaves in a folder output of its own (its name inside): a rerun of the same command may
replace what it wrote there; anything else there is someone's."""


def _check_folder_contents(folder: Path, kind: str, option: str, writes: frozenset[str], owner: str | None) -> None:
    if not writes or not folder.is_dir():
        return
    linked = sorted(name for name in writes if (folder / name).is_symlink())
    if linked:  # written through, or deleted through, it would reach another folder
        raise ValueError(
            f"{option} {folder}: {linked[0]} is a symbolic link (to {os.readlink(folder / linked[0])}); dpolab does "
            "not write or delete through links in its outputs: remove the link or choose another folder"
        )
    if run_kind(folder) == kind or (owner is not None and _owner(folder) == owner):
        return  # the command's own earlier output: its own rules (resume, --overwrite, replace) apply
    replaced = sorted(entry.name for entry in folder.iterdir() if entry.name in writes)
    if replaced:
        shown = ", ".join(replaced[:4]) + (f" and {len(replaced) - 4} more" if len(replaced) > 4 else "")
        raise ValueError(
            f"{option} {folder} holds files this command did not write, and it would replace its {shown}: "
            "choose a new or empty folder"
        )


def _owner(folder: Path) -> str | None:
    try:
        return (folder / OWNER).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def claim_folder(folder: str | os.PathLike, owner: str) -> Path:
    """Create ``folder`` (a folder output that :func:`check_output` passed) and mark it as ``owner``'s, so that a
    rerun of that command may replace its files there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if _owner(folder) != owner:
        write_text(folder / OWNER, owner + "\n")
    return folder


def _check_run_folders(given: Path, resolved: Path, kind: str, option: str) -> None:
    """The innermost existing run folder at or above ``resolved`` decides (module docstring)."""
    for folder in (resolved, *resolved.parents):
        found = run_kind(folder)
        if found is None:
            continue
        name = RUN_NAMES[found]
        if folder == resolved:
            if found == kind:
                return  # the run's own command: its resume and --overwrite rules apply
            raise ValueError(
                f"{option} {given} is a {name} folder; writing there would replace its files: choose another {option}"
            )
        top = resolved.relative_to(folder).parts[0]
        if kind != found and kind not in ACCEPTS[found]:
            raise ValueError(f"{option} {given} is inside the {name} folder {folder}; choose an {option} outside it")
        if top in RUN_FILES[found]:
            raise ValueError(
                f"{option} {given} would write into {folder / top}, which the {name} in {folder} wrote; "
                f"choose another {option}"
            )
        return


def check_outputs(
    outputs: Mapping[str, str | os.PathLike | None], kind: OutputKind, inputs: Mapping[str, object] | None = None
) -> dict[str, Path | None]:
    """:func:`check_output` for each of a command's file outputs (option → path, None when not asked for), and
    no two of them the same file (the second would replace the first). Returns option → the path to write."""
    seen: dict[Path, str] = {}
    checked = {}
    for option, out in outputs.items():
        if out is None or out == "":
            checked[option] = out
            continue
        checked[option] = check_output(out, kind, inputs, option, file=True)
        resolved = checked[option].resolve()
        if resolved in seen:
            raise ValueError(f"{option} and {seen[resolved]} are the same file ({out}); give each its own")
        seen[resolved] = option
    return checked


# --- writing ---------------------------------------------------------------------------------------------


def _temporary(path: Path) -> Path:
    """``.tmp-<8 hex of the name>-<pid><suffix>`` beside ``path``: short whatever the name's length (a 255-byte
    name stays writable), the suffix last (matplotlib reads the format from it), and what an earlier process
    killed while writing the same path left behind found by its prefix and removed."""
    digest = hashlib.sha256(path.name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    for stale in path.parent.glob(f".tmp-{digest}-*"):
        pid = stale.name[len(f".tmp-{digest}-") :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    return path.with_name(f".tmp-{digest}-{os.getpid()}{path.suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends without an error,
    removed when it raises. The folder is created. ``ValueError`` when ``path`` is a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; the output must be a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:  # a full disk, a file-size limit: name the output, not the temporary name
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path``, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` to ``path``, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


Note = Callable[[str], None]


def stderr_note(message: str) -> None:
    from dpolab.console import printable  # the keys named come from the data

    print(printable(f"note: {message}"), file=sys.stderr)


def strict_json(value, where: str = "") -> tuple[object, list[str]]:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None, and the dotted keys where they were
    (``final.loss``, ``rows[3]``). Everything else is returned as it is."""
    found: list[str] = []

    def clean(item, at: str):
        if isinstance(item, float) and not math.isfinite(item):
            found.append(f"{at or 'the value'} ({item})")
            return None
        if isinstance(item, Mapping):
            return {key: clean(child, f"{at}.{key}" if at else str(key)) for key, child in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(child, f"{at}[{index}]") for index, child in enumerate(item)]
        return item

    return clean(value, where), found


def dumps(value, note: Note | None = stderr_note, source: str = "", **options) -> str:
    """Strict JSON text of ``value``: non-finite numbers as null, each reported to ``note`` (with ``source``,
    the file it goes to). ``options`` go to :func:`json.dumps` (``indent``, ``ensure_ascii``, ``default``…)."""
    cleaned, found = strict_json(value)
    if found and note is not None:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        note(f"{source or 'JSON'}: {shown} not a finite number; written as null")
    text = json.dumps(cleaned, allow_nan=False, **options)
    # With ensure_ascii=False, three line breaks that JSON leaves raw would split a JSONL row for readers that
    # split on every Unicode line break (Python's str.splitlines, editors): escaped, they read back the same.
    return text.translate(_LINE_BREAKS) if not options.get("ensure_ascii", True) else text


_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def write_json(
    path: str | os.PathLike, value, note: Note | None = stderr_note, indent: int | None = 2, **options
) -> Path:
    """``value`` as strict JSON (:func:`dumps`) to ``path``, atomically."""
    text = dumps(value, note, source=str(path), indent=indent, **options)
    return write_text(path, text + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping], note: Note | None = stderr_note) -> int:
    """``rows`` as JSON lines (UTF-8, non-ASCII kept, strict) to ``path``, atomically; returns how many."""
    count = 0
    found: list[str] = []

    def collect(message: str) -> None:
        found.append(message)

    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(dumps(row, collect, source=f"line {count + 1}", ensure_ascii=False) + "\n")
            count += 1
    if found and note is not None:
        note(f"{path}: " + "; ".join(found[:3]) + (f"; and {len(found) - 3} more lines" if len(found) > 3 else ""))
    return count


# --- state that must round-trip exactly --------------------------------------------------------------------

_FLOAT_TAG = "$float"


def exact_dumps(value, **options) -> str:
    """Strict JSON that keeps non-finite floats: each becomes ``{"$float": "nan" | "inf" | "-inf"}``, which
    :func:`exact_loads` turns back. For state a run restores (a checkpoint's ``state.json``), where ``null``
    would change the resumed run."""

    def encode(item):
        if isinstance(item, float) and not math.isfinite(item):
            return {_FLOAT_TAG: repr(item)}
        if isinstance(item, Mapping):
            return {key: encode(child) for key, child in item.items()}
        if isinstance(item, (list, tuple)):
            return [encode(child) for child in item]
        return item

    return json.dumps(encode(value), allow_nan=False, **options)


def exact_loads(text: str):
    """The value :func:`exact_dumps` wrote (plain JSON reads as it is)."""

    def decode(item: dict):
        if len(item) == 1 and isinstance(item.get(_FLOAT_TAG), str):
            return float(item[_FLOAT_TAG])
        return item

    return json.loads(text, object_hook=decode)
