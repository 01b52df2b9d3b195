"""Server lifecycle on a real swarm: automatic block choice and OFFLINE on shutdown."""

from __future__ import annotations

import time

import pytest

from corolla.swarm import protocol
from corolla.swarm.dht_records import get_module_infos
from corolla.testing.swarm import CorollaServer
from corolla.testing.wire import WireClient

PREFIX = "tiny-lifecycle"


def _states(client: WireClient, blocks: int) -> dict[str, dict[int, protocol.ServerState]]:
    infos = client.run(get_module_infos(client.dht, [protocol.make_uid(PREFIX, i) for i in range(blocks)]))
    states: dict[str, dict[int, protocol.ServerState]] = {}
    for index, module in enumerate(infos):
        for peer, info in module.servers.items():
            states.setdefault(peer, {})[index] = info.state
    return states


@pytest.mark.slow
def test_second_server_takes_the_uncovered_span_and_shutdown_announces_offline(tiny_models, tmp_path):
    model = tiny_models.get("llama")
    common = [
        "--dht-prefix",
        PREFIX,
        "--torch-dtype",
        "float32",
        "--throughput",
        "5",
        "--num-blocks",
        "3",
        "--mean-balance-check-period",
        "3600",
    ]
    first = CorollaServer(tmp_path, model, "--new-swarm", *common, name="first")
    second = None
    try:
        assert (first.wait_state("online")["start_block"], first.stats()["end_block"]) == (0, 3)
        second = CorollaServer(tmp_path, model, "--initial-peers", first.maddr, *common, name="second")
        stats = second.wait_state("online")
        assert (stats["start_block"], stats["end_block"]) == (3, 6)  # the weakest (uncovered) window
        with WireClient(first.maddr) as client:
            states = _states(client, 6)
            assert states[first.peer_id] == dict.fromkeys(range(3), protocol.ServerState.ONLINE)
            assert states[second.peer_id] == dict.fromkeys(range(3, 6), protocol.ServerState.ONLINE)
            second_peer = second.peer_id
            assert second.stop() == 0
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                states = _states(client, 6)
                if states.get(second_peer) == dict.fromkeys(range(3, 6), protocol.ServerState.OFFLINE):
                    break
                time.sleep(0.5)
            assert states[second_peer] == dict.fromkeys(range(3, 6), protocol.ServerState.OFFLINE)
            assert second.stats()["state"] == "offline"
    finally:
        if second is not None:
            second.stop()
        first.stop()
