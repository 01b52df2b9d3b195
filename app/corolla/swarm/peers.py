"""Starting and stopping hivemind peers the way Corolla wants them.

NAT port mapping stays off unless asked for. The block server and the node's swarm client run their
DHT on a thread (`in_process=True`, local_dht.py: no forked copy of a process holding torch; p2pd is
their own child and dies with them). Otherwise the DHT runs in a forked child process (with p2pd as
its own child); Corolla's child differs from hivemind's in three ways that make it behave under signals:

- it leads its own process group, so a terminal's Ctrl-C or a `kill` of the caller's group reaches the
  caller only, which then says goodbye on the DHT (OFFLINE) and shuts the child down in order;
- it dies with its parent: a watchdog thread notices when the parent is gone (also after SIGKILL) and
  kills the child's whole group, p2pd included, so an orphan never keeps announcing a dead server;
- SIGTERM kills it (a forked child inherits the parent's asyncio signal handlers, which swallow it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from hivemind.dht import DHT

from corolla.swarm.local_dht import InProcessDHT
from corolla.swarm.relays import relay_options

logger = logging.getLogger(__name__)
LOOPBACK_MADDRS = ["/ip4/127.0.0.1/tcp/0"]
PARENT_POLL_S = 0.5
CHILD_POLL_S = 1.0  # how often a caller waiting on the forked DHT checks that the child still runs


class PeerStartError(RuntimeError):
    """The DHT could not start or join the swarm (bad or unreachable initial peers, no p2pd)."""


class DHTChildDiedError(RuntimeError):
    """The forked DHT process ended while a caller waited for its answer."""


def _watch_parent(parent_pid: int) -> None:
    """In the DHT child: once the parent is gone, take the whole group (this process and p2pd) down."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    with contextlib.suppress(OSError):
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os._exit(1)


def _close_inherited_tcp_sockets() -> None:
    """In the DHT child: close the TCP sockets the fork copied from the parent (a node's API listener and
    its clients' kept-alive connections). A copy keeps a connection open after the parent closed it, so
    a client that reuses it waits for an answer that never comes. The child needs none of them: it
    speaks to its parent over a pipe and to p2pd over a Unix socket."""
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        fd = int(name)
        with contextlib.suppress(OSError):
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            probe = socket.socket(fileno=fd)  # learns the family and type; detached below, never closed
            family, kind = probe.family, probe.type
            probe.detach()
            if family in (socket.AF_INET, socket.AF_INET6) and kind == socket.SOCK_STREAM:
                os.close(fd)


class CorollaDHT(DHT):
    """hivemind's DHT, with a child that has its own process group and dies with its parent."""

    def start(self) -> None:
        self._watched_parent = os.getpid()
        super().start()

    def run(self) -> None:  # runs in the forked child
        _close_inherited_tcp_sockets()
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # p2pd (a Go program) inherits an ignored SIGINT and keeps ignoring it; only the parent handles it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Out of the terminal's foreground group now: never stopped for writing its log there (`stty tostop`).
        for name in ("SIGTSTP", "SIGTTOU"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        if hasattr(os, "getppid"):
            threading.Thread(
                target=_watch_parent, args=(self._watched_parent,), name="corolla-parent-watch", daemon=True
            ).start()
        super().run()

    # hivemind's blocking calls wait for the child's answer with no end; the child could die after it
    # was ready (a fork of a threaded process can abort), so these waits also watch that it still runs.
    def run_coroutine(self, coro: Callable, return_future: bool = False) -> Any:
        future = super().run_coroutine(coro, return_future=True)
        return future if return_future else self._answer(future)

    def get(self, key: Any, latest: bool = False, return_future: bool = False, **kwargs: Any) -> Any:
        future = super().get(key, latest=latest, return_future=True, **kwargs)
        return future if return_future else self._answer(future)

    def store(
        self,
        key: Any,
        value: Any,
        expiration_time: float,
        subkey: Any = None,
        return_future: bool = False,
        **kwargs: Any,
    ) -> Any:
        future = super().store(key, value, expiration_time, subkey=subkey, return_future=True, **kwargs)
        return future if return_future else self._answer(future)

    def _answer(self, future: concurrent.futures.Future) -> Any:
        while True:
            try:
                return future.result(timeout=CHILD_POLL_S)
            except concurrent.futures.TimeoutError:
                if not self.is_alive():
                    raise DHTChildDiedError(f"the DHT process ended (exit code {self.exitcode})") from None

    def shutdown(self) -> None:
        """Shut the child down in order if it answers, else kill it and p2pd; bounded in time."""
        if self.pid is None or self._origin_pid != os.getpid():
            return
        with contextlib.suppress(Exception):
            super().shutdown()  # asks over the pipe, waits shutdown_timeout, then SIGTERM
            self.join(self.shutdown_timeout)
        # Whatever is left of its group: p2pd if the child died first, the child if SIGTERM did not take.
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.join(self.shutdown_timeout)


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    client_mode: bool = False,
    host_maddrs: Sequence[str] = LOOPBACK_MADDRS,
    announce_maddrs: Sequence[str] = (),
    identity_path: str | None = None,
    nat_port_map: bool = False,
    use_relay: bool = True,
    use_auto_relay: bool = False,
    auto_nat: bool = True,
    force_reachability: str | None = None,
    trusted_relays: Sequence[str] = (),
    num_workers: int = 32,
    startup_timeout: float = 60.0,
    in_process: bool = False,
) -> DHT | InProcessDHT:
    """A running hivemind DHT (a forked child process) and its p2pd daemon.

    `in_process`: the DHT runs on a thread of this process instead (local_dht.py): no forked copy of a
    process that has imported torch; p2pd is then a child of this process.

    `nat_port_map` stays off by default: hivemind's own default probes the gateway with NAT-PMP
    and UPnP, which a user did not ask for and which loopback-only tests must never do.
    Raises PeerStartError (one readable line) when the DHT cannot start or reach its initial peers.
    """
    options = dict(
        client_mode=client_mode,
        num_workers=num_workers,
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None,
        identity_path=identity_path,
        nat_port_map=nat_port_map,
        use_relay=use_relay,
        use_auto_relay=use_auto_relay,
        auto_nat=auto_nat,
        startup_timeout=startup_timeout,
        **relay_options(force_reachability, trusted_relays),
    )
    if in_process:
        try:
            return InProcessDHT(list(initial_peers), **options)
        except Exception as exc:
            raise PeerStartError(_describe_start_failure(exc, initial_peers)) from exc
    dht = CorollaDHT(initial_peers=list(initial_peers), start=False, **options)
    try:
        dht.run_in_background(await_ready=True, timeout=startup_timeout + 5)
    except BaseException as exc:
        dht.shutdown()
        if isinstance(exc, Exception):
            raise PeerStartError(_describe_start_failure(exc, initial_peers)) from exc
        raise
    return dht


def _describe_start_failure(exc: Exception, initial_peers: Sequence[str]) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "failed to connect to bootstrap peers" in text:
        text = "none of them answered (check that the address is current and the peer is running)"
    elif isinstance(exc, TimeoutError):
        text = "no answer in time"
    if initial_peers:
        return f"could not join the swarm through {' '.join(initial_peers)}: {text[:300]}"
    return f"could not start the DHT: {text[:300]}"


def peers_by_id(maddrs: Sequence[str]) -> dict[str, list[str]]:
    """Initial peers grouped by peer id (an invite names several addresses of one member)."""
    grouped: dict[str, list[str]] = {}
    for maddr in maddrs:
        if "/p2p/" in maddr and "p2p-circuit" not in maddr:
            address, peer = maddr.rsplit("/p2p/", 1)
            grouped.setdefault(peer.strip("/"), []).append(address)
    return grouped


async def rejoin_if_alone(_dht, node, peers: dict[str, list[str]]) -> int:
    """In the DHT process: when none of the initial peers is connected or the routing table is empty (a
    member restarted, a home's connection came back), dial them again and ping them into the routing
    table. Returns how many answered (0 when nothing was needed or nobody answered).

    hivemind joins through its initial peers once, at start; without this a NAT'd member whose only
    link was a restarted member stays alone, its records stored nowhere, until its own restart."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    p2p = node.protocol.p2p
    connected = {str(info.peer_id) for info in await p2p.list_peers()}
    if node.protocol.routing_table.peer_id_to_uid and any(peer in connected for peer in peers):
        return 0
    answered = 0
    for peer, addresses in peers.items():
        try:
            peer_id = PeerID.from_base58(peer)
            await asyncio.wait_for(p2p._client.connect(peer_id, [Multiaddr(a) for a in addresses]), 10.0)
            if await asyncio.wait_for(node.protocol.call_ping(peer_id), 10.0) is not None:
                answered += 1
        except Exception:  # this one is still away: the next round tries again
            continue
    return answered
