"""What a running block server tells the swarm and keeps learning from it: its announcements (JOINING,
ONLINE, OFFLINE with its span and throughput), rejoining its initial peers when it lost them, the
measured pings to the next servers, rebalancing its blocks, its visible addresses and whether others
can reach it (with the relay retake after a relay came back)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from functools import partial

from corolla import __version__
from corolla.swarm import protocol
from corolla.swarm.dht_records import compute_spans, declare_blocks, declare_model, get_module_infos
from corolla.swarm.models.devices import (
    dtype_name,
)
from corolla.swarm.protocol import ServerInfo, ServerState
from corolla.swarm.reachability import (
    NetworkPlan,
    RelayProof,
    connected_relays,
    describe,
    port_of,
    relay_state,
    relayed_addresses,
)
from corolla.swarm.relays import announced_member_addrs, reachable_members, relay_peer_ids
from corolla.swarm.server.block_selection import block_throughputs, should_choose_other_blocks
from corolla.swarm.server.stats import PARENT_PID_ENV

logger = logging.getLogger(__name__)
NEXT_PINGS_UPDATE_S = 30.0  # DHT lookup of the next blocks' servers plus one round of pings
RETAKE_RELAY_AFTER_S = 10.0  # a relay connected again but not carrying us this long: restart to reserve
RETAKE_RELAY_EXIT_CODE = 75  # EX_TEMPFAIL: the node starts the server again at once, not counted as a crash
REJOIN_CHECK_S = 10.0  # how often a server checks that it still reaches one of its initial peers
MEMBERS_CHECK_S = 10.0  # how often a server reads which members others can dial, and looks for uncovered blocks
MAX_MEMBERS_KEPT = 64
GAP_JITTER_S = 10.0  # the most a server waits before moving to cover a block nobody serves
RELAY_POLL_S = 3.0  # how often a relayed server looks whether its proven relays are still connected
RELAY_GONE_AFTER_S = 15.0  # every relay gone this long, while other members could relay: restart to use them


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


class SwarmPresenceMixin:
    """The swarm-facing loops of BlockServer (server.py): uses its config, dht, stats, state, span, peer_id,
    throughput, next_pings and _set_state."""

    def _server_info(self, start: int, end: int) -> ServerInfo:
        measured = isinstance(self.config.throughput, str)
        return ServerInfo(
            state=self.state,
            throughput=float(self.announced_throughput),
            start_block=start,
            end_block=end,
            public_name=self.config.public_name,
            version=protocol.PETALS_COMPAT_VERSION,
            network_rps=self.throughput.network_rps if measured else None,
            forward_rps=self.throughput.forward_rps if measured else None,
            inference_rps=self.throughput.inference_rps if measured else None,
            adapters=tuple(self.adapters),
            torch_dtype=dtype_name(self.dtype),
            quant_type=self.config.quant_type,
            using_relay=self.stats.using_relay,
            cache_tokens_left=self.budget.tokens_left_dht if self.budget is not None else None,
            next_pings=self.next_pings.announced() if self.next_pings and self.state != ServerState.OFFLINE else None,
            extra=self._extra_info(),
        )

    def _extra_info(self) -> dict:
        """Corolla's own keys: its version and, for a directly reachable server, its addresses (every member
        keeps those as bootstrap peers and relays: the swarm outlives whoever created it)."""
        extra = {"corolla_version": __version__}
        if self.network is not None and self.network.state == "direct":
            addrs = announced_member_addrs(self.stats.visible_maddrs)
            if addrs:
                extra[protocol.MEMBER_ADDRS_KEY] = addrs
        return extra

    async def _announce(self, start: int, end: int) -> None:
        await declare_blocks(self.dht, self._uids(start, end), self._server_info(start, end), self.config.expiration)
        if self.state != ServerState.OFFLINE:
            repository = None if self.checkpoint.is_local else f"https://huggingface.co/{self.checkpoint.source_name}"
            await declare_model(
                self.dht, self.dht_prefix, protocol.ModelInfo(self.total_blocks, repository), self.config.expiration
            )

    async def _announce_forever(self, start: int, end: int) -> None:
        first = True
        while True:
            try:
                await self._announce(start, end)
            except Exception:
                logger.warning("announcement failed", exc_info=True)
            await self._measure_next_pings(start, end)
            if first:  # the first pings are announced at once, not an update period later
                first = False
                with contextlib.suppress(Exception):
                    await self._announce(start, end)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_announcer.wait(), self.config.update_period)
            self._wake_announcer.clear()

    async def _rejoin_forever(self) -> None:
        """Back into the swarm after losing it (a member restarted, this home's link came back): the
        initial peers are dialled again and the announcement repeated at once, so a restarted member
        learns this server's blocks within seconds instead of never (see peers.rejoin_if_alone)."""
        from corolla.swarm.peers import peers_by_id, rejoin_if_alone

        peers = peers_by_id(self.config.initial_peers)
        while True:
            await asyncio.sleep(REJOIN_CHECK_S)
            try:
                coroutine = self.dht.run_coroutine(partial(rejoin_if_alone, peers=peers), return_future=True)
                answered = await asyncio.wait_for(coroutine, 60.0)
            except Exception as exc:  # the DHT is busy or going away: the next round tries again
                logger.info("could not check the swarm's initial peers: %s", one_line(exc))
                continue
            if answered:
                logger.info("rejoined the swarm through %d initial peer(s); announcing again", answered)
                self._wake_announcer.set()

    async def _watch_members_forever(self, move: asyncio.Event | None) -> None:
        """Every few seconds: which members others can dial (their announced addresses, kept in the stats
        for the node), and whether a block lost every server (a member left). A gap is filled within
        seconds, not at the next random balance check (up to two minutes): after a short random wait, so
        that of several servers able to move one does and the others see it (JOINING counts)."""
        uids = self._uids(0, self.total_blocks)
        first = True
        while True:
            if not first:  # the first read at once: a restarted server names its relay within seconds
                await asyncio.sleep(MEMBERS_CHECK_S)
            first = False
            if self.config.nat_port_map and self.network is not None:  # the router's mapping comes (and goes) late
                with contextlib.suppress(Exception):
                    self.stats.visible_maddrs = await self._visible_maddrs(await self.dht.replicate_p2p(), self.network)
            try:
                infos = await get_module_infos(self.dht, uids)
                announced = {
                    peer: info.extra.get(protocol.MEMBER_ADDRS_KEY) or ()
                    for module in infos
                    for peer, info in module.servers.items()
                    if info.state == ServerState.ONLINE
                }
                # Kept while this server runs, newest first: a read while the swarm's records move (the
                # member that held them left) may miss a member, which must not delay taking it as relay.
                found = reachable_members(announced, self.peer_id)
                members = list(dict.fromkeys([*found, *self.stats.reachable_members]))[:MAX_MEMBERS_KEPT]
                ids = set(relay_peer_ids(found))  # who others can reach now (the window names them)
                names = {
                    peer: info.public_name or peer[-6:]
                    for module in infos
                    for peer, info in module.servers.items()
                    if peer in ids
                }
                if announced:  # a read that found no server at all is a swarm in motion, not an empty one
                    self.stats.member_names = names
                if members != self.stats.reachable_members:
                    logger.info("members others can dial: %s", " ".join(members) or "none")
                    self.stats.reachable_members = members
                if move is None or move.is_set():
                    continue
                spans = compute_spans(infos, min_state=ServerState.JOINING)
                if min(block_throughputs(spans.values(), self.total_blocks)) > 0:
                    continue
                await asyncio.sleep(random.uniform(0, GAP_JITTER_S))
                infos = await get_module_infos(self.dht, uids)
                spans = compute_spans(infos, min_state=ServerState.JOINING)
                if should_choose_other_blocks(self.peer_id, spans, self.total_blocks, self.config.balance_quality):
                    logger.info("a block lost every server: moving to cover it")
                    move.set()
            except Exception as exc:  # the DHT is busy or going away: the next round tries again
                logger.info("could not read the swarm's members: %s", one_line(exc))

    async def _measure_next_pings(self, start: int, end: int) -> None:
        if self.next_pings is None:
            return
        try:
            update = self.next_pings.update(self.dht, self.dht_prefix, start, end, self.total_blocks)
            await asyncio.wait_for(update, NEXT_PINGS_UPDATE_S)
        except Exception as exc:  # pings only refine routes: they never stop the announcements
            logger.info("could not measure next_pings: %s", one_line(exc))

    async def _balance_forever(self, move: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(random.uniform(0, 2 * self.config.mean_balance_check_period))
            try:
                infos = await get_module_infos(self.dht, self._uids(0, self.total_blocks))
                spans = compute_spans(infos, min_state=ServerState.JOINING)
                if should_choose_other_blocks(self.peer_id, spans, self.total_blocks, self.config.balance_quality):
                    move.set()
                    return
            except Exception:
                logger.warning("rebalancing check failed", exc_info=True)

    async def _visible_maddrs(self, p2p, network: NetworkPlan) -> list[str]:
        """The addresses libp2p shows others (printed, and in the stats). Behind NAT with relays on public
        addresses it may show none for a while: its auto-relay replaces every public address (our
        announced circuit addresses too) by circuit addresses of the relays it holds reservations on,
        which it reports late. Nothing waits for that: the planned circuit addresses stand in."""
        try:
            return [str(m) for m in await asyncio.wait_for(p2p.get_visible_maddrs(latest=True), 10.0)]
        except ValueError:  # hivemind: "No multiaddrs found"
            return [f"{maddr}/p2p/{self.peer_id}" for maddr in network.announce_maddrs]

    def _set_reachability(self, state: str, relay_addrs: list[str] = (), proven_at: float | None = None) -> None:
        port = port_of(self.config.host_maddrs)
        self.stats.reachability = describe(state, port, relay_addrs, proven_at)

    async def _watch_reachability(self, p2p) -> None:
        """A relayed server says "relay" only while a stranger has really reached it through one: each
        relay it is connected to is proven by a dial through it (relay_state), again when relays come
        or go, and every few minutes."""
        if self.network is None or not self.network.trusted_relays:
            return
        proof: RelayProof | None = None
        had_relay, lost_since = False, None
        while True:
            with contextlib.suppress(Exception):
                state, proof = await relay_state(p2p, self.network.trusted_relays, proof)
                addrs = relayed_addresses(p2p, proof.proven)
                known = self.stats.reachability
                if known is None or state != known.state or addrs != known.relay_addrs:
                    logger.info("reachability: %s %s", state, " ".join(addrs))
                    self._set_reachability(state, addrs, proof.proven_at if proof.proven else None)
                had_relay = had_relay or state == "relay"
                # The relay restarted (connected again, yet nothing comes through it): go-libp2p's auto-relay
                # backs off for an hour from a relay whose reservation failed while it was away, so this
                # server would stay unreachable that long. A new p2pd reserves at once: stop, and the node
                # starts the server again (a few seconds; the blocks are read from the page cache).
                regained = had_relay and state == "unreachable" and bool(proof.tried)
                # Or every relay is gone (the member whose invite this one joined with left for good) while
                # the swarm has other members others can dial: a restarted server takes them as relays (the
                # node passes what it learned as initial peers), as p2pd's relays are fixed at its start.
                ours = set(relay_peer_ids(self.network.trusted_relays))
                others = [m for m in self.stats.reachable_members if relay_peer_ids([m])[0] not in ours]
                gone = had_relay and state == "unreachable" and not proof.tried and bool(others)
                lost_since = (lost_since or time.monotonic()) if regained or gone else None
                after = RETAKE_RELAY_AFTER_S if regained else RELAY_GONE_AFTER_S
                if lost_since is not None and time.monotonic() - lost_since > after:
                    why = (
                        "the relay came back without this server's reservation"
                        if regained
                        else f"its relays are gone and {len(others)} other member address(es) could relay"
                    )
                    if not os.environ.get(PARENT_PID_ENV):  # a `corolla serve` of its own: nobody would restart it
                        logger.warning("%s: restart `corolla serve` (under the node this happens by itself)", why)
                        lost_since = None
                    else:
                        logger.warning("%s: restarting to take a relay", why)
                        self.exit_code = RETAKE_RELAY_EXIT_CODE
                        self._stop.set()
                        return
            # quickly while looking for a relay (a proof costs a short-lived daemon), then a light check
            relayed = self.stats.reachability is not None and self.stats.reachability.state == "relay"
            await self._sleep_watching_relays(p2p, proof, 15.0 if relayed else 5.0)

    async def _sleep_watching_relays(self, p2p, proof: RelayProof | None, seconds: float) -> None:
        """Sleep, looking every few seconds whether a proven relay dropped its connection. A relay that
        restarts is connected again within seconds (the DHT dials it), and then looks as before while our
        reservation on it is gone: a drop seen here makes the next round prove it again."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(RELAY_POLL_S, left))
            if proof is None or not proof.proven:
                continue
            with contextlib.suppress(Exception):
                live = await connected_relays(p2p, self.network.trusted_relays)
                if not set(proof.proven) <= set(live):
                    logger.info("a relay dropped its connection: proving the relay again")
                    proof.proven_at = None
                    return
