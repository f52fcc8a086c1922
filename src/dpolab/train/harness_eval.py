"""lm-evaluation-harness during training (``eval_harness:`` in the training config).

The policy is evaluated in memory (no save, no reload) on dpolab's offline task definitions
(:mod:`dpolab.eval.harness`) every ``every`` optimiser steps and once at the end. Each evaluation writes
one line to ``output_dir/harness.jsonl`` (every metric with its stderr and 95% bootstrap interval) and its
values to metrics.jsonl and TensorBoard as ``harness/<task>/<metric>``; the HTML report shows them.

Under several processes the main process evaluates and the others wait at a barrier; the harness runs on
the unwrapped model, which under DDP is the whole model. Under FSDP no process holds the whole model, so
``eval_harness`` is refused there: evaluate the saved model with ``dpolab eval harness``. The harness
seeds Python's, NumPy's and torch's generators; they are saved before and restored after, so training
with evaluation draws the same random numbers as training without it.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch

from dpolab.outputs import dumps
from dpolab.settings import EvalHarnessSettings


def check_files(settings: EvalHarnessSettings) -> tuple[dict, dict]:
    """Each task's files and its shots, every file read and checked, so a bad file stops the run before any
    model loads. Needs the eval extra."""
    from dpolab.eval.harness import check_request, require_lm_eval
    from dpolab.eval.tasks import resolve_files

    require_lm_eval()
    keys = ("eval_harness.data_dir", "eval_harness.data", "eval_harness.fewshot_data")
    try:
        files = resolve_files(settings.tasks, settings.data_dir, settings.data, settings.fewshot_data, keys)
        shots = check_request(files, settings.num_fewshot, settings.limit)
    except ValueError as error:
        raise ValueError(f"eval_harness: {error}") from None
    return files, shots


def absolute_paths(settings: EvalHarnessSettings) -> EvalHarnessSettings:
    """``settings`` with their local paths absolute (a resumed run reads the same files from any directory)."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().absolute())

    return dataclasses.replace(
        settings,
        data_dir=absolute(settings.data_dir) if isinstance(settings.data_dir, str) else settings.data_dir,
        data={task: absolute(p) if isinstance(p, str) else p for task, p in settings.data.items()},
        fewshot_data={task: absolute(p) if isinstance(p, str) else p for task, p in settings.fewshot_data.items()},
    )


def metric_values(result: dict) -> dict[str, float]:
    """``harness/<task>/<metric>`` → value, for metrics.jsonl and TensorBoard."""
    return {
        f"harness/{task}/{metric}": numbers["value"]
        for task, task_result in result["tasks"].items()
        for metric, numbers in task_result["metrics"].items()
    }


class RandomState:
    """Python's, NumPy's and torch's (CPU and CUDA) generator states, to restore after the harness seeds them."""

    def __init__(self) -> None:
        self.python, self.numpy, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class HarnessEvaluator:
    """Runs the harness on the policy at the steps the settings ask for; see the module docstring."""

    def __init__(self, settings: EvalHarnessSettings, accelerator, folder, tokenizer) -> None:
        if accelerator.distributed_type.value == "FSDP":
            raise ValueError(
                "eval_harness: not available under FSDP (no process holds the whole model during training); "
                "evaluate the saved model with dpolab eval harness"
            )
        from dpolab.eval.harness import fewshot_counts
        from dpolab.eval.tasks import resolve_files

        # the files were read and checked in TrainConfig.validate (check_files): only locate them here
        self.settings = settings
        self.files = resolve_files(settings.tasks, settings.data_dir, settings.data, settings.fewshot_data)
        self.shots = fewshot_counts(settings.num_fewshot, self.files)
        self.accelerator, self.folder, self.tokenizer = accelerator, folder, tokenizer
        self.path = folder.path / "harness.jsonl"
        self.last: dict = {}
        self.evaluated_at: int | None = None

    def periodic(self, step: int) -> bool:
        """An evaluation is due after this step (the end of training is evaluated apart)."""
        return bool(self.settings.every and step % self.settings.every == 0)

    def evaluate(self, step: int, model) -> dict:
        """The harness on the policy now: every process returns the same metric values."""
        from dpolab.eval.harness import evaluate_checked

        if self.evaluated_at == step:
            return metric_values(self.last) if self.last else {}
        self.evaluated_at = step
        result = None
        if self.accelerator.is_main_process:
            state = RandomState()
            try:
                result = evaluate_checked(
                    self.accelerator.unwrap_model(model),
                    self.tokenizer,
                    self.files,
                    self.shots,
                    limit=self.settings.limit,
                    batch_size=self.settings.batch_size,
                    max_new_tokens=self.settings.max_new_tokens,
                    max_new_tokens_key="eval_harness.max_new_tokens",
                )
            finally:
                state.restore()
        self.accelerator.wait_for_everyone()
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            result = broadcast_object_list([result])[0]
        values = metric_values(result)
        self.last = {"step": step, **result}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(dumps(self.last, self.folder.log.info, source="harness.jsonl") + "\n")
        self.folder.log.write(step, values)
        shown = ", ".join(f"{name.removeprefix('harness/')} {100 * value:.1f}%" for name, value in values.items())
        self.folder.log.info(f"harness at step {step}: {shown}")
        return values


def read_harness_log(path: str | Path) -> list[dict]:
    """The evaluations of a run (``harness.jsonl``), in order; empty when the run had none."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
