"""How many intra-op threads the small token steps that run on the event loop use, chosen by measurement.

A token step of a small model or a short span is a string of tiny matrix products: splitting each one
over the cores costs more (a wake-up and a join per operation) than it saves, and the woken thread takes
the other core from the p2pd daemons and peers the step's bytes must pass through. On a 2-core machine a
1-block step of the test model takes 0.26 ms on one thread and 0.34 ms on two. A larger model's step
gains from every core. So the server times the steps it runs inline under each choice (all threads, or
one) and runs them under the faster, trying the other again now and then in case that changed. Toggling
the count costs well under a microsecond; the outputs agree within the precision that spot checks
allow (the order of a sum may change, as between any two machines).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
SAMPLES = 8  # recent step times kept per choice; their median decides
PROBE_EVERY = 64  # steps between tries of the choice not taken


class StepThreads:
    """Runs small token steps under the measured faster intra-op thread count: `threads` (the server's
    own count) or 1."""

    def __init__(self, threads: int):
        self.threads = threads
        self.options = (threads, 1) if threads > 1 else (threads,)
        self._ms: dict[int, deque[float]] = {n: deque(maxlen=SAMPLES) for n in self.options}
        self._steps = 0
        self._best: int | None = None  # cached between probes: the choice is made on the step's path

    def choose(self) -> int:
        """The thread count for the next step: each choice until it has its samples, then the faster,
        with the other tried every PROBE_EVERY steps."""
        if len(self.options) == 1:
            return self.threads
        self._steps += 1
        if self._best is None:
            for option in self.options:
                if len(self._ms[option]) < SAMPLES:
                    return option
            self._best = self.best()
        phase = self._steps % PROBE_EVERY
        if phase == 0:
            return next(option for option in self.options if option != self._best)
        if phase == 1:  # the probe's time is in: decide again
            self._best = self.best()
        return self._best

    def best(self) -> int:
        """The faster choice so far (the server's own count until both are measured)."""
        if any(len(samples) < SAMPLES for samples in self._ms.values()):
            return self.threads
        return min(self.options, key=lambda option: statistics.median(self._ms[option]))

    def record(self, threads: int, ms: float) -> None:
        self._ms[threads].append(ms)

    def run(self, fn: Callable[[], T]) -> T:
        """`fn()` under the chosen thread count; the server's own count is back when it returns."""
        if len(self.options) == 1:
            return fn()  # one thread already: nothing to choose
        threads = self.choose()
        if threads != self.threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        try:
            out = fn()
        finally:
            if threads != self.threads:
                torch.set_num_threads(self.threads)
        self.record(threads, (time.perf_counter() - started) * 1000)
        return out
