"""Home networks, measured in the network lab (corolla/testing/netlab.py), all in one run:

1. Server start -> its blocks usable by a client behind another NAT: a Corolla server behind NAT vs a
   stock Petals 2.2 server behind NAT, same lab, same initial peers, same client (a Corolla client in
   home 2 that is already running and retries every second). Target: Corolla <= 0.5x.
   The lab's internet is public-looking (corolla/testing/netlab.py), so the stock server's libp2p AutoNAT
   finds it private and its auto-relay takes a relay, as on the real internet. `--relays N` adds N more
   relay-capable public peers (default 2, so four with the bootstrap and the first server): go-libp2p's
   auto-relay waits for four candidates or three minutes, and the real swarm has many more than four.
   `--with-stock-public` also times the stock server on the public segment (no relay needed).
2. Tokens/s of a 64-token greedy generation through the second span relayed (server behind NAT) vs the
   same server reachable directly (its router forwards the port; it announces --public-ip).
   `--delay-ms` puts a delaying forwarder in front of every public peer's address (bootstrap/relay and
   the first server), so both paths see the same per-link delay.

Usage (root; the lab needs network namespaces and iptables; about 4 minutes on 2 loaded cores):
    unshare -n sh -c 'ip link set lo up && PYTHONPATH=app .venv/bin/python benchmarks/netlab_relay.py'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corolla.testing import LAB_CLIENT
from corolla.testing.lab_swarm import (
    LAB_PORT,
    CorollaBootstrap,
    corolla_server,
    lab_maddr,
    public_relays,
    run_corolla_client,
    stock_server,
)
from corolla.testing.netlab import NetLab
from corolla.testing.swarm import make_reference_model, reference_python

PREFIX = "tiny-llama-hf"
COMMON = ["--dht-prefix", PREFIX, "--torch-dtype", "float32", "--throughput", "10", "--num-threads", "1"]


def start_poller(lab: NetLab, host, model: Path, peers: list[str], timeout: float) -> subprocess.Popen:
    script = LAB_CLIENT
    argv = [sys.executable, str(script), str(model), PREFIX, *peers, "--until-usable"]
    argv += ["--connect-timeout", str(timeout)]
    process = lab.popen(host, argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready = json.loads(process.stdout.readline() or "{}")
    if "ready_at" not in ready:
        raise RuntimeError("the polling client did not start")
    return process


def usable_after(poller: subprocess.Popen, started_at: float, timeout: float) -> float | None:
    try:
        out, _ = poller.communicate(timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        poller.kill()
        return None
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    usable_at = lines[-1].get("usable_at") if lines else None
    return None if usable_at is None else round(usable_at - started_at, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay in front of public peers")
    parser.add_argument("--stock-timeout", type=float, default=180.0, help="how long a stock NAT'd server gets")
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--relays", type=int, default=2, help="more relay-capable public peers (Corolla bootstraps)")
    parser.add_argument("--with-stock-public", action="store_true", help="also time a stock server in public")
    args = parser.parse_args()
    began = time.time()
    work = Path(tempfile.mkdtemp(prefix="corolla-netlab-bench-"))
    model = make_reference_model(work / "tiny-llama", PREFIX)
    results: dict = {
        "delay_ms_one_way": args.delay_ms,
        "lab": "bootstrap and server 0:2 public; server 2:4 in home 1; client in home 2",
        "extra_public_relays": args.relays,
    }
    with NetLab() as lab:
        pub0, pub1 = lab.add_public("pub0"), lab.add_public("pub1")
        home1, home2 = lab.add_home("home1"), lab.add_home("home2")
        front = LAB_PORT + 1  # public peers listen on loopback behind a delaying forwarder at this port
        boot = CorollaBootstrap(lab, pub0, work)
        relay_maddr = boot.maddr
        if args.delay_ms:
            # the bootstrap listens on all interfaces; clients reach it (and relay through it) via the forwarder
            lab.forwarder(pub0, front, LAB_PORT, args.delay_ms)
            relay_maddr = boot.maddr.replace(f"/tcp/{LAB_PORT}/", f"/tcp/{front}/")
        first = corolla_server(
            lab, pub1, work, model, "--initial-peers", relay_maddr, "--blocks", "0:2", *COMMON, name="first",
            announce_port=front if args.delay_ms else None,
        )  # fmt: skip
        if args.delay_ms:
            lab.forwarder(pub1, front, LAB_PORT, args.delay_ms)
        first_maddr = lab_maddr(first, pub1)
        extra = public_relays(lab, work, boot.maddr, args.relays) if args.relays else []
        base_peers = [relay_maddr, first_maddr]  # part 2: relays behind the same delay as the first server
        peers = [*base_peers, *(peer.maddr for peer in extra)]

        # 1. start -> usable by a NAT'd client
        def time_to_usable(start_server, name: str, timeout: float) -> float | None:
            poller = start_poller(lab, home2, model, [relay_maddr], timeout)
            started_at = time.time()
            server = start_server()
            try:
                seconds = usable_after(poller, started_at, timeout)
            finally:
                server.stop()
            results[name] = seconds
            print(json.dumps({name: seconds}), file=sys.stderr, flush=True)
            return seconds

        corolla_s = time_to_usable(
            lambda: corolla_server(lab, home1, work, model, "--initial-peers", *peers, "--blocks", "2:4", *COMMON,
                                   name="corolla-nat"),
            "corolla_nat_server_start_to_usable_s", 180,
        )  # fmt: skip
        if not args.skip_stock and reference_python().exists():
            stock_s = time_to_usable(
                lambda: stock_server(lab, home1, work, model, peers, "2:4", PREFIX, "stock-nat"),
                "stock_petals_nat_server_start_to_usable_s", args.stock_timeout,
            )  # fmt: skip
            stock_public_s = None
            if args.with_stock_public:
                stock_public_s = time_to_usable(
                    lambda: stock_server(lab, lab.add_public("pub2"), work, model, peers, "2:4", PREFIX,
                                         "stock-public"),
                    "stock_petals_public_server_start_to_usable_s", args.stock_timeout,
                )  # fmt: skip
            if stock_s is None:
                results["stock_petals_nat_server_note"] = f"never usable within {args.stock_timeout:.0f} s"
            if corolla_s and stock_public_s:
                results["corolla_nat_vs_stock_public_ratio"] = round(corolla_s / stock_public_s, 3)
            if corolla_s and stock_s:
                results["corolla_nat_vs_stock_nat_ratio"] = round(corolla_s / stock_s, 3)

        # 2. tokens/s: relayed vs the same server with its port forwarded
        relayed = corolla_server(
            lab, home1, work, model, "--initial-peers", *base_peers, "--blocks", "2:4", *COMMON, name="relayed"
        )
        relayed.wait_state("online")
        report = run_corolla_client(lab, home2, model, PREFIX, [relay_maddr], 64)
        relayed.stop()
        results["relayed"] = {k: report[k] for k in ("exact", "tokens_per_s", "generate_s")}
        results["relayed"]["announced_using_relay"] = True
        lab.forward_port(home1, LAB_PORT)
        direct = corolla_server(
            lab, home1, work, model, "--initial-peers", *base_peers, "--blocks", "2:4", *COMMON,
            "--public-ip", home1.public_ip, name="forwarded",
        )  # fmt: skip
        direct.wait_state("online")
        report = run_corolla_client(lab, home2, model, PREFIX, [relay_maddr], 64)
        results["port_forwarded"] = {k: report[k] for k in ("exact", "tokens_per_s", "generate_s")}
        results["port_forwarded"]["announced_using_relay"] = direct.stats()["using_relay"]
        direct.stop()
        results["relayed_vs_direct_tokens_per_s_ratio"] = round(
            results["relayed"]["tokens_per_s"] / results["port_forwarded"]["tokens_per_s"], 3
        )
        first.stop()
    results["wall_s"] = round(time.time() - began, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
