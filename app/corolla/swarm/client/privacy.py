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

from corolla.swarm.peer_ids import PeerListError, check_peer_ids

LEVELS = ("any", "members", "peers", "local")


class PrivacyError(PeerListError):
    """A privacy policy that cannot be built: an unknown level, a malformed or empty peer list."""


class PrivacyViolation(RuntimeError):
    """Something tried to send a tensor to a peer outside the policy (a bug: routing never chooses one)."""


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
            object.__setattr__(
                self, "peers", check_peer_ids(self.peers or (), f"{self.level} privacy's peer list", PrivacyError)
            )

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
