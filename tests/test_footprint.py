"""A light footprint (issue 29): the node's processes while it serves and chats, a pause that keeps the
model loaded, and an idle node that imports no torch. Real nodes serving the tiny default model; the
figures themselves are in benchmarks/footprint.py."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from corolla.testing.node import NodeProcess, contributing_node, sse_events
from tests.support.procs import describe


def _chat(node: NodeProcess, content: str = "hello", max_new_tokens: int = 8) -> list[tuple[str, dict]]:
    chat = node.post("/api/chats", json={"title": "footprint"}).json()
    with node.client.stream(
        "POST", f"/api/chats/{chat['id']}/messages", json={"content": content, "max_new_tokens": max_new_tokens}
    ) as response:
        assert response.status_code == 200, response.read()
        return list(sse_events(response))


def _tokens(events: list[tuple[str, dict]]) -> int:
    assert events[-1][0] == "done", events[-3:]
    return sum(1 for kind, _ in events if kind == "token")


def _tree(node: NodeProcess) -> list[psutil.Process]:
    root = psutil.Process(node.process.pid)
    return [root, *(p for p in root.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE)]


def _kind(process: psutil.Process) -> str:
    cmdline = " ".join(process.cmdline())
    if process.name() == "p2pd" or os.path.basename(process.cmdline()[0]) == "p2pd":  # not a path with p2pd in it
        return "p2pd"
    if "torch_shm_manager" in cmdline:
        return "torch_shm_manager"
    if "serve" in process.cmdline():
        return "server"
    return "node" if "node" in process.cmdline() else cmdline[:80]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with contributing_node(tmp_path_factory.mktemp("footprint-home"), "footprint-node") as process:
        yield process


@pytest.mark.slow
def test_serving_and_chatting_takes_three_processes_and_the_node_none_of_the_swarm(node):
    """While the node contributes, a chat's swarm client runs in the block server's process (chat_engine/)
    and shares the server's DHT and p2pd (one per computer): the node starts none and loads no torch. The
    DHT runs on a thread: no forked DHT child (a copy of a process that imported torch), no
    torch_shm_manager. Checked while a reply streams."""
    with node.chat_streaming("tell me a story", 64, tokens=2, timeout=180) as got:
        tree = _tree(node)  # while the reply streams (or just after, on a very fast machine)
    kinds = sorted(_kind(p) for p in tree)
    assert kinds == ["node", "p2pd", "server"], describe(tree)
    server = next(p for p in tree if _kind(p) == "server")
    assert [_kind(p) for p in server.children()] == ["p2pd"], describe(tree)
    assert _tokens(got["events"]) > 0


@pytest.mark.slow
def test_pause_keeps_the_model_loaded_and_resumes_the_same_server(node):
    before = node.wait_contribution("online")["contribution"]
    assert not before["model_kept"]
    reply = node.post("/api/contribution/pause")
    assert reply.status_code == 200 and "stays loaded" in reply.json()["message"]
    paused = node.wait_contribution("paused", timeout=60)["contribution"]
    assert paused["pid"] == before["pid"] and paused["model_kept"], paused
    server = psutil.Process(before["pid"])
    assert server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    stats = node.home / "data" / "server" / "server-stats.json"
    deadline = time.monotonic() + 30
    while '"state": "paused"' not in stats.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)  # the server has gone OFFLINE for the swarm, with its blocks still loaded
    assert '"state": "paused"' in stats.read_text()
    assert node.post("/api/contribution/resume").status_code == 200
    resumed = node.wait_contribution("online", timeout=60)["contribution"]
    assert resumed["pid"] == before["pid"], "resuming restarted the server instead of serving its loaded blocks"
    assert resumed["restarts"] == before["restarts"] and not resumed["model_kept"]
    assert _tokens(_chat(node)) > 0  # routed to the resumed server: it serves again
    # Stop while paused with the model kept: the waiting server leaves in order (no orphan), Start serves.
    assert node.post("/api/contribution/pause").status_code == 200
    node.wait_contribution("paused", timeout=60)
    assert node.post("/api/contribution/stop").status_code == 200
    assert node.wait_contribution("stopped", timeout=60)["contribution"]["pid"] is None
    server.wait(30)
    assert node.post("/api/contribution/start").status_code == 200
    node.wait_contribution("online", timeout=120)


@pytest.mark.slow
def test_pause_and_free_memory_ends_the_server_and_resume_loads_it_again(node):
    before = node.wait_contribution("online")["contribution"]
    server_tree = [psutil.Process(before["pid"]), *psutil.Process(before["pid"]).children(recursive=True)]
    reply = node.post("/api/contribution/pause-free")
    assert reply.status_code == 200 and "unloaded" in reply.json()["message"]
    paused = node.wait_contribution("paused", timeout=60)["contribution"]
    assert paused["pid"] is None and not paused["model_kept"]
    assert not [p for p in server_tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert node.post("/api/contribution/resume").status_code == 200
    resumed = node.wait_contribution("online", timeout=120)["contribution"]
    assert resumed["pid"] not in (None, before["pid"])
    assert _tokens(_chat(node)) > 0


@pytest.mark.slow
def test_an_idle_node_awaiting_consent_imports_no_torch(tmp_path):
    """The node a first run starts (waiting for the user's consent) answers the window without torch:
    status, settings, chats and hardware's first part; torch comes with the swarm client or a server."""
    node = NodeProcess(tmp_path / "home", extra_env={"COROLLA_AWAIT_CONSENT": "1"}, name="idle-node")
    try:
        for path in ("/api/status", "/api/settings", "/api/chats", "/api/stats/history?hours=24", "/v1/models"):
            assert node.get(path).status_code == 200, path
        assert node.status()["contribution"]["state"] == "stopped"
        assert not node.maps_torch(), "an idle node loaded torch"
        assert [p for p in _tree(node) if p.pid != node.process.pid] == []
    finally:
        node.stop()


@pytest.mark.slow
def test_the_windows_first_requests_leave_an_idle_node_without_torch(tmp_path):
    """The window asks for the swarm and for the hardware with its block plan as it opens: a node whose
    default model is ready (any start after the first) answers both without importing torch (the plan's
    sizes come from a short-lived process)."""
    env = {"COROLLA_AWAIT_CONSENT": "1"}
    first = NodeProcess(tmp_path / "home", extra_env=env, name="first-node")
    try:  # the first start writes the default model's folder (that imports torch, once)
        assert first.get("/api/hardware").status_code == 200
    finally:
        first.stop()
    node = NodeProcess(tmp_path / "home", extra_env=env, name="idle-node")
    try:
        assert node.get("/api/swarm").status_code == 409  # no swarm yet: said without the swarm client
        hardware = node.get("/api/hardware")
        assert hardware.status_code == 200, hardware.text
        plan = hardware.json()["plan"]
        assert plan["recommended_blocks"] == plan["num_blocks"] > 0 and plan["bytes_per_block"] > 0
        assert not node.maps_torch(), "answering the window loaded torch into the idle node"
        assert [p for p in _tree(node) if p.pid != node.process.pid] == []  # the plan's process is gone
    finally:
        node.stop()
