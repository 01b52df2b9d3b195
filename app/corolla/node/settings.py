"""The node's settings, one typed object, persisted in SQLite; and the contribution policy."""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Petals' public swarm (protocol doc §5.8).
PUBLIC_INITIAL_PEERS = [
    "/dns/bootstrap1.petals.dev/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY",
    "/dns/bootstrap2.petals.dev/tcp/31338/p2p/QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5",
]
PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,128}$")  # base58; the node checks the multihash itself
_WINDOW = re.compile(r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    swarm: Literal["private", "public", "custom"] = "private"
    custom_peers: list[str] = Field(default_factory=list, max_length=64)
    model: str | None = Field(None, max_length=1024, description="hub repo id or local folder; None: the demo")
    dht_prefix: str | None = Field(None, max_length=256)
    blocks: str | None = Field(None, pattern=r"^\d{1,5}:\d{1,5}$")
    num_blocks: int | None = Field(None, ge=1, le=100000)
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    quant_type: Literal["none", "int8", "nf4"] = "none"
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")
    memory_cap_gib: float | None = Field(None, gt=0, le=4096)
    public_name: str | None = Field(None, max_length=128)
    contribute: bool = True
    only_when_idle: bool = False
    allow_on_battery: bool = False  # as BOINC: a laptop on battery does not serve unless asked to
    # The block server's share of the processor: its compute threads are this share of the cores (a
    # duty cycle, as BOINC's CPU-time cap is, would stall every session mid-step, adding latency for
    # the swarm's users; fewer threads make each step slower but never stop it).
    cpu_percent: int = Field(100, ge=10, le=100, description="use at most this share of the processor cores")
    time_window: str | None = Field(None, description="HH:MM-HH:MM, local time; may wrap midnight")
    # "Let others join" (True) or "This computer only" (False): whether the private swarm listens beyond
    # loopback (on every interface, at swarm_port) and shows an invite.
    listen_on_lan: bool = False
    # The TCP port of this computer's swarm peer, chosen once (on first start) and kept, so that invites
    # and a forwarded router port stay valid across pauses, restarts and reboots.
    swarm_port: int | None = Field(None, ge=1024, le=65535)
    # Ask the home router to forward swarm_port (NAT-PMP/UPnP); off unless the user switches it on.
    nat_port_map: bool = False
    # The router's public IPv4 address, where the user forwarded swarm_port to this computer by hand:
    # announced (with the LAN addresses) and put first in the invite.
    public_address: str | None = Field(None, pattern=r"^(\d{1,3}\.){3}\d{1,3}$")
    # Swarms on this network (mDNS): off, nothing is announced and nothing listens. On, the node lists
    # the swarms its neighbours announce, and announces its own private swarm when that listens on
    # the LAN (never the public swarm).
    lan_discovery: bool = False
    # Who may receive the hidden states of a new chat (each chat keeps its own choice): "any" server,
    # "members" of the private swarms this node created or joined, only the "peers" in trusted_peers,
    # or this computer's own server ("local").
    default_privacy: Literal["any", "members", "peers", "local"] = "any"
    trusted_peers: list[str] = Field(default_factory=list, max_length=1024, description="peer ids")
    # Blocks the node's swarm client runs itself at each end of the model (swarm/client/local_edges.py):
    # no server receives token embeddings or final states. It hides little (README "Who can read my
    # chat"); the cost is 2k blocks of compute per token here. 0: the swarm runs every block.
    chat_local_blocks: int = Field(0, ge=0, le=32, description="blocks run on this computer at each end")
    # Peer ids of the servers of private swarms this node joined (from their invites): members.
    swarm_members: list[str] = Field(default_factory=list, max_length=1024)
    # Addresses of the members others can dial, learned from the swarm (each such server announces its
    # own): extra bootstrap peers and relays next to custom_peers, so the swarm outlives the member whose
    # invite this node joined with. Newest first; kept across restarts.
    learned_peers: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("trusted_peers", "swarm_members")
    @classmethod
    def _check_peer_ids(cls, value: list[str]) -> list[str]:
        for peer in value:
            if not PEER_ID.match(peer):
                raise ValueError(f"{peer[:80]!r} is not a peer id")
        return value

    @field_validator("time_window")
    @classmethod
    def _check_window(cls, value: str | None) -> str | None:
        if value is not None and not _WINDOW.match(value):
            raise ValueError("time_window must look like 22:00-07:00")
        return value

    @field_validator("custom_peers", "learned_peers")
    @classmethod
    def _check_peers(cls, value: list[str]) -> list[str]:
        for peer in value:
            if not peer.startswith("/") or "/p2p/" not in peer or len(peer) > 512:
                raise ValueError(f"{peer!r} is not a multiaddr ending in /p2p/<peer id>")
        return value


def contribution_allowed(
    settings: Settings, now: dt.datetime, cpu_busy_percent: float, on_battery: bool
) -> tuple[bool, str]:
    """Whether the block server should run now, and why not. Pure: the node feeds it measurements."""
    if not settings.contribute:
        return False, "contribution is switched off"
    if on_battery and not settings.allow_on_battery:
        return False, "paused: the computer runs on battery"
    if settings.time_window:
        start, end = (dt.time.fromisoformat(part) for part in settings.time_window.split("-"))
        current = now.time()
        inside = start <= current < end if start <= end else (current >= start or current < end)
        if not inside:
            return False, f"paused: outside the daily window {settings.time_window}"
    if settings.only_when_idle and cpu_busy_percent > 50.0:
        return False, "paused: the computer is busy"
    return True, ""
