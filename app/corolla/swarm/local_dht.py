"""hivemind's DHT, run on a thread of this process instead of a forked child.

hivemind's `DHT` is a forked process: a copy of a parent that has imported torch and transformers (and,
in a node, loaded the client's embeddings) costs 200-400 MB of proportional memory, although all it
runs is a DHTNode on an event loop. Here the DHTNode runs on its own event loop in a daemon thread of
the caller; p2pd is still its own process (a child of this one). The interface is the part of
hivemind's DHT that Corolla uses: run_coroutine, get, store, peer_id, client_mode, get_visible_maddrs,
replicate_p2p and shutdown; futures are awaitable from any event loop and have .result().
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hivemind.p2p.p2p_daemon as p2p_daemon
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator
from hivemind.p2p import P2P

logger = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_S = 3.0
PR_SET_PDEATHSIG = 1
SIG_IGN = ctypes.c_void_p(1)


class _SubprocessDyingWithParent:
    """asyncio.subprocess for hivemind's p2p_daemon module only: p2pd gets SIGKILL once the thread that
    started it is gone (Linux). With the DHT on a thread, p2pd is this process's own child and nothing
    else would end it after a SIGKILL of this process (hivemind's forked DHT child watched for that)."""

    def __init__(self, libc: ctypes.CDLL):
        self._libc = libc

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio.subprocess, name)

    def _die_with_parent(self) -> None:  # in the child, between fork and exec: the C library only
        self._libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        # A terminal's Ctrl-C reaches the whole group: only the parent handles it and then stops p2pd in
        # order (p2pd, a Go program, keeps a SIGINT it inherited as ignored).
        self._libc.signal(int(signal.SIGINT), SIG_IGN)

    async def create_subprocess_exec(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("preexec_fn", self._die_with_parent)
        return await asyncio.subprocess.create_subprocess_exec(*args, **kwargs)


class _AsyncioForP2PD:
    def __init__(self, subprocess: _SubprocessDyingWithParent):
        self.subprocess = subprocess

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


def _p2pd_dies_with_its_parent() -> None:
    if not sys.platform.startswith("linux") or isinstance(p2p_daemon.asyncio, _AsyncioForP2PD):
        return
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        p2p_daemon.asyncio = _AsyncioForP2PD(_SubprocessDyingWithParent(libc))


_p2pd_dies_with_its_parent()


class DHTFuture:
    """A result from the DHT's thread: awaitable on any event loop, or waited for with .result()."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def result(self, timeout: float | None = None) -> Any:
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        return self._future.cancel()

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()


class InProcessDHT:
    """A DHTNode on a thread of this process, with hivemind DHT's interface (see the module's doc)."""

    pid = None  # no child process: p2pd is this process's own child
    shutdown_timeout = SHUTDOWN_TIMEOUT_S

    def __init__(self, initial_peers: Sequence[str], *, num_workers: int, startup_timeout: float, **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="corolla-dht", daemon=True)
        self._thread.start()
        self._replicas: dict[int, P2P] = {}  # one P2P replica per caller's event loop
        self._node: DHTNode | None = None
        create = DHTNode.create(
            initial_peers=list(initial_peers),
            num_workers=num_workers,
            record_validator=CompositeValidator(()),
            startup_timeout=startup_timeout,
            **kwargs,
        )
        try:
            self._node = asyncio.run_coroutine_threadsafe(create, self._loop).result(startup_timeout + 5)
        except BaseException:
            self._stop_loop()
            raise
        # A program that ends without shutting the DHT down (an error on the way out) still leaves the
        # swarm in order instead of having the thread's pending tasks destroyed at exit.
        atexit.register(self.shutdown)

    # --- hivemind DHT's interface --------------------------------------------------------------------
    def run_coroutine(
        self, coro: Callable[[InProcessDHT, DHTNode], Awaitable[Any]], return_future: bool = False
    ) -> Any:
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking DHT call from the DHT's own thread would deadlock")
        future = asyncio.run_coroutine_threadsafe(coro(self, self._node), self._loop)
        return DHTFuture(future) if return_future else future.result()

    def get(self, key: Any, latest: bool = False, return_future: bool = False, **kwargs: Any) -> Any:
        async def get(_dht, node: DHTNode):
            return await node.get(key, latest=latest, **kwargs)

        return self.run_coroutine(get, return_future)

    def store(
        self, key: Any, value: Any, expiration_time: float, subkey: Any = None, return_future: bool = False, **kw: Any
    ) -> Any:
        async def store(_dht, node: DHTNode):
            return await node.store(key, value, expiration_time, subkey=subkey, **kw)

        return self.run_coroutine(store, return_future)

    @property
    def peer_id(self):
        return self._node.peer_id

    @property
    def client_mode(self) -> bool:
        return self._node.protocol.client_mode

    def get_visible_maddrs(self, latest: bool = False) -> list:
        async def maddrs(_dht, node: DHTNode):
            return await node.get_visible_maddrs(latest=latest)

        return self.run_coroutine(maddrs)

    async def replicate_p2p(self) -> P2P:
        """A P2P client of this DHT's p2pd for the calling event loop (the node's own is bound to the
        DHT's thread): no new daemon, the same peer."""
        loop = id(asyncio.get_running_loop())
        if loop not in self._replicas:
            self._replicas[loop] = await P2P.replicate(self._node.p2p.daemon_listen_maddr)
        return self._replicas[loop]

    async def new_p2p(self) -> P2P:
        """A P2P client of this DHT's p2pd that the caller owns (not shared like replicate_p2p's): its
        shutdown() closes only this client, p2pd stays (a swarm client sharing this DHT, issue 29)."""
        return await P2P.replicate(self._node.p2p.daemon_listen_maddr)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        """Leave the DHT and stop p2pd; bounded in time (p2pd is killed if it does not go)."""
        if not self._thread.is_alive():
            return
        if self._node is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._node.shutdown(), self._loop).result(self.shutdown_timeout)
            except Exception as exc:
                logger.info("the DHT did not shut down in order (%s); stopping p2pd", type(exc).__name__)
            child = getattr(self._node.p2p, "_child", None)  # hivemind's handle on the p2pd process
            if child is not None and child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
        self._stop_loop()

    def _stop_loop(self) -> None:
        """End the DHT's tasks (cancelled, not left pending to be destroyed at exit), then its thread."""
        atexit.unregister(self.shutdown)
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result(self.shutdown_timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.shutdown_timeout)
        if not self._thread.is_alive():
            self._loop.close()


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
