"""The swarm client's event loop: hivemind's P2P objects live on it, in a background thread or lent to
the thread that generates (so a token costs no thread hop)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading

from corolla.swarm.client.streams import CLOSE_TIMEOUT

logger = logging.getLogger(__name__)
CANCEL_GRACE_S = 3.0  # for a cancelled coroutine to unwind (close its streams) before we move on
# Sessions generate() closes behind its return, at most this many at once; past it a close is awaited
# (a swarm that never answers a close must not pile up streams). Each close is bounded by its streams'
# CLOSE_TIMEOUT; the model's close() waits up to BACKGROUND_CLOSE_WAIT_S for them before shutting down.
MAX_BACKGROUND_CLOSES = 8
BACKGROUND_CLOSE_WAIT_S = 2 * CLOSE_TIMEOUT


class ClientLoop:
    """The client's event loop, run by a background thread, or lent to one caller thread at a time.

    A call from another thread normally hops to the loop thread and back (~0.1 ms, two thread
    wake-ups). generate() borrows the loop instead: its thread runs the loop itself during each step,
    so a token costs no hop. Meanwhile other threads' calls still run, whenever the borrower drives
    the loop (most of a step's time is spent waiting on the servers, inside the loop).
    """

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._driver = threading.Lock()  # held by whichever thread runs the loop
        self._borrow = threading.Lock()  # one borrower at a time
        self._lent = threading.Event()  # the background thread has stopped running the loop for a borrower
        self._returned = threading.Event()
        self._closed = False
        self._local = threading.local()
        self._background: set[concurrent.futures.Future] = set()  # closes still running (close_later)
        self._background_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="corolla-client", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._closed:
            with self._driver:
                if self._closed:
                    return
                self.loop.run_forever()  # until a borrower's (or stop()'s) loop.stop
            self._lent.set()
            self._returned.wait()  # lent out: wait until the borrower gives it back
            self._returned.clear()

    def run(self, coroutine, timeout: float | None = None):
        """Run `coroutine` on the loop and wait for it. On a timeout or a Ctrl-C in the waiting thread the
        coroutine is cancelled (and given a moment to unwind) before the error propagates. On a stopped
        loop it fails at once (nothing would ever run the coroutine)."""
        if self._closed:
            coroutine.close()
            raise RuntimeError("the swarm client was closed")
        if getattr(self._local, "borrowed", False):
            task = self.loop.create_task(coroutine if timeout is None else asyncio.wait_for(coroutine, timeout))
            try:
                return self.loop.run_until_complete(task)
            except KeyboardInterrupt:
                task.cancel()
                with contextlib.suppress(BaseException):
                    self.loop.run_until_complete(asyncio.wait({task}, timeout=CANCEL_GRACE_S))
                raise
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except (concurrent.futures.TimeoutError, KeyboardInterrupt):
            future.cancel()
            with contextlib.suppress(BaseException):
                concurrent.futures.wait([future], timeout=CANCEL_GRACE_S)
            raise

    def close_later(self, coroutine) -> bool:
        """Run a close on the loop without waiting for it; False (nothing started) when too many are
        already in flight, and the caller closes in the foreground instead."""
        with self._background_lock:
            if self._closed or len(self._background) >= MAX_BACKGROUND_CLOSES:
                coroutine.close()
                return False
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
            self._background.add(future)
        future.add_done_callback(self._forget)
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._background_lock:
            self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            logger.debug("a background session close failed: %s", future.exception())

    def wait_background(self, timeout: float = BACKGROUND_CLOSE_WAIT_S) -> None:
        """Wait (bounded) for the closes close_later started: the servers free their sessions now."""
        with self._background_lock:
            pending = list(self._background)
        if pending and not getattr(self._local, "borrowed", False):
            concurrent.futures.wait(pending, timeout=timeout)

    @contextlib.contextmanager
    def borrowed(self):
        """Within this block, this thread runs the loop for its own calls (if no one else borrows it)."""
        if self._closed or getattr(self._local, "borrowed", False) or not self._borrow.acquire(blocking=False):
            yield
            return
        try:
            # The stop is consumed by the background thread's run_forever (never by ours): wait for it.
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._lent.wait()
            self._lent.clear()
            self._driver.acquire()
            self._local.borrowed = True
            try:
                yield
            finally:
                self._local.borrowed = False
                self._driver.release()
                self._returned.set()
        finally:
            self._borrow.release()

    def stop(self) -> None:
        """Cancel what still runs on the loop (quietly: no 'Task was destroyed' warnings), then stop it."""
        if not self.thread.is_alive():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=CANCEL_GRACE_S)

        with contextlib.suppress(BaseException):
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(CANCEL_GRACE_S + 1)
        self._closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._returned.set()
        self.thread.join(5)
