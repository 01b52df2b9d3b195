"""Client settings; the defaults follow Petals' ClientConfig where one exists."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list)
    dht_prefix: str | None = None
    allowed_servers: list[str] | None = None  # base58 peer ids; None: any
    blocked_servers: list[str] = field(default_factory=list)
    connect_timeout: float = 5.0
    request_timeout: float = 30.0  # per step, at most; a stalling server is hedged long before (speed.py)
    # A step is overdue after this floor plus 4x the server's expected step time (measured here, else
    # announced); an overdue step is sent to another server of the same blocks too (hedged).
    step_deadline_floor: float = 3.0
    hedge: bool = True  # False: an overdue step is a failure of its server (re-route and replay) instead
    update_period: float = 60.0
    max_retries: int = 8  # per step; then the error propagates (never an endless loop)
    min_backoff: float = 0.5
    max_backoff: float = 10.0
    ban_timeout: float = 15.0  # first ban; doubles with each further failure
    ping_timeout: float = 2.0
    # Share of a server's steps (after its first ones) re-run on another server to catch wrong results;
    # 0 turns spot checks off. See verification.py and benchmarks/verification_overhead.py.
    spot_check_rate: float = 0.1
    # Ask servers to push each step's output to the next server: True on every hop, False never, None
    # where the measured round trips say it pays (route_choice.py).
    use_server_to_server: bool | None = None
    # Blocks run by this client itself at each end of the model (local_edges.py): no server receives
    # token embeddings or final states. Costs 2k blocks of compute and memory here; hides little.
    local_edge_blocks: int = 0
    # Greedy generation drafts tokens by prompt lookup (speculative.py) where it pays (route_choice.py).
    speculative: bool = True
    # Steps to Corolla servers go over a TCP connection of the client's own where the server can be
    # reached that way (direct_link.py), else through p2pd.
    direct_links: bool = True
    # Loopback-only peers (tests, the private demo swarm): no relays, no AutoNAT.
    use_relay: bool = True
    auto_nat: bool = True
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
