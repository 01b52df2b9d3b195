"""`corolla serve` under the everyday signals, as a terminal or a service manager sends them.

Each test starts the real command in its own process group, signals it, and then requires that the
main process and every child it started (hivemind's DHT process, p2pd, torch_shm_manager) are gone
within the issue's bounds, with no traceback in its output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from corolla.swarm.peers import start_dht
from corolla.testing.swarm import CorollaServer
from tests.support.procs import alive, descendants, describe, group_members, kill_all, wait_gone

PREFIX = "tiny-signals"


def _serve(tmp_path, model, *args: str, name: str) -> CorollaServer:
    return CorollaServer(
        tmp_path,
        model,
        "--dht-prefix",
        PREFIX,
        "--blocks",
        "0:6",
        "--torch-dtype",
        "float32",
        "--throughput",
        "10",
        *args,
        name=name,
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_group_stops_serve_and_every_child(tiny_models, tmp_path, sig):
    server = _serve(tmp_path, tiny_models.get("llama"), "--new-swarm", name=f"group-{sig.name}")
    tree = []
    try:
        server.wait_state("online")
        tree = descendants(server.process.pid)
        assert any("p2pd" in " ".join(p.cmdline()) for p in tree), describe(tree)
        os.killpg(server.process.pid, sig)  # what Ctrl-C in a terminal and `timeout` do
        left = wait_gone(tree, 15)
        assert not left, f"still running 15 s after {sig.name}: {describe(left)}\n{server.log_tail()}"
        assert group_members(server.process.pid) == []
        assert server.process.wait(5) == 0
        log = server.log_path.read_text(errors="replace")
        assert "Traceback" not in log and "Task exception" not in log, log[-3000:]
        assert server.stats()["state"] == "offline"
    finally:
        kill_all(tree)
        server.kill()


def test_a_second_ctrl_c_forces_the_exit(tiny_models, tmp_path):
    server = _serve(tmp_path, tiny_models.get("llama"), "--new-swarm", name="twice")
    tree = []
    try:
        server.wait_state("online")
        tree = descendants(server.process.pid)
        os.killpg(server.process.pid, signal.SIGINT)
        os.killpg(server.process.pid, signal.SIGINT)
        assert not wait_gone(tree, 15), describe(alive(tree))
        assert "Traceback" not in server.log_path.read_text(errors="replace")
    finally:
        kill_all(tree)
        server.kill()


def test_a_signal_while_loading_stops_serve_too(tiny_models, tmp_path):
    """Ctrl-C before the server is online (joining an unreachable swarm): no wait for the join to time out."""
    dead_peer = "/ip4/127.0.0.1/tcp/9/p2p/QmXfptdHU6hqG95JswxYVUH4bphcK8y18mhFcgUQFe6fCN"
    server = _serve(tmp_path, tiny_models.get("llama"), "--initial-peers", dead_peer, name="joining")
    tree = []
    try:
        deadline = time.monotonic() + 60
        while server.stats().get("state") != "joining" and time.monotonic() < deadline:
            time.sleep(0.2)
        tree = descendants(server.process.pid)
        os.killpg(server.process.pid, signal.SIGINT)
        assert not wait_gone(tree, 15), describe(alive(tree)) + "\n" + server.log_tail()
        assert "Traceback" not in server.log_path.read_text(errors="replace")
    finally:
        kill_all(tree)
        server.kill()


def _swarm_states(maddr: str) -> dict[str, str]:
    command = [sys.executable, "-m", "corolla.cli", "swarm", "--initial-peers", maddr, "--no-relay"]
    result = subprocess.run(
        [*command, "--no-auto-nat", "--json", "--model", f"{PREFIX}:6"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Task was destroyed" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    models = {m["dht_prefix"]: m for m in json.loads(result.stdout)}
    return {s["peer_id"]: s["state"] for s in models[PREFIX]["servers"]} if PREFIX in models else {}


@pytest.mark.slow
def test_sigkill_of_serve_takes_its_children_and_its_record_expires(tiny_models, tmp_path):
    bootstrap = start_dht(use_relay=False, auto_nat=False, in_process=True)  # a peer that outlives the server
    maddr = str(bootstrap.get_visible_maddrs()[0])
    server = _serve(tmp_path, tiny_models.get("llama"), "--initial-peers", maddr, "--update-period", "2", name="kill")
    tree = []
    try:
        server.wait_state("online")
        peer = server.peer_id
        tree = descendants(server.process.pid)
        assert _swarm_states(maddr).get(peer) == "ONLINE"
        os.kill(server.process.pid, signal.SIGKILL)  # the main process only: no chance to clean up
        left = wait_gone(tree, 10)
        assert not left, f"orphans 10 s after SIGKILL: {describe(left)}"
        deadline = time.monotonic() + 30  # the record expires 2 x update period after its last store
        states = _swarm_states(maddr)
        while states.get(peer) == "ONLINE" and time.monotonic() < deadline:
            time.sleep(1)
            states = _swarm_states(maddr)
        assert states.get(peer) != "ONLINE", states
    finally:
        kill_all(tree)
        server.kill()
        bootstrap.shutdown()
