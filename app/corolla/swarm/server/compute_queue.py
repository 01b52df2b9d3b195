"""The one compute thread of a block server, fed in priority order.

A token step is a few milliseconds of work that a person is waiting on; a forward or backward pass
over a full batch can take seconds. Petals puts inference ahead of forward/backward on its runtime,
and so does this queue: whenever the thread frees up, the most urgent waiting job runs next (FIFO
within a priority). A job in the thread is never interrupted; the slot passes on only once the thread
has really finished it, also when the coroutine that asked for it was cancelled (a timeout), so a
cancelled job cannot let two jobs pile up in the executor behind the queue's back.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from concurrent.futures import Executor
from enum import IntEnum
from typing import TypeVar

T = TypeVar("T")


class Priority(IntEnum):
    INFERENCE = 0
    FORWARD = 1
    BACKWARD = 2


class ComputeQueue:
    def __init__(self, executor: Executor):
        self.executor = executor
        self._waiting: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()
        self._busy = False

    @property
    def busy(self) -> bool:
        """A job is on the thread now."""
        return self._busy

    @property
    def waiting(self) -> int:
        return sum(1 for *_, granted in self._waiting if not granted.done())

    async def run(self, fn: Callable[[], T], priority: Priority) -> T:
        """Run `fn` on the executor once every more urgent (or earlier, equally urgent) job has run."""
        loop = asyncio.get_running_loop()
        if self._busy or self._waiting:
            granted = loop.create_future()
            heapq.heappush(self._waiting, (int(priority), next(self._order), granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._pass_on()  # the slot came just as this job was cancelled: hand it on
                raise
        self._busy = True
        try:
            job = self.executor.submit(fn)
        except BaseException:
            self._pass_on()
            raise
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._pass_on))
        return await asyncio.wrap_future(job)

    def _pass_on(self) -> None:
        while self._waiting:
            *_, granted = heapq.heappop(self._waiting)
            if not granted.done():  # skip jobs cancelled while they waited
                granted.set_result(None)
                return
        self._busy = False
