"""Swarms on this network: a private swarm announced and found over mDNS (zeroconf), so computers of
one home or office join each other's swarm with no address typed.

The node owns one `LanDiscovery`; it only exists while the user has switched discovery on, and the
node closes it (no socket left open, nothing announced) when they switch it off. What goes on the
wire is only what joining needs: the swarm's bootstrap multiaddrs, DHT prefix, model and a human
name. What other computers announce is untrusted: every record is decoded within fixed bounds,
malformed ones are dropped, and at most `MAX_SWARMS` are kept.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass

from corolla.node.invites import make_invite

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_corolla._tcp.local."
PROTOCOL_VERSION = b"1"
MAX_SWARMS = 32  # a hostile LAN peer announcing thousands of swarms fills this and no more
MAX_REJECTED = 256  # malformed announcements remembered, so their repeats cost no new lookups
MAX_PEERS = 6  # bootstrap addresses per swarm (one TXT string each)
MAX_TXT_BYTES = 2048  # the whole TXT record of one announcement
MAX_TXT_KEYS = 16
MAX_NAME = 64
MAX_MODEL = 256
MAX_PREFIX = 128
MAX_MADDR = 255  # a TXT string's own limit
RESOLVE_TIMEOUT_MS = 1500
_MADDR = re.compile(r"^/ip[46]/[0-9a-fA-F.:]{2,45}/tcp/\d{1,5}/p2p/[1-9A-HJ-NP-Za-km-z]{32,64}$")
_UNSAFE = re.compile(r"[^\w .\-()']")


@dataclass(frozen=True)
class LanSwarm:
    """A private swarm another computer on this network announces."""

    name: str
    model: str
    dht_prefix: str
    peers: tuple[str, ...]
    invite: str
    seen_at: float

    def to_dict(self) -> dict:
        data = asdict(self)
        data["peers"] = list(self.peers)
        return data


def lan_maddrs(maddrs: list[str]) -> list[str]:
    """The addresses a neighbour can dial: TCP multiaddrs with a peer id, neither loopback nor wildcard."""
    usable = []
    for maddr in maddrs:
        if not _MADDR.match(maddr):
            continue
        address = ipaddress.ip_address(maddr.split("/")[2])
        if not (address.is_loopback or address.is_unspecified or address.is_multicast):
            usable.append(maddr)
    return usable[:MAX_PEERS]


def encode_announcement(name: str, model: str, dht_prefix: str, maddrs: list[str]) -> dict[str, str]:
    """The TXT properties of an announcement (raises ValueError where nothing dialable is left)."""
    peers = lan_maddrs(maddrs)
    if not peers:
        raise ValueError("no LAN address to announce (the swarm listens on loopback only)")
    properties = {"v": PROTOCOL_VERSION.decode(), "name": _clip(name, MAX_NAME), "model": _clip(model, MAX_MODEL)}
    properties["prefix"] = _clip(dht_prefix, MAX_PREFIX)
    properties.update({f"p{i}": peer for i, peer in enumerate(peers)})
    return properties


def decode_announcement(properties: dict, text_size: int, now: float | None = None) -> LanSwarm | None:
    """An announcement's TXT properties as a `LanSwarm`, or None where anything is off (never raises)."""
    try:
        if text_size > MAX_TXT_BYTES or len(properties) > MAX_TXT_KEYS:
            return None
        fields = {}
        for key, value in properties.items():
            if not isinstance(key, bytes) or not isinstance(value, bytes):
                return None
            fields[key.decode("ascii")] = value.decode("utf-8")
        if fields.get("v") != PROTOCOL_VERSION.decode():
            return None
        name, model, prefix = fields.get("name", ""), fields.get("model", ""), fields.get("prefix", "")
        if not name or len(name) > MAX_NAME or len(model) > MAX_MODEL or len(prefix) > MAX_PREFIX:
            return None
        if not (name + model + prefix).isprintable():
            return None  # no control characters (terminal escapes) reach a listing
        peers = [fields[f"p{i}"] for i in range(MAX_PEERS) if f"p{i}" in fields]
        if not peers or any(len(p) > MAX_MADDR or not _MADDR.match(p) for p in peers):
            return None
        if any(ipaddress.ip_address(p.split("/")[2]).is_loopback for p in peers):
            return None  # a neighbour pointing us at our own loopback is no swarm of theirs
        name = _clip(name, MAX_NAME)
        invite = make_invite(peers, prefix, model, name)
        return LanSwarm(name, model, prefix, tuple(peers), invite, now if now is not None else time.time())
    except (UnicodeDecodeError, ValueError, AttributeError, TypeError):
        return None


def _clip(text: str, limit: int) -> str:
    return _UNSAFE.sub("", str(text))[:limit].strip() or "Corolla"


def instance_name(name: str, maddrs: list[str]) -> str:
    """A DNS-SD instance name (at most 63 bytes): the human name and a short id of the swarm's peer."""
    peer_id = lan_maddrs(maddrs)[0].rsplit("/", 1)[-1] if lan_maddrs(maddrs) else "000000"
    label = f"{_clip(name, 40)} ({peer_id[-6:]})"
    return f"{label}.{SERVICE_TYPE}"


class LanDiscovery:
    """One zeroconf instance: browses for Corolla swarms, and announces this computer's one if told to.

    Thread-safe: the node calls it from its tick thread, the API reads `swarms()` from others."""

    def __init__(self, interfaces: list[str] | None = None):
        from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, Zeroconf

        self._zc = Zeroconf(interfaces=interfaces or InterfaceChoice.All, ip_version=IPVersion.V4Only)
        self._lock = threading.Lock()
        self._found: dict[str, LanSwarm] = {}
        self._rejected: set[str] = set()
        self._announced = None  # the ServiceInfo on the air, if any
        self._announced_key: tuple | None = None
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])

    # --- listening ----------------------------------------------------------------------------------
    def _on_change(self, zeroconf, service_type: str, name: str, state_change) -> None:
        from zeroconf import ServiceStateChange

        if state_change is ServiceStateChange.Removed:
            with self._lock:
                self._found.pop(name, None)
            return
        with self._lock:
            if name in self._rejected or (name not in self._found and len(self._found) >= MAX_SWARMS):
                return  # full, or known bad: a flood of announcements costs no lookups and no memory
            if self._announced is not None and name == self._announced.name:
                return  # our own swarm
        try:
            info = zeroconf.get_service_info(service_type, name, timeout=RESOLVE_TIMEOUT_MS)
        except Exception:  # a malformed answer or a closing zeroconf: nothing to list
            logger.debug("could not resolve %r", name, exc_info=True)
            return
        swarm = decode_announcement(info.properties, len(info.text or b"")) if info else None
        if swarm is None:
            logger.info("ignored a malformed LAN announcement %r", name[:100])
            with self._lock:
                if len(self._rejected) >= MAX_REJECTED:
                    self._rejected.clear()
                self._rejected.add(name)
            return
        with self._lock:
            if name in self._found or len(self._found) < MAX_SWARMS:
                self._found[name] = swarm

    def swarms(self) -> list[LanSwarm]:
        with self._lock:
            return sorted(self._found.values(), key=lambda s: s.name.lower())

    # --- announcing ---------------------------------------------------------------------------------
    def announce(self, name: str, model: str, dht_prefix: str, maddrs: list[str]) -> bool:
        """Put this computer's swarm on the air (or keep it there); False where nothing is dialable."""
        from zeroconf import ServiceInfo

        try:
            properties = encode_announcement(name, model, dht_prefix, maddrs)
        except ValueError:
            self.withdraw()
            return False
        key = tuple(sorted(properties.items()))
        if key == self._announced_key:
            return True
        self.withdraw()
        peers = lan_maddrs(maddrs)
        addresses = sorted({p.split("/")[2] for p in peers if p.startswith("/ip4/")})
        info = ServiceInfo(
            SERVICE_TYPE,
            instance_name(name, maddrs),
            port=int(peers[0].split("/")[4]),
            properties=properties,
            parsed_addresses=addresses,
            server=f"corolla-{peers[0].rsplit('/', 1)[-1][-12:].lower()}.local.",
        )
        self._zc.register_service(info, allow_name_change=True)
        self._announced, self._announced_key = info, key
        return True

    def withdraw(self) -> None:
        if self._announced is not None:
            with contextlib.suppress(Exception):
                self._zc.unregister_service(self._announced)
            self._announced, self._announced_key = None, None

    @property
    def announcing(self) -> bool:
        return self._announced is not None

    def close(self) -> None:
        self.withdraw()
        with contextlib.suppress(Exception):
            self._browser.cancel()
        with contextlib.suppress(Exception):
            self._zc.close()


def default_human_name() -> str:
    return _clip(socket.gethostname().split(".")[0], MAX_NAME)
