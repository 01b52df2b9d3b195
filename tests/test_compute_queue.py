"""The compute thread's queue: token steps first, a cancelled job never lets two run at once."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from corolla.swarm.server.compute_queue import ComputeQueue, Priority


def test_waiting_jobs_run_most_urgent_first_and_one_at_a_time():
    order: list[str] = []
    running = 0
    overlap = False
    release = threading.Event()

    def job(name: str, hold: threading.Event | None = None):
        def run():
            nonlocal running, overlap
            running += 1
            overlap |= running > 1
            if hold is not None:
                hold.wait(10)
            order.append(name)
            running -= 1

        return run

    async def main():
        queue = ComputeQueue(ThreadPoolExecutor(max_workers=2))  # two threads: only the queue keeps order
        first = asyncio.create_task(queue.run(job("busy", release), Priority.FORWARD))
        await asyncio.sleep(0.05)
        waiting = [
            asyncio.create_task(queue.run(job(name, None), priority))
            for name, priority in [
                ("backward", Priority.BACKWARD),
                ("forward", Priority.FORWARD),
                ("step-1", Priority.INFERENCE),
                ("cancelled", Priority.INFERENCE),
                ("step-2", Priority.INFERENCE),
            ]
        ]
        await asyncio.sleep(0.05)
        waiting[3].cancel()
        release.set()
        await asyncio.gather(first, *waiting, return_exceptions=True)
        assert queue.waiting == 0

    asyncio.run(main())
    assert order == ["busy", "step-1", "step-2", "forward", "backward"]
    assert not overlap


def test_a_job_cancelled_while_running_holds_the_slot_until_it_ends():
    release = threading.Event()
    finished: list[str] = []

    def slow():
        release.wait(10)
        finished.append("slow")

    def fast():
        finished.append("fast")

    async def main():
        queue = ComputeQueue(ThreadPoolExecutor(max_workers=2))
        slow_task = asyncio.create_task(queue.run(slow, Priority.FORWARD))
        await asyncio.sleep(0.05)
        slow_task.cancel()  # a timeout: the thread still runs it
        fast_task = asyncio.create_task(queue.run(fast, Priority.INFERENCE))
        await asyncio.sleep(0.1)
        assert finished == []  # the fast job waits for the thread, not for the cancelled coroutine
        release.set()
        await fast_task

    asyncio.run(main())
    assert finished == ["slow", "fast"]
