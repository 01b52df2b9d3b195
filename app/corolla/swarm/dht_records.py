"""Reading and writing Petals' DHT records: per-block server infos and the model index.

Shared by the block server (announcing, choosing blocks) and the client (routing, swarm health).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

from hivemind.dht import DHT, DHTNode
from hivemind.utils import get_dht_time

from corolla.swarm import protocol
from corolla.swarm.protocol import ServerInfo, ServerState

logger = logging.getLogger(__name__)


@dataclass
class ModuleInfo:
    """Who serves one block: {peer id (base58): ServerInfo}."""

    uid: str
    servers: dict[str, ServerInfo] = field(default_factory=dict)


@dataclass
class RemoteSpan:
    """A server's span, relative to the queried uid list (as Petals' compute_spans gives it)."""

    peer_id: str
    start: int
    end: int
    server_info: ServerInfo

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def state(self) -> ServerState:
        return self.server_info.state

    @property
    def throughput(self) -> float:
        return self.server_info.throughput


async def _store_server_info(
    dht: DHT, node: DHTNode, uids: list[str], peer_id: str, value: tuple, expiration_time: float
) -> dict:
    return await node.store_many(
        keys=uids,
        subkeys=[peer_id] * len(uids),
        values=[value] * len(uids),
        expiration_time=expiration_time,
        num_workers=min(len(uids), 32),
    )


async def declare_blocks(dht: DHT, uids: list[str], info: ServerInfo, expiration: float) -> None:
    """Store `info` under every uid, with this peer's id as the subkey."""
    peer_id = dht.peer_id.to_base58()
    value = info.to_tuple()
    await dht.run_coroutine(
        partial(
            _store_server_info, uids=uids, peer_id=peer_id, value=value, expiration_time=get_dht_time() + expiration
        ),
        return_future=True,
    )


async def declare_model(dht: DHT, dht_prefix: str, model_info: protocol.ModelInfo, expiration: float) -> None:
    if dht_prefix.startswith("_"):
        return  # Petals' convention for private models
    await dht.store(
        protocol.MODELS_INDEX_KEY,
        subkey=dht_prefix,
        value=model_info.to_dict(),
        expiration_time=get_dht_time() + expiration,
        return_future=True,
    )


async def _get_many(dht: DHT, node: DHTNode, uids: list[str]) -> dict:
    # sufficient_expiration_time=inf is what `latest=True` means: crawl for the freshest copy.
    return await node.get_many(uids, sufficient_expiration_time=float("inf"), num_workers=min(len(uids), 32))


async def get_module_infos(dht: DHT, uids: list[str]) -> list[ModuleInfo]:
    """Server infos of each uid; entries a stock Petals reader would reject are skipped here too."""
    found = await dht.run_coroutine(partial(_get_many, uids=uids), return_future=True)
    infos = []
    for uid in uids:
        module = ModuleInfo(uid)
        record = found.get(uid)
        if record is not None and isinstance(record.value, dict):
            for peer_id, entry in record.value.items():
                try:
                    if not isinstance(peer_id, str):
                        raise ValueError("subkey is not a base58 string")
                    module.servers[peer_id] = ServerInfo.from_tuple(entry.value)
                except (ValueError, TypeError) as exc:
                    logger.debug("skipping incorrect peer entry for %s from %s: %s", uid, peer_id, exc)
        infos.append(module)
    return infos


def compute_spans(module_infos: list[ModuleInfo], min_state: ServerState) -> dict[str, RemoteSpan]:
    """Each server's span over the queried blocks (indices relative to the list), as Petals computes it."""
    spans: dict[str, RemoteSpan] = {}
    offset = 0
    if module_infos:
        try:
            offset = protocol.parse_uid(module_infos[0].uid)[1]
        except ValueError:
            offset = 0
    for index, module in enumerate(module_infos):
        for peer_id, info in sorted(module.servers.items()):
            if info.state < min_state:
                continue
            span = spans.get(peer_id)
            if span is None or span.state < info.state:
                start, end = index, index + 1
                if info.start_block is not None and info.end_block is not None:
                    start = min(max(info.start_block - offset, 0), len(module_infos))
                    end = min(max(info.end_block - offset, 0), len(module_infos))
                spans[peer_id] = RemoteSpan(peer_id, start, end, info)
            elif span.state == info.state:
                span.end = max(span.end, index + 1)
    return spans
