"""Tokens/s across real distances, in the network lab (tests/support/netlab.py), all in one run.

Lab: a bootstrap peer, 3 servers on 3 public hosts, the client on a 4th host; a delaying forwarder in
front of each server's announced address adds `--delay-ms` one way per direction (so every link into
a server, from the client or from another server, gets it). Tiny Llama (the reference harness's, 4
blocks: 0:2, 2:3, 3:4). Greedy, `--new-tokens` per run, the median of 3 runs after a warm-up.

1. The anchor first: stock Petals 2.2 servers and the stock Petals client (its servers never push).
2. Corolla servers on the same hosts, ports and delays; the Corolla client without push, with push,
   and with push + speculative steps, on a free prompt and on a "rewrite" prompt.
3. The network floors: with push a token travels client -> s1 -> s2 -> s3 -> client, (servers + 1)
   one-way delays; without push each server is a round trip from the client, 2 x servers delays.

Usage (root; the lab needs network namespaces):
    unshare -n sh -c 'ip link set lo up && PYTHONPATH=app .venv/bin/python benchmarks/wan_tokens_per_second.py'
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.lab_swarm import LAB_PORT, CorollaBootstrap, corolla_server  # noqa: E402
from tests.support.netlab import NetLab  # noqa: E402
from tests.support.swarm import PetalsServer, make_reference_model, run_reference_script  # noqa: E402

PREFIX = "tiny-llama-hf"
SPANS = ["0:2", "2:3", "3:4"]
FRONT = LAB_PORT + 1  # servers listen on loopback behind a delaying forwarder at this port
COMMON = ["--dht-prefix", PREFIX, "--torch-dtype", "float32", "--throughput", "10", "--num-threads", "1"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay per direction into each server")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-stock", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="corolla-wan-bench-"))
    model = make_reference_model(work / "tiny-llama", PREFIX)
    servers = len(SPANS)
    results: dict = {
        "delay_ms_one_way": args.delay_ms,
        "new_tokens": args.new_tokens,
        "chain": SPANS,
        "lab": "bootstrap on pub0; servers on pub1..pub3 behind delaying forwarders; client on pub4",
        "push_floor_ms_per_token_network": (servers + 1) * args.delay_ms,
        "no_push_floor_ms_per_token_network": 2 * servers * args.delay_ms,
    }
    with NetLab() as lab:
        boot_host = lab.add_public("pub0")
        hosts = [lab.add_public(f"pub{i + 1}") for i in range(servers)]
        client_host = lab.add_public(f"pub{servers + 1}")
        boot = CorollaBootstrap(lab, boot_host, work)
        for host in hosts:
            lab.forwarder(host, FRONT, LAB_PORT, args.delay_ms)

        if not args.skip_stock:
            stock = [
                PetalsServer(
                    work,
                    model,
                    boot.maddr,
                    blocks,
                    PREFIX,
                    name=f"stock-{i}",
                    launcher=lab.exec_argv(host.ns, []),
                    network_flags=[
                        "--host_maddrs",
                        f"/ip4/127.0.0.1/tcp/{LAB_PORT}",
                        "--announce_maddrs",
                        f"/ip4/{host.ip}/tcp/{FRONT}",
                        "--no_auto_relay",
                    ],
                )
                for i, (host, blocks) in enumerate(zip(hosts, SPANS, strict=True))
            ]
            try:
                for server in stock:
                    server.wait_started()
                result = run_reference_script(
                    ROOT / "tests" / "interop" / "petals_generate_speed.py",
                    str(model),
                    boot.maddr,
                    PREFIX,
                    str(args.new_tokens),
                    timeout=600,
                    launcher=lab.exec_argv(client_host.ns, []),
                )
                lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
                if lines:
                    report = json.loads(lines[-1])
                    results["stock_petals"] = {
                        "ms_per_token": round(1000 * report["seconds"] / report["tokens"], 1),
                        "tokens_per_s": round(report["tokens_per_s"], 2),
                    }
                else:
                    results["stock_petals"] = {"error": (result.stderr or result.stdout)[-1500:]}
            finally:
                for server in stock:
                    server.stop()
            print(json.dumps({"stock_petals": results["stock_petals"]}), file=sys.stderr, flush=True)

        corolla = [
            corolla_server(
                lab,
                host,
                work,
                model,
                "--initial-peers",
                boot.maddr,
                "--blocks",
                blocks,
                *COMMON,
                "--update-period",
                "10",
                name=f"corolla-{i}",
                announce_port=FRONT,
            )
            for i, (host, blocks) in enumerate(zip(hosts, SPANS, strict=True))
        ]
        try:
            for server in corolla:
                server.wait_state("online")
            script = ROOT / "benchmarks" / "wan_client.py"
            argv = [sys.executable, str(script), str(model), PREFIX, boot.maddr, "--new-tokens", str(args.new_tokens)]
            run = lab.run(client_host, argv, timeout=900)
            modes = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"mode"')]
            if not modes:
                results["corolla_error"] = run.stderr[-2000:]
            results["corolla"] = {m.pop("mode"): m for m in modes}
        finally:
            for server in corolla:
                server.stop()

    stock_ms = results.get("stock_petals", {}).get("ms_per_token")
    for mode in results.get("corolla", {}).values():
        if stock_ms:
            mode["vs_stock_petals_tokens_per_s"] = round(stock_ms / mode["ms_per_token"], 3)
        mode["vs_push_floor"] = round(mode["ms_per_token"] / results["push_floor_ms_per_token_network"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
