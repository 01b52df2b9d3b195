"""A bootstrap peer: a full DHT node that welcomes peers, relays for NAT'd ones and answers reachability checks.

Run it on a machine others can dial (that is what a bootstrap peer is for), so it tells libp2p it is
public and serves relay reservations at once:

    python -m corolla.swarm.bootstrap --port 31337 [--public-ip IP] [--initial-peers MADDR ...]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from corolla.swarm.peers import start_dht
from corolla.swarm.reachability import ReachabilityProtocol


async def _serve(args: argparse.Namespace) -> int:
    announce = list(args.announce_maddrs)
    if args.public_ip:
        announce.append(f"/ip4/{args.public_ip}/tcp/{args.port}")
    dht = start_dht(
        args.initial_peers,
        host_maddrs=args.host_maddrs or [f"/ip4/0.0.0.0/tcp/{args.port}"],
        announce_maddrs=announce,
        identity_path=args.identity_path,
        use_relay=True,
        force_reachability="public",
    )
    service = ReachabilityProtocol()
    try:
        await service.attach(await dht.replicate_p2p())
        for maddr in dht.get_visible_maddrs():
            print(f"corolla: bootstrap peer; others join with --initial-peers {maddr}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        await service.detach()
        dht.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m corolla.swarm.bootstrap", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=31337)
    parser.add_argument("--host-maddrs", nargs="+", default=None, metavar="MADDR")
    parser.add_argument("--announce-maddrs", nargs="+", default=[], metavar="MADDR")
    parser.add_argument("--public-ip", default=None)
    parser.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR")
    parser.add_argument("--identity-path", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
