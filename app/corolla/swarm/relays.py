"""libp2p circuit relays the way Corolla uses them (hivemind's p2pd, go-libp2p 0.32).

What we measured in the network lab (corolla/testing/netlab.py) and why each option is here:
- A relay serves reservations only once libp2p believes it is publicly reachable, and a NAT'd peer
  looks for a relay only once libp2p believes it is private. libp2p learns both from AutoNAT, whose
  servers never dial back private addresses, so on a private internet (a company network, a private
  swarm on a LAN, the lab when built on 10.77.0.0/24) neither ever happens. Corolla asks its own
  reachability check instead (reachability.py) and tells p2pd the answer: `force_reachability`
  "public" or "private". (On a public-looking internet, the lab's default, stock Petals servers'
  AutoNAT does work: tests/test_netlab.py runs a stock server behind NAT.)
- With relay discovery on (p2pd's default; hivemind has no switch for it), autorelay waits until it
  knows four relay candidates or three minutes have passed. A server that knows its relays (its
  initial peers) uses them at once: `trusted_relays` switches discovery off (see `_static_relays`).
- go-libp2p advertises circuit addresses only through relays with public addresses. A NAT'd server
  therefore announces `<relay>/p2p-circuit` for each trusted relay itself (`circuit_addresses`), which
  libp2p keeps alongside any relay addresses it adds on the real internet.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

_patched = False


def _static_relays() -> None:
    """Make p2pd use only the named relays (no discovery, no 3-minute wait) whenever relays are named.

    hivemind builds p2pd's command line itself and has no relay-discovery switch, so this wraps that
    builder once per process; peers started without trusted relays get exactly hivemind's flags.
    """
    global _patched
    if _patched:
        return
    original = P2P._make_process_args

    def make_process_args(*args: Any, **kwargs: Any) -> list[str]:
        if kwargs.get("trustedRelays"):
            kwargs.setdefault("relayDiscovery", False)
        return original(*args, **kwargs)

    P2P._make_process_args = staticmethod(make_process_args)
    _patched = True


def relay_options(force_reachability: str | None, trusted_relays: Sequence[str]) -> dict[str, Any]:
    """Extra hivemind P2P options: the reachability we determined, and the relays to reserve on."""
    if force_reachability not in (None, "public", "private"):
        raise ValueError(f"force_reachability must be public, private or None, not {force_reachability!r}")
    options: dict[str, Any] = {}
    if force_reachability:
        options["force_reachability"] = force_reachability
    if trusted_relays:
        _static_relays()
        options["trusted_relays"] = list(trusted_relays)
    return options


def circuit_addresses(relays: Sequence[str]) -> list[str]:
    """`<relay maddr with /p2p/ID>/p2p-circuit` for each relay (the addresses a NAT'd peer announces)."""
    return [f"{relay.rstrip('/')}/p2p-circuit" for relay in relays if "/p2p/" in relay and "p2p-circuit" not in relay]


def relay_peer_ids(relays: Sequence[str]) -> list[str]:
    return [relay.rsplit("/p2p/", 1)[1].strip("/") for relay in relays if "/p2p/" in relay]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def circuit_multiaddr(relay: str) -> Multiaddr:
    """`<relay>/p2p-circuit` as a Multiaddr p2pd accepts (for dialling a peer through that relay).

    hivemind's Python multiaddr encodes a /p2p/ value as a CID, which p2pd's Go parser rejects, so the
    binary form is written here: /p2p/ is code 421 with the raw multihash, /p2p-circuit is code 290.
    """
    address, peer = relay.rstrip("/").removesuffix("/p2p-circuit").rsplit("/p2p/", 1)
    peer_bytes = PeerID.from_base58(peer).to_bytes()
    raw = Multiaddr(address).to_bytes() + _varint(421) + _varint(len(peer_bytes)) + peer_bytes + _varint(290)
    return Multiaddr(raw)


# --- members others can dial, learned from the swarm ------------------------------------------------------
# A directly reachable server announces its addresses in its ServerInfo (protocol.MEMBER_ADDRS_KEY); every
# member reads them from the block records and keeps them as extra bootstrap peers and relays, so the swarm
# does not depend on the member whose invite it joined with (issue 25: "no special creator").
_DIRECT_MADDR = re.compile(
    r"^/(ip4|ip6|dns|dns4|dns6)/[A-Za-z0-9.:\-]{1,253}/tcp/\d{1,5}/p2p/(?P<peer>[1-9A-HJ-NP-Za-km-z]{20,128})$"
)
MAX_MEMBERS_LEARNED = 16


def _is_loopback_maddr(maddr: str) -> bool:
    return maddr.startswith(("/ip4/127.", "/ip6/::1/"))


def announced_member_addrs(visible_maddrs: Sequence[str], limit: int = 8) -> list[str]:
    """The addresses a directly reachable server announces for others to dial: no loopback and no relay
    circuit, public ones first (a member in another home can only use those)."""
    from corolla.swarm.reachability import relay_candidates

    direct = [m for m in visible_maddrs if _DIRECT_MADDR.match(m) and not _is_loopback_maddr(m)]
    first = relay_candidates(direct)  # one per peer, its best
    return list(dict.fromkeys([*first, *direct]))[:limit]


def reachable_members(announced: dict[str, Sequence[str]], own_peer_id: str | None) -> list[str]:
    """The addresses of the directly reachable members (peer id -> what it announced), this peer left out.
    An address counts only if it names the peer that announced it: a member can vouch for itself only."""
    found: list[str] = []
    for peer, addrs in announced.items():
        if peer == own_peer_id:
            continue
        for maddr in list(addrs)[:8]:
            match = _DIRECT_MADDR.match(maddr) if isinstance(maddr, str) else None
            if match and match.group("peer") == peer and maddr not in found:
                found.append(maddr)
    return found[: MAX_MEMBERS_LEARNED * 4]
