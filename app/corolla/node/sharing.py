"""This computer's place in a swarm others join: a kept identity and port, its addresses, and what to
tell the user about who can reach it (the window's "Let others join" panel reads `sharing_status`)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import socket
import time
from pathlib import Path

import psutil

from corolla.api import models as m

KEPT_PORT_WAIT_S = 3.0
PORT_RANGE = (31330, 31999)  # below the usual ephemeral range, so an outgoing connection rarely takes it


def _free(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libp2p binds: TIME_WAIT is no owner
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def new_identity() -> bytes:
    """A new libp2p private key as hivemind's P2P.generate_identity writes it (an RSA-2048 key, DER, in
    libp2p's PrivateKey message: key_type RSA = 0, then the key), written here without importing
    hivemind, whose package imports torch (README, Footprint: a node that contributes holds no torch)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    length, size = bytearray(), len(der)
    while True:  # the length as a protobuf varint
        length.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            break
    return b"\x08\x00\x12" + bytes(length) + der


class SwarmAddress:
    """The swarm peer's key file (mode 0600) and its port, both kept across restarts."""

    def __init__(self, identity_path: Path):
        self.identity_path = Path(identity_path)
        self.port_notice: str | None = None  # set when a kept port was taken and replaced (the invite changed)

    def identity(self) -> Path:
        """The key file, written once (hivemind's format) and readable by this user only."""
        if not self.identity_path.is_file():
            self.identity_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.identity_path.write_bytes(new_identity())
        if self.identity_path.stat().st_mode & 0o777 != 0o600:
            os.chmod(self.identity_path, 0o600)
        return self.identity_path

    def port_for(self, kept: int | None, loopback_only: bool, our_server_holds_it: bool) -> int:
        """The kept port, or a new free one when there is none yet or another program holds it."""
        host = "127.0.0.1" if loopback_only else "0.0.0.0"
        if kept is not None and (our_server_holds_it or _free(kept, host)):
            return kept
        if kept is not None:  # our own stopped server's p2pd may take a moment to let it go
            deadline = time.monotonic() + KEPT_PORT_WAIT_S
            while time.monotonic() < deadline:
                time.sleep(0.25)
                if _free(kept, host):
                    return kept
        for _ in range(200):
            port = random.randint(*PORT_RANGE)
            if _free(port, "0.0.0.0") and _free(port, "127.0.0.1"):
                break
        else:  # the whole range is busy: any port the system gives
            with socket.socket() as sock:
                sock.bind(("0.0.0.0", 0))
                port = sock.getsockname()[1]
        if kept is not None:
            self.port_notice = (
                f"Port {kept} was taken by another program, so this computer now uses port {port}: the invite "
                f"changed, so share the new one (and forward port {port} instead if you forwarded {kept})."
            )
        return port


def lan_addresses() -> list[str]:
    """This computer's IPv4 addresses other computers could dial (no loopback, no link-local)."""
    found = []
    with contextlib.suppress(Exception):
        for addrs in psutil.net_if_addrs().values():
            for addr in addrs:
                if addr.family != socket.AF_INET:
                    continue
                ip = ipaddress.ip_address(addr.address)
                if not (ip.is_loopback or ip.is_link_local) and addr.address not in found:
                    found.append(addr.address)
    return found


def is_public(address: str) -> bool:
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(address)
        return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip in _CGNAT)
    return False


_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def sharing_status(
    choice_others: bool,
    port: int | None,
    addresses: list[str],
    reachability_state: str,
    nat_port_map: bool,
    port_notice: str | None,
    relay_names: list[str] = (),
    reachable_names: list[str] = (),
) -> m.Sharing:
    """What the window says next to the invite: what the choice means, who can reach this computer (and
    through whose computer, when relayed), and which members people outside can reach directly."""
    if not choice_others:
        return m.Sharing(
            choice="local",
            port=port,
            lan_addresses=addresses,
            sentence="This computer only: the swarm listens on this computer and nobody else can join it.",
            outside="no",
            outside_sentence="Other computers cannot join: choose Let others join to invite friends.",
            fixes=[],
            port_notice=port_notice,
        )
    lan = next((a for a in addresses if not is_public(a)), addresses[0] if addresses else None)
    sentence = f"Let others join: other computers connect to this one on port {port}."
    where = f" ({lan})" if lan else ""
    forward = (
        f"Forward TCP port {port} on your router to this computer{where}, then enter the router's public "
        "address in Settings, next to Let others join."
    )
    fixes = [forward]
    if not nat_port_map:
        fixes.append("Or switch on 'Ask the router to open the port (NAT-PMP/UPnP)' if your router supports it.")
    fixes.append("Or join a member who is reachable from outside (paste their invite) and share their invite.")
    public = [a for a in addresses if is_public(a)]
    reachable = list(reachable_names)
    if reachability_state == "direct" or (reachability_state == "unknown" and public):
        outside, line, fixes = "yes", "People outside this network can reach this computer directly.", []
        reachable = ["this computer", *reachable]
    elif reachability_state == "relay":
        outside = "relay"
        through = f"{_names(relay_names)}'s computer (a relay, slower)" if relay_names else "a relay (slower)"
        line = f"People outside this network reach this computer through {through}: invites work."
    elif reachability_state in ("unknown", "unreachable"):
        outside = "no"
        where = f" (its address {lan} is on your home network)" if lan else ""
        line = (
            "People outside this network probably cannot reach this computer: it is behind a router"
            f"{where}; computers on the same network can join."
        )
    else:
        outside, line = "unknown", "Checking whether people outside this network can reach this computer..."
    return m.Sharing(
        choice="others",
        port=port,
        lan_addresses=addresses,
        sentence=sentence,
        outside=outside,
        outside_sentence=line,
        fixes=fixes,
        port_notice=port_notice,
        reachable_members=reachable,
    )


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"


def probe_addresses(maddrs: list[str], timeout: float = 4.0) -> tuple[set[str], list[str]]:
    """Which addresses accept a TCP connection (all tried at once), and the host:port list tried."""
    from concurrent.futures import ThreadPoolExecutor

    from corolla.node.invites import dial_targets

    targets = {maddr: dial_targets(maddr) for maddr in maddrs}
    tried = list(dict.fromkeys(f"{t[0]}:{t[1]}" for t in targets.values() if t))

    def answers(target: tuple[str, int] | None) -> bool:
        if target is None:
            return False
        try:
            with socket.create_connection(target, timeout=timeout):
                return True
        except OSError:
            return False

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(targets)))) as pool:
        results = dict(zip(targets, pool.map(answers, targets.values()), strict=True))
    return {maddr for maddr, ok in results.items() if ok}, tried
