"""Runs in the stock Petals 2.2 reference venv: what a stock reader sees in the DHT (pydantic v1 strict).

Usage: python petals_dht_check.py INITIAL_PEER DHT_PREFIX NUM_BLOCKS
Prints one JSON line: {peer_id: {"state": name, "blocks": [...], "throughput": x}}.
"""

import json
import sys

import petalsref_nonat  # noqa: F401
from hivemind import DHT
from petals.utils.dht import get_remote_module_infos


def main():
    initial_peer, prefix, num_blocks = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dht = DHT(initial_peers=[initial_peer], client_mode=True, start=True)
    infos = get_remote_module_infos(dht, [f"{prefix}.{i}" for i in range(num_blocks)], latest=True)
    seen = {}
    for index, info in enumerate(infos):
        for peer, server in info.servers.items():
            entry = seen.setdefault(
                str(peer),
                {
                    "state": server.state.name,
                    "blocks": [],
                    "throughput": server.throughput,
                    "start_block": server.start_block,
                    "end_block": server.end_block,
                    "cache_tokens_left": server.cache_tokens_left,
                    "using_relay": server.using_relay,
                },
            )
            entry["blocks"].append(index)
    print(json.dumps(seen))
    dht.shutdown()


if __name__ == "__main__":
    main()
