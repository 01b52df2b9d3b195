"""Peer ids checked without hivemind: its PeerID comes with its package, which imports torch, and the node
checks the peer lists of chats' privacy choices while it contributes, when it holds no torch (README,
Footprint). The swarm client's privacy policies (client/privacy.py) use the same check."""

from __future__ import annotations

from collections.abc import Iterable

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_VALUES = {c: i for i, c in enumerate(ALPHABET)}
MAX_PEERS = 1024  # peers one privacy choice may name
MAX_PEER_ID_CHARS = 128


class PeerListError(ValueError):
    """A malformed or empty peer list (the message names the first bad entry)."""


def base58_decode(text: str) -> bytes | None:
    if not text or len(text) > MAX_PEER_ID_CHARS or any(c not in _VALUES for c in text):
        return None
    number = 0
    for c in text:
        number = number * 58 + _VALUES[c]
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


def is_peer_id(text: str) -> bool:
    """A base58 libp2p peer id: a multihash, sha2-256 (Qm...) or identity (12D3KooW...)."""
    raw = base58_decode(text)
    if raw is None or len(raw) < 3 or raw[1] != len(raw) - 2:
        return False
    return (raw[0] == 0x12 and len(raw) == 34) or (raw[0] == 0x00 and 4 < len(raw) <= 64)


def check_peer_ids(
    peers: Iterable[str], what: str = "peer list", error: type[ValueError] = PeerListError
) -> frozenset[str]:
    """The peer ids as a set; `error` naming the first malformed one, or an empty list."""
    if isinstance(peers, str):
        raise error(f"the {what} must be a list of peer ids, not one string")
    checked = set()
    for peer in peers:
        if not isinstance(peer, str) or not peer.strip():
            raise error(f"the {what} holds {peer!r}, which is not a peer id")
        peer = peer.strip()
        if "/p2p/" in peer:  # a multiaddr: its peer id is the last part
            peer = peer.rsplit("/p2p/", 1)[1].strip("/")
        if not is_peer_id(peer):
            raise error(f"{peer[:80]!r} in the {what} is not a peer id (base58, such as 12D3KooW... or Qm...)")
        checked.add(peer)
    if not checked:
        raise error(f"the {what} is empty: name at least one peer id, or use the level 'any'")
    if len(checked) > MAX_PEERS:
        raise error(f"the {what} names {len(checked)} peers; at most {MAX_PEERS}")
    return frozenset(checked)
