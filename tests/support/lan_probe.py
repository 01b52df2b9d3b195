"""LAN discovery probes, run inside a lab host's namespace (tests/test_lan_discovery.py).

announce NAME MODEL PREFIX MADDR...   Corolla's announcer: prints "announced", stays on the air
browse SECONDS                        Corolla's listener: prints the swarms it found as JSON
raw-listen SECONDS                    a plain socket on 224.0.0.251:5353: prints JSON counts of
                                      the mDNS packets that mention Corolla's service type
hostile COUNT ADDRESS                 a hostile neighbour: malformed records, then COUNT valid ones
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import time

from corolla.node.lan_discovery import SERVICE_TYPE, LanDiscovery

FAKE_PEER = "QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"


def announce(name: str, model: str, prefix: str, maddrs: list[str]) -> None:
    lan = LanDiscovery()
    try:
        assert lan.announce(name, model, prefix, maddrs)
        print("announced", flush=True)
        time.sleep(600)  # until the test stops it
    finally:
        lan.close()


def browse(seconds: float) -> None:
    lan = LanDiscovery()
    try:
        time.sleep(seconds)
        print(json.dumps([s.to_dict() for s in lan.swarms()]), flush=True)
    finally:
        lan.close()


def raw_listen(seconds: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", 5353))
    membership = struct.pack("4s4s", socket.inet_aton("224.0.0.251"), socket.inet_aton("0.0.0.0"))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    print("listening", flush=True)
    counts = {"packets": 0, "corolla": 0}
    label = SERVICE_TYPE.split(".")[0].encode()  # "_corolla", as a DNS label inside any packet
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(9000)
        except TimeoutError:
            break
        counts["packets"] += 1
        counts["corolla"] += label in data
    print(json.dumps(counts), flush=True)


async def hostile(count: int, address: str) -> None:
    from zeroconf import ServiceInfo
    from zeroconf.asyncio import AsyncZeroconf

    maddr = f"/ip4/{address}/tcp/31337/p2p/{FAKE_PEER}"
    extra = [f"k{i}" for i in range(40)]
    malformed = {
        "no-version": {"name": "x", "model": "m", "prefix": "p", "p0": maddr},
        "bad-maddr": {"v": "1", "name": "x", "model": "m", "prefix": "p", "p0": "/ip4/1.2.3.4/udp/1"},
        "loopback": {"v": "1", "name": "x", "model": "m", "prefix": "p", "p0": maddr.replace(address, "127.0.0.1")},
        "oversized": {"v": "1", "name": "x" * 200, "model": "m" * 240, "prefix": "p", "p0": maddr},
        "many-keys": {"v": "1", "name": "x", "model": "m", "prefix": "p", "p0": maddr, **dict.fromkeys(extra, "y")},
        "huge": {"v": "1", "name": "x", "model": "m", "prefix": "p", **{f"p{i}": "/" + "z" * 240 for i in range(10)}},
        "not-utf8": {b"v": b"1", b"name": b"\xff\xfe", b"model": b"m", b"prefix": b"p", b"p0": maddr.encode()},
    }
    records = [(f"bad {key}", props) for key, props in malformed.items()]
    records += [(f"flood {i}", {"v": "1", "name": f"flood {i}", "model": "m", "prefix": "p", "p0": maddr})
                for i in range(count)]  # fmt: skip
    azc = AsyncZeroconf(interfaces=[address])
    infos = [
        ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=31337, properties=props,
                    parsed_addresses=[address], server="hostile.local.")
        for name, props in records
    ]  # fmt: skip
    tasks = await asyncio.gather(*(azc.async_register_service(info) for info in infos))
    await asyncio.gather(*tasks)
    print("announced", flush=True)
    await asyncio.sleep(600)


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "announce":
        announce(args[0], args[1], args[2], args[3:])
    elif command == "browse":
        browse(float(args[0]))
    elif command == "raw-listen":
        raw_listen(float(args[0]))
    elif command == "hostile":
        asyncio.run(hostile(int(args[0]), args[1]))


if __name__ == "__main__":
    main()
