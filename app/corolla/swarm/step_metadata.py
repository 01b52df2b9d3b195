"""The typed metadata of Petals' block RPCs: the msgpack map in `ExpertRequest.metadata` (protocol doc §2.5).

A client builds one of these and encodes it once (`pack`); a server decodes the peer's map once
(`decode`), which bounds and type-checks every key it reads and keeps unknown keys aside, as Petals
ignores them. The encoded maps are those stock Petals servers and clients send and read: the same
keys, the same value types (float `points`, tuples as ext 0x40, nil `active_adapter` in a first step).

- `StepMetadata`: one message of an inference session (`rpc_inference`), and its pushed copy (`rpc_push`).
- `CallMetadata`: a forward or backward request (`rpc_forward`, `rpc_backward` and their streams).
- `ForwardReply`: the metadata of a Corolla server's forward reply (whether it kept the forward graph).

What only a server knows is checked where it is known: that an adapter is served, a chain's blocks, a
rollback position against the cache's length, `max_length` against the server's limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hivemind.utils import MSGPackSerializer

from corolla.swarm import protocol

NextServer = tuple[str, str, int, int]  # (peer_id_b58, session_id, start, end) of one downstream span
MAX_GRAPH_KEY_CHARS = 64  # Corolla's names of kept forward graphs (forward_graphs.py)
# Corolla's extensions; stock peers ignore them.
UPSTREAM_KEY = "corolla_upstream"
KEEP_GRAPH_KEY = "corolla_keep_graph"
GRAPH_KEY = "corolla_graph"


class MetadataError(ValueError):
    """A peer's metadata that this side refuses; the message says why (the server returns it to the peer)."""


def decode_map(raw: bytes) -> dict[str, Any]:
    """A peer's metadata bytes as a map: empty for none, bounded in size and depth (protocol.loads)."""
    if not raw:
        return {}
    if len(raw) > protocol.MAX_METADATA_BYTES:
        raise MetadataError(f"metadata is {len(raw)} bytes, more than the limit of {protocol.MAX_METADATA_BYTES}")
    try:
        metadata = protocol.loads(raw, max_bytes=protocol.MAX_METADATA_BYTES)
    except protocol.DecodeError as exc:
        raise MetadataError(f"metadata refused: {exc}") from exc
    if not isinstance(metadata, dict):
        raise MetadataError("metadata must be a msgpack map")
    return metadata


# --- reading one key ---------------------------------------------------------------------------------
def _short_id(value: Any, name: str) -> str | None:
    """A session or step id: a string of at most MAX_SESSION_ID_CHARS, or absent."""
    if value is not None and (not isinstance(value, str) or len(value) > protocol.MAX_SESSION_ID_CHARS):
        raise MetadataError(f"{name} must be a string of at most {protocol.MAX_SESSION_ID_CHARS} characters")
    return value


def _count(value: Any, name: str) -> int | None:
    if value is not None and (type(value) is not int or value < 0):
        raise MetadataError(f"{name} must be an int >= 0, got {protocol.shorten(value)}")
    return value


def _adapter(value: Any) -> str | None:
    """None or "" mean the base model (Petals); whether the server has the adapter is its own check."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise MetadataError(f"adapter {protocol.shorten(value)} not found")
    return value


def _points(value: Any) -> float | int | None:
    """Petals' spending points: read by no Corolla code, kept (when a number) for a pushed copy."""
    return value if type(value) in (int, float) else None


def _optional_id(value: Any, limit: int) -> str | None:
    """A Corolla extension's name: a malformed one is as good as none (it only enables an optimisation)."""
    return value if isinstance(value, str) and 0 < len(value) <= limit else None


def _next_server(entry: Any) -> NextServer:
    peer, session, start, end = entry  # raises for anything but a 4-sequence
    if not isinstance(peer, str) or len(peer) > protocol.MAX_SESSION_ID_CHARS:
        raise ValueError("bad peer id")
    if not isinstance(session, str) or len(session) > protocol.MAX_SESSION_ID_CHARS:
        raise ValueError("bad session id")
    if type(start) is not int or type(end) is not int or not 0 <= start < end <= start + protocol.MAX_CHAIN_LENGTH:
        raise ValueError("bad block range")
    return (peer, session, start, end)


def _next_servers(value: Any) -> tuple[NextServer, ...] | None:
    """The downstream chain to push to; a malformed one only disables the push, as it does in Petals."""
    if value is None or not isinstance(value, (list, tuple)) or len(value) > protocol.MAX_CHAIN_LENGTH:
        return None
    try:
        return tuple(_next_server(entry) for entry in value)
    except (TypeError, ValueError):
        return None


def _unknown(metadata: Mapping[str, Any], known: frozenset[str]) -> dict[str, Any]:
    return {key: value for key, value in metadata.items() if key not in known}


# --- inference steps ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepMetadata:
    """One rpc_inference message. The first of a session carries `max_length` (and, with it, the
    adapter, nil for none); later ones carry `start_from_position` and, for a push, `next_servers`."""

    session_id: str | None = None
    step_id: str | None = None
    points: float | int | None = 0.0
    args_structure: Any = None  # nested tuples naming the tensors (packing.unpack_args_kwargs checks it)
    start_from_position: int | None = None
    max_length: int | None = None  # first message only
    active_adapter: str | None = None  # sent with max_length
    alloc_timeout: float | None = None  # seconds to wait for cache memory; Petals clients never send it
    next_servers: tuple[NextServer, ...] | None = None  # the rest of the chain, for server-to-server push
    upstream: str | None = None  # Corolla: the server that pushes into this session
    pushed: bool = False  # set by the server that pushed this copy
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys: passed on in a pushed copy

    _KEYS = frozenset(
        {
            "session_id",
            "step_id",
            "points",
            "args_structure",
            "start_from_position",
            "max_length",
            "active_adapter",
            "alloc_timeout",
            "next_servers",
            UPSTREAM_KEY,
            "pushed",
        }
    )

    def encode(self) -> dict[str, Any]:
        """The msgpack map, in the order Petals' client writes it; absent (None) keys are left out."""
        data: dict[str, Any] = {}
        for key in ("session_id", "step_id", "points", "args_structure", "start_from_position", "max_length"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.max_length is not None or self.active_adapter is not None:
            data["active_adapter"] = self.active_adapter  # nil in a first step: the base model
        if self.alloc_timeout is not None:
            data["alloc_timeout"] = self.alloc_timeout
        if self.next_servers is not None:
            data["next_servers"] = list(self.next_servers)
        if self.upstream is not None:
            data[UPSTREAM_KEY] = self.upstream
        if self.pushed:
            data["pushed"] = True
        data.update(self.extra)
        return data

    def pack(self) -> bytes:
        return MSGPackSerializer.dumps(self.encode())

    @classmethod
    def decode(cls, raw: bytes) -> StepMetadata:
        """A peer's message: every key bounded and typed once; MetadataError for one a server refuses."""
        return cls.from_map(decode_map(raw))

    @classmethod
    def from_map(cls, metadata: Mapping[str, Any]) -> StepMetadata:
        get = metadata.get
        alloc_timeout = get("alloc_timeout")
        if alloc_timeout is not None and (type(alloc_timeout) not in (int, float) or not alloc_timeout >= 0):
            raise MetadataError("alloc_timeout must be a number >= 0")
        return cls(
            session_id=_short_id(get("session_id"), "session_id"),
            step_id=_short_id(get("step_id"), "step_id"),
            points=_points(get("points")),
            args_structure=get("args_structure"),
            start_from_position=_count(get("start_from_position"), "start_from_position"),
            max_length=_count(get("max_length"), "max_length"),
            active_adapter=_adapter(get("active_adapter")),
            alloc_timeout=None if alloc_timeout is None else float(alloc_timeout),
            next_servers=_next_servers(get("next_servers")),
            upstream=_optional_id(get(UPSTREAM_KEY), protocol.MAX_SESSION_ID_CHARS),
            pushed=get("pushed") is True,
            extra=_unknown(metadata, cls._KEYS),
        )

    def pushed_on(self, session_id: str, rest: tuple[NextServer, ...]) -> StepMetadata:
        """This step as a server pushes it to the next server of the chain: that server's session, the
        chain after it, marked as pushed (Petals' rpc_push)."""
        return dataclasses.replace(self, session_id=session_id, next_servers=rest, pushed=True)


# --- forward and backward ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CallMetadata:
    """A forward or backward request. The `keep_graph`, `graph` and `grad_prefix` keys are Corolla's
    training extensions (forward_graphs.py); stock servers ignore them."""

    args_structure: Any = None
    points: float | int | None = 0.0
    active_adapter: str | None = None
    keep_graph: str | None = None  # forward: keep this pass's graph under this name for the backward
    graph: str | None = None  # backward: the kept graph to backpropagate through
    grad_prefix: int | None = None  # backward: the input gradients of the first N positions only
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = frozenset(
        {"args_structure", "points", "active_adapter", KEEP_GRAPH_KEY, GRAPH_KEY, protocol.GRAD_PREFIX_KEY}
    )

    def encode(self) -> dict[str, Any]:
        """Petals' `{args_structure, points, active_adapter}` (the adapter nil for none), then Corolla's keys."""
        data: dict[str, Any] = {"args_structure": self.args_structure}
        if self.points is not None:
            data["points"] = self.points
        data["active_adapter"] = self.active_adapter
        if self.keep_graph is not None:
            data[KEEP_GRAPH_KEY] = self.keep_graph
        if self.grad_prefix is not None:
            data[protocol.GRAD_PREFIX_KEY] = self.grad_prefix
        if self.graph is not None:
            data[GRAPH_KEY] = self.graph
        data.update(self.extra)
        return data

    def pack(self) -> bytes:
        return MSGPackSerializer.dumps(self.encode())

    @classmethod
    def decode(cls, raw: bytes) -> CallMetadata:
        return cls.from_map(decode_map(raw))

    @classmethod
    def from_map(cls, metadata: Mapping[str, Any]) -> CallMetadata:
        get = metadata.get
        prefix = get(protocol.GRAD_PREFIX_KEY)
        if prefix is not None and not (type(prefix) is int and prefix >= 1):
            raise MetadataError(f"{protocol.GRAD_PREFIX_KEY} must be a positive int, got {protocol.shorten(prefix)}")
        return cls(
            args_structure=get("args_structure"),
            points=_points(get("points")),
            active_adapter=_adapter(get("active_adapter")),
            keep_graph=_optional_id(get(KEEP_GRAPH_KEY), MAX_GRAPH_KEY_CHARS),
            graph=_optional_id(get(GRAPH_KEY), MAX_GRAPH_KEY_CHARS),
            grad_prefix=prefix,
            extra=_unknown(metadata, cls._KEYS),
        )


@dataclass(frozen=True)
class ForwardReply:
    """A forward reply's metadata: a Corolla server says it kept the forward graph; stock servers send none."""

    graph_kept: bool = False

    def pack(self) -> bytes:
        return MSGPackSerializer.dumps({protocol.GRAPH_KEPT_KEY: True}) if self.graph_kept else b""

    @classmethod
    def decode(cls, raw: bytes) -> ForwardReply:
        """Lenient: a reply's metadata that does not decode counts as none."""
        try:
            metadata = decode_map(raw)
        except MetadataError:
            return cls()
        return cls(graph_kept=metadata.get(protocol.GRAPH_KEPT_KEY) is True)
