"""Who may receive a client's hidden states: the privacy policy every route obeys.

Every server on a route can read the text back from what it receives (the first server's inputs are
token embeddings; the last server can apply the public head to its outputs; published attacks invert
the states in between: see benchmarks/privacy.py and SECURITY.md). So the only protection an app can
honestly offer is choosing who receives them. Four levels:

- "any": any server of the swarm (Petals' behaviour);
- "members": the servers of the private swarms this node created or joined (the node supplies their
  peer ids);
- "peers": only the peers listed;
- "local": only this computer's own server(s).

A policy is enforced by SwarmView (routing.py): servers outside it never enter the view's spans, so no
route, failover, spot-check replay or push target can name them, and opening a stream or a forward /
backward call to one raises PrivacyViolation before a byte is sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hivemind.p2p import PeerID

LEVELS = ("any", "members", "peers", "local")
MAX_PEERS = 1024


class PrivacyError(ValueError):
    """A privacy policy that cannot be built: an unknown level, a malformed or empty peer list."""


class PrivacyViolation(RuntimeError):
    """Something tried to send a tensor to a peer outside the policy (a bug: routing never chooses one)."""


def check_peer_ids(peers: Iterable[str], what: str = "peer list") -> frozenset[str]:
    """The peer ids as a set; PrivacyError naming the first malformed one, or an empty list."""
    if isinstance(peers, str):
        raise PrivacyError(f"the {what} must be a list of peer ids, not one string")
    checked = set()
    for peer in peers:
        if not isinstance(peer, str) or not peer.strip():
            raise PrivacyError(f"the {what} holds {peer!r}, which is not a peer id")
        peer = peer.strip()
        if "/p2p/" in peer:  # a multiaddr: its peer id is the last part
            peer = peer.rsplit("/p2p/", 1)[1].strip("/")
        if not _is_peer_id(peer):
            raise PrivacyError(f"{peer[:80]!r} in the {what} is not a peer id (base58, such as 12D3KooW... or Qm...)")
        checked.add(peer)
    if not checked:
        raise PrivacyError(f"the {what} is empty: name at least one peer id, or use the level 'any'")
    if len(checked) > MAX_PEERS:
        raise PrivacyError(f"the {what} names {len(checked)} peers; at most {MAX_PEERS}")
    return frozenset(checked)


def _is_peer_id(text: str) -> bool:
    """A base58 libp2p peer id: a multihash, sha2-256 (Qm...) or identity (12D3KooW...)."""
    try:
        raw = PeerID.from_base58(text).to_bytes()
    except Exception:
        return False
    if len(raw) < 3 or raw[1] != len(raw) - 2:
        return False
    return (raw[0] == 0x12 and len(raw) == 34) or (raw[0] == 0x00 and 4 < len(raw) <= 64)


@dataclass(frozen=True)
class Privacy:
    """A privacy level and, except for "any", the peer ids allowed to receive hidden states."""

    level: str = "any"
    peers: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise PrivacyError(f"privacy level must be one of {', '.join(LEVELS)}; got {self.level!r}")
        if self.level == "any":
            if self.peers is not None:
                raise PrivacyError("the level 'any' takes no peer list")
        else:
            object.__setattr__(self, "peers", check_peer_ids(self.peers or (), f"{self.level} privacy's peer list"))

    @classmethod
    def any(cls) -> Privacy:
        return cls()

    @classmethod
    def members(cls, peers: Iterable[str]) -> Privacy:
        return cls("members", frozenset(_listed(peers)))

    @classmethod
    def only(cls, peers: Iterable[str]) -> Privacy:
        return cls("peers", frozenset(_listed(peers)))

    @classmethod
    def local(cls, peers: Iterable[str]) -> Privacy:
        return cls("local", frozenset(_listed(peers)))

    @property
    def restricted(self) -> bool:
        return self.level != "any"

    def allows(self, peer: str) -> bool:
        return self.peers is None or peer in self.peers

    def to_dict(self) -> dict:
        return {"level": self.level, "peers": sorted(self.peers) if self.peers is not None else None}

    def __str__(self) -> str:
        if self.peers is None:
            return "any server"
        names = {"members": "members of my swarms", "peers": "only these peers", "local": "this computer only"}
        return f"{names[self.level]} ({len(self.peers)} peer{'s' * (len(self.peers) != 1)})"


def _listed(peers: Iterable[str]) -> list:
    if isinstance(peers, str):
        raise PrivacyError("the peer list must be a list of peer ids, not one string")
    return list(peers)


def as_privacy(value: Privacy | str | Iterable[str] | dict | None) -> Privacy:
    """A Privacy from what an API caller may give: None or "any", a Privacy, a list of peer ids (only
    these peers), or {"level": ..., "peers": [...]}."""
    if value is None or value == "any":
        return Privacy()
    if isinstance(value, Privacy):
        return value
    if isinstance(value, str):
        raise PrivacyError(f"privacy must be 'any', a Privacy, a list of peer ids or a dict; got {value!r}")
    if isinstance(value, dict):
        unknown = set(value) - {"level", "peers"}
        if unknown:
            raise PrivacyError(f"unknown privacy field(s): {', '.join(sorted(map(str, unknown)))}")
        level, peers = value.get("level", "any"), value.get("peers")
        if level == "any":
            return Privacy()
        return Privacy(level, frozenset(_listed(peers or ())))
    return Privacy.only(value)
