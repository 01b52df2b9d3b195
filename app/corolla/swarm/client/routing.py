"""Which servers a client sends its activations through.

The swarm view (ONLINE spans, pings, bans) refreshes from the DHT; `choose_route` is a pure function:
a minimum-cost split of [start, end) into server segments, where a segment's cost is the client's
round trip to that server, a fixed per-hop cost, the compute time of its blocks, and a heavy
penalty if the server lacks free cache for the session (Petals' min-latency cost model, protocol doc §4.4).

The records behind the view come from strangers: spans are only what a peer announced (dht_records),
numbers are clamped, and the work is bounded: at most MAX_SERVERS_PER_BLOCK servers per block,
at most MAX_PINGS_PER_REFRESH pings per refresh, all within one ping timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from corolla.swarm import protocol
from corolla.swarm.client.config import ClientConfig
from corolla.swarm.client.copies import CopyCounts
from corolla.swarm.client.ledger import ledger_of
from corolla.swarm.client.privacy import Privacy, PrivacyViolation
from corolla.swarm.dht_records import RemoteSpan, compute_spans, get_module_infos
from corolla.swarm.direct_link import DirectLinks
from corolla.swarm.protocol import ServerState

logger = logging.getLogger(__name__)
HOP_COST = 0.018
UNKNOWN_RTT = 0.15
DEFAULT_INFERENCE_RPS = 300.0
NO_CACHE_PENALTY = 10.0
MAX_PINGS_PER_REFRESH = 64
PINGS_IN_FLIGHT = 16


class MissingBlocksError(RuntimeError):
    def __init__(self, blocks: list[int], dht_prefix: str, nobody: bool = False):
        self.blocks = blocks
        shown = ", ".join(map(str, blocks[:20])) + (" ..." if len(blocks) > 20 else "")
        if nobody:
            message = (
                f"nobody serves {dht_prefix} in this swarm (no server announces any of its blocks); "
                "check the model and --dht-prefix, or serve it yourself with: corolla serve"
            )
        else:
            message = (
                f"no online server holds block(s) {shown} of {dht_prefix}; the swarm cannot run this "
                "model until someone serves them"
            )
        super().__init__(message)


class PrivacyCoverageError(MissingBlocksError):
    """The servers the privacy policy allows cannot cover the model: fails at once (waiting would not
    help; only a change of policy or a trusted server for these blocks would)."""

    def __init__(self, blocks: list[int], dht_prefix: str, privacy: Privacy):
        self.blocks, self.privacy = blocks, privacy
        shown = ", ".join(map(str, blocks[:20])) + (" ..." if len(blocks) > 20 else "")
        RuntimeError.__init__(
            self,
            f"privacy '{privacy}': no allowed server holds block(s) {shown} of {dht_prefix} (other servers do, "
            "but they may not see this text); serve these blocks on a computer you trust, add its peer id, or "
            "choose a wider privacy level",
        )


@dataclass(frozen=True)
class RouteSegment:
    peer_id: str
    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.start}:{self.end} via …{self.peer_id[-6:]}"


def describe_route(route: list[RouteSegment]) -> str:
    return ", ".join(str(segment) for segment in route) if route else "(no route)"


def choose_route(
    spans: dict[str, RemoteSpan],
    start: int,
    end: int,
    rtts: dict[str, float],
    cache_tokens_needed: int | None = None,
    discounts: dict[str, float] | None = None,
) -> list[RouteSegment]:
    """The cheapest chain of segments covering [start, end); raises MissingBlocksError if impossible.

    The cost is what a token travels with server-to-server push: client -> first server (half the
    client's round trip to it), each server -> the next (half the RTT the server announces in
    `next_pings`, or, where it announces none for that peer or cannot reach it, half the client's round
    trip to the next server), the last server -> client, plus a fixed cost per hop and each block's compute time.
    A dynamic programme over blocks: `arriving[peer]` is the cheapest way to have the activation at
    `peer`, about to compute the current block. `discounts` divides the announced speed of servers this
    client measured to be slower than they announce (speed.py).
    """
    discounts = discounts or {}
    covering: list[list[tuple[str, RemoteSpan]]] = [[] for _ in range(end)]  # who may be entered at each block
    for peer, span in spans.items():
        for block in range(max(span.start, start), min(span.end, end)):
            covering[block].append((peer, span))
    if any(not covering[b] for b in range(start, end)):
        raise MissingBlocksError(_uncovered(spans, start, end) or [start], "the model")

    def entry_cost(span: RemoteSpan) -> float:
        length = min(span.end, end) - max(span.start, start)
        return HOP_COST + (0.0 if _has_cache(span, length, cache_tokens_needed) else NO_CACHE_PENALTY)

    arriving = {peer: _rtt_cost(rtts.get(peer)) + entry_cost(span) for peer, span in covering[start]}
    came_from: list[dict[str, str | None]] = [dict.fromkeys(arriving)]
    for block in range(start, end):
        done = {
            peer: cost + discounts.get(peer, 1.0) / _inference_rps(spans[peer]) for peer, cost in arriving.items()
        }  # block computed on `peer`
        if block + 1 == end:
            break
        arriving, back = {}, {}
        for nxt, span in covering[block + 1]:
            best, best_from = done.get(nxt, math.inf), nxt  # staying on the same server costs nothing more
            enter = entry_cost(span)
            for cur, cost in done.items():
                if cur == nxt:
                    continue
                hop = cost + _transfer_cost(spans[cur], nxt, rtts) + enter
                if hop < best - 1e-12:
                    best, best_from = hop, cur
            arriving[nxt], back[nxt] = best, best_from
        came_from.append(back)
    last = min(done, key=lambda peer: done[peer] + _rtt_cost(rtts.get(peer)))
    peers = [last]
    for back in reversed(came_from[1:]):
        peers.append(back[peers[-1]])
    peers.reverse()
    return _merge([RouteSegment(peer, start + i, start + i + 1) for i, peer in enumerate(peers)])


def _inference_rps(span: RemoteSpan) -> float:
    return min(span.server_info.inference_rps or DEFAULT_INFERENCE_RPS, protocol.MAX_ANNOUNCED_RPS)


def _transfer_cost(cur: RemoteSpan, nxt: str, rtts: dict[str, float]) -> float:
    """One activation's trip from server `cur` to server `nxt`: what `cur` measured (next_pings, sent
    straight there by push), else what the client measured to `nxt`."""
    pings = cur.server_info.next_pings
    if pings and nxt in pings and not math.isinf(pings[nxt]):
        return _rtt_cost(pings[nxt])
    # No measure, or `cur` could not reach `nxt` (no push there): the client's own copy carries the step.
    return _rtt_cost(rtts.get(nxt))


def _merge(route: list[RouteSegment]) -> list[RouteSegment]:
    merged: list[RouteSegment] = []
    for segment in route:
        if merged and merged[-1].peer_id == segment.peer_id and merged[-1].end == segment.start:
            merged[-1] = RouteSegment(segment.peer_id, merged[-1].start, segment.end)
        else:
            merged.append(segment)
    return merged


def _rtt_cost(rtt: float | None) -> float:
    if rtt is None or math.isnan(rtt):
        return UNKNOWN_RTT
    return min(max(rtt, 0.0) / 2, 5.0) if math.isfinite(rtt) else 5.0


def _has_cache(span: RemoteSpan, length: int, tokens: int | None) -> bool:
    left = span.server_info.cache_tokens_left
    return tokens is None or left is None or tokens * 2 * length <= left


@dataclass
class _Ban:
    until: float
    failures: int


@dataclass
class SwarmView:
    """The client's picture of one model's servers; call `refresh()` before routing."""

    dht: DHT
    p2p: P2P
    dht_prefix: str
    num_blocks: int
    config: ClientConfig
    spans: dict[str, RemoteSpan] = field(default_factory=dict)
    rtts: dict[str, float] = field(default_factory=dict)
    direct_step_s: dict[str, float] = field(default_factory=dict)  # fastest direct token step per peer (route_choice)
    direct_steps: dict[str, int] = field(default_factory=dict)  # how many were timed
    bans: dict[str, _Ban] = field(default_factory=dict)
    last_refresh: float = 0.0
    announced: bool = False  # whether any server (in any state) announced any block at the last refresh
    verification: object = None  # the client's spot-check ledger (verification.Ledger), made on first use
    speed: object = None  # the client's step times and slow servers (speed.SpeedLedger), made on first use
    direct_links: DirectLinks = field(default_factory=DirectLinks)  # where direct links failed (direct_link.py)
    copies: CopyCounts = field(default_factory=CopyCounts)  # the client's copies of pushed steps (copies.py)
    # Who may receive tensors: spans of servers outside it are dropped at every refresh (the one place
    # all routes, failovers, spot checks and push targets come from), and stub() refuses them.
    privacy: Privacy = field(default_factory=Privacy)
    excluded: dict[str, RemoteSpan] = field(default_factory=dict)  # online spans the privacy keeps out
    _restricted: dict = field(default_factory=dict, repr=False)  # privacy -> view (under())

    def uids(self) -> list[str]:
        return [protocol.make_uid(self.dht_prefix, i) for i in range(self.num_blocks)]

    async def refresh(self) -> None:
        reached = {peer for peer, rtt in self.rtts.items() if math.isfinite(rtt)}
        infos = await get_module_infos(self.dht, self.uids(), prefer=reached | set(self.config.allowed_servers or ()))
        self.announced = any(info.servers for info in infos)
        spans = compute_spans(infos, min_state=ServerState.ONLINE)
        allowed = set(self.config.allowed_servers) if self.config.allowed_servers is not None else None
        spans = {
            p: s for p, s in spans.items() if p not in self.config.blocked_servers and (allowed is None or p in allowed)
        }
        self.excluded = {p: s for p, s in spans.items() if not self.privacy.allows(p)}
        spans = {p: s for p, s in spans.items() if self.privacy.allows(p)}
        now = time.monotonic()
        unbanned = {p: s for p, s in spans.items() if self.bans.get(p, _Ban(0, 0)).until <= now}
        # Bans are ignored where honouring them would leave a block without any server.
        honoured = not _uncovered(unbanned, 0, self.num_blocks) or _uncovered(spans, 0, self.num_blocks)
        self.spans = unbanned if honoured else spans
        # Forget unreachable peers no longer seen (a flood would grow this map with every refresh).
        self.rtts = {p: rtt for p, rtt in self.rtts.items() if math.isfinite(rtt) or p in self.spans}
        await self._ping([p for p in self.spans if p not in self.rtts])
        self.last_refresh = now

    async def refresh_if_stale(self) -> None:
        if time.monotonic() - self.last_refresh > self.config.update_period or not self.spans:
            await self.refresh()

    async def _ping(self, peers: list[str]) -> None:
        """Measure round trips to (a sample of at most MAX_PINGS_PER_REFRESH of) `peers`, all within
        about one ping timeout; a peer that does not answer in time counts as unreachable."""
        if len(peers) > MAX_PINGS_PER_REFRESH:
            peers = random.sample(peers, MAX_PINGS_PER_REFRESH)
        in_flight = asyncio.Semaphore(PINGS_IN_FLIGHT)
        deadline = time.perf_counter() + 2 * self.config.ping_timeout

        async def ping(peer: str) -> None:
            self.rtts[peer] = math.inf
            async with in_flight:
                left = deadline - time.perf_counter()
                if left <= 0:
                    return
                try:
                    stub = self.stub(peer)
                    # Twice: the first also opens the connection (several round trips); the smaller of the
                    # two is the link's, which route_choice.py weighs against what a push saves.
                    for _ in range(2):
                        timeout = min(self.config.ping_timeout, deadline - time.perf_counter())
                        if timeout <= 0:
                            return
                        started = time.perf_counter()
                        await asyncio.wait_for(stub.rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=timeout), timeout)
                        self.rtts[peer] = min(self.rtts[peer], time.perf_counter() - started)
                except Exception:
                    pass

        await asyncio.gather(*(ping(peer) for peer in peers))

    def route(
        self,
        start: int,
        end: int,
        cache_tokens_needed: int | None = None,
        adapter: str | None = None,
        avoid: Collection[str] = (),
    ) -> list[RouteSegment]:
        """The best route over [start, end); with `adapter`, only through servers that announce it; never
        through `avoid`."""
        spans = self.spans
        if adapter or avoid:
            spans = {
                peer: span
                for peer, span in spans.items()
                if peer not in avoid and (not adapter or adapter in span.server_info.adapters)
            }
        discounts = getattr(self.speed, "discounts", None)
        try:
            return choose_route(spans, start, end, self.rtts, cache_tokens_needed, discounts)
        except MissingBlocksError as exc:
            if self.privacy.restricted:
                held_outside = [b for b in exc.blocks if not _uncovered(self.excluded, b, b + 1)]
                if held_outside:
                    raise PrivacyCoverageError(exc.blocks, self.dht_prefix, self.privacy) from None
            if adapter:
                raise MissingBlocksError(exc.blocks, f"{self.dht_prefix} with adapter {adapter!r}") from None
            raise MissingBlocksError(exc.blocks, self.dht_prefix) from None

    def stub(self, peer: str):
        """The RPC stub of `peer`; PrivacyViolation if the privacy policy keeps it out. Every stream,
        forward, backward and ping the client opens goes through here."""
        if not self.privacy.allows(peer):
            raise PrivacyViolation(f"refused to contact server …{peer[-6:]}: it is outside privacy '{self.privacy}'")
        return protocol.server_stub(self.p2p, PeerID.from_base58(peer))

    def under(self, privacy: Privacy | None) -> SwarmView:
        """This view restricted to `privacy` (itself for None or the same policy; a restricted view only
        narrows further): one view per policy, sharing the DHT, the config, the bans and the spot-check
        ledger, with spans of its own."""
        if privacy is None or privacy == self.privacy:
            return self
        if self.privacy.restricted and not (privacy.peers is not None and privacy.peers <= self.privacy.peers):
            raise ValueError(f"this client is restricted to privacy '{self.privacy}'; a call can only narrow it")
        view = self._restricted.get(privacy)
        if view is None:
            ledger_of(self)  # made here, so the restricted view shares it
            view = dataclasses.replace(
                self, privacy=privacy, spans={}, rtts=dict(self.rtts), excluded={}, last_refresh=0.0, _restricted={}
            )
            self._restricted[privacy] = view
        return view

    def ban(self, peer: str) -> None:
        """Temporarily avoid a failing server: 15 s, doubling with each further failure."""
        previous = self.bans.get(peer)
        failures = previous.failures + 1 if previous else 1
        self.bans[peer] = _Ban(time.monotonic() + self.config.ban_timeout * 2 ** (failures - 1), failures)
        self.spans.pop(peer, None)
        self.rtts.pop(peer, None)

    def on_success(self, peer: str) -> None:
        self.bans.pop(peer, None)


def _uncovered(spans: dict[str, RemoteSpan], start: int, end: int) -> list[int]:
    """Blocks in [start, end) that no span holds."""
    covered = set()
    for span in spans.values():
        covered.update(range(span.start, span.end))
    return [b for b in range(start, end) if b not in covered]
