"""The swarm's health per model, read from the DHT: coverage and every server's state, as the Petals
health monitor computes it (all states, including OFFLINE records that have not expired)."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass, field

from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from corolla.swarm import protocol
from corolla.swarm.dht_records import compute_spans, get_module_infos
from corolla.swarm.protocol import ServerState


@dataclass
class ServerHealth:
    peer_id: str
    state: str
    start_block: int
    end_block: int
    throughput: float
    inference_rps: float | None
    version: str | None
    corolla_version: str | None
    using_relay: bool | None
    cache_tokens_left: int | None
    public_name: str | None
    torch_dtype: str | None
    quant_type: str | None
    ping_ms: float | None = None
    # What one new session could hold, in tokens (cache_tokens_left counts keys and values of every
    # block apart, as Petals announces it). The text view and the JSON both show this number.
    free_cache_tokens: int | None = None


@dataclass
class ModelHealth:
    dht_prefix: str
    num_blocks: int
    repository: str | None
    servers: list[ServerHealth] = field(default_factory=list)
    online_per_block: list[int] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return bool(self.online_per_block) and min(self.online_per_block) > 0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "healthy": self.healthy,
            "missing_blocks": [i for i, n in enumerate(self.online_per_block) if n == 0],
        }


async def _ping(p2p: P2P, peer_id: str, timeout: float) -> float | None:
    started = time.perf_counter()
    try:
        stub = protocol.server_stub(p2p, PeerID.from_base58(peer_id))
        await stub.rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=timeout)
    except Exception as exc:
        if "protocol not supported" not in str(exc):  # a relay-only peer still answers this way
            return None
    return (time.perf_counter() - started) * 1000


async def read_models_index(dht: DHT) -> dict[str, dict]:
    record = await dht.get(protocol.MODELS_INDEX_KEY, latest=True, return_future=True)
    models = {}
    if record is not None and isinstance(record.value, dict):
        for prefix, entry in record.value.items():
            value = entry.value
            if isinstance(prefix, str) and isinstance(value, dict) and type(value.get("num_blocks")) is int:
                models[prefix] = value
    return models


async def read_swarm_health(
    dht: DHT, p2p: P2P, extra_models: dict[str, int] | None = None, ping_timeout: float = 2.0
) -> list[ModelHealth]:
    index = await read_models_index(dht)
    for prefix, blocks in (extra_models or {}).items():
        index.setdefault(prefix, {"num_blocks": blocks, "repository": None})
    report = []
    for prefix, entry in sorted(index.items()):
        blocks = min(int(entry["num_blocks"]), protocol.MAX_CHAIN_LENGTH)
        infos = await get_module_infos(dht, [protocol.make_uid(prefix, i) for i in range(blocks)])
        model = ModelHealth(prefix, blocks, entry.get("repository"))
        model.online_per_block = [sum(1 for s in m.servers.values() if s.state == ServerState.ONLINE) for m in infos]
        for peer, span in sorted(compute_spans(infos, ServerState.OFFLINE).items(), key=lambda kv: kv[1].start):
            info = span.server_info
            model.servers.append(
                ServerHealth(
                    peer_id=peer,
                    state=ServerState(info.state).name,
                    start_block=span.start,
                    end_block=span.end,
                    throughput=info.throughput,
                    inference_rps=info.inference_rps,
                    version=info.version,
                    corolla_version=info.extra.get("corolla_version"),
                    using_relay=info.using_relay,
                    cache_tokens_left=info.cache_tokens_left,
                    public_name=info.public_name,
                    torch_dtype=info.torch_dtype,
                    quant_type=info.quant_type,
                    free_cache_tokens=_free_session_tokens(info.cache_tokens_left, span.end - span.start),
                )
            )
        pings = await asyncio.gather(
            *(_ping(p2p, s.peer_id, ping_timeout) for s in model.servers if s.state != "OFFLINE")
        )
        for server, ping in zip([s for s in model.servers if s.state != "OFFLINE"], pings, strict=True):
            server.ping_ms = None if ping is None or not math.isfinite(ping) else round(ping, 2)
        report.append(model)
    return report


def _free_session_tokens(cache_tokens_left: int | None, num_blocks: int) -> int | None:
    if cache_tokens_left is None:
        return None
    return int(cache_tokens_left) // max(2 * num_blocks, 1)


def format_health(models: list[ModelHealth], flagged: dict[str, dict] | None = None) -> str:
    """`flagged`: peer id -> evidence of servers caught returning wrong results (the node's record)."""
    flagged = flagged or {}
    if not models:
        return "No models are announced in this swarm."
    lines = []
    for model in models:
        state = "healthy" if model.healthy else "BROKEN (some blocks have no online server)"
        lines.append(f"{model.dht_prefix}: {model.num_blocks} blocks, {state}")
        bar = "".join("·" if n == 0 else str(min(n, 9)) for n in model.online_per_block)
        lines.append(f"  coverage (online servers per block): {bar}")
        for s in model.servers:
            free = "?" if s.free_cache_tokens is None else str(s.free_cache_tokens)
            software = f"corolla {s.corolla_version}" if s.corolla_version else f"petals {s.version or '?'}"
            link = "relay" if s.using_relay else "direct"
            ping = "-" if s.ping_ms is None else f"{s.ping_ms:.1f} ms"
            name = f" {s.public_name}" if s.public_name else ""
            lines.append(
                f"  {s.state:<7} {s.start_block:>4}:{s.end_block:<4} …{s.peer_id[-8:]}{name}  "
                f"{s.throughput:.1f} tok/s  {software}  {link}  free cache {free} tok  ping {ping}"
                + ("  FLAGGED: returned wrong results" if s.peer_id in flagged else "")
            )
    if flagged:
        lines.append("Servers caught returning wrong results (never used by this computer):")
        for peer, evidence in flagged.items():
            lines.append(f"  …{peer[-8:]}  {evidence.get('dht_prefix') or '?'}: {evidence.get('detail', '')}")
    return "\n".join(lines)
