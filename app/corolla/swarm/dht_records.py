"""Reading and writing Petals' DHT records: per-block server infos and the model index.

Shared by the block server (announcing, choosing blocks) and the client (routing, swarm health).

Anyone can store a record under any block, so a record is believed only as far as it proves itself:
a server's span is made of the blocks under which it actually announced (a record under block 0
claiming blocks 0..10^9 gives its peer block 0 only), every number is clamped to a sane range, each
block keeps at most MAX_SERVERS_PER_BLOCK entries (a random sample when more are stored), and the
values themselves were decoded by the bounded decoder (protocol.loads, installed in the DHT process).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from hivemind.dht import DHT, DHTNode
from hivemind.utils import get_dht_time

from corolla.swarm import protocol
from corolla.swarm.protocol import ServerInfo, ServerState

logger = logging.getLogger(__name__)
MAX_SERVERS_PER_BLOCK = 32  # public Petals swarms have a handful; more is a flood, and routing work grows with it
MAX_DHT_LOOKUP_S = 30.0
MAX_PEER_ID_CHARS = 128
_sample = random.Random()  # a per-process sample: a flood cannot choose peer ids that always survive it


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


async def get_module_infos(
    dht: DHT, uids: list[str], timeout: float = MAX_DHT_LOOKUP_S, prefer: Collection[str] = ()
) -> list[ModuleInfo]:
    """Server infos of each uid; entries a stock Petals reader would reject are skipped here too.
    `prefer`: peers kept first when a block holds more entries than MAX_SERVERS_PER_BLOCK."""
    found = await asyncio.wait_for(dht.run_coroutine(partial(_get_many, uids=uids), return_future=True), timeout)
    return [read_module_info(uid, found.get(uid), prefer) for uid in uids]


def read_module_info(uid: str, record: Any, prefer: Collection[str] = ()) -> ModuleInfo:
    """One block's DHT record (a ValueWithExpiration of {subkey: ValueWithExpiration}) as a ModuleInfo;
    never raises: whatever in it is malformed is skipped. Of a flood, the peers in `prefer` (those
    the caller already reached) are kept, and a random sample of the others."""
    module = ModuleInfo(uid)
    value = getattr(record, "value", None)
    if not isinstance(value, dict):
        return module
    entries = list(value.items())
    if len(entries) > MAX_SERVERS_PER_BLOCK:
        known = [entry for entry in entries if entry[0] in prefer][:MAX_SERVERS_PER_BLOCK]
        others = [entry for entry in entries if entry[0] not in prefer]
        entries = known + _sample.sample(others, min(len(others), MAX_SERVERS_PER_BLOCK - len(known)))
    for peer_id, entry in entries:
        try:
            if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID_CHARS:
                raise ValueError("subkey is not a base58 peer id")
            module.servers[peer_id] = ServerInfo.from_tuple(getattr(entry, "value", None)).clamped()
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            logger.debug("skipping incorrect peer entry for %s: %s", protocol.shorten(uid), protocol.shorten(str(exc)))
    return module


def compute_spans(module_infos: list[ModuleInfo], min_state: ServerState) -> dict[str, RemoteSpan]:
    """Each server's span over the queried blocks (indices relative to the list).

    Unlike Petals, which stretches a span to the record's own start_block/end_block claim, a span here
    is the longest run of consecutive queried blocks under which the peer announced itself in its best
    state, cut to its declared [start_block, end_block) when it declares one. A peer's claims about
    blocks it did not announce under are ignored."""
    offset = 0
    if module_infos:
        try:
            offset = protocol.parse_uid(module_infos[0].uid)[1]
        except ValueError:
            offset = 0
    announced: dict[str, dict[int, ServerInfo]] = {}
    for index, module in enumerate(module_infos):
        for peer_id, info in module.servers.items():
            if info.state >= min_state:
                announced.setdefault(peer_id, {})[index] = info
    spans: dict[str, RemoteSpan] = {}
    for peer_id, by_index in sorted(announced.items()):
        best = max(info.state for info in by_index.values())
        indices = sorted(i for i, info in by_index.items() if info.state == best)
        start, end = _longest_run(indices)
        first = by_index[start]
        if first.start_block is not None and first.end_block is not None:
            start = max(start, first.start_block - offset)
            end = min(end, first.end_block - offset)
        if start < end:
            spans[peer_id] = RemoteSpan(peer_id, start, end, by_index[start])
    return spans


def _longest_run(indices: list[int]) -> tuple[int, int]:
    """[start, end) of the longest run of consecutive numbers in sorted `indices` (the first if tied)."""
    best = run = (indices[0], indices[0] + 1)
    for index in indices[1:]:
        run = (run[0], index + 1) if index == run[1] else (index, index + 1)
        if run[1] - run[0] > best[1] - best[0]:
            best = run
    return best
