"""Home networks in the network lab (corolla/testing/netlab.py): NAT, relays and reachability.

One lab per module: a public bootstrap (pub0), a public server (pub1) for blocks 0:k, a server behind
NAT in home 1 for k:n, and clients in home 2. Every peer runs with NAT port mapping off.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corolla.testing import LAB_CLIENT
from corolla.testing.lab_swarm import (
    CorollaBootstrap,
    LabNode,
    corolla_server,
    lab_maddr,
    public_relays,
    run_corolla_client,
    stock_server,
)
from corolla.testing.netlab import NetLab, lab_unavailable_reason
from corolla.testing.swarm import (
    make_reference_model,
    reference_dir,
    reference_python,
    run_reference_script,
)

HERE = Path(__file__).parent / "interop"
REFERENCE_PREFIX = "tiny-llama-hf"


@pytest.fixture(scope="module")
def lab():
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with NetLab() as lab:
        for name in ("pub0", "pub1"):
            lab.add_public(name)
        for name in ("home1", "home2"):
            lab.add_home(name)
        yield lab


def test_lab_routers_masquerade_and_drop_outside_in(lab, tmp_path):
    """The lab itself: sealed off from the machine's network, homes reach the internet, nothing reaches
    into a home, the forwarder delays."""
    assert lab.leaks() == []
    outer = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout.splitlines()
    assert all("link/loopback" in line for line in outer), outer  # the namespace the lab was built from
    pub, home1, home2 = lab.hosts["pub1"], lab.hosts["home1"], lab.hosts["home2"]
    echo = ["python3", "-c", "import http.server as h; h.HTTPServer(('0.0.0.0', 8000), h.BaseHTTPRequestHandler)"]
    servers = [lab.popen(host, [*echo[:2], echo[2] + ".serve_forever()"]) for host in (pub, home1)]
    try:
        deadline = time.monotonic() + 20
        while not lab.can_connect(home1, pub.ip, 8000) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert lab.can_connect(home1, pub.ip, 8000)  # out through the NAT
        assert lab.can_connect(home2, pub.ip, 8000)
        assert not lab.can_connect(pub, home1.ip, 8000)  # a home's LAN is not routed from outside
        assert not lab.can_connect(pub, home1.public_ip, 8000)  # no port forwarding on its router
        assert not lab.can_connect(home2, home1.public_ip, 8000)  # nor from the neighbours
        seen = lab.run(home1, ["python3", "-c", f"import socket; s=socket.create_connection(({pub.ip!r}, 8000)); "
                               "print(s.getsockname()[0])"])  # fmt: skip
        assert seen.stdout.strip() == home1.ip  # its own view; the server sees the router's address
        forwarder = lab.forwarder(pub, 9000, 8000, delay_ms=150)
        timing = (
            f"import socket,time; s=socket.create_connection(({pub.ip!r}, 9000)); t=time.monotonic(); "
            "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); s.recv(100); print(time.monotonic()-t)"
        )
        assert float(lab.run(home1, ["python3", "-c", timing]).stdout) >= 0.3  # 150 ms each way
        forwarder.terminate()
    finally:
        for server in servers:
            server.terminate()


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(2)
    return False


# --- a swarm across homes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_prefix(tiny_models, tmp_path_factory):
    """The reference harness's tiny Llama where the stock environment exists (so stock clients can use
    the same chain), else Corolla's own tiny Llama."""
    if reference_python().exists() and reference_dir().exists():
        model = make_reference_model(tmp_path_factory.mktemp("ref-model") / "tiny-llama", REFERENCE_PREFIX)
        return model, REFERENCE_PREFIX
    return tiny_models.get("llama"), "tiny-lab"


@pytest.mark.slow
def test_stock_petals_server_behind_nat_serves_corolla_and_stock_clients_behind_another_nat(
    lab, model_and_prefix, tmp_path
):
    """The anchor: a stock Petals 2.2 server in home 1 (its own reachability check, stock auto-relay) for
    blocks k:n, a Corolla server in public for 0:k, clients in home 2: Corolla's and stock Petals', greedy
    64 tokens, token-exact. Works because the lab's internet is public-looking (netlab.py) and has four
    relay-capable public peers (lab_swarm.public_relays). (Before the chain fixture: its own peers.)"""
    model, prefix = model_and_prefix
    if prefix != REFERENCE_PREFIX:
        pytest.skip("the stock Petals reference environment is not built")
    num_blocks = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    k = num_blocks // 2
    boot = CorollaBootstrap(lab, lab.hosts["pub0"], tmp_path, name="anchor-bootstrap")
    relays = public_relays(lab, tmp_path, boot.maddr)
    public = stock = None
    try:
        public = corolla_server(
            lab, lab.hosts["pub1"], tmp_path, model, "--initial-peers", boot.maddr, "--blocks", f"0:{k}",
            "--dht-prefix", prefix, "--torch-dtype", "float32", "--throughput", "10", name="anchor-public",
        )  # fmt: skip
        peers = [boot.maddr, lab_maddr(public, lab.hosts["pub1"]), *(relay.maddr for relay in relays)]
        stock = stock_server(lab, lab.hosts["home1"], tmp_path, model, peers, f"{k}:{num_blocks}", prefix, "stock-nat")
        stock.wait_started()
        log = stock.log_path.read_text(errors="replace")
        assert "This server is accessible via relays" in log  # its own check: not dialable
        stock_id = re.search(r"Running a server on \[.*?/p2p/(\w+)'", log).group(1)
        # Its libp2p takes a relay once AutoNAT calls it private: seconds, not a fixed time; bounded tries.
        deadline, report = time.monotonic() + 240, {}
        while time.monotonic() < deadline:
            report = run_corolla_client(lab, lab.hosts["home2"], model, prefix, [boot.maddr], 64)
            if report.get("exact"):
                break
            time.sleep(5)
        assert report.get("exact") and report["new_tokens"] == 64, report
        assert f"{k}:{num_blocks} via …{stock_id[-6:]}" in report["route"], report["route"]
        # A stock client finds the relayed server's circuit address by libp2p peer routing, which only
        # peers connected to that server can answer (those holding its reservations: two of the four).
        # So it starts from all the public peers, as stock clients of the public swarm do.
        try:
            result = run_reference_script(
                reference_dir() / "client_check.py", str(model), *peers, "--dht_prefix", prefix,
                "--new_tokens", "64", timeout=300, launcher=lab.exec_argv(lab.hosts["home2"].ns, []),
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            # Stock client to stock server, both behind NAT: in 2 of 5 runs here the stock client found
            # its route and then stalled until killed (stock code on both ends of the relayed stream).
            # Corolla's client above has already passed; this records the anchor's own limit.
            pytest.xfail(f"the stock client stalled behind NAT: {(exc.stderr or b'')[-600:]!r}")
        summary = [line for line in result.stdout.splitlines() if line.startswith("SUMMARY ")]
        assert result.returncode == 0 and summary, result.stdout[-3000:] + result.stderr[-3000:]
        assert json.loads(summary[-1].removeprefix("SUMMARY "))["ok"]
    finally:
        for server in (stock, public):
            if server is not None:
                server.stop()
        for peer in (*relays, boot):
            peer.kill()


@pytest.fixture(scope="module")
def chain(lab, model_and_prefix, tmp_path_factory):
    """Bootstrap in pub0, blocks 0:k in pub1, k:n behind NAT in home 1 (two relays: pub0 and pub1)."""
    model, prefix = model_and_prefix
    num_blocks = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    k = num_blocks // 2
    workdir = tmp_path_factory.mktemp("lab-chain")
    boot = CorollaBootstrap(lab, lab.hosts["pub0"], workdir)
    common = ["--dht-prefix", prefix, "--torch-dtype", "float32", "--throughput", "10", "--step-timeout", "60"]
    public = corolla_server(
        lab, lab.hosts["pub1"], workdir, model, "--initial-peers", boot.maddr, "--blocks", f"0:{k}", *common,
        name="public-server",
    )  # fmt: skip
    servers = [public]
    try:
        public_maddr = lab_maddr(public, lab.hosts["pub1"])
        home = corolla_server(
            lab, lab.hosts["home1"], workdir, model, "--initial-peers", boot.maddr, public_maddr,
            "--blocks", f"{k}:{num_blocks}", *common, name="home-server",
        )  # fmt: skip
        servers.append(home)
        home.wait_state("online")
        yield {"boot": boot, "public": public, "home": home, "model": model, "prefix": prefix}
    finally:
        for server in servers:
            server.stop()


@pytest.mark.slow
def test_nat_server_detects_it_is_not_dialable_and_announces_relay(chain):
    public, home = chain["public"].stats(), chain["home"].stats()
    assert public["reachability"]["state"] == "direct" and public["using_relay"] is False
    assert home["using_relay"] is True
    deadline = time.monotonic() + 30
    while chain["home"].stats()["reachability"]["state"] != "relay" and time.monotonic() < deadline:
        time.sleep(1)
    reach = chain["home"].stats()["reachability"]
    assert reach["state"] == "relay", reach
    assert any(chain["boot"].peer_id in addr and "/p2p-circuit/" in addr for addr in reach["relay_addrs"])
    assert "forward" in reach["advice"].lower()
    # "relay" is proven: a fresh peer that knew only the circuit address reached it through the relay
    assert reach["relay_proven_at"] and reach["relay_proven_at"] <= time.time(), reach


@pytest.mark.slow
def test_stock_reader_sees_the_relayed_server_with_using_relay(lab, chain):
    """What a stock Petals client reads from the DHT (pydantic v1 strict): both servers, the NAT'd one relayed."""
    if chain["prefix"] != REFERENCE_PREFIX:
        pytest.skip("the stock Petals reference environment is not built")
    result = run_reference_script(
        HERE / "petals_dht_check.py", chain["boot"].maddr, chain["prefix"], "4",
        launcher=lab.exec_argv(lab.hosts["home2"].ns, []),
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stderr[-3000:]
    seen = json.loads(lines[-1])
    home, public = seen[chain["home"].peer_id], seen[chain["public"].peer_id]
    assert home["state"] == "ONLINE" and home["using_relay"] is True and home["blocks"] == [2, 3]
    assert public["state"] == "ONLINE" and public["using_relay"] is False and public["blocks"] == [0, 1]


@pytest.mark.slow
def test_client_behind_nat_generates_through_relayed_server(lab, chain):
    report = run_corolla_client(lab, lab.hosts["home2"], chain["model"], chain["prefix"], [chain["boot"].maddr], 64)
    assert report["exact"] and report["new_tokens"] == 64, report
    assert chain["home"].stats()["inference_steps"] > 0  # the chain really went through the NAT'd server
    # Direct links (direct_link.py): to the public server, yes; into the other home, no (its router lets
    # nothing in): those steps went through p2pd and its relay.
    assert report["direct_links"] == [chain["public"].peer_id], report
    assert report["direct_link_failed"] == [chain["home"].peer_id], report


@pytest.mark.slow
def test_stock_client_behind_nat_generates_through_relayed_corolla_server(lab, chain):
    if chain["prefix"] != REFERENCE_PREFIX:
        pytest.skip("the stock Petals reference environment is not built")
    steps_before = chain["home"].stats()["inference_steps"]
    result = run_reference_script(
        reference_dir() / "client_check.py", str(chain["model"]), chain["boot"].maddr,
        "--dht_prefix", REFERENCE_PREFIX, "--new_tokens", "16",
        timeout=400, launcher=lab.exec_argv(lab.hosts["home2"].ns, []),
    )  # fmt: skip
    summary = [line for line in result.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert result.returncode == 0 and summary, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(summary[-1].removeprefix("SUMMARY "))["ok"]
    assert chain["home"].stats()["inference_steps"] > steps_before


@pytest.mark.slow
def test_stock_petals_reachability_check_gets_true_answers_from_corolla(lab, chain):
    """Petals' own check_direct_reachability, asking Corolla peers: true in public, false behind NAT."""
    if chain["prefix"] != REFERENCE_PREFIX:
        pytest.skip("the stock Petals reference environment is not built")
    peers = [chain["boot"].maddr, lab_maddr(chain["public"], lab.hosts["pub1"])]
    answers = {}
    for host in ("pub0", "home2"):
        result = run_reference_script(
            HERE / "petals_reachability_check.py", *peers, timeout=180, launcher=lab.exec_argv(lab.hosts[host].ns, [])
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        assert lines, result.stderr[-3000:]
        answers[host] = json.loads(lines[-1])["reachable"]
    assert answers == {"pub0": True, "home2": False}


@pytest.mark.slow
def test_node_behind_nat_says_it_is_reachable_via_relay_and_marks_relayed_servers(lab, chain, tmp_path, qtbot):
    """The node API of a computer at home: /api/status says "relay" with advice; /api/swarm marks relays.
    (Runs last: its server joins the chain as a second server for the NAT'd span.)"""
    # The node waits for the first-run consent, so its first contribution is the lab swarm's span: no
    # block server of the private demo swarm has to start (and be replaced) first.
    node = LabNode(lab, lab.hosts["home1"], tmp_path / "node-home", extra_env={"COROLLA_AWAIT_CONSENT": "1"})
    try:
        status = node.request("GET", "/api/status")
        assert status["reachability"]["state"] == "not_checked"  # nothing contributes yet
        settings = node.request("GET", "/api/settings")
        peers = [chain["boot"].maddr, lab_maddr(chain["public"], lab.hosts["pub1"])]
        num_blocks = json.loads((chain["model"] / "config.json").read_text())["num_hidden_layers"]
        settings.update(
            swarm="custom", custom_peers=peers, model=str(chain["model"]), dht_prefix=chain["prefix"],
            blocks=f"{num_blocks // 2}:{num_blocks}", torch_dtype="float32",
        )  # fmt: skip
        node.request("PUT", "/api/settings", settings)  # saved: nothing runs before the user agrees
        node.request("POST", "/api/contribution/start")  # the user agrees: serve the lab swarm's span

        def relayed_online() -> bool:
            nonlocal status
            status = node.request("GET", "/api/status")
            contribution = status["contribution"]
            return (
                contribution["state"] == "online"
                and contribution["start_block"] == num_blocks // 2
                and status["reachability"]["state"] == "relay"
            )

        wait_for(relayed_online, 240)
        reach = status["reachability"]
        assert reach["state"] == "relay" and reach["using_relay"], status
        assert "relay" in reach["summary"] and "forward" in reach["advice"].lower()
        assert reach["relay_addrs"] and all("/p2p-circuit/" in addr for addr in reach["relay_addrs"])
        # The window's Contribute pane shows this node's status as a person reads it: "via a relay".
        from corolla.api.models import NodeStatus
        from corolla.gui.node_client import NodeClient
        from corolla.gui.panes.contribute import ContributePane

        pane = ContributePane(NodeClient(node.url, "unused: the pane only renders the status given"))
        qtbot.addWidget(pane)
        pane.show_status(NodeStatus.model_validate(status))
        assert pane.fields["network"].text().startswith("Via a relay (slower). Nothing needed"), pane.fields[
            "network"
        ].text()
        servers: dict = {}

        def swarm_shows_this_computer() -> bool:
            nonlocal servers
            servers = {s["peer_id"]: s for model in node.request("GET", "/api/swarm") for s in model["servers"]}
            return any(s.get("this_computer") for s in servers.values())

        wait_for(swarm_shows_this_computer, 90)  # its first announcement may still be on its way
        assert servers[chain["home"].peer_id]["using_relay"] is True
        assert servers[chain["public"].peer_id]["using_relay"] is False
        mine = [s for s in servers.values() if s.get("this_computer")]
        assert len(mine) == 1 and mine[0]["using_relay"] is True, servers
    finally:
        node.stop()


@pytest.mark.slow
def test_relay_peer_dies_and_the_nat_server_stays_reachable_through_another(lab, chain):
    """The bootstrap (one of home 1's two relays) dies: within 60 s the NAT'd server's status names only
    the surviving relay, and a client behind NAT still generates through it. (Last: the bootstrap is gone.)"""
    boot, public_maddr = chain["boot"], lab_maddr(chain["public"], lab.hosts["pub1"])
    boot.kill()
    deadline = time.monotonic() + 60
    reach = {}
    while time.monotonic() < deadline:
        reach = chain["home"].stats()["reachability"]
        if reach["state"] == "relay" and all(boot.peer_id not in addr for addr in reach["relay_addrs"]):
            break
        time.sleep(1)
    assert reach["state"] == "relay" and reach["relay_addrs"], reach
    assert all(boot.peer_id not in addr for addr in reach["relay_addrs"]), reach
    assert any(chain["public"].peer_id in addr for addr in reach["relay_addrs"]), reach
    steps_before = chain["home"].stats()["inference_steps"]
    report = run_corolla_client(lab, lab.hosts["home2"], chain["model"], chain["prefix"], [public_maddr], 16)
    assert report["exact"], report
    assert chain["home"].stats()["inference_steps"] > steps_before


@pytest.mark.slow
def test_home_router_outage_mid_generation_fails_over_with_the_same_tokens(lab, chain, tmp_path):
    """Home 1's router drops everything for 20 s (and forgets its NAT state) while a client in home 2 is
    generating through it: the client fails over (to a backup for those blocks, or to home 1 once it is
    back) and the tokens are exact. (Last: home 1 may need a while to win its relays back.)"""
    entry = lab_maddr(chain["public"], lab.hosts["pub1"])  # the bootstrap is gone by now
    num_blocks = json.loads((chain["model"] / "config.json").read_text())["num_hidden_layers"]
    home1 = lab.hosts["home1"]
    client = backup = None
    sessions_before = chain["home"].stats()["sessions_opened"]
    try:
        script = LAB_CLIENT
        argv = [sys.executable, str(script), str(chain["model"]), chain["prefix"], entry,
                "--new-tokens", "400", "--request-timeout", "8"]  # fmt: skip
        client = lab.popen(lab.hosts["home2"], argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = client.stdout.readline()
        while line and '"generating"' not in line:
            line = client.stdout.readline()
        assert line, "the client never started generating"
        route = json.loads(line)["generating"]
        assert chain["home"].peer_id[-6:] in route, f"the client does not go through home 1: {route}"
        # The backup joins now (clients route to direct servers first), while home 1 is down.
        backup = corolla_server(
            lab, lab.add_public("pub2"), tmp_path, chain["model"], "--initial-peers", entry,
            "--blocks", f"{num_blocks // 2}:{num_blocks}", "--dht-prefix", chain["prefix"], "--torch-dtype",
            "float32", "--throughput", "10", name="backup",
        )  # fmt: skip
        time.sleep(0.5)
        lab.cut_home(home1)
        time.sleep(20)
        lab.restore_home(home1)
        out, _ = client.communicate(timeout=300)
        report = json.loads([row for row in out.splitlines() if row.startswith('{"exact"')][-1])
        assert report["exact"] and report["new_tokens"] == 400, out[-3000:]
        # the session really broke and was rebuilt: on the backup, or on home 1 in a new session
        failed_over = backup.stats()["inference_steps"] > 0
        reopened = chain["home"].stats()["sessions_opened"] >= sessions_before + 2
        assert failed_over or reopened, (backup.stats(), chain["home"].stats())
    finally:
        lab.restore_home(home1)
        if client is not None and client.poll() is None:
            client.kill()
        if backup is not None:
            backup.stop()
