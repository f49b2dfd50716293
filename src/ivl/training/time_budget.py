"""Fit a training run into a wall-clock budget by choosing its length from its own measured speed.

The same recipe runs 30-40 % slower on one day's 2-core machine than on another's (docs/benchmarks.md,
session 14), so a fixed step count cannot promise a finishing time. Stopping at the deadline would cut the
cosine schedule short, with the learning rate still high. Instead the run measures its time per step, sets
the total it can afford (never more than the recipe's ``max_steps``), and the schedule is re-spanned over that
total; it re-measures as it goes, since the machine's speed drifts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ivl.errors import ConfigError


@dataclass
class TimeBudget:
    """Plans the total steps of a run that must end within ``seconds`` of ``started`` (a ``clock`` reading).

    ``replan(step)`` is called after every optimizer step. It measures from step ``skip`` (the first steps are
    slower: allocations, caches), and at step ``first`` and every ``every`` steps after it returns the total
    that fits, clamped to ``[step, max_steps]``; at other steps it returns None.
    """

    seconds: float
    max_steps: int
    started: float
    first: int = 50
    every: int = 250
    skip: int = 5
    clock: Callable[[], float] = time.perf_counter
    plans: list[tuple[int, int]] = field(default_factory=list)  # (step, planned total)
    _mark: float | None = field(default=None, init=False, repr=False)  # clock reading at step ``skip``

    def __post_init__(self) -> None:
        if not self.seconds > 0 or not math.isfinite(self.seconds):
            raise ConfigError(f"a time budget must be a positive number of seconds, got {self.seconds}")
        if not 0 <= self.skip < self.first or self.every < 1:
            raise ConfigError(f"time budget: need 0 <= skip < first and every >= 1, got {self}")
        if self.skip == 0:
            self._mark = self.started

    def replan(self, step: int) -> int | None:
        now = self.clock()
        if step == self.skip:
            self._mark = now
        if step < self.first or (step - self.first) % self.every or self._mark is None:
            return None
        per_step = (now - self._mark) / (step - self.skip)
        left = self.seconds - (now - self.started)
        affordable = step + (math.floor(left / per_step) if per_step > 0 else self.max_steps)
        total = max(step, min(self.max_steps, affordable))
        self.plans.append((step, total))
        return total
