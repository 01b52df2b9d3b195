"""Push and speculative steps across distance, in the network lab: 3 servers on 3 hosts, 20 ms one
way per direction into each server (a delaying forwarder in front of each announced address), a
standby for the middle span on a 4th host, a stock Petals 2.2 server for the middle span on a 5th,
clients on a 6th. One lab for the module (slow: it starts a bootstrap and five servers in namespaces,
all at once).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from corolla.testing import LAB_CLIENT
from corolla.testing.lab_swarm import LAB_PORT, CorollaBootstrap, corolla_server, run_corolla_client
from corolla.testing.netlab import NetLab, lab_unavailable_reason
from corolla.testing.swarm import (
    PetalsServer,
    make_reference_model,
    reference_dir,
    reference_python,
    run_reference_script,
)

pytestmark = pytest.mark.slow
PREFIX = "tiny-llama-hf"
FRONT = LAB_PORT + 1
DELAY_MS = 20.0
COMMON = ["--dht-prefix", PREFIX, "--torch-dtype", "float32", "--throughput", "10", "--step-timeout", "60"]


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if not reference_python().exists():
        pytest.skip("the stock Petals reference environment is not built (it makes the lab's model)")
    work = tmp_path_factory.mktemp("wan-lab")
    model = make_reference_model(work / "tiny-llama", PREFIX)
    with NetLab() as lab:
        boot = CorollaBootstrap(lab, lab.add_public("pub0"), work)
        servers = {}
        for name, blocks in [("s1", "0:2"), ("s2", "2:3"), ("s3", "3:4"), ("standby", "2:3")]:
            host = lab.add_public(name)
            lab.forwarder(host, FRONT, LAB_PORT, DELAY_MS)
            servers[name] = corolla_server(
                lab, host, work, model, "--initial-peers", boot.maddr, "--blocks", blocks, *COMMON,
                name=name, announce_port=FRONT,
            )  # fmt: skip
        stock_host = lab.add_public("stock2")
        lab.forwarder(stock_host, FRONT, LAB_PORT, DELAY_MS)
        stock = PetalsServer(
            work, model, boot.maddr, "2:3", PREFIX, name="stock2", launcher=lab.exec_argv(stock_host.ns, []),
            network_flags=[
                "--host_maddrs", f"/ip4/127.0.0.1/tcp/{LAB_PORT}",
                "--announce_maddrs", f"/ip4/{stock_host.ip}/tcp/{FRONT}", "--no_auto_relay",
            ],
        )  # fmt: skip
        for server in servers.values():
            server.wait_state("online")
        stock.wait_started()
        yield {
            "lab": lab, "model": model, "boot": boot, "servers": servers, "stock": stock,
            "client": lab.add_public("client"),
        }  # fmt: skip
        stock.stop()
        for server in servers.values():
            server.stop()


def corolla_peers(wan) -> list[str]:
    return [s.peer_id for s in wan["servers"].values() if s.process.poll() is None]


def test_corolla_client_pushes_through_a_stock_server_in_the_middle(wan):
    """Corolla s1, stock Petals 2.2 s2, Corolla s3 (the Corolla middle servers blocked for this client):
    s1 pushes its output to the stock server, which takes it (2.2 servers accept pushes, never send
    them); the tokens equal the local model's."""
    lab, servers = wan["lab"], wan["servers"]
    sent_before = servers["s1"].stats().get("pushes_sent", 0)
    blocked = [servers["s2"].peer_id, servers["standby"].peer_id]
    report = run_corolla_client(
        lab, wan["client"], wan["model"], PREFIX, [wan["boot"].maddr, "--blocked", *blocked], new_tokens=24
    )
    assert report.get("exact") and report["new_tokens"] == 24, report
    middle = report["route"].split(", ")[1]
    assert middle.startswith("2:3") and not any(peer[-6:] in middle for peer in blocked), report["route"]
    time.sleep(1.5)  # stats files are rewritten every second
    assert servers["s1"].stats().get("pushes_sent", 0) > sent_before


def test_stock_petals_client_pushes_through_corolla_servers(wan):
    """A stock Petals 2.2 client sends next_servers; the Corolla servers push to each other; its check
    against the local model passes."""
    lab, servers = wan["lab"], wan["servers"]
    wan["stock"].stop()  # its route must go through Corolla servers only (the stock one says it is offline)
    alive = [s for s in servers.values() if s.process.poll() is None]
    before = sum(s.stats().get("pushes_received", 0) for s in alive)
    result = run_reference_script(
        reference_dir() / "client_check.py", str(wan["model"]), wan["boot"].maddr,
        "--dht_prefix", PREFIX, "--new_tokens", "16",
        timeout=400, launcher=lab.exec_argv(wan["client"].ns, []),
    )  # fmt: skip
    summary = [line for line in result.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert result.returncode == 0 and summary, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(summary[-1].removeprefix("SUMMARY "))["ok"]
    time.sleep(1.5)  # stats files are rewritten every second
    assert sum(s.stats().get("pushes_received", 0) for s in alive) > before


def test_a_link_between_two_servers_cut_mid_generation_costs_one_late_copy(wan):
    """The default client (it pushes at 20 ms a link) through s1, s2, s3; a few tokens in, s2's host
    starts dropping everything from s1's (a firewall between two offices): s1's pushes stop arriving.
    The client, which had stopped sending s2 its own copy of each step once pushes won, sends it late
    for the next step and at once from then on (client/copies.py): the tokens equal the local model's."""
    lab, servers = wan["lab"], wan["servers"]
    allowed = [servers[name].peer_id for name in ("s1", "s2", "s3")]
    argv = [sys.executable, str(LAB_CLIENT), str(wan["model"]), PREFIX, wan["boot"].maddr, "--new-tokens", "48"]
    client = lab.popen(
        wan["client"], [*argv, "--allowed", *allowed], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    cut = ["iptables", "-I", "INPUT", "1", "-s", lab.hosts["s1"].ip, "-j", "DROP"]
    try:
        json.loads(client.stdout.readline())["generating"]
        time.sleep(1.5)  # a few tokens in: the copies to s2 and s3 are held back by now
        assert lab.run(lab.hosts["s2"], cut).returncode == 0
        out, err = client.communicate(timeout=400)
    finally:
        if client.poll() is None:
            client.kill()
        lab.run(lab.hosts["s2"], ["iptables", "-D", *cut[2:3], *cut[4:]])
    report = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
    assert report["exact"] and report["new_tokens"] == 48, (report, err[-3000:])
    assert report["copies"]["held_back"] >= 10 and report["copies"]["sent_late"] >= 1, report["copies"]


def test_push_and_speculation_survive_a_middle_server_killed_mid_generation(wan):
    """The default client (push on; greedy, so speculative steps on) through the lab chain; the server
    holding block 2 on its route is SIGKILLed mid-generation: the tokens equal the local model's. Last
    in the module: a killed server's announcement lingers on the DHT (up to 240 s), and stock Petals
    clients would spend minutes timing out on it."""
    lab, servers = wan["lab"], wan["servers"]
    script = LAB_CLIENT
    argv = [sys.executable, str(script), str(wan["model"]), PREFIX, wan["boot"].maddr, "--new-tokens", "48"]
    argv += ["--allowed", *corolla_peers(wan)]  # not the stock server: this test kills a Corolla one
    client = lab.popen(wan["client"], argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = client.stdout.readline()
        route = json.loads(line)["generating"]
        middle = next(s for s in (servers["s2"], servers["standby"]) if s.peer_id[-6:] in route.split("2:3 via")[1])
        time.sleep(1.5)  # a few tokens in: pushes and drafts are flowing
        middle.kill()
        out, err = client.communicate(timeout=400)
    finally:
        if client.poll() is None:
            client.kill()
    report = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
    assert report["exact"] and report["new_tokens"] == 48, (report, err[-3000:])
    pushed = sum(s.stats().get("pushes_received", 0) for s in servers.values() if s is not middle)
    assert pushed > 0
