"""Invites to a private swarm: what they carry, how they are written and read back, and bounds.

An invite is `corolla-invite:` + base64url(JSON). Version 2 carries every address a friend might dial
(public, relay circuit, LAN, and other directly reachable members' addresses), the DHT prefix, the
model and the inviting member's public name. Reading one is bounded (length, number of addresses, each
address's form) and every refusal is one sentence that says what to do. Version 1 invites (no "v") are
still read.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from dataclasses import dataclass, field

INVITE_PREFIX = "corolla-invite:"
INVITE_VERSION = 2
MAX_INVITE_CHARS = 8192
MAX_PEERS = 32
MAX_MADDR_CHARS = 512
# /ip4|ip6|dns*/HOST/tcp/PORT/p2p/ID, optionally followed by /p2p-circuit[/p2p/ID] (a relay's address).
_MADDR = re.compile(
    r"^/(ip4|ip6|dns|dns4|dns6)/[A-Za-z0-9.:\-]{1,253}/tcp/\d{1,5}/p2p/[1-9A-HJ-NP-Za-km-z]{20,128}"
    r"(/p2p-circuit(/p2p/[1-9A-HJ-NP-Za-km-z]{20,128})?)?$"
)


class InviteError(ValueError):
    """An invite that cannot be used; str() is one sentence for the user."""


@dataclass
class Invite:
    peers: list[str]
    dht_prefix: str | None = None
    model: str | None = None
    name: str | None = None
    version: int = INVITE_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def peer_ids(self) -> list[str]:
        """The members it names (the relay's id for a circuit address is the relay's, also a member)."""
        ids = []
        for maddr in self.peers:
            for part in re.findall(r"/p2p/([1-9A-HJ-NP-Za-km-z]+)", maddr):
                if part not in ids:
                    ids.append(part)
        return ids


def address_rank(maddr: str) -> int:
    """Order in an invite: public direct addresses first, then relays, then LAN, loopback last."""
    host = maddr.split("/")[2] if maddr.count("/") >= 2 else ""
    if "/p2p-circuit" in maddr:
        return 1
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return 0  # a DNS name: someone set it up to be dialled
    if ip.is_loopback:
        return 3
    return 2 if ip.is_private or ip.is_link_local else 0


def make_invite(maddrs: list[str], dht_prefix: str, model: str, name: str | None = None) -> str:
    """An invite naming these addresses (deduplicated, best first, bounded to what a reader accepts)."""
    peers: list[str] = []
    for maddr in sorted(dict.fromkeys(maddrs), key=address_rank):
        if _MADDR.match(maddr) and len(maddr) <= MAX_MADDR_CHARS and len(peers) < MAX_PEERS:
            peers.append(maddr)
    data = {"v": INVITE_VERSION, "peers": peers, "dht_prefix": dht_prefix, "model": model}
    if name:
        data["name"] = name[:128]
    invite = INVITE_PREFIX + base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()
    while len(invite) > MAX_INVITE_CHARS and len(data["peers"]) > 1:  # drop the least useful addresses
        data["peers"] = data["peers"][:-1]
        invite = INVITE_PREFIX + base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()
    return invite


def parse_invite(text: str) -> Invite:
    """The invite in `text` (surrounding spaces and line breaks allowed), or InviteError saying why not."""
    text = "".join(text.split())  # a mail client may wrap a long invite over several lines
    if len(text) > MAX_INVITE_CHARS:
        raise InviteError(
            f"This is too long for an invite ({len(text)} characters; an invite has at most {MAX_INVITE_CHARS}): "
            "paste one invite only, copied with the Copy invite button."
        )
    if not text.startswith(INVITE_PREFIX):
        if text.startswith("/") and "/p2p/" in text:
            raise InviteError(
                "This is a peer address, not an invite: choose Custom peers in Settings to use it, "
                "or ask for the invite from the Contribute pane of a member's Corolla."
            )
        raise InviteError(
            "This is not a Corolla invite (an invite starts with corolla-invite:): ask for the invite from "
            "the Contribute pane of a member's Corolla."
        )
    try:
        body = text[len(INVITE_PREFIX) :]
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode())
        if not isinstance(data, dict):
            raise TypeError("not an object")
        peers = data["peers"]
        if not isinstance(peers, list):
            raise TypeError("peers is not a list")
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InviteError(
            "This invite is damaged (part of it is missing or changed): copy it again in full, or ask for a new one."
        ) from exc
    version = data.get("v", 1)
    if not isinstance(version, int) or version < 1:
        raise InviteError("This invite is damaged (its version is not a number): ask for a new one.")
    if version > INVITE_VERSION:
        raise InviteError(
            f"This invite was made by a newer Corolla (invite version {version}; this one reads up to "
            f"{INVITE_VERSION}): update Corolla, then paste it again."
        )
    if len(peers) > MAX_PEERS:
        raise InviteError(f"This invite names {len(peers)} addresses (at most {MAX_PEERS}): ask for a new one.")
    bad = [p for p in peers if not isinstance(p, str) or len(p) > MAX_MADDR_CHARS or not _MADDR.match(p)]
    if bad:
        shown = str(bad[0])[:80]
        raise InviteError(f"This invite is damaged (one of its addresses, {shown!r}, is not valid): ask for a new one.")
    if not peers:
        raise InviteError("This invite names no address to join through: ask for a new one.")
    strings = {}
    for key, limit in (("dht_prefix", 256), ("model", 1024), ("name", 128)):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            raise InviteError(f"This invite is damaged (its {key} is not valid): ask for a new one.")
        strings[key] = value or None
    return Invite(list(dict.fromkeys(peers)), strings["dht_prefix"], strings["model"], strings["name"], version)


def dial_targets(maddr: str) -> tuple[str, int] | None:
    """(host, TCP port) a dial to this address starts with (a relay's own address for a circuit one)."""
    parts = maddr.split("/")
    try:
        return parts[2], int(parts[4])
    except (IndexError, ValueError):
        return None
