"""``dpolab sweep SPEC.yaml``: a grid of training runs over config keys and seeds, with intervals.

A sweep runs each point of its grid, for each seed, through the normal recipes (``dpolab train``,
``sft``, ``rm``, ``ppo`` in a process of its own; the toy lab in this one), then an optional evaluation
command, and writes one table: for each point and metric the mean over seeds and its 95% interval
(Student's t). Finished runs are skipped when the sweep is started again, unfinished training runs
resume from their last checkpoint, so a stopped sweep loses at most a checkpoint interval.

It sits beside ``quickstart.py`` above ``train/`` and ``eval/``: it drives recipes, it adds no training
code. The spec's keys are :class:`SweepSpec`'s fields (docs/experiments.md#the-sweep-tool).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dpolab import safe_yaml
from dpolab.outputs import RUN_FILES, atomic_path, check_output, write_json, write_text
from dpolab.report.sweep import CHANGE_SUFFIX, value_text
from dpolab.settings import dotted_keys
from dpolab.settings import parse as nested_settings
from dpolab.train.registry import COMMANDS

TRAINING_RECIPES = tuple(COMMANDS)  # dpolab train, sft, rm, ppo (dpolab.train.registry)
RECIPES = (*TRAINING_RECIPES, "toy")
RESULT_FILE = "sweep_result.json"  # written last, atomically: its presence means the run is finished


@dataclass
class EvaluateSpec:
    """A command run after each training run (and on the baseline model); the numbers of its JSON output
    become metrics named ``evaluate/<key>``."""

    command: str
    """The command line (no shell). Placeholders: ``{model_dir}`` (the run's ``model/``, or the baseline's
    model), ``{run_dir}``, ``{seed}``, ``{output}`` (the JSON file to write)."""
    output: str = "evaluate.json"
    """The file the command writes, in the run's folder (``{output}`` in the command is its path)."""
    name: str | None = None
    """Its metrics are ``evaluate/<name>/<key>`` when named (needed when there are several evaluations)."""
    baseline: bool = True
    """Run it on the baseline model too; false for a command that reads the run's settings (``{config[data]}``)."""


@dataclass
class BaselineSpec:
    """A model evaluated with the same command for each seed: every run gets ``<metric> change``, its value
    minus the baseline's of the same seed (paired), with its own interval."""

    model: str
    """The baseline model's folder; ``{seed}`` is replaced by the seed."""
    name: str = "baseline"
    """Its row in the table."""


@dataclass
class PlotSpec:
    """One figure per metric: the metric (mean, 95% interval) against a swept key, one line per value of
    another key (the 3D paper's Fig. 9 shape)."""

    x: str
    """The swept key on the horizontal axis."""
    metrics: list[str]
    """The metrics to plot, one figure each."""
    line: str | list[str] | None = None
    """The key (or keys) whose values make the lines (e.g. ``loss``); default: one line per set of the other keys."""
    where: dict = field(default_factory=dict)
    """Only the points with these values (as shown in the table), e.g. ``{optimizer: adam}``."""
    log_x: bool = False
    """Logarithmic x axis (λ ∈ {5, 50, 500})."""


@dataclass
class CompareSpec:
    """Two values of one swept key compared run by run: for every combination of the other swept keys
    (the points' names and the grid's keys), each metric of point ``a`` minus that of point ``b`` with the
    same seed, and the interval of those paired differences."""

    key: str
    """The swept key whose values are compared (``name`` for the listed points)."""
    a: str | int | float | bool
    """The value whose runs come first in ``a − b``, as shown in the table."""
    b: str | int | float | bool


@dataclass
class SweepSpec:
    """A sweep: which recipe, the settings every run shares, the grid, the seeds, and what to measure."""

    recipe: str = "train"
    """``train``, ``sft``, ``rm``, ``ppo`` (a ``dpolab <recipe>`` process per run) or ``toy`` (the toy lab)."""
    base: dict = field(default_factory=dict)
    """Config keys every run shares (dotted keys such as ``loss_params.beta`` allowed); ``{seed}`` in a string
    value is replaced by the run's seed."""
    grid: dict = field(default_factory=dict)
    """Key → list of values; every combination is a point. A value that is a mapping with a ``name`` is a
    bundle: its keys are set together (``{name: sgd, optimizer: sgd, learning_rate: 0.5}``), shown as its name."""
    points: list = field(default_factory=list)
    """A list of points, each a mapping of keys (``name`` labels it); combined with every grid combination."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """The ``seed`` of each run of a point."""
    metrics: list[str] = field(default_factory=list)
    """The table's columns; default: every metric all runs have (``dpolab sweep --metrics`` lists them)."""
    evaluate: dict | list | None = None
    """:class:`EvaluateSpec`: ``{command: ..., output: evaluate.json}``, or a list of them, each with its own
    ``name`` and ``output`` (run in order after each run and on the baseline)."""
    baseline: dict | None = None
    """:class:`BaselineSpec`: ``{model: runs/qs{seed}/runs/sft/model, name: sft}``; needs ``evaluate``."""
    plots: list = field(default_factory=list)
    """:class:`PlotSpec` mappings: ``[{x: loss_params.lam, line: loss, metrics: [...], log_x: true}]``."""
    compare: list = field(default_factory=list)
    """:class:`CompareSpec` mappings: ``[{key: name, a: dpop, b: dpo}]``: a − b per seed, for every value of
    the other swept keys."""
    launcher: str | None = None
    """Training recipes: the command that starts ``dpolab``; default ``python -m dpolab`` of this Python.
    E.g. ``torchrun --nproc_per_node 8 -m dpolab``."""
    out: str | None = None
    """The sweep's folder; default ``runs/sweep-<spec file name>``; ``--out`` overrides it."""


@dataclass
class Point:
    """One set of settings; run once per seed."""

    name: str
    """Its label: ``name`` from the spec, else ``key=value`` of what it sets."""
    settings: dict
    """The config keys this point sets (dotted), beside the base."""
    coordinates: dict = field(default_factory=dict)
    """Swept key → the value shown in the table and the plots (a bundle's ``name``; a listed point's ``name``)."""

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=+-]+", "_", self.name).strip("_") or "point"


@dataclass
class Job:
    """One run: a point (or the baseline) at one seed."""

    point: Point
    seed: int
    run_dir: Path
    config: dict = field(default_factory=dict)
    """The nested config of the run (training recipes and toy); empty for the baseline."""
    baseline: bool = False


def load_spec(path: str | Path, out: str | None = None) -> tuple[SweepSpec, Path]:
    """The spec in ``path`` checked field by field, and the sweep's folder. ``ValueError`` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep spec: no such file: {path}")
    data = safe_yaml.load(path.read_text(), str(path))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sweep keys (recipe, base, grid, points, seeds, ...)")
    spec = nested_settings(SweepSpec, data, "sweep", "a sweep key", "docs/experiments.md#the-sweep-tool")
    if spec.recipe not in RECIPES:
        raise ValueError(f"sweep.recipe: one of {', '.join(RECIPES)}; got {spec.recipe!r}")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ValueError(f"sweep.seeds: a non-empty list of distinct integers; got {spec.seeds!r}")
    for index, plot in enumerate(spec.plots):
        nested_settings(PlotSpec, plot, f"sweep.plots[{index}]", "a plot setting", "docs/experiments.md")
    evaluations(spec)  # each checked, an unknown placeholder included
    if spec.baseline is not None:
        nested_settings(BaselineSpec, spec.baseline, "sweep.baseline", "a baseline setting", "docs/experiments.md")
        if spec.evaluate is None:
            raise ValueError("sweep.baseline: needs sweep.evaluate (the baseline is measured with that command)")
    folder = Path(out or spec.out or Path("runs") / f"sweep-{path.stem}")
    return spec, folder


def expand_points(spec: SweepSpec) -> list[Point]:
    """Every grid combination under every listed point; labels unique."""
    for key, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep.grid.{key}: a non-empty list of values; got {values!r}")
    if not spec.grid and not spec.points:
        raise ValueError("sweep: empty grid: give grid: (key: [values]) or points: (a list of mappings)")
    for index, entry in enumerate(spec.points):
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"sweep.points[{index}]: a non-empty mapping of keys; got {entry!r}")
    for where, keys in [("grid", list(spec.grid)), *[(f"points[{i}]", list(p)) for i, p in enumerate(spec.points)]]:
        for key in ("seed", "output_dir"):
            if key in keys or key in spec.base:
                raise ValueError(f"sweep.{where if key in keys else 'base'}.{key}: set by the sweep (use seeds:)")
    combinations = [dict(zip(spec.grid, values, strict=True)) for values in itertools.product(*spec.grid.values())]
    points = []
    for listed in spec.points or [{}]:
        listed = dict(listed)
        name = listed.pop("name", None)
        for combination in combinations:
            settings, shown = dict(listed), {}
            for key, value in combination.items():
                if isinstance(value, dict) and "name" in value:  # a bundle of keys set together
                    settings.update({k: v for k, v in value.items() if k != "name"})
                    shown[key] = value["name"]
                else:
                    settings[key] = value
                    shown[key] = value
            swept = " ".join(f"{key}={value_text(value)}" for key, value in shown.items())
            if name is None:
                label = " ".join(f"{key}={value_text(value)}" for key, value in {**listed, **shown}.items())
            else:
                label = f"{name} {swept}".strip()
            coordinates = {**({"name": name} if name is not None else {}), **listed, **shown}
            points.append(Point(label or "base", settings, coordinates))
    seen: dict[str, Point] = {}
    for point in points:
        if point.folder in seen:
            raise ValueError(f"sweep: two points would share the folder {point.folder!r}: give them distinct names")
        seen[point.folder] = point
    return points


def nested(settings: dict) -> dict:
    """Dotted keys (``loss_params.beta``) as nested mappings (a new structure: the spec's own mappings are
    shared by many points and must not change)."""
    import copy

    result: dict = {}
    for key, value in copy.deepcopy(settings).items():
        target = result
        *parents, leaf = str(key).split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"sweep: {key}: {parent} is not a mapping")
        if isinstance(value, dict) and isinstance(target.get(leaf), dict):
            target[leaf] = {**target[leaf], **value}
        else:
            target[leaf] = value
    return result


def _with_seed(value, seed: int):
    if isinstance(value, str):
        return value.replace("{seed}", str(seed))
    if isinstance(value, dict):
        return {key: _with_seed(item, seed) for key, item in value.items()}
    if isinstance(value, list):
        return [_with_seed(item, seed) for item in value]
    return value


def plan_jobs(spec: SweepSpec, folder: Path) -> list[Job]:
    """Every run of the sweep, its config built and validated (every config error before any run)."""
    points = expand_points(spec)
    shown = {key for point in points for key in point.coordinates}
    for index, plot in enumerate(spec.plots):
        plot = PlotSpec(**plot)
        line = [plot.line] if isinstance(plot.line, str) else list(plot.line or [])
        for key in [plot.x, *line, *plot.where]:
            if key not in shown:
                raise ValueError(
                    f"sweep.plots[{index}]: {key!r} is not a swept key (swept: {', '.join(sorted(shown))})"
                )
    for index, entry in enumerate(spec.compare):
        compare = nested_settings(
            CompareSpec, entry, f"sweep.compare[{index}]", "a compare setting", "docs/experiments.md"
        )
        if compare.key not in shown:
            raise ValueError(
                f"sweep.compare[{index}]: {compare.key!r} is not a swept key (swept: {', '.join(sorted(shown))})"
            )
        values = {value_text(point.coordinates.get(compare.key)) for point in points}
        for side in ("a", "b"):
            if value_text(getattr(compare, side)) not in values:
                raise ValueError(
                    f"sweep.compare[{index}].{side}: {getattr(compare, side)!r} is not a value of {compare.key} "
                    f"(values: {', '.join(sorted(values))})"
                )
    jobs = []
    if spec.baseline is not None:
        baseline = BaselineSpec(**spec.baseline)
        point = Point(baseline.name, {"model": baseline.model})
        for seed in spec.seeds:
            if not Path(_with_seed(baseline.model, seed)).exists():
                raise ValueError(
                    f"sweep.baseline.model: no such folder for seed {seed}: {_with_seed(baseline.model, seed)}"
                )
            jobs.append(Job(point, seed, folder / "runs" / point.folder / f"seed{seed}", baseline=True))
    for point in points:
        for seed in spec.seeds:
            run_dir = folder / "runs" / point.folder / f"seed{seed}"
            config = nested({**spec.base, **point.settings})
            config = _with_seed(config, seed) | {"seed": seed, "output_dir": str(run_dir)}
            try:
                validate_config(spec.recipe, config)
            except ValueError as error:
                raise ValueError(f"sweep point {point.name!r} (seed {seed}): {error}") from None
            jobs.append(Job(point, seed, run_dir, config))
    listed, checked = isinstance(spec.evaluate, list), evaluations(spec)
    for job in jobs:  # a {config[KEY]} the run has not fails now, not after the runs before it
        for index, evaluate in enumerate(checked):
            if job.baseline and not evaluate.baseline:
                continue
            where = f"sweep.evaluate[{index}]" if listed else "sweep.evaluate"
            try:
                evaluation_command(evaluate, evaluation_values(job, "model", job.run_dir / evaluate.output), where)
            except ValueError as error:
                raise ValueError(
                    f"sweep point {job.point.name!r} (seed {job.seed}): {error}"
                    + ("; an evaluation that reads the run's settings needs baseline: false" if job.baseline else "")
                ) from None
    for job in jobs:  # a finished run whose settings changed since would mix two experiments in one table
        record = read_result(job.run_dir)
        if record is not None and record.get("config") != job.config:
            raise ValueError(
                f"sweep: {job.run_dir} finished with other settings than the spec now gives "
                f"({_difference(record.get('config') or {}, job.config)}); use another --out or delete that folder"
            )
    return jobs


def _difference(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    changed = [key for key in keys if old.get(key) != new.get(key)]
    return ", ".join(f"{key}: {old.get(key)!r} → {new.get(key)!r}" for key in changed[:3])


def validate_config(recipe: str, config: dict) -> None:
    """The recipe's own checks on one run's config (keys, types, values, files); loads no model."""
    if recipe == "toy":
        from dpolab.toy.lab import ToyConfig

        toy_config = nested_settings(
            ToyConfig, {k: v for k, v in config.items() if k != "output_dir"}, "toy", "a toy key", "docs/toy.md"
        )
        toy_config.validate()
        return
    from dpolab.train.config import load_config
    from dpolab.train.registry import COMMANDS

    defaults = COMMANDS[recipe].defaults
    load_config(None, None, {**defaults, **config, "progress": config.get("progress", False)})


def applied_evaluations(spec: SweepSpec, job: Job) -> list[dict]:
    """The evaluations a run gets, as the settings recorded with its result."""
    from dataclasses import asdict

    return [asdict(e) for e in evaluations(spec) if e.baseline or not job.baseline]


def finished(spec: SweepSpec, job: Job) -> bool:
    """Its result exists and was measured with the spec's evaluations; a run whose evaluations changed
    is evaluated again (not trained again). A result recorded before evaluations were recorded counts."""
    result = read_result(job.run_dir)
    if result is None:
        return False
    current = applied_evaluations(spec, job)
    return result.get("evaluations", current) == current


def read_result(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def sweep_inputs(spec_path: str | Path, jobs: list[Job]) -> dict[str, list[str]]:
    """Everything the sweep's runs read (the spec, each run's model, data…), for :func:`check_output`."""
    inputs: dict[str, list[str]] = {"spec": [str(spec_path)]}
    for job in jobs:
        # every setting that names an existing file or folder: model, data, ppo.reward.model, monitor.pairs…
        settings = (
            dotted_keys(job.config)
            if not job.baseline
            else {"baseline.model": _with_seed(job.point.settings["model"], job.seed)}
        )
        for key, value in settings.items():
            if (
                key not in ("output_dir", "cache_dir")
                and isinstance(value, str)
                and value
                and Path(value).expanduser().exists()
            ):
                inputs.setdefault(key, []).append(value)
    return inputs


def _write_json(path: Path, data) -> None:
    write_json(path, data, default=str)


# --- running ---------------------------------------------------------------------------------------------


def run_job(spec: SweepSpec, job: Job, log: Path) -> dict:
    """Train (unless already trained), evaluate, and return the run's metrics; any failure raises."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {}
    if job.baseline:
        model_dir = _with_seed(job.point.settings["model"], job.seed)
    elif spec.recipe == "toy":
        metrics.update(run_toy_job(job))
        model_dir = str(job.run_dir)
    else:
        metrics.update(run_training_job(spec, job, log))
        model_dir = str(job.run_dir / "model")
    for evaluate in evaluations(spec):
        if job.baseline and not evaluate.baseline:
            continue
        metrics.update(run_evaluation(evaluate, job, model_dir, log))
    return metrics


def evaluations(spec: SweepSpec) -> list[EvaluateSpec]:
    """The spec's evaluations, each checked: known keys, known placeholders; with several, distinct names
    and outputs. ``ValueError`` naming the entry."""
    if spec.evaluate is None:
        return []
    entries = spec.evaluate if isinstance(spec.evaluate, list) else [spec.evaluate]
    if not entries:
        raise ValueError("sweep.evaluate: an empty list; give a command, or leave evaluate out")
    several = isinstance(spec.evaluate, list) and len(entries) > 1
    checked = []
    for index, entry in enumerate(entries):
        where = f"sweep.evaluate[{index}]" if isinstance(spec.evaluate, list) else "sweep.evaluate"
        evaluate = nested_settings(EvaluateSpec, entry, where, "an evaluate setting", "docs/experiments.md")
        if several and not evaluate.name:
            raise ValueError(f"{where}: with several evaluations each needs a name (its metrics: evaluate/<name>/...)")
        evaluation_command(evaluate, {name: name for name in PLACEHOLDERS} | {"config": None}, where)
        check_evaluation_output(evaluate.output, spec.recipe, where)
        checked.append(evaluate)
    for key in ("name", "output"):
        values = [getattr(e, key) for e in checked]
        repeated = sorted({v for v in values if values.count(v) > 1 and v is not None})
        if repeated:
            raise ValueError(f"sweep.evaluate: two evaluations have the {key} {repeated[0]!r}; give each its own")
    return checked


def check_evaluation_output(output: str, recipe: str, where: str) -> None:
    """An evaluation's ``output`` is a file name inside the run's folder: not a path out of it (it would land on
    the spec, the data, another run), and not one of the files the run itself wrote (its summary.json)."""
    path = Path(output)
    if not output or path.is_absolute() or output.startswith("~") or ".." in path.parts:
        raise ValueError(f"{where}.output: a file name inside each run's folder (e.g. math.json); got {output!r}")
    own = RUN_FILES["toy" if recipe == "toy" else "train"] | {"samples.jsonl", "harness.jsonl"}
    if path.parts[0] in own:
        raise ValueError(f"{where}.output: {output!r} is a file the run writes itself; name the evaluation's own file")


def run_toy_job(job: Job) -> dict:
    from dpolab.toy.lab import ToyConfig, run_toy

    config = ToyConfig(**{k: v for k, v in job.config.items() if k != "output_dir"})
    run = run_toy(config)
    run.save(job.run_dir)
    return numeric(run.summary())


def run_training_job(spec: SweepSpec, job: Job, log: Path) -> dict:
    from dpolab.train.checkpoint import latest_checkpoint

    summary_path = job.run_dir / "summary.json"
    if not summary_path.exists():  # with a summary it trained earlier and only its evaluation failed
        config_path = job.run_dir.parent / f"{job.run_dir.name}.config.yaml"
        write_text(config_path, yaml.safe_dump({**job.config, "progress": False}, sort_keys=False))
        launcher = shlex.split(spec.launcher) if spec.launcher else [sys.executable, "-m", "dpolab"]
        command = [*launcher, spec.recipe, str(config_path)]
        if latest_checkpoint(job.run_dir) is not None:
            command.append("--resume")
        _run_logged(command, log, f"{spec.recipe} run")
    summary = json.loads(summary_path.read_text())
    metrics = numeric({key: value for key, value in summary.items() if key not in ("final", "eval")})
    metrics.update(numeric(summary.get("final") or {}))
    metrics.update(
        numeric({f"eval/{k}" if not k.startswith("eval/") else k: v for k, v in (summary.get("eval") or {}).items()})
    )
    return metrics


PLACEHOLDERS = ("model_dir", "run_dir", "seed", "output")  # and {config[KEY]}: the run's setting KEY (dotted)
CONFIG_FIELD = re.compile(r"config\[([^\[\]]+)\]")


def evaluation_values(job: Job, model_dir: str, output: Path) -> dict:
    """The placeholders' values for one run's evaluation."""
    return {
        "model_dir": model_dir,
        "run_dir": str(job.run_dir),
        "seed": str(job.seed),
        "output": str(output),
        "config": dotted_keys(job.config),  # the form {config[KEY]} reads
    }


def _config_value(key: str, settings: dict | None, where: str) -> str:
    if settings is None:  # checking the command before there are runs
        return key
    if key not in settings:
        raise ValueError(
            f"{where}.command: {{config[{key}]}}: the run's settings have no key {key!r} (set it in base, grid "
            "or points; a recipe's defaults are not visible here)"
        )
    value = settings[key]
    if value is None or isinstance(value, (dict, list)):
        raise ValueError(f"{where}.command: {{config[{key}]}} is {value!r}, not a single value to put in a command")
    return str(value)


def evaluation_command(evaluate: EvaluateSpec, values: dict, where: str = "sweep.evaluate") -> list[str]:
    """The evaluation's command line with its placeholders filled (``values["config"]`` None: any key is
    taken as known); ``ValueError`` naming an unknown placeholder, a missing setting or a stray brace."""
    known = f"{', '.join('{' + name + '}' for name in PLACEHOLDERS)} and {{config[KEY]}} for the run's setting KEY"
    command = []
    for word in shlex.split(evaluate.command):
        try:
            fields = list(string.Formatter().parse(word))
        except ValueError as error:
            raise ValueError(
                f"{where}.command: stray brace in {word!r} ({error}); a literal brace is written {{{{ or }}}}"
            ) from None
        text = []
        for literal, name, format_spec, conversion in fields:
            text.append(literal)
            if name is None:
                continue
            match = CONFIG_FIELD.fullmatch(name)
            if format_spec or conversion or (name not in PLACEHOLDERS and match is None):
                shown = name + (f"!{conversion}" if conversion else "") + (f":{format_spec}" if format_spec else "")
                raise ValueError(f"{where}.command: unknown placeholder {{{shown}}} (known: {known})")
            text.append(_config_value(match.group(1), values["config"], where) if match else str(values[name]))
        command.append("".join(text))
    if not command:
        raise ValueError(f"{where}.command: empty")
    if command[0] == "dpolab":  # this installation's dpolab, whatever PATH says
        command = [sys.executable, "-m", "dpolab", *command[1:]]
    return command


def run_evaluation(evaluate: EvaluateSpec, job: Job, model_dir: str, log: Path) -> dict:
    output = job.run_dir / evaluate.output
    _run_logged(evaluation_command(evaluate, evaluation_values(job, model_dir, output)), log, "evaluation")
    try:
        data = json.loads(output.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RuntimeError(f"evaluation wrote no JSON at {output}: {error}") from None
    if not isinstance(data, dict):
        raise RuntimeError(f"evaluation output {output} is not a JSON object")
    prefix = f"evaluate/{evaluate.name}/" if evaluate.name else "evaluate/"
    return {f"{prefix}{key}": value for key, value in flat_numbers(data).items()}


def _run_logged(command: list[str], log: Path, what: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{what} exited with {result.returncode}: {' | '.join(tail)} (log: {log})")


def numeric(data: dict) -> dict:
    """The finite numbers of a flat mapping (booleans and nested values left out)."""
    return {
        key: float(value)
        for key, value in data.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def flat_numbers(data: dict, prefix: str = "") -> dict:
    """The finite numbers of a mapping, nested mappings included as ``outer/inner`` (lists left out): an
    evaluation's JSON such as ``dpolab eval harness``'s gives ``tasks/arc/metrics/acc/value``."""
    numbers = {}
    for key, value in data.items():
        if isinstance(value, dict):
            numbers.update(flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            numbers[f"{prefix}{key}"] = float(value)
    return numbers


def run_sweep(spec_path: str | Path, out: str | None = None, progress: bool = True, dry_run: bool = False) -> dict:
    """Plan, run what is not finished, aggregate and write the table, plots and page. Returns the results."""
    from dpolab.console import printable, progress_bar

    spec, folder = load_spec(spec_path, out)
    jobs = plan_jobs(spec, folder)
    writes = RUN_FILES["sweep"] | {"runs", "reports"}
    folder = check_output(
        folder, "sweep", sweep_inputs(spec_path, jobs), "--out" if out else "sweep.out", writes=writes
    )
    pending = [job for job in jobs if not finished(spec, job)]
    if dry_run:
        return {
            "folder": str(folder),
            "runs": len(jobs),
            "pending": len(pending),
            "points": _point_names(jobs),
            "available_metrics": aggregate(spec, jobs)["available_metrics"],
        }
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "spec.yaml", Path(spec_path).read_text())
    failures = []
    with progress_bar(progress, f"sweep {folder.name}", len(jobs)) as advance:
        advance(0, completed=len(jobs) - len(pending))
        for job in pending:
            log = folder / "logs" / f"{job.point.folder}-seed{job.seed}.log"
            start = time.perf_counter()
            try:
                metrics = run_job(spec, job, log)
            except KeyboardInterrupt:
                raise
            except Exception as error:  # one run's failure (a diverged toy run, a crashed process) is not the sweep's
                message = f"{type(error).__name__}: {' '.join(str(error).split())}"
                failures.append({"point": job.point.name, "seed": job.seed, "error": message})
                print(printable(f"sweep: {job.point.name} seed {job.seed} failed: {message}"), file=sys.stderr)
            else:
                record = {
                    "evaluations": applied_evaluations(spec, job),
                    "point": job.point.name,
                    "settings": job.point.settings,
                    "seed": job.seed,
                    "baseline": job.baseline,
                    "config": job.config,
                    "metrics": metrics,
                    "seconds": time.perf_counter() - start,
                }
                _write_json(job.run_dir / RESULT_FILE, record)
            advance()
    results = aggregate(spec, jobs)
    results["failures"] = failures
    results["folder"] = str(folder)
    write_results(spec, folder, results)
    return results


def _point_names(jobs: list[Job]) -> list[str]:
    return list(dict.fromkeys(job.point.name for job in jobs))


# --- aggregation -----------------------------------------------------------------------------------------

# Two-sided 95% quantiles of Student's t for 1–30 degrees of freedom; beyond, the normal's with the
# first two Cornish–Fisher terms (error < 1e-4 from 31 on; tested against scipy).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip


def t_quantile(degrees_of_freedom: int) -> float:
    if degrees_of_freedom <= len(T_975):
        return T_975[degrees_of_freedom - 1]
    z, v = 1.959964, degrees_of_freedom
    return z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)


def interval(values: list[float]) -> dict:
    """Mean and the 95% t-interval of the mean over seeds (half-width null with one value)."""
    n = len(values)
    mean = math.fsum(v / n for v in values)  # v / n first: gradient ratios reach 1e300, whose sum overflows
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "half_width": None, "low": None, "high": None, "values": values}
    scale = max(abs(v - mean) for v in values) or 1.0  # scaled, so the squares do not overflow either
    sd = scale * math.sqrt(math.fsum(((v - mean) / scale) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "half_width": half,
        "low": mean - half,
        "high": mean + half,
        "values": values,
    }


def aggregate(spec: SweepSpec, jobs: list[Job]) -> dict:
    """Per point: each metric's values over seeds and interval; ``<metric> change`` against the baseline."""
    records = {(job.point.name, job.seed): read_result(job.run_dir) for job in jobs}
    baseline_metrics = {
        job.seed: (records[(job.point.name, job.seed)] or {}).get("metrics", {}) for job in jobs if job.baseline
    }
    rows = []
    for name in _point_names(jobs):
        point_jobs = [job for job in jobs if job.point.name == name]
        done = {job.seed: records[(name, job.seed)]["metrics"] for job in point_jobs if records[(name, job.seed)]}
        per_metric: dict[str, dict[int, float]] = {}
        for seed, metrics in done.items():
            for key, value in metrics.items():
                per_metric.setdefault(key, {})[seed] = value
            if not point_jobs[0].baseline:
                for key, value in baseline_metrics.get(seed, {}).items():
                    if key in metrics:
                        per_metric.setdefault(key + CHANGE_SUFFIX, {})[seed] = metrics[key] - value
        rows.append(
            {
                "point": name,
                "folder": point_jobs[0].point.folder,
                "coordinates": point_jobs[0].point.coordinates,
                "baseline": point_jobs[0].baseline,
                "seeds_done": sorted(done),
                "metrics": {
                    key: interval([by_seed[s] for s in sorted(by_seed)]) | {"seeds": sorted(by_seed)}
                    for key, by_seed in per_metric.items()
                },  # fmt: skip
            }
        )
    available = sorted({key for row in rows for key in row["metrics"]})
    chosen = list(spec.metrics) or [
        key
        for key in available
        if all(key in row["metrics"] for row in rows if not row["baseline"] and row["seeds_done"])
    ]
    missing = [key for key in spec.metrics if key not in available]
    matching = (["name"] if any("name" in point for point in spec.points) else []) + list(spec.grid)
    return {
        "comparisons": [
            comparison
            for entry in spec.compare
            for comparison in compare_points(CompareSpec(**entry), rows, chosen, matching)
        ],
        "recipe": spec.recipe,
        "seeds": spec.seeds,
        "swept_keys": _swept_keys(spec),
        "metrics": chosen,
        "missing_metrics": missing,
        "available_metrics": available,
        "points": rows,
    }


def compare_points(compare: CompareSpec, rows: list[dict], metrics: list[str], matching: list[str]) -> list[dict]:
    """``a − b`` paired by seed for each pair of points that differ only in ``compare.key`` (among ``matching``)."""

    def shown(row: dict, key: str) -> str:
        return value_text(row["coordinates"].get(key))

    others = [key for key in matching if key != compare.key]
    runs = [row for row in rows if not row["baseline"]]
    found = []
    for first in runs:
        if shown(first, compare.key) != value_text(compare.a):
            continue
        for second in runs:
            if shown(second, compare.key) != value_text(compare.b):
                continue
            if any(shown(first, key) != shown(second, key) for key in others):
                continue
            differences = {}
            for metric in metrics:
                if metric not in first["metrics"] or metric not in second["metrics"]:
                    continue
                one, two = (dict(zip(r["metrics"][metric]["seeds"], r["metrics"][metric]["values"], strict=True))
                            for r in (first, second))  # fmt: skip
                seeds = sorted(set(one) & set(two))
                if seeds:
                    differences[metric] = interval([one[s] - two[s] for s in seeds]) | {"seeds": seeds}
            found.append(
                {
                    "key": compare.key,
                    "a": first["point"],
                    "b": second["point"],
                    "at": {key: first["coordinates"].get(key) for key in others},
                    "metrics": differences,
                }
            )
    return found


def _swept_keys(spec: SweepSpec) -> list[str]:
    keys = [key for point in spec.points for key in point] + list(spec.grid)
    return list(dict.fromkeys(keys))


def write_results(spec: SweepSpec, folder: Path, results: dict) -> None:
    """results.json (everything), results.csv (one row per point and metric), plots and index.html."""
    import csv

    from dpolab.report.sweep import comparison_table, markdown_table, write_sweep_page

    _write_json(folder / "results.json", results)
    keys = results["swept_keys"]
    with atomic_path(folder / "results.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["point", *keys, "metric", "n", "mean", "sd", "ci95_low", "ci95_high", "values"])
        for row in results["points"]:
            for metric in results["metrics"] + [m + CHANGE_SUFFIX for m in results["metrics"]]:
                stats = row["metrics"].get(metric)
                if stats is None:
                    continue
                settings = [value_text(row["coordinates"].get(key, "")) for key in keys]
                writer.writerow(
                    [
                        row["point"],
                        *settings,
                        metric,
                        stats["n"],
                        stats["mean"],
                        stats["sd"],
                        stats["low"],
                        stats["high"],
                        ";".join(f"{v:.6g}" for v in stats["values"]),
                    ]  # fmt: skip
                )
    comparisons = comparison_table(results)
    write_text(
        folder / "results.md", markdown_table(results) + (f"\nPaired by seed:\n\n{comparisons}" if comparisons else "")
    )
    write_sweep_page([PlotSpec(**plot) for plot in spec.plots], folder, results)
