"""Contribution counters of a running server, published as a JSON file a parent process can read.

The file is replaced atomically (write to a temporary file, then rename), so a reader never sees a
half-written snapshot; `read_stats` is what the node uses.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The pid a server must not outlive (its starter's), in its environment; here so that the node reads it
# without importing the server (torch).
PARENT_PID_ENV = "COROLLA_PARENT_PID"


@dataclass
class ServerStats:
    started_at: float = field(default_factory=time.time)
    state: str = "starting"
    state_reason: str = ""
    model: str = ""
    dht_prefix: str = ""
    start_block: int | None = None
    end_block: int | None = None
    peer_id: str = ""
    visible_maddrs: list[str] = field(default_factory=list)
    using_relay: bool = False
    reachability: dict[str, Any] = field(default_factory=dict)  # reachability.Reachability, as a dict
    # Directly reachable members learned from the swarm's records (relays.reachable_members): the node
    # keeps them as extra bootstrap peers and relays.
    reachable_members: list[str] = field(default_factory=list)
    member_names: dict[str, str] = field(default_factory=dict)  # their public names, by peer id
    throughput: float = 0.0
    inference_rps: float | None = None
    forward_rps: float | None = None
    torch_dtype: str = ""
    quant_type: str = "none"
    cache_bytes_total: int = 0
    cache_bytes_left: int = 0
    span_bytes: int = 0
    tokens_processed: int = 0
    inference_steps: int = 0
    sessions_opened: int = 0
    sessions_active: int = 0
    forward_requests: int = 0
    backward_requests: int = 0
    backward_graphs_reused: int = 0  # backward passes that reused their forward's graph (no re-run)
    requests_refused: int = 0
    requests_turned_away: int = 0  # unread: the peer had run up too many refusals
    requests_held: int = 0  # of those, held a while before the answer (refusals.py)
    pushes_sent: int = 0  # step outputs pushed to the next server of a chain
    pushes_received: int = 0
    steps_from_pushes: int = 0  # steps computed from a pushed copy (it arrived before the client's)
    bytes_in: int = 0
    bytes_out: int = 0
    # Continuous batching (step_batcher.py): token steps, the forwards that ran them, how many of those
    # carried several sessions, and how many sessions each forward carried (bucketed).
    token_steps: int = 0
    step_forwards: int = 0
    joint_forwards: int = 0
    batch_sizes: dict[str, int] = field(default_factory=dict)
    sessions_peak: int = 0  # the most inference sessions open at once
    num_threads: int = 0  # torch's intra-op threads for the blocks
    omp_wait_policy: str = ""  # OMP_WAIT_POLICY as the server started (cli.py sets PASSIVE by default)

    def snapshot(self) -> dict[str, Any]:
        data = asdict(self)
        data["uptime_s"] = round(time.time() - self.started_at, 3)
        data["updated_at"] = time.time()
        return data

    def write(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, path)


def read_stats(path: str | os.PathLike) -> dict[str, Any] | None:
    """The latest snapshot, or None if the server has not written one yet."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
