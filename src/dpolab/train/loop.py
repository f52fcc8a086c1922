"""The course of every recipe's loop, around the recipe's own step: the start (settings checked, paths made absolute,
the accelerator, the run folder, the recipe's setup), the resume, the stop signals and the progress bar; after
each step the log, the monitor's alarms, the periodic held-out and harness evaluations and the checkpoint; at the
end the final evaluation, the final model and ``summary.json``.

A recipe's ``train()`` then reads as its loop::

    with start_run(config, resume, overwrite, setup) as s:
        loop = Loop(s, "sft", evaluate)
        with loop:
            for step in loop.steps():
                result = train_step(s, step, items, forward, "examples")
                loop.record(step, result.metrics, shown={"loss": result.metrics["loss"]})
                loop.end_step(step, result.nonfinite)
        return loop.finish("examples")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from dpolab.console import progress_bar
from dpolab.train.accelerator import make_accelerator
from dpolab.train.config import TrainConfig
from dpolab.train.evaluation import harness_evaluator
from dpolab.train.guard import catch_stop_signals
from dpolab.train.lifecycle import Run, checkpoint_step, finish_run, interrupted, resume
from dpolab.train.run_folder import open_run
from dpolab.train.step import alarm_stop

NO_MODEL = object()  # ``harness_model`` of a recipe whose model the harness cannot evaluate (a reward model)


@contextmanager
def start_run(config: TrainConfig, resume_from: str | None, overwrite: bool, setup: Callable) -> Iterator[Run]:
    """Check ``config``, make its paths absolute (config.yaml and checkpoints then resume from any directory), make
    the accelerator, open the run folder (locked while the run lasts) and run the recipe's ``setup``."""
    config.validate()
    config = config.with_absolute_paths()
    started = time.perf_counter()
    accelerator = make_accelerator(config)
    with open_run(config, accelerator, resume_from, overwrite) as folder:
        s = setup(config, accelerator, folder)
        s.started = started
        yield s


class Loop:
    """What happens around a recipe's step, in order; ``evaluate(step)`` is the recipe's held-out evaluation.

    ``command``: the CLI command that resumes this run (named in the messages). ``harness_model``: the module the
    lm-evaluation-harness scores (default the model; :data:`NO_MODEL`: none, no ``harness`` in the summary).
    ``title``: the progress bar's.
    """

    def __init__(
        self, s: Run, command: str, evaluate: Callable[[int], dict], harness_model=None, title: str = "training"
    ) -> None:
        self.s, self.command, self.evaluate, self.title = s, command, evaluate, title
        self.harness_model = s.model if harness_model is None else harness_model
        self.harness = None
        if self.harness_model is not NO_MODEL:
            self.harness = harness_evaluator(s.config, s.accelerator, s.folder, s.tokenizer)
        self.metrics: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.evaluated_at = 0
        self.steps_done = s.total_steps
        self.stopped_by_alarm: str | None = None
        self._exits = ExitStack()

    def __enter__(self) -> Loop:
        s = self.s
        self.first_step = resume(s, s.folder.log)
        s.model.train()
        self.stop = self._exits.enter_context(catch_stop_signals())
        show = s.config.progress and s.accelerator.is_main_process
        self.bar = self._exits.enter_context(progress_bar(show, self.title, s.total_steps, show_metrics=True))
        self.bar(0, completed=self.first_step - 1)
        return self

    def __exit__(self, *exc) -> None:
        self._exits.close()

    def steps(self) -> Iterator[int]:
        """The steps still to run: from the one after the resumed checkpoint to the last, or to an alarm's stop."""
        for step in range(self.first_step, self.s.total_steps + 1):
            yield step
            if self.stopped_by_alarm:
                return

    def record(self, step: int, metrics: dict, shown: dict, alarms: list | None = None, on_alarm: str | None = None):
        """Log the step's metrics (every ``logging_steps``, at the last step, and with new alarms); log the alarms
        and decide, with every process, whether one stops the run (``on_alarm: stop``); move the bar."""
        config, log = self.s.config, self.s.folder.log
        self.metrics = metrics
        if step % config.logging_steps == 0 or step == self.s.total_steps or alarms:
            log.write(step, metrics)
        if on_alarm is not None:  # a recipe with a monitor (the same on every process)
            self.stopped_by_alarm = alarm_stop(self.s.accelerator, log, alarms or [], on_alarm)
        self.bar(1, **shown)

    def end_step(self, step: int, nonfinite: str | None) -> None:
        """The periodic evaluations, then the checkpoint when due (always before an alarm's stop or a signal's);
        raises :class:`NonFiniteError` after a non-finite batch and :class:`TrainingInterrupted` after a signal."""
        s = self.s
        if s.config.eval_steps and step % s.config.eval_steps == 0 and step != s.total_steps:
            self.last_eval, self.evaluated_at = self.evaluate(step), step
        if self.harness and self.harness.periodic(step) and step != s.total_steps:
            self.harness.evaluate(step, self.harness_model)
        saved, signalled = checkpoint_step(
            s, step, self.stop, nonfinite, self.command, force=bool(self.stopped_by_alarm)
        )
        if self.stopped_by_alarm:
            s.folder.log.info(
                f"stopping after step {step}: alarm {self.stopped_by_alarm} with monitor.on_alarm: stop; "
                f"checkpoint: {saved}"
            )
            self.steps_done = step
        elif signalled:
            raise interrupted(s, step, self.stop, saved, self.command)

    def finish(self, unit: str, **extra) -> dict:
        """The final held-out evaluation (unless the last step had one), the final harness evaluation, the final
        model and ``summary.json`` (``extra``: the recipe's own keys); the summary."""
        if self.evaluated_at != self.steps_done:  # an alarm stop right after a periodic evaluation: not twice
            self.last_eval = self.evaluate(self.steps_done) or self.last_eval
        if self.harness_model is not NO_MODEL:
            extra["harness"] = self.harness.evaluate(self.steps_done, self.harness_model) if self.harness else None
        return finish_run(self.s, self.steps_done, unit, self.metrics, self.last_eval, **extra)
