"""Can other peers dial this one? Petals' reachability protocol, wire-compatible, and where we stand.

Wire (petals-protocol.md §5.5): the unary RPC `ReachabilityProtocol.rpc_check` takes a hivemind
`PingRequest` whose `peer.node_id` carries the raw PeerID bytes of the peer to check, and answers a
`PingResponse` whose `available` says whether the answering peer could dial it. A peer asked about
itself answers True. To check another peer, the answering peer dials it from a separate stripped
"probe" daemon (no relay, no listening, no NAT traversal), so only a direct connection counts.

At start a server asks up to five peers whether it can be dialled (`check_direct_reachability`): a
majority of yes means "direct"; a majority of no means "relay" (its DHT then runs in client mode and it
reserves slots on libp2p relays); no answer at all means "unknown", which is treated as direct, as stock
Petals does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import dht_pb2
from hivemind.utils.multiaddr import Multiaddr

from corolla.swarm.server.stats import Reachability

logger = logging.getLogger(__name__)

SELF_CHECK_TIMEOUT = 5.0  # Petals' timeouts: asking a peer about itself, and about someone else
OTHER_CHECK_TIMEOUT = 10.0
CHECK_BUDGET = 5.0  # starting our probe and dialling the peer we were asked about (inside the asker's 10 s).
# A dial to a dialable peer takes a few round trips (well under 2 s even at 300 ms); a NAT drops the
# SYN silently, so "not dialable" is only known when this runs out: it sets how long a NAT'd server
# waits for its answer. A peer misjudged as not dialable still works, through a relay.
MAX_PEERS_ASKED = 5
MAX_CONCURRENT_PROBES = 4
PROBES_PER_ASKER_PER_MINUTE = 6  # every check makes us dial someone: a hostile peer must not use us as a cannon
MAX_ASKERS_TRACKED = 1024
PROBE_DAEMON_OPTIONS = dict(
    dht_mode="client", use_relay=False, auto_nat=False, nat_port_map=False, no_listen=True, startup_timeout=5
)
TEMPORARY_PEER_STARTUP_TIMEOUT = 30


def is_relay_address(maddr: str | Multiaddr) -> bool:
    return "/p2p-circuit" in str(maddr)


class ReachabilityProtocol(ServicerBase):  # the class name is on the wire: do not rename
    """Answers other peers' reachability checks. Attach to the peer's main P2P with `attach`."""

    def __init__(self) -> None:
        self._main: P2P | None = None
        self._probes = asyncio.Semaphore(MAX_CONCURRENT_PROBES)
        self._asked: dict[PeerID, list[float]] = {}
        self.checks_answered = 0

    async def attach(self, p2p: P2P) -> None:
        self._main = p2p
        await self.add_p2p_handlers(p2p)

    async def detach(self) -> None:
        if self._main is not None:
            with contextlib.suppress(Exception):
                await self.remove_p2p_handlers(self._main)
        self._main = None

    async def rpc_check(self, request: dht_pb2.PingRequest, context: P2PContext) -> dht_pb2.PingResponse:
        try:
            target = PeerID(request.peer.node_id)
        except Exception:
            return dht_pb2.PingResponse(available=False)  # not a PeerID: nobody to dial
        if target == context.local_id:
            return dht_pb2.PingResponse(available=True)
        self._rate_limit(context.remote_id)
        available = await self.can_dial(target)
        self.checks_answered += 1
        logger.info("reachability check for ...%s: %s", str(target)[-6:], "dialable" if available else "not dialable")
        return dht_pb2.PingResponse(available=available)

    def _rate_limit(self, asker: PeerID) -> None:
        now = time.monotonic()
        recent = [t for t in self._asked.get(asker, ()) if now - t < 60.0]
        if len(recent) >= PROBES_PER_ASKER_PER_MINUTE:
            raise RuntimeError("too many reachability checks; try again later")  # the asker sees "no answer"
        if asker not in self._asked and len(self._asked) >= MAX_ASKERS_TRACKED:
            self._asked.pop(next(iter(self._asked)))
        self._asked[asker] = [*recent, now]

    async def can_dial(self, target: PeerID) -> bool:
        """Whether a fresh, relay-less connection to `target` succeeds at an address we know for it.

        The probe daemon lives only for this check: checks are rare (a server's start), and a daemon
        that outlives a killed server would be an orphan.
        """
        addrs = await self._direct_addrs_of(target)
        if not addrs:
            return False
        deadline = time.monotonic() + CHECK_BUDGET
        async with self._probes:
            probe = await P2P.create(**PROBE_DAEMON_OPTIONS)
            try:
                # hivemind has no public "connect"; its daemon client does (the probe only ever dials)
                await asyncio.wait_for(probe._client.connect(target, addrs), max(1.0, deadline - time.monotonic()))
                return True
            except Exception as error:
                logger.debug("could not dial %s at %s: %s", target, addrs, error)
                return False
            finally:
                with contextlib.suppress(Exception):
                    await probe.shutdown()

    async def _direct_addrs_of(self, target: PeerID) -> list[Multiaddr]:
        if self._main is None:
            return []
        for info in await asyncio.wait_for(self._main.list_peers(), 5.0):
            if info.peer_id == target:
                return [addr for addr in info.addrs if not is_relay_address(addr)]
        return []


async def ask_peers(p2p: P2P, peers: Sequence[PeerID], max_peers: int = MAX_PEERS_ASKED) -> list[bool]:
    """Ask each peer (concurrently, at most `max_peers`) whether it can dial `p2p`; the answers received."""
    request = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=p2p.peer_id.to_bytes()))

    async def ask(peer: PeerID) -> bool | None:
        try:
            stub = ReachabilityProtocol.get_stub(p2p, peer)
            response = await asyncio.wait_for(stub.rpc_check(request), OTHER_CHECK_TIMEOUT + 2)
            return bool(response.available)
        except Exception as error:
            logger.debug("%s did not check our reachability: %s", peer, error)
            return None

    answers = await asyncio.gather(*(ask(peer) for peer in list(peers)[:max_peers]))
    return [answer for answer in answers if answer is not None]


@dataclass
class DirectCheck:
    dialable: bool | None  # None: nobody answered
    answers: list[bool]

    @property
    def reachable_via_relay(self) -> bool:
        return self.dialable is False


async def check_direct_reachability(
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] = (),
    identity_path: str | None = None,
    threshold: float = 0.5,
    nat_port_map: bool = False,
) -> DirectCheck:
    """Start a temporary relay-less peer on the same addresses and ask the swarm whether it can dial it.
    With `nat_port_map` it first asks the home router to open its port (NAT-PMP/UPnP), as the server
    itself will, and is asked about once the router has answered (or NAT_MAP_WAIT_S passed)."""
    options = {**PROBE_DAEMON_OPTIONS, "no_listen": False, "startup_timeout": TEMPORARY_PEER_STARTUP_TIMEOUT}
    p2p = await P2P.create(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None,
        identity_path=identity_path,
        check_if_identity_free=False,
        **{**options, "nat_port_map": nat_port_map},
    )
    service = ReachabilityProtocol()  # answers "yes, it is me" to stock checkers calling us back
    node = None
    try:
        if nat_port_map:
            mapped = await wait_for_port_mapping(p2p)
            logger.info("the router %s", f"opened the port: {mapped}" if mapped else "did not open the port")
        await service.attach(p2p)
        node = await asyncio.wait_for(DHTNode.create(p2p=p2p, initial_peers=list(initial_peers), client_mode=True), 30)
        peers = list(node.protocol.routing_table.peer_id_to_uid.keys())
        answers = await ask_peers(p2p, peers)
    finally:
        if node is not None:
            with contextlib.suppress(Exception):
                await node.shutdown()
        await service.detach()
        with contextlib.suppress(Exception):
            await p2p.shutdown()
    dialable = (sum(answers) / len(answers) >= threshold) if answers else None
    logger.info("direct reachability: %d of %d peers could dial us", sum(answers), len(answers))
    return DirectCheck(dialable, answers)


NAT_MAP_WAIT_S = 12.0  # go-libp2p finds the gateway (UPnP, NAT-PMP) and maps the port in a few seconds


def is_public_maddr(maddr: str) -> bool:
    import ipaddress

    try:
        ip = ipaddress.ip_address(maddr.split("/")[2])
    except (ValueError, IndexError):
        return False
    return ip.is_global and ip not in ipaddress.ip_network("100.64.0.0/10")


async def wait_for_port_mapping(p2p: P2P, timeout: float = NAT_MAP_WAIT_S) -> str | None:
    """The public address the home router mapped for this peer (NAT-PMP/UPnP), once libp2p shows it;
    None if none came in `timeout` (no such router, or it refused)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            for maddr in await asyncio.wait_for(p2p.get_visible_maddrs(latest=True), 5.0):
                if is_public_maddr(str(maddr)) and not is_relay_address(maddr):
                    return str(maddr)
        await asyncio.sleep(1.0)
    return None


async def router_opens_port(host_maddrs: Sequence[str], identity_path: str | None = None) -> str | None:
    """Whether the home router maps a public port to this computer when asked (NAT-PMP/UPnP): the public
    address it gave a temporary peer on the same addresses, or None."""
    p2p = await P2P.create(
        host_maddrs=list(host_maddrs),
        identity_path=identity_path,
        check_if_identity_free=False,
        **{**PROBE_DAEMON_OPTIONS, "no_listen": False, "nat_port_map": True, "startup_timeout": 30},
    )
    try:
        mapped = await wait_for_port_mapping(p2p)
        logger.info("the router %s", f"opened the port: {mapped}" if mapped else "did not open the port")
        return mapped
    finally:
        with contextlib.suppress(Exception):
            await p2p.shutdown()


# --- where this computer stands ---------------------------------------------------------------------


def describe(
    state: str, port: int | None, relay_addrs: Sequence[str] = (), relay_proven_at: float | None = None
) -> Reachability:
    forward = (
        f"Forward TCP port {port} on your router to this computer"
        if port
        else "Choose a fixed port (Settings or --port), forward it on your router to this computer"
    )
    texts = {
        "checking": ("Checking whether other peers can reach this computer...", ""),
        "direct": ("Reachable directly: other peers connect to this computer.", "Nothing to do."),
        "relay": (
            "Reachable via a relay: this computer is behind a router (NAT) that other peers cannot dial, "
            "so they reach it through a relay peer.",
            f"Nothing needed: relays work but are slower. For full speed: {forward.lower()}, "
            "then restart contributing.",
        ),
        "unreachable": (
            "Not reachable: other peers cannot dial this computer and no relay has accepted it yet.",
            f"{forward}, or wait: Corolla keeps trying relays. Check that a firewall allows Corolla.",
        ),
        "local": ("Serving this computer only (a private swarm on loopback): other computers cannot join.", ""),
        "unknown": (
            "Reachability unknown: no peer answered the check (older peers do not), so this computer "
            "acts as directly reachable.",
            f"If clients cannot use your blocks: {forward.lower()}.",
        ),
    }
    summary, advice = texts[state]
    return Reachability(state, summary, advice, list(relay_addrs), time.time(), relay_proven_at)


def relay_candidates(initial_peers: Sequence[str]) -> list[str]:
    """One address per peer to reserve a relay slot on: go-libp2p's auto-relay counts each trusted relay
    address as a candidate, so three addresses of one peer (an invite's public, LAN and loopback ones)
    made it wait its three-minute boot delay for candidates that never came. Public addresses first, then
    private ones; a loopback address only for a peer known by nothing else (a relay on this very
    computer: one-computer swarms, the screenshots); circuit addresses never."""
    import ipaddress

    def rank(maddr: str) -> int:
        try:
            ip = ipaddress.ip_address(maddr.split("/")[2])
        except (ValueError, IndexError):
            return 0
        return 2 if ip.is_loopback else 1 if ip.is_private else 0

    chosen: dict[str, str] = {}
    for maddr in sorted((p for p in initial_peers if "/p2p/" in p and "p2p-circuit" not in p), key=rank):
        peer = maddr.rsplit("/p2p/", 1)[1].strip("/")
        if peer not in chosen:
            chosen[peer] = maddr
    return list(chosen.values())


def listens_on_public_address(host_maddrs: Sequence[str]) -> bool:
    """Whether a listen address is (or, for 0.0.0.0, an interface has) a public IPv4 address."""
    import ipaddress
    import socket

    import psutil

    def public(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return ip.is_global and ip not in ipaddress.ip_network("100.64.0.0/10")

    hosts = {maddr.split("/")[2] for maddr in host_maddrs if maddr.startswith("/ip4/")}
    if "0.0.0.0" in hosts:
        with contextlib.suppress(Exception):
            for addrs in psutil.net_if_addrs().values():
                hosts.update(a.address for a in addrs if a.family == socket.AF_INET)
    return any(public(host) for host in hosts)


def _is_loopback(maddr: str) -> bool:
    return maddr.startswith(("/ip4/127.", "/ip6/::1/"))


def port_of(maddrs: Sequence[str]) -> int | None:
    """The first fixed TCP port among listen addresses (None for port 0)."""
    for maddr in maddrs:
        with contextlib.suppress(Exception):
            port = int(Multiaddr(maddr).value_for_protocol("tcp"))
            if port:
                return port
    return None


# --- how a server joins, given its reachability ---------------------------------------------------------


@dataclass
class NetworkPlan:
    """The DHT options a server starts with, decided before it starts (as Petals decides)."""

    state: str  # "direct" | "relay" | "unreachable" | "unknown" | "local"
    client_mode: bool  # a peer nobody can dial must not sit in others' routing tables
    use_auto_relay: bool
    force_reachability: str | None
    trusted_relays: list[str]
    announce_maddrs: list[str]
    answers: list[bool]

    @property
    def using_relay(self) -> bool:
        return self.state == "relay"


async def plan_network(
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] = (),
    identity_path: str | None = None,
    mode: str = "auto",
    use_relay: bool = True,
    nat_port_map: bool = False,
) -> NetworkPlan:
    """Decide how to join: `mode` "auto" asks the swarm; "direct" and "relay" are the user's word.

    Explicit announce addresses (--public-ip, --announce-maddrs) mean the user vouches for them: direct.
    """
    from corolla.swarm.relays import circuit_addresses

    relays = relay_candidates(initial_peers)
    answers: list[bool] = []
    if mode == "auto" and host_maddrs and all(_is_loopback(maddr) for maddr in host_maddrs):
        # Listening on loopback only (tests, the private demo swarm): nobody off this computer can dial it,
        # and everybody on it can; asking would only cost a temporary daemon.
        return NetworkPlan("local", False, False, None, [], list(announce_maddrs), answers)
    if mode == "direct" or (mode == "auto" and announce_maddrs):
        dialable: bool | None = True
    elif mode == "relay":
        dialable = False
    elif not initial_peers:
        # The first peer of a new swarm has nobody to ask. Listening on an interface with a public
        # address, it is on the internet itself: saying so lets libp2p serve relay reservations at once
        # (otherwise AutoNAT needs peers to dial back first, and NAT'd members wait minutes for a relay).
        # Behind a router told to open the port (NAT-PMP/UPnP), the router's mapping is its word.
        dialable = True if listens_on_public_address(host_maddrs) else None
        if dialable is None and nat_port_map and await router_opens_port(host_maddrs, identity_path):
            dialable = True
    else:
        check = await check_direct_reachability(
            initial_peers, host_maddrs, announce_maddrs, identity_path, nat_port_map=nat_port_map
        )
        dialable, answers = check.dialable, check.answers
    if dialable is True:
        return NetworkPlan("direct", False, False, "public", [], list(announce_maddrs), answers)
    if dialable is None:
        return NetworkPlan("unknown", False, use_relay, None, [], list(announce_maddrs), answers)
    if not use_relay or not relays:
        return NetworkPlan("unreachable", True, False, "private" if use_relay else None, [], [], answers)
    # go-libp2p's auto-relay waits for every trusted relay to answer (or for its three-minute boot delay):
    # one that left for good (a member whose invite others joined with) must not be among them.
    relays = await answering(relays) or relays
    return NetworkPlan("relay", True, True, "private", relays, circuit_addresses(relays), answers)


RELAY_DIAL_TIMEOUT = 3.0  # a relay that does not accept a TCP connection in this long is left out


async def answering(maddrs: Sequence[str], timeout: float = RELAY_DIAL_TIMEOUT) -> list[str]:
    """The addresses (in order) that accept a TCP connection now, all tried at once."""

    async def answers(maddr: str) -> bool:
        parts = maddr.split("/")
        try:
            host, port = parts[2], int(parts[4])
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, ValueError, IndexError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True

    results = await asyncio.gather(*(answers(maddr) for maddr in maddrs))
    return [maddr for maddr, ok in zip(maddrs, results, strict=True) if ok]


class PlanInBackground:
    """`plan_network` in a thread of its own, started before the heavy imports and the model's opening:
    a NAT'd server's answer takes seconds (a NAT drops the probes silently), which then overlap them."""

    def __init__(self, **kwargs) -> None:
        self._future: concurrent.futures.Future[NetworkPlan] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        threading.Thread(target=self._run, args=(kwargs,), name="corolla-reachability", daemon=True).start()

    def _run(self, kwargs: dict) -> None:
        async def plan() -> NetworkPlan:
            self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
            return await plan_network(**kwargs)

        try:
            self._future.set_result(asyncio.run(plan()))
        except BaseException as error:  # handed to whoever awaits the plan
            self._future.set_exception(error)

    async def result(self) -> NetworkPlan:
        return await asyncio.wrap_future(self._future)

    def cancel(self, timeout: float = 15.0) -> None:
        """Stop a check still running and wait until its temporary daemon is gone (no orphan p2pd)."""
        if self._future.done():
            return
        if self._loop is not None and self._task is not None:
            with contextlib.suppress(RuntimeError):  # its loop just closed
                self._loop.call_soon_threadsafe(self._task.cancel)
        concurrent.futures.wait([self._future], timeout)


RELAY_PROOF_TIMEOUT = 20.0  # one dial through one relay, including the relay's hop to us
RELAY_PROOF_TTL = 300.0  # a proven relay is proven again after this long (reservations expire, relays restart)
RELAY_RETRY_S = 10.0  # after a failed proof (the reservation may still be on its way)
PROOF_DAEMON_OPTIONS = dict(
    dht_mode="client", use_relay=True, auto_nat=False, nat_port_map=False, no_listen=True, startup_timeout=10
)


async def connected_relays(p2p: P2P, relays: Sequence[str]) -> list[str]:
    """The relays (maddrs with /p2p/ID) this peer holds a live connection to."""
    from corolla.swarm.relays import relay_peer_ids

    connected = {str(info.peer_id) for info in await asyncio.wait_for(p2p.list_peers(), 10.0)}
    return [relay for relay, peer in zip(relays, relay_peer_ids(relays), strict=True) if peer in connected]


async def prove_relayed(p2p: P2P, relays: Sequence[str], timeout: float = RELAY_PROOF_TIMEOUT) -> list[str]:
    """The relays through which a stranger really reached this peer, end to end.

    A fresh peer that knows no address of ours but `<relay>/p2p-circuit` dials our PeerID there. The dial
    completes only if the relay holds our reservation and forwards the connection to us, and the security
    handshake with our key ran through it. (Once connected, libp2p may add a direct connection by hole
    punching, which is why the dialler is told nothing else: the first connection can only be the relayed
    one.) A live connection to a relay proves none of that: a relay may refuse reservations, or lose them.
    """
    from corolla.swarm.relays import circuit_multiaddr

    proven: list[str] = []
    for relay in relays:  # a fresh dialler each time: an earlier one has learnt our direct addresses
        probe = await P2P.create(**PROOF_DAEMON_OPTIONS)
        try:
            # hivemind has no public "connect"; its daemon client does
            await asyncio.wait_for(probe._client.connect(p2p.peer_id, [circuit_multiaddr(relay)]), timeout)
            # p2pd's host falls back to its DHT when the circuit dial fails: through the relay it may find
            # our direct addresses and dial those. Only a connection over the circuit proves the relay.
            if await asyncio.wait_for(_connected_through_circuit(probe, p2p.peer_id), timeout):
                proven.append(relay)
            else:
                logger.info("a stranger reached this peer through %s's DHT, not its circuit", relay)
        except Exception as error:
            logger.info("no relayed connection through %s yet: %s", relay, str(error)[:200])
        finally:
            with contextlib.suppress(Exception):
                await probe.shutdown()
    return proven


async def _connected_through_circuit(probe: P2P, peer_id: PeerID) -> bool:
    """Whether `probe`'s connection to `peer_id` runs through a relay (its remote address is a circuit)."""
    for info in await probe.list_peers():
        if info.peer_id == peer_id:
            return any("/p2p-circuit" in str(addr) for addr in info.addrs)
    return False


@dataclass
class RelayProof:
    """What a relayed server knows about its relays: which were proven, and when it last tried."""

    proven: list[str]
    proven_at: float | None  # when the proof was made (or tried, if nothing was proven)
    tried: list[str]  # the relays connected when it was made (a new or lost one calls for a new proof)

    def fresh(self, live: Sequence[str], now: float) -> bool:
        ttl = RELAY_PROOF_TTL if self.proven else RELAY_RETRY_S  # a failed proof is retried soon
        return self.proven_at is not None and now - self.proven_at < ttl and set(self.tried) == set(live)


async def relay_state(p2p: P2P, relays: Sequence[str], proof: RelayProof | None = None) -> tuple[str, RelayProof]:
    """("relay", proof) once a stranger reached this peer through a relay it is connected to, else
    ("unreachable", proof with nothing proven). A recent proof is kept while its relays stay connected."""
    live = await connected_relays(p2p, relays)
    now = time.time()
    if proof is not None and proof.fresh(live, now):
        return ("relay" if proof.proven else "unreachable"), proof
    proven = await prove_relayed(p2p, live) if live else []
    return ("relay" if proven else "unreachable"), RelayProof(proven, now, list(live))


def relayed_addresses(p2p: P2P, relays: Sequence[str]) -> list[str]:
    """The full circuit addresses of this peer through `relays`, as others dial them."""
    from corolla.swarm.relays import circuit_addresses

    return [f"{addr}/p2p/{p2p.peer_id}" for addr in circuit_addresses(relays)]
