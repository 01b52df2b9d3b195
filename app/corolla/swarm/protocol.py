"""The Petals 2.x wire contract: DHT keys and values, uids, handler names, limits and error strings.

Stock peers validate DHT values with pydantic.v1 strict types and silently drop mistyped entries,
so every value written here has exact Python types (float throughput, int block indices, base58
peer id strings). Readers accept both tuples and lists where Petals does.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from enum import IntEnum

# hivemind tells streaming RPCs apart by `typing.AsyncIterator` annotations (not collections.abc's).
from typing import Any, AsyncIterator  # noqa: UP035

import msgpack
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from corolla.swarm import wire

wire.install()  # one socket write per stream message, same bytes (wire.py)

UID_DELIMITER = "."
CHAIN_DELIMITER = " "
MODELS_INDEX_KEY = "_petals.models"
HANDLER_CLASS_NAME = "TransformerConnectionHandler"  # part of every RPC's libp2p protocol id
# Reported in ServerInfo.version and rpc_info. Clients never gate on it (protocol doc §6.1).
PETALS_COMPAT_VERSION = "2.3.0.dev2"

# Defaults that match `petals.cli.run_server` (protocol doc §2.1, §1.6, §5.1).
UPDATE_PERIOD = 120.0
REQUEST_TIMEOUT = 180.0
SESSION_TIMEOUT = 1800.0
STEP_TIMEOUT = 300.0
MAX_ALLOC_TIMEOUT = 600.0
STREAM_CHUNK_BYTES = 4 * 1024 * 1024  # hivemind DEFAULT_MAX_MSG_SIZE

# Peer-controlled sizes that Petals does not cap but Corolla does.
MAX_METADATA_BYTES = 64 * 1024
MAX_CHAIN_LENGTH = 1024
MAX_OPEN_SESSIONS = 256
MAX_SESSION_ID_CHARS = 128  # session and step ids a peer sends
MAX_TENSORS_PER_REQUEST = 8
MAX_REQUEST_BYTES = 256 * 1024 * 1024
# Bounded decoding of peer-supplied msgpack (metadata, rpc_info replies, DHT values and RPCs).
MAX_MSGPACK_DEPTH = 32  # ext-type nesting (tuples, DHT dictionaries); arrays nest on msgpack's own stack
MAX_DHT_MSGPACK_BYTES = 8 * 1024 * 1024  # any msgpack the DHT process reads (p2pd caps messages at 4 MiB)
# What a DHT node stores for others: one value (a server's record is ~1 KiB), and all subkeys of one key
# together, so that a lookup's reply (hivemind asks for up to 16 keys at once) stays under p2pd's 4 MiB
# message cap: a key filled past that made every reply that carried it fail, and honest readers saw the
# key as empty.
MAX_DHT_VALUE_BYTES = 32 * 1024
MAX_DHT_KEY_BYTES = 192 * 1024
MAX_DHT_SUBKEYS = 1024  # per key: bounds the work of each store too (a block has tens of real servers)
MAX_LOGGED_CHARS = 96  # peer-supplied text echoed into logs and error replies is cut to this
MAX_ANNOUNCED_RPS = 1e6  # the fastest real servers announce ~1e4 tokens/s; anything above is a claim
MAX_ANNOUNCED_INT = 1 << 40  # blocks and cache tokens
MAX_NEXT_PINGS = 64
# Corolla-only ServerInfo key: the addresses of a directly reachable server, so that every member learns
# the swarm's bootstrap peers and relays from the swarm itself (not only from the invite it was given).
MEMBER_ADDRS_KEY = "corolla_addrs"
# Corolla servers only: pushes to another Corolla server on one long-lived stream (server/push_stream.py).
PUSH_STREAM_NAME = "CorollaPushStream.push_stream"
MAX_PUSH_BYTES = 2 * 1024 * 1024  # a pushed step's output: p2pd caps unary payloads (rpc_push) at 2 MiB
# A Corolla server's reply to a step it took from a push (the client's copy may then be held back:
# client/copies.py). Stock clients read no reply metadata; stock servers send none.
PUSHED_REPLY_METADATA = msgpack.packb({"pushed": True})
MAX_MEMBER_ADDRS = 8
MAX_MEMBER_ADDR_CHARS = 256


def shorten(text: Any, limit: int = MAX_LOGGED_CHARS) -> str:
    """A peer-supplied value as it may appear in a log line or an error reply: repr'd and cut."""
    shown = repr(text) if not isinstance(text, str) else text
    return shown if len(shown) <= limit else f"{shown[:limit]}…({len(shown)} chars)"


class DecodeError(ValueError):
    """Peer-supplied msgpack that is malformed, too large or nested too deeply."""


_TUPLE_EXT = 0x40
_decoding = threading.local()  # ext nesting depth of the decode running on this thread


def _ext_hook(code: int, data: bytes) -> Any:
    depth = getattr(_decoding, "depth", 0)
    if depth >= _decoding.max_depth:
        raise DecodeError(f"msgpack nested more than {_decoding.max_depth} levels deep")
    _decoding.depth = depth + 1
    try:
        if code == _TUPLE_EXT:
            return tuple(msgpack.unpackb(data, ext_hook=_ext_hook, raw=False))
        registered = MSGPackSerializer._ext_type_codes.get(code)
        if registered is not None:  # hivemind's own: DictionaryDHTValue (0x50), BatchTensorDescriptor (0x51)
            return registered.unpackb(data)  # re-enters `loads` below: the depth carries over
        return data  # unknown ext codes stay raw bytes, as hivemind leaves them
    finally:
        _decoding.depth = depth


def loads(raw: bytes, max_bytes: int = MAX_METADATA_BYTES, max_depth: int = MAX_MSGPACK_DEPTH) -> Any:
    """hivemind's MSGPackSerializer.loads, bounded: at most `max_bytes` of input, at most `max_depth`
    levels of ext types (hivemind recurses on the C stack for each nested tuple: ~200 levels in a 3 KB
    message crash the process). Every failure is a DecodeError."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected msgpack bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise DecodeError(f"msgpack of {len(raw)} bytes is over the limit of {max_bytes}")
    outer = getattr(_decoding, "max_depth", None)
    if outer is None:
        _decoding.max_depth, _decoding.depth = max_depth, 0
    try:
        return msgpack.unpackb(raw, ext_hook=_ext_hook, raw=False)
    except DecodeError:
        raise
    except RecursionError as exc:
        raise DecodeError("msgpack nested too deeply") from exc
    except Exception as exc:  # msgpack's own errors, and whatever a hostile ext payload makes unpackb raise
        raise DecodeError(f"invalid msgpack: {type(exc).__name__}: {shorten(str(exc))}") from exc
    finally:
        if outer is None:
            del _decoding.max_depth


def _bounded_serializer_loads(cls: type, buf: bytes) -> Any:
    return loads(buf, max_bytes=MAX_DHT_MSGPACK_BYTES)


def harden_msgpack() -> None:
    """Make hivemind decode with `loads` everywhere in this process and in processes it forks later,
    i.e. the DHT process, which decodes every value and RPC other peers send it with this function.
    Also make a DHT lookup skip the entries of a dictionary value that do not decode, instead of
    failing the whole key: one peer's poisoned subkey must not hide every server of a block."""
    from hivemind.dht import node as dht_node

    MSGPackSerializer.loads = classmethod(_bounded_serializer_loads)
    search = dht_node._SearchState
    if not getattr(search.finish_search, "_corolla", False):
        search.finish_search = _finish_search_skipping_undecodable(search.finish_search)
    _cap_dht_storage()


def _cap_dht_storage() -> None:
    """Make every DHT storage (and cache) in this process refuse a value over MAX_DHT_VALUE_BYTES, a new
    subkey past MAX_DHT_SUBKEYS, and a new or grown subkey that would take its key past
    MAX_DHT_KEY_BYTES. A full key keeps what it holds: its servers refresh their own entries at their
    size, so only growth past the caps is refused."""
    from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue

    if getattr(DHTLocalStorage.store_subkey, "_corolla", False):
        return
    store_subkey, store = DHTLocalStorage.store_subkey, DHTLocalStorage.store

    def capped_store_subkey(storage: Any, key: Any, subkey: Any, value: bytes, expiration_time: float) -> bool:
        if len(value) > MAX_DHT_VALUE_BYTES:
            return False
        found = storage.get(key)
        if found is not None and isinstance(found.value, DictionaryDHTValue):
            if subkey not in found.value and len(found.value) >= MAX_DHT_SUBKEYS:
                return False
            sizes = {k: len(entry.value) for k, entry in found.value.items()}
            before = sizes.get(subkey, 0)
            if len(value) > before and sum(sizes.values()) - before + len(value) > MAX_DHT_KEY_BYTES:
                return False
        return store_subkey(storage, key, subkey, value, expiration_time)

    def capped_store(storage: Any, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        if subkey is None and isinstance(value, (bytes, bytearray)) and len(value) > MAX_DHT_VALUE_BYTES:
            return False
        return store(storage, key, value, expiration_time, subkey)

    capped_store_subkey._corolla = True
    DHTLocalStorage.store_subkey, DHTLocalStorage.store = capped_store_subkey, capped_store


def _finish_search_skipping_undecodable(finish: Any) -> Any:
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.dht.validation import DHTRecord

    def decodable_value(state: Any, subkey: Any, value: bytes, expiration_time: float) -> bool:
        try:
            if state.record_validator is not None:  # as hivemind's finish_search does before decoding
                subkey_bytes = state.serializer.dumps(subkey)
                record = DHTRecord(state.key_id.to_bytes(), subkey_bytes, value, expiration_time)
                value = state.record_validator.strip_value(record)
            loads(value, max_bytes=MAX_DHT_MSGPACK_BYTES)
            return True
        except Exception:  # DecodeError, or a validator choking on a hostile record
            return False

    def finish_search(state: Any) -> None:
        # Every real DHT has a record validator (hivemind wraps even none in a CompositeValidator), so
        # this must not depend on there being none. The found value may be this node's own storage
        # object: the usable entries go into a copy, never deleted from what the storage holds.
        value = state.binary_value
        if isinstance(value, DictionaryDHTValue):
            items = list(value.items())
            usable = [(k, v) for k, v in items if decodable_value(state, k, v.value, v.expiration_time)]
            if len(usable) < len(items):
                kept = DictionaryDHTValue(value.maxsize)
                for subkey, entry in usable:
                    kept.store(subkey, entry.value, entry.expiration_time)
                state.binary_value = kept
        try:
            finish(state)
        except DecodeError:  # a plain value that does not decode: found nothing usable
            if not state.future.done():
                state.future.set_result(None)

    finish_search._corolla = True
    return finish_search


harden_msgpack()  # at import: every Corolla process that speaks to peers imports this module first


class ServerState(IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


def make_uid(dht_prefix: str, block: int) -> str:
    return f"{dht_prefix}{UID_DELIMITER}{block}"


def parse_uid(uid: str) -> tuple[str, int]:
    """`prefix.7` -> ("prefix", 7); anything else raises ValueError."""
    prefix, sep, index = uid.rpartition(UID_DELIMITER)
    if not sep or not prefix or UID_DELIMITER in prefix or not index.isdigit():
        raise ValueError(f"malformed module uid {uid!r}")
    return prefix, int(index)


def chain_uids(dht_prefix: str, start: int, end: int) -> str:
    return CHAIN_DELIMITER.join(make_uid(dht_prefix, i) for i in range(start, end))


def default_inference_max_length(config: Any) -> int:
    """Petals: 8192 for grouped-query attention models, 2048 otherwise (Mixtral counts as 2048)."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
    if getattr(config, "model_type", "") == "mixtral":
        return 2048
    return 8192 if heads // max(kv_heads, 1) > 1 else 2048


def _strict_float(value: Any, name: str, allow_inf: bool = False) -> float:
    if type(value) is not float or math.isnan(value) or (math.isinf(value) and not allow_inf) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return value


def _strict_int(value: Any, name: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


@dataclass
class ServerInfo:
    """The value a server stores under each of its block uids (protocol doc §1.4)."""

    state: ServerState
    throughput: float
    start_block: int | None = None
    end_block: int | None = None
    public_name: str | None = None
    version: str | None = None
    network_rps: float | None = None
    forward_rps: float | None = None
    inference_rps: float | None = None
    adapters: tuple[str, ...] = ()
    torch_dtype: str | None = None
    quant_type: str | None = None
    using_relay: bool | None = None
    cache_tokens_left: int | None = None
    next_pings: dict[str, float] | None = None
    # Corolla-only keys live here too; stock readers ignore unknown keys.
    extra: dict[str, Any] = field(default_factory=dict)

    _FLOATS = ("network_rps", "forward_rps", "inference_rps")
    _INTS = ("start_block", "end_block", "cache_tokens_left")

    def validate(self) -> ServerInfo:
        """Apply the strict rules stock readers apply; raises ValueError like they would."""
        self.state = ServerState(self.state)
        _strict_float(self.throughput, "throughput")
        for name in self._FLOATS:
            if getattr(self, name) is not None:
                _strict_float(getattr(self, name), name)
        for name in self._INTS:
            if getattr(self, name) is not None:
                _strict_int(getattr(self, name), name)
        if self.next_pings is not None:
            if not isinstance(self.next_pings, dict):
                raise ValueError("next_pings must be a map")
            for peer, rtt in self.next_pings.items():
                if not isinstance(peer, str):
                    raise ValueError("next_pings keys must be base58 strings")
                _strict_float(rtt, "next_pings value", allow_inf=True)
        if self.public_name is not None:
            self.public_name = str(self.public_name)
        return self

    def clamped(self) -> ServerInfo:
        """This info with every number a router or a display uses cut to a plausible range, and its
        free text cut short: a peer's record may claim anything (inference_rps=1e300, blocks 0..10^9)."""
        for name in ("throughput", *self._FLOATS):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, min(value, MAX_ANNOUNCED_RPS))
        for name in self._INTS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, min(value, MAX_ANNOUNCED_INT))
        if self.next_pings is not None:
            # A peer's claimed RTTs steer routes: at most MAX_NEXT_PINGS, each in [0, inf].
            pings = list(self.next_pings.items())[:MAX_NEXT_PINGS]
            self.next_pings = {
                peer[:MAX_LOGGED_CHARS]: max(rtt, 0.0) for peer, rtt in pings if rtt == rtt
            }  # rtt == rtt drops NaN
        for name in ("public_name", "version", "torch_dtype", "quant_type"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(value)[:MAX_LOGGED_CHARS])
        self.adapters = tuple(str(a)[:MAX_LOGGED_CHARS] for a in self.adapters[:16])
        # Unknown keys are for stock readers to ignore; Corolla reads only its own version and the
        # addresses a directly reachable member announces (a few short strings; invites.py checks each).
        version = self.extra.get("corolla_version")
        addrs = self.extra.get(MEMBER_ADDRS_KEY)
        self.extra = {"corolla_version": str(version)[:MAX_LOGGED_CHARS]} if version is not None else {}
        if isinstance(addrs, (list, tuple)):
            kept = [a for a in addrs[:MAX_MEMBER_ADDRS] if isinstance(a, str) and len(a) <= MAX_MEMBER_ADDR_CHARS]
            self.extra[MEMBER_ADDRS_KEY] = kept
        return self

    def to_tuple(self) -> tuple[int, float, dict[str, Any]]:
        self.validate()
        extra = {
            "start_block": self.start_block,
            "end_block": self.end_block,
            "public_name": self.public_name,
            "version": self.version,
            "network_rps": self.network_rps,
            "forward_rps": self.forward_rps,
            "inference_rps": self.inference_rps,
            "adapters": tuple(self.adapters),
            "torch_dtype": self.torch_dtype,
            "quant_type": self.quant_type,
            "using_relay": self.using_relay,
            "cache_tokens_left": self.cache_tokens_left,
            "next_pings": self.next_pings,
            **self.extra,
        }
        return (int(self.state), self.throughput, extra)

    @classmethod
    def from_tuple(cls, value: Any) -> ServerInfo:
        """Decode a DHT value; raises ValueError for entries a stock reader would skip."""
        if not isinstance(value, (tuple, list)) or len(value) < 2:
            raise ValueError(f"server info must be a (state, throughput, extra) sequence, got {type(value)}")
        state, throughput = value[0], value[1]
        if type(state) is not int or state not in {s.value for s in ServerState}:
            raise ValueError(f"invalid server state {state!r}")
        extra = value[2] if len(value) > 2 else {}
        if not isinstance(extra, dict):
            raise ValueError("server info extra must be a map")
        known = {k: v for k, v in extra.items() if k in cls.__dataclass_fields__ and k != "extra"}
        unknown = {k: v for k, v in extra.items() if k not in known}
        if "adapters" in known:
            known["adapters"] = tuple(known["adapters"] or ())
        info = cls(state=ServerState(state), throughput=throughput, **known, extra=unknown)
        return info.validate()


@dataclass(frozen=True)
class ModelInfo:
    num_blocks: int
    repository: str | None = None

    def to_dict(self) -> dict[str, Any]:
        _strict_int(self.num_blocks, "num_blocks")
        return {"num_blocks": self.num_blocks, "repository": self.repository}


# Error texts stock clients and chat.petals.dev match on (protocol doc §2.10).
# Corolla's training extension (forward_graphs.py): a forward reply's metadata carries this key (True)
# when the server kept the forward graph; a backward that then sends no inputs gets ERR_GRAPH_GONE
# back if the graph is gone by then, and the client sends the full request.
GRAPH_KEPT_KEY = "corolla_graph_kept"
ERR_GRAPH_GONE = "the forward graph of this backward request is not kept here: send its inputs"
# A backward request's metadata may ask for the input gradients of the first N positions only (prompt
# tuning: the token embeddings are frozen, the prompts come first); stock servers send them all.
GRAD_PREFIX_KEY = "corolla_grad_prefix"


def err_max_length_exceeded(prefix: int, current: int, max_length: int) -> str:
    return f"Maximum length exceeded: prefix {prefix} + current {current} exceeds pre-allocated maximum {max_length}"


def err_cannot_allocate(tokens: int, max_tokens: int) -> str:
    return f"Cannot allocate KV cache for {tokens} tokens, max = {max_tokens}"


def err_not_served(uid: str) -> str:
    return f"Remote peer does not serve {shorten(uid)}"


# --- the RPCs themselves ---------------------------------------------------------------------------
# hivemind derives each libp2p protocol id from the servicer class's name and the method name, and
# tells streaming RPCs apart by `typing.AsyncIterator` annotations. Clients build their stubs from
# this declaration, so they never import the server's handler (which implements the same names).
class TransformerConnectionHandler(ServicerBase):  # the name is on the wire: do not rename
    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertRequest]:  # Petals declares ExpertRequest here; same wire bytes
        raise NotImplementedError

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError


def server_stub(p2p: P2P, peer: PeerID) -> Any:
    """A stub for calling a block server's RPCs (Corolla's or stock Petals')."""
    return TransformerConnectionHandler.get_stub(p2p, peer)
