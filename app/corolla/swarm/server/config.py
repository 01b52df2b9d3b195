"""Every setting of a block server (the `corolla serve` flags map onto these one to one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from corolla.swarm import protocol

# Set by whoever starts `corolla serve --exit-with-parent` to its own pid (see BlockServer's orphan watch);
# defined in stats.py, which the node reads without importing torch.
from corolla.swarm.server.stats import PARENT_PID_ENV  # noqa: F401


@dataclass
class ServerConfig:
    model: str
    # Swarm
    initial_peers: list[str] = field(default_factory=list)
    new_swarm: bool = False
    dht_prefix: str | None = None
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = field(default_factory=list)
    identity_path: str | None = None
    public_name: str | None = None
    nat_port_map: bool = False  # hivemind's default (True) probes the gateway with NAT-PMP/UPnP
    use_relay: bool = True
    use_auto_relay: bool = True
    auto_nat: bool = True
    reachability: str = "auto"  # "auto": ask peers whether they can dial us; "direct" or "relay": as told
    # Corolla clients that can reach this computer send their steps over a TCP connection of their own
    # (direct_link.py) instead of through both p2pd daemons; on this port (0: any free one)
    direct_links: bool = True
    direct_link_port: int = 0
    # Blocks
    blocks: tuple[int, int] | None = None  # explicit [start, end): no automatic choice, no rebalancing
    num_blocks: int | None = None
    balance_quality: float = 0.75
    mean_balance_check_period: float = 60.0
    mean_block_selection_delay: float = 2.5
    # Model
    device: str = "auto"
    torch_dtype: str = "auto"
    quant_type: str = "none"
    token: str | None = None
    revision: str | None = None
    cache_dir: str | None = None
    adapters: list[str] = field(default_factory=list)  # PEFT LoRA folders, announced by these names
    # Limits and timeouts
    inference_max_length: int | None = None  # None: Petals' default for the model (8192 or 2048)
    max_batch_size: int | None = None  # tokens per request; None: same rule
    attn_cache_tokens: int | None = None  # KV budget per block; None: 2x inference_max_length
    max_open_sessions: int = protocol.MAX_OPEN_SESSIONS
    max_alloc_timeout: float = protocol.MAX_ALLOC_TIMEOUT
    request_timeout: float = protocol.REQUEST_TIMEOUT
    session_timeout: float = protocol.SESSION_TIMEOUT
    step_timeout: float = protocol.STEP_TIMEOUT
    update_period: float = protocol.UPDATE_PERIOD
    # Throughput: a number to announce as is, "auto" (cached measurement) or "eval" (measure again)
    throughput: float | str = "auto"
    throughput_cache: Path | None = None
    # Counters for a parent process (JSON, rewritten atomically every second)
    stats_path: Path | None = None
    exit_with_parent: bool = False  # stop (announcing OFFLINE) when the process that started it dies
    num_threads: int | None = None

    @property
    def expiration(self) -> float:
        return max(2 * self.update_period, 3.0)
