"""What a run keeps across a stop: every component with ``state_dict``/``load_state_dict`` registered with the
checkpointer once (the data position, the data's fingerprint, the counters; a recipe adds its own, such as the
3D monitor), the resume that restores them all, and the checkpoint at the end of each step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dpolab.engine.reference import (
    items_fingerprint,
)


@dataclass
class Counters:
    """Running totals of a run (global, over every process)."""

    items_seen: int = 0
    tokens_seen: int = 0
    nonfinite_skipped: int = 0
    elapsed_seconds: float = 0.0
    _started: float = field(default_factory=time.perf_counter, repr=False)
    _elapsed_before: float = field(default=0.0, repr=False)

    def start_clock(self) -> None:
        """Count time from now on, on top of what earlier runs of this output_dir counted."""
        self._elapsed_before, self._started = self.elapsed_seconds, time.perf_counter()

    def tick(self) -> None:
        self.elapsed_seconds = self._elapsed_before + time.perf_counter() - self._started

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("items_seen", "tokens_seen", "nonfinite_skipped", "elapsed_seconds")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self.start_clock()


class DataIdentity:
    """The fingerprint of the tokenised training items: resuming on changed data (same path, other contents, or
    another tokenizer) is refused instead of continuing as if nothing changed."""

    def __init__(self, items: list, source: str) -> None:
        self.fingerprint, self.source = items_fingerprint(items), source

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"cannot resume: the training data {self.source} is not what the checkpoint was trained on (its "
                "tokenised rows differ: the file or the tokenizer changed); use a new output_dir or --overwrite"
            )
