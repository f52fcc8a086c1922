"""The data of a run and its order: loading, holding out, tokenising and reporting (before any model loads), and
the seeded order cut into *global* micro-batches of ``batch_size × processes`` items, each process taking every
``processes``-th one, so a run on P processes sees the same items per optimiser step as one process with
``batch_size × P``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from dpolab.data.formats import DataError, where
from dpolab.engine.loading import check_vocabulary, load_tokenizer, read_model_config
from dpolab.train.config import TrainConfig
from dpolab.train.run_folder import RunFolder, log_skipped_rows, write_run_inputs


@dataclass
class Data:
    """A recipe's tokenised training and held-out items, and what happened to the rows."""

    items: list
    eval_items: list
    report: dict  # counts for summary.json
    tokenizer: object
    pad_token_id: int


def prepare_data(config: TrainConfig, accelerator, folder: RunFolder, load, tokenize) -> Data:
    """Load (``load``: file → examples, bad rows), hold out, tokenise (``tokenize``), report; refuse empty data.

    Runs before any model loads, so bad data fails fast.
    """
    log = folder.log
    examples, bad_rows = load(config.data, config.data_split, config.on_bad_rows, config.max_row_bytes)
    log_skipped_rows(log, bad_rows)
    examples, eval_examples = split_eval(examples, config, load)
    tokenizer = load_tokenizer(config.tokenizer or config.model, config.trust_remote_code)
    limits = dict(max_prompt_length=config.max_prompt_length, truncation_mode=config.truncation_mode)
    items, report = _tokenize_named(tokenize, tokenizer, examples, config.data, config.max_length, limits)
    eval_source = config.eval_data or config.data
    eval_items, eval_report = (
        _tokenize_named(tokenize, tokenizer, eval_examples, eval_source, config.max_length, limits)
        if eval_examples
        else ([], None)
    )
    for line in report.lines():
        log.info(f"data: {line}")
    if eval_report:
        log.info(f"eval data: {eval_report.lines()[0]}")
    if not items:
        raise ValueError(f"{config.data}: no usable {report.unit} after tokenisation ({'; '.join(report.lines())})")
    # the model's config (no weights read yet) sets its embedding rows: an id past them fails here, not mid-run
    check_vocabulary(read_model_config(config.model, config.trust_remote_code), tokenizer, config.model,
                     config.tokenizer or config.model)  # fmt: skip
    write_run_inputs(folder, accelerator, config, {**report.as_dict(), "bad_rows": bad_rows})
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Data(items, eval_items, {**report.as_dict(), "bad_rows_skipped": len(bad_rows)}, tokenizer, pad_token_id)


def _tokenize_named(tokenize, tokenizer, examples: list, source: str, max_length, limits: dict):
    """``tokenize``, with a row it refuses (a chat template that fails on it) named by file, line and row."""
    try:
        return tokenize(tokenizer, examples, max_length, **limits)
    except DataError as error:
        if error.row is None:
            raise
        line = next((example.line for example in examples if example.row == error.row), None)
        detail = str(error).removeprefix(f"row {error.row}: ")
        raise DataError(f"{where(source, error.row, line)}: {detail}", row=error.row) from None


def split_eval(examples: list, config: TrainConfig, load) -> tuple[list, list]:
    """(training examples, held-out examples): ``eval_data`` loaded with ``load``, or a seeded ``eval_fraction``."""
    if config.eval_data:
        return examples, load(config.eval_data, config.data_split, config.on_bad_rows, config.max_row_bytes)[0]
    if config.eval_fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    held = max(1, round(len(examples) * config.eval_fraction))
    if held >= len(examples):
        raise ValueError(
            f"eval_fraction: {config.eval_fraction} of {len(examples)} usable rows holds out {held}, leaving none to "
            "train on; lower eval_fraction, give eval_data, or add rows"
        )
    held_out = set(order[:held])
    return [e for i, e in enumerate(examples) if i not in held_out], [examples[i] for i in sorted(held_out)]


def shard_batches(count: int, batch_size: int, rank: int, processes: int) -> list[tuple[list[int], bool]]:
    """This process's batches over items 0..count−1 (every ``processes``-th item), as (ids, real).

    Every process gets the same number of batches, so forwards that are collective (FSDP) stay in step:
    a process that runs out repeats item 0 in a batch marked ``real=False`` whose results are ignored.
    """
    mine = list(range(rank, count, processes))
    per_process = math.ceil(count / processes)
    batches = [(mine[i : i + batch_size], True) for i in range(0, len(mine), batch_size)]
    while len(batches) < math.ceil(per_process / batch_size):
        batches.append(([0], False))
    return batches


@dataclass
class MicroBatch:
    epoch: int
    global_ids: list[int]  # every item of this micro-batch, on all processes together
    ids: list[int]  # this process's share (item 0 as a stand-in when the share is empty: see ``real``)
    real: bool  # False: this process has no item in the micro-batch and runs a stand-in forward


class BatchStream:
    """The data order: a seeded shuffle per epoch cut into global micro-batches of ``batch_size × processes``,
    grouped into optimiser steps of up to ``accumulation`` micro-batches that never cross an epoch's end.

    Process r takes items r, r + P, … of each global micro-batch. The order is a pure function of (seed,
    epoch), so the position (steps consumed) is the whole state.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, rank: int = 0, processes: int = 1, accumulation: int = 1
    ) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.processes, self.accumulation = rank, processes, accumulation
        self.consumed = 0
        self._iterator = self._generate()

    def _generate(self):
        epoch = 0
        width = self.batch_size * self.processes
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
            micro_batches = []
            for start in range(0, len(order), width):
                global_ids = order[start : start + width]
                mine = global_ids[self.rank :: self.processes]
                micro_batches.append(MicroBatch(epoch, global_ids, mine or global_ids[:1], bool(mine)))
            for start in range(0, len(micro_batches), self.accumulation):
                yield micro_batches[start : start + self.accumulation]
            epoch += 1

    def next_step(self) -> list[MicroBatch]:
        """The micro-batches of the next optimiser step."""
        self.consumed += 1
        return next(self._iterator)

    def state_dict(self) -> dict:
        return {"steps": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = 0
        self._iterator = self._generate()
        for _ in range(state["steps"]):
            self.next_step()


def steps_per_epoch(items: int, batch_size: int, processes: int, accumulation: int) -> int:
    """Optimiser steps in one pass: an epoch's last step takes the micro-batches left, never the next epoch's."""
    return math.ceil(math.ceil(items / (batch_size * processes)) / accumulation)


def total_steps(config: TrainConfig, items: int, processes: int) -> int:
    per_epoch = steps_per_epoch(items, config.batch_size, processes, config.gradient_accumulation_steps)
    return config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
