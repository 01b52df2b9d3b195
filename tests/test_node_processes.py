"""The node's processes: a dead block server takes all of its processes with it before its restart,
`corolla stop` and signals leave nothing behind, and the server's log stays bounded."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from corolla.node import supervisor as supervisor_module
from corolla.node.supervisor import ServerSupervisor
from corolla.testing.node import NodeProcess
from tests.support.procs import alive, descendants, describe, kill_all, wait_gone


def _chat_once(node: NodeProcess) -> None:
    """A chat through the node: its own swarm client (a DHT thread and a second p2pd) now runs too."""
    reply = node.post(
        "/v1/chat/completions",
        json={"model": node.status()["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert reply.status_code == 200, reply.text


@pytest.mark.slow
def test_a_killed_block_server_leaves_no_process_and_stop_leaves_none_of_the_node(tmp_path):
    node = NodeProcess(tmp_path / "home", name="procs-node")
    everything = []
    try:
        before = node.wait_contribution("online")["contribution"]
        server_tree = descendants(before["pid"])
        assert len(server_tree) >= 2, describe(server_tree)  # the server (its DHT on a thread) and p2pd
        everything += server_tree
        os.kill(before["pid"], signal.SIGKILL)
        left = wait_gone(server_tree, 10)
        assert not left, f"the dead server's processes 10 s later: {describe(left)}"
        restarted = node.wait_contribution(
            "online", timeout=120, predicate=lambda s: s["contribution"]["restarts"] >= 1
        )["contribution"]
        assert restarted["pid"] != before["pid"]
        _chat_once(node)
        tree = descendants(node.process.pid)
        everything += tree
        env = {**os.environ, "COROLLA_HOME": str(node.home)}
        stop = subprocess.run(
            [sys.executable, "-m", "corolla.cli", "stop"], env=env, capture_output=True, text=True, timeout=60
        )
        assert stop.returncode == 0, stop.stderr
        left = wait_gone(tree, 45)
        assert not left, f"still running after `corolla stop`: {describe(left)}\n{node.log_tail()}"
    finally:
        kill_all(everything)
        node.stop()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_node_group_stops_it_and_its_block_server(tmp_path, sig):
    node = NodeProcess(tmp_path / "home", name=f"signal-node-{sig.name}")
    tree = []
    try:
        node.wait_contribution("online")
        tree = descendants(node.process.pid)
        os.killpg(node.process.pid, sig)  # Ctrl-C in the terminal that runs `corolla node`
        left = wait_gone(tree, 45)
        assert not left, f"still running after {sig.name}: {describe(left)}\n{node.log_tail()}"
        assert node.process.wait(5) == 0
        assert "Traceback" not in node.log_path.read_text(errors="replace")
    finally:
        kill_all(alive(tree))
        node.stop()


def test_the_server_log_is_capped_and_only_its_end_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor_module, "LOG_MAX_BYTES", 64 * 1024)
    monkeypatch.setattr(supervisor_module, "LOG_KEEP_BYTES", 16 * 1024)
    supervisor = ServerSupervisor(tmp_path)
    noise = b"x" * 199 + b"\n"
    supervisor.log_path.write_bytes(noise * 1000 + b"the last line\n")  # ~200 KiB: over the cap
    assert supervisor._log_tail() == f"{'x' * 199} | {'x' * 199} | the last line"
    supervisor.poll()  # what the node does every second
    assert supervisor.log_path.stat().st_size == 0
    kept = supervisor._old_log_path.read_bytes()
    assert len(kept) == 16 * 1024 and kept.endswith(b"the last line\n")
    # A child that appends goes on writing at the start of the cut file, not past a hole.
    with open(supervisor.log_path, "ab") as log:
        log.write(b"after the cut\n")
    assert supervisor.log_path.read_bytes() == b"after the cut\n"


@pytest.mark.slow
def test_a_second_ctrl_c_forces_the_node_and_still_leaves_nothing(tmp_path):
    node = NodeProcess(tmp_path / "home", name="twice-node")
    tree = []
    try:
        node.wait_contribution("online")
        tree = descendants(node.process.pid)
        os.killpg(node.process.pid, signal.SIGINT)
        os.killpg(node.process.pid, signal.SIGINT)
        left = wait_gone(tree, 15)
        assert not left, f"still running after two Ctrl-C: {describe(left)}\n{node.log_tail()}"
        assert "Traceback" not in node.log_path.read_text(errors="replace")
        assert not (node.home / "config" / "node.json").exists()  # the lock is released even when forced
    finally:
        kill_all(alive(tree))
        node.stop()


@pytest.mark.slow
def test_the_nodes_dht_processes_hold_none_of_its_api_connections(tmp_path):
    """The node forks DHT processes (block server's and chat client's) while its API has connections open;
    a forked copy of a kept-alive connection would outlive the node's close and hang the client reusing it."""
    import psutil

    node = NodeProcess(tmp_path / "home", name="fork-node")
    try:
        node.wait_contribution("online")
        _chat_once(node)  # the chat client's DHT process is forked now, with this test's connection open
        api_port = int(node.url.rsplit(":", 1)[1].split("/")[0])
        holders = []
        for pid in [p.pid for p in descendants(node.process.pid)[1:]]:  # the node itself holds them, rightly
            with contextlib.suppress(psutil.Error):
                for conn in psutil.Process(pid).net_connections(kind="tcp"):
                    if api_port in (conn.laddr.port if conn.laddr else None, conn.raddr.port if conn.raddr else None):
                        holders.append((pid, conn))
        assert not holders, f"child processes hold the node's API sockets: {holders}"
        assert node.status()["contribution"]["state"] == "online"  # the same connection still answers
    finally:
        node.stop()


def test_a_closed_supervisor_starts_no_server(tmp_path):
    """The node's shutdown closes its supervisor; a start that races with it (a default model finished
    preparing just then) must not leave a block server running with nobody to stop it."""
    supervisor = ServerSupervisor(tmp_path / "server")
    supervisor.close()
    supervisor.start(["/nonexistent-model", "--new-swarm"])
    supervisor.resume()
    assert supervisor.process is None and not supervisor.wanted
    assert supervisor.poll().pid is None


@pytest.mark.slow
def test_a_server_whose_starter_died_before_its_watch_began_stops_by_itself(tiny_models, tmp_path, monkeypatch):
    """`--exit-with-parent` watches the pid its starter named: one already gone when the server comes up
    (it died while the server was still importing) is noticed at once."""
    from corolla.testing.swarm import CorollaServer

    gone = subprocess.Popen(["true"])
    gone.wait()
    monkeypatch.setenv("COROLLA_PARENT_PID", str(gone.pid))
    server = CorollaServer(
        tmp_path,
        tiny_models.get("llama"),
        "--new-swarm",
        "--dht-prefix",
        "tiny-orphan",
        "--blocks",
        "0:2",
        "--exit-with-parent",
        name="orphan",
    )
    try:
        code = server.process.wait(120)
        assert code == 0, server.log_tail()
        assert "the process that started this server is gone" in server.log_tail()
    finally:
        server.stop()


def test_a_stop_racing_with_a_restart_leaves_no_server(tmp_path, monkeypatch):
    """The node polls its supervisor on one thread while an API request stops it on another. A server that
    crashes at once is restarted by the polls as fast as they come; each stop must still leave no server
    running (an earlier supervisor let a poll restart one behind the stop's back, so "stopped" lied and
    the next start, seeing one running, started nothing)."""
    monkeypatch.setattr(supervisor_module, "restart_delay", lambda failures: 0.0)
    monkeypatch.setattr(supervisor_module, "corolla_command", lambda *args: [sys.executable, "-c", "exit(3)"])
    supervisor = ServerSupervisor(tmp_path / "server")
    polling = threading.Event()
    polling.set()

    def poll_forever() -> None:
        while polling.is_set():
            supervisor.poll()

    poller = threading.Thread(target=poll_forever, daemon=True)
    poller.start()
    try:
        for _ in range(40):
            supervisor.start(["/a-model-that-crashes"])
            time.sleep(0.05)  # a few crashes and restarts by the polls
            supervisor.stop()
            time.sleep(0.01)  # a poll that was restarting it meanwhile has finished
            assert supervisor.process is None and supervisor.state == "stopped", supervisor.poll()
    finally:
        polling.clear()
        poller.join(10)
        supervisor.close()
