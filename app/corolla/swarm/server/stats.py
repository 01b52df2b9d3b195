"""Contribution counters of a running server, published as a JSON file a parent process can read.

The file is replaced atomically (write to a temporary file, then rename), so a reader never sees a
half-written snapshot. `read_stats` is what the node uses: the same `ServerStats`, typed, read back
once. Stdlib only, so the node reads it without importing the server (torch, hivemind).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The pid a server must not outlive (its starter's), in its environment; here so that the node reads it
# without importing the server (torch).
PARENT_PID_ENV = "COROLLA_PARENT_PID"


@dataclass
class Reachability:
    """Whether other peers can reach this server, as a person needs to know it (reachability.describe
    writes it; the node shows it as is)."""

    state: str  # "checking" | "direct" | "relay" | "unreachable" | "unknown" | "local"
    summary: str
    advice: str
    relay_addrs: list[str]
    checked_at: float
    relay_proven_at: float | None = None  # when a stranger last reached this computer through a relay

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Reachability | None:
        """As written in a snapshot; None for none yet (`{}`) or one that does not read as such."""
        if not isinstance(data, Mapping) or not isinstance(data.get("state"), str):
            return None
        addrs, proven = data.get("relay_addrs"), data.get("relay_proven_at")
        return cls(
            state=data["state"],
            summary=str(data.get("summary", "")),
            advice=str(data.get("advice", "")),
            relay_addrs=[str(a) for a in addrs] if isinstance(addrs, list) else [],
            checked_at=float(data["checked_at"]) if isinstance(data.get("checked_at"), (int, float)) else 0.0,
            relay_proven_at=float(proven) if isinstance(proven, (int, float)) else None,
        )


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
    reachability: Reachability | None = None  # None until the server has checked (`{}` in the file)
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
    lean_decode_steps: int = 0  # of those, run by the CPU's lean decode path (models/lean_decode.py)
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
    pushes_sent_on_stream: int = 0  # of pushes_sent: on a push stream to a Corolla server (push_stream.py)
    pushes_sent_direct: int = 0  # of those: on a direct link (direct_link.py), not through p2pd
    pushes_received_on_stream: int = 0  # of pushes_received: taken from a push stream
    steps_from_pushes: int = 0  # steps computed from a pushed copy (it arrived before the client's)
    duplicate_steps: int = 0  # a step's second copy (the push after the client's, or the other way): dropped
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
    # Set when a snapshot is written: what a reader of the file sees.
    uptime_s: float = 0.0
    updated_at: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        data = asdict(self)
        data["reachability"] = data["reachability"] or {}
        data["uptime_s"] = round(time.time() - self.started_at, 3)
        data["updated_at"] = time.time()
        return data

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> ServerStats:
        """A snapshot read back. A server of another version may write more or fewer keys: unknown ones
        are dropped, and a missing or mistyped one keeps its default."""
        stats = cls(started_at=0.0)
        for name, kind in _TYPES.items():
            if name not in data:
                continue
            if name == "reachability":
                stats.reachability = Reachability.from_dict(data[name])
                continue
            value = _read(data[name], kind)
            if value is not _MISFIT:
                setattr(stats, name, value)
        return stats

    def write(self, path: Path) -> None:
        write_snapshot(self.snapshot(), path)


class StatsFile:
    """The stats file a server keeps for the node: one writer at a time, and never an older snapshot over a
    newer one (the last state written at exit must not be replaced by a periodic write on its thread).
    Snapshots are ordered by when they were taken (`take`), not by their clock (coarse on some systems)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock, self._order, self._written = threading.Lock(), itertools.count(1), 0

    def take(self, stats: ServerStats) -> tuple[int, dict[str, Any]]:
        return next(self._order), stats.snapshot()

    def write(self, taken: tuple[int, dict[str, Any]]) -> None:
        order, snapshot = taken
        with self._lock:
            if order < self._written:
                return
            try:
                write_snapshot(snapshot, self.path)
                self._written = order
            except OSError:
                logger.warning("could not write stats to %s", self.path, exc_info=True)


def write_snapshot(snapshot: dict[str, Any], path: Path) -> None:
    """A snapshot written whole (a reader never sees half a file); safe on a thread of its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(snapshot))
    os.replace(tmp, path)


_MISFIT = object()


def _read(value: Any, kind: Any) -> Any:
    """A JSON value as a field of type `kind` (an int where a float goes: JSON has one kind of number),
    or _MISFIT."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    for option in options:
        base = typing.get_origin(option) or option
        if value is None and option is type(None):
            return None
        if base is float and type(value) in (int, float):
            return float(value)
        if base in (int, str, bool, list, dict) and type(value) is base:
            return value
    return _MISFIT


_TYPES = typing.get_type_hints(ServerStats)


def read_stats(path: str | os.PathLike) -> ServerStats | None:
    """The latest snapshot, or None if the server has not written one yet."""
    try:
        data = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return ServerStats.from_snapshot(data) if isinstance(data, dict) else None
