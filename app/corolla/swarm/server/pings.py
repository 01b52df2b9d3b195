"""`next_pings`: this server's round trips to the servers likely to follow it in a chain.

As Petals does (protocol doc §4.3): every announce cycle, ping up to 5 random servers that host
blocks inside this server's span (start+1 .. end-1: a chain may leave here early) and up to 5 that
host block `end` (the likely successors), all at once, each within a timeout; keep an exponential
moving average per peer (0.2 new, 0.8 old), forget peers not measured for 5 minutes, and announce
the map (seconds, `inf` for a peer that did not answer: at once for a peer never reached, after two
failed cycles in a row for one that answered before). Clients route by these: with push, an
activation goes from this server straight to the next one.
"""

from __future__ import annotations

import asyncio
import math
import random
import time

from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from corolla.swarm import protocol
from corolla.swarm.dht_records import get_module_infos
from corolla.swarm.protocol import ServerState

PINGS_PER_GROUP = 5
PING_TIMEOUT_S = 2.0
EMA_WEIGHT = 0.2
EXPIRY_S = 300.0
FAILURES_FOR_UNREACHABLE = 2  # failed pings in a row, after a good one, before a peer is announced as `inf`


class NextPings:
    def __init__(self, p2p: P2P, own_peer_id: str, timeout: float = PING_TIMEOUT_S):
        self.p2p, self.own_peer_id, self.timeout = p2p, own_peer_id, timeout
        self._rtts: dict[str, tuple[float, float]] = {}  # peer -> (smoothed rtt, when last measured)
        self._failures: dict[str, int] = {}  # peer -> failed pings in a row

    def candidates(self, servers_by_block: list[dict[str, ServerState]]) -> list[str]:
        """Up to 5 random servers of the inner blocks and up to 5 of the block after the span.

        `servers_by_block`: the servers (and states) of blocks start+1 .. end, the last entry being block
        `end` when the model has one."""
        *inner, after = servers_by_block if servers_by_block else [{}]
        inner_peers = {p for block in inner for p, state in block.items() if state == ServerState.ONLINE}
        next_peers = {p for p, state in after.items() if state == ServerState.ONLINE}
        inner_peers.discard(self.own_peer_id)
        next_peers.discard(self.own_peer_id)
        chosen = random.sample(sorted(next_peers), min(PINGS_PER_GROUP, len(next_peers)))
        inner_peers -= set(chosen)
        chosen += random.sample(sorted(inner_peers), min(PINGS_PER_GROUP, len(inner_peers)))
        return chosen

    async def update(self, dht: DHT, dht_prefix: str, start: int, end: int, total_blocks: int) -> None:
        """Look up the likely next servers on the DHT and ping them (bounded: about two timeouts)."""
        last = min(end, total_blocks - 1)
        if last < start + 1:
            return  # a server of the whole model has nobody to hand over to
        uids = [protocol.make_uid(dht_prefix, b) for b in range(start + 1, last + 1)]
        infos = await get_module_infos(dht, uids)
        by_block = [{peer: info.state for peer, info in module.servers.items()} for module in infos]
        if end >= total_blocks:
            by_block.append({})  # no block after this span
        peers = self.candidates(by_block)
        await asyncio.gather(*(self._ping(peer) for peer in peers))

    async def _ping(self, peer: str) -> None:
        started = time.perf_counter()
        try:
            stub = protocol.server_stub(self.p2p, PeerID.from_base58(peer))
            await asyncio.wait_for(stub.rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=self.timeout), self.timeout)
            rtt = time.perf_counter() - started
        except Exception:
            rtt = math.inf
        self.record(peer, rtt)

    def record(self, peer: str, rtt: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        old = self._rtts.get(peer)
        if not math.isfinite(rtt):
            self._failures[peer] = self._failures.get(peer, 0) + 1
            # One failed ping after a good one is not a lost link (libp2p's dial backoff after a blip
            # fails every dial to the peer for a while): the last measurement stands until the next cycle
            # fails too. Clients and stock Petals routers read `inf` as "no push, avoid this hop".
            if old is not None and math.isfinite(old[0]) and self._failures[peer] < FAILURES_FOR_UNREACHABLE:
                return
        else:
            self._failures.pop(peer, None)
            if old is not None and math.isfinite(old[0]):
                rtt = EMA_WEIGHT * rtt + (1 - EMA_WEIGHT) * old[0]
        self._rtts[peer] = (rtt, now)

    def announced(self, now: float | None = None) -> dict[str, float]:
        """The map to announce: fresh measurements only, at most protocol.MAX_NEXT_PINGS, floats."""
        now = time.monotonic() if now is None else now
        self._rtts = {p: v for p, v in self._rtts.items() if now - v[1] <= EXPIRY_S}
        freshest = sorted(self._rtts.items(), key=lambda item: -item[1][1])[: protocol.MAX_NEXT_PINGS]
        return {peer: float(rtt) for peer, (rtt, _) in freshest}
