"""Continuous batching of token steps: what waits when the compute thread frees up runs as one forward.

Each session's handler hands its token step here instead of to the compute queue. One drain task
asks the queue for the compute thread (at inference priority, so token steps still go before forward
and backward passes); when the thread is granted, the job takes every step then waiting that can share
a forward with the oldest one (same blocks and adapter; within the row, memory and padding caps),
so steps that arrived while the previous forward ran join the next one. Steps of different lengths
join too, padded, while the padding stays within MAX_PADDING times the positions asked for. The oldest step always goes
first, so no session starves; a session whose step failed in a joint forward has it run again alone,
so one bad step fails only its own session (swarm/models/batched_step.py says what joins).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from corolla.swarm.models.batched_step import StepRow, forward_joined, joint_cost_tokens, padded_positions
from corolla.swarm.models.span import BlockSpan
from corolla.swarm.server.adapters import run_with_adapter
from corolla.swarm.server.stats import ServerStats

# Rows in one joint forward: past a few dozen rows a CPU or GPU forward stops getting cheaper per row.
MAX_ROWS = 32
# The joint layout copies every joined session's cache once: bounded so a crowd of long sessions
# cannot double the server's cache memory at once.
MAX_JOINT_BYTES = 256 * 2**20
# Steps longer than this (prefills, replays) run alone: they fill a forward by themselves.
MAX_STEP_TOKENS = 8
# Steps of different lengths (one token beside a speculative draft) share a forward, padded to the
# longest, while the forward computes at most this many times the positions asked for.
MAX_PADDING = 2
# Batch-size buckets of the stats (how many sessions each forward carried).
BATCH_BUCKETS = ((1, "1"), (2, "2"), (4, "3-4"), (8, "5-8"), (16, "9-16"), (32, "17-32"))


@dataclass
class _Waiting:
    span: BlockSpan
    adapter: str | None
    step: StepRow
    done: asyncio.Future
    key: tuple = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.span.start, self.span.end, self.adapter)


class StepBatcher:
    """`run_on_thread(job)` runs `job` on the compute thread at inference priority; `bytes_per_token` is
    what one cached position of the whole span costs. Counts go to `stats`."""

    def __init__(
        self,
        run_on_thread: Callable[[Callable[[], list]], Awaitable[list]],
        bytes_per_token: int,
        stats: ServerStats,
    ):
        self._run_on_thread = run_on_thread
        self._max_joint_tokens = max(1, MAX_JOINT_BYTES // max(1, bytes_per_token))
        self._lock = threading.Lock()  # the pending list is read by the compute thread too
        self._pending: list[_Waiting] = []
        self._drainer: asyncio.Task | None = None
        self.stats = stats
        for _, label in (*BATCH_BUCKETS, (None, "33+")):
            stats.batch_sizes.setdefault(label, 0)

    async def step(self, span: BlockSpan, adapter: str | None, step: StepRow) -> torch.Tensor:
        """This session's step, computed alone or together with others waiting at the same time."""
        item = _Waiting(span, adapter, step, asyncio.get_running_loop().create_future())
        with self._lock:
            self._pending.append(item)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await item.done  # cancelled (a timeout): the drain skips it if not yet taken

    def close(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
        with self._lock:
            pending, self._pending = self._pending, []
        for item in pending:
            if not item.done.done():
                item.done.cancel()

    async def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
            taken: list[_Waiting] = []

            def job(taken: list[_Waiting] = taken) -> list:
                with self._lock:
                    taken.extend(self._take())
                return self._compute(taken)

            try:
                results = await self._run_on_thread(job)
            except Exception as exc:  # the queue itself failed: every taken step fails with it
                results = [exc] * len(taken)
            for item, result in zip(taken, results, strict=True):
                if item.done.done():
                    continue
                if isinstance(result, BaseException):
                    item.done.set_exception(result)
                else:
                    item.done.set_result(result)

    def _take(self) -> list[_Waiting]:
        """The oldest live step and every later one that can share its forward (the lock is held)."""
        live = [item for item in self._pending if not item.done.done()]
        if not live:
            self._pending = []
            return []
        head, taken, rest = live[0], [live[0]], []
        rows = head.step.rows
        for item in live[1:]:
            steps = [t.step for t in taken] + [item.step]
            computed, asked = padded_positions(steps)
            fits = (
                rows + item.step.rows <= MAX_ROWS
                and joint_cost_tokens(steps) <= self._max_joint_tokens
                and computed <= MAX_PADDING * asked
            )
            if item.key == head.key and fits:  # sub-spans of one key share the same weights
                taken.append(item)
                rows += item.step.rows
            else:
                rest.append(item)
        self._pending = rest
        return taken

    def _compute(self, taken: list[_Waiting]) -> list:
        """On the compute thread: one forward for all of `taken`, or each alone if that failed."""
        if not taken:
            return []
        self.stats.token_steps += len(taken)
        self._count_batch(len(taken))
        head = taken[0]
        if len(taken) > 1:
            try:
                steps = [item.step for item in taken]
                outputs = run_with_adapter(head.adapter, lambda: forward_joined(head.span, steps))()
                self.stats.step_forwards += 1
                self.stats.joint_forwards += 1
                return outputs
            except Exception:
                pass
        results: list = []
        for item in taken:
            self.stats.step_forwards += 1
            try:
                results.append(run_with_adapter(item.adapter, functools.partial(_alone, item))())
            except Exception as exc:
                results.append(exc)
        return results

    def _count_batch(self, size: int) -> None:
        for limit, label in BATCH_BUCKETS:
            if size <= limit:
                self.stats.batch_sizes[label] += 1
                return
        self.stats.batch_sizes["33+"] += 1


def _alone(item: _Waiting) -> torch.Tensor:
    step = item.step
    return item.span(step.hidden, step.cache, attention_mask=step.attention_mask, position_ids=step.position_ids)
