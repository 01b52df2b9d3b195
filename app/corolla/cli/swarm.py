"""`corolla swarm`: the swarm's health, private swarms on this network, and spot checks through the node."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

from corolla.api import routes
from corolla.api.client import NodeError
from corolla.cli.common import node_call


def cmd_swarm(args: argparse.Namespace) -> int:
    from corolla.swarm.client.client_loop import ClientLoop
    from corolla.swarm.client.health import format_health, read_swarm_health
    from corolla.swarm.peers import start_dht

    if args.action == ["lan"]:
        return _swarm_lan(args.json)
    if args.action:
        return _swarm_check(args.action)
    if not args.initial_peers:
        print("corolla: error: the following arguments are required: --initial-peers", file=sys.stderr)
        return 2
    extra = {}
    for item in args.model or []:
        prefix, _, blocks = item.rpartition(":")
        if not prefix or not blocks.isdigit():
            print(f"corolla: error: --model takes PREFIX:NUM_BLOCKS, got {item!r}", file=sys.stderr)
            return 2
        extra[prefix] = int(blocks)
    dht = start_dht(args.initial_peers, client_mode=True, use_relay=not args.no_relay, auto_nat=not args.no_auto_nat)
    loop = ClientLoop()
    p2p = None
    try:
        p2p = loop.run(dht.replicate_p2p(), timeout=60)
        models = loop.run(read_swarm_health(dht, p2p, extra), timeout=120)
        flagged = _flagged_servers()
        if args.json:
            print(json.dumps([m.to_dict() for m in models], indent=2))
        else:
            print(format_health(models, flagged))
        return 0
    finally:
        if p2p is not None:
            with contextlib.suppress(Exception):
                loop.run(p2p.shutdown(), timeout=10)
        loop.stop()
        dht.shutdown()


def _flagged_servers() -> dict[str, dict]:
    """Servers this computer's node caught returning wrong results (its database; none if no node ran)."""
    from corolla.node.paths import NodePaths

    path = NodePaths.default().database
    if not path.exists():
        return {}
    try:
        from corolla.node.db import Database

        db = Database(path)
        try:
            return db.flagged_servers()
        finally:
            db.close()
    except Exception:  # a database another version wrote, or locked: the health view still works
        return {}


LAN_LISTEN_S = 3.0  # mDNS answers to a fresh query arrive within about a second


def _swarm_lan(as_json: bool) -> int:
    """`corolla swarm lan`: listen a few seconds for private swarms announced on this network."""
    from corolla.node.lan_discovery import LanDiscovery

    try:
        lan = LanDiscovery()
    except OSError as exc:
        print(f"corolla: cannot listen on the local network: {exc}", file=sys.stderr)
        return 1
    try:
        time.sleep(LAN_LISTEN_S)
        swarms = lan.swarms()
    finally:
        lan.close()
    if as_json:
        print(json.dumps([s.to_dict() for s in swarms], indent=2))
    elif not swarms:
        print("No Corolla swarm is announced on this network.")
    else:
        for swarm in swarms:
            print(f"{swarm.name}: {swarm.model} ({len(swarm.peers)} address(es))\n  join: {swarm.invite}")
    return 0


def _swarm_check(action: list[str]) -> int:
    """`corolla swarm check PEER`: the running node checks one server on purpose."""
    if len(action) != 2 or action[0] != "check":
        print("corolla: error: usage: corolla swarm check PEER_ID", file=sys.stderr)
        return 2
    try:
        result = node_call("POST", routes.SWARM_CHECK, {"peer_id": action[1]}, timeout=200)
    except NodeError as exc:
        print(f"corolla: {exc}", file=sys.stderr)
        return 1
    compared = ", ".join(result.get("compared_with") or []) or "nothing"
    print(f"{result['state']}: {result['detail']} (compared with {compared})")
    return 0 if result["state"] != "flagged" else 3
