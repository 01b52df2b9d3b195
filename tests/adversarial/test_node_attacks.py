"""The node's local surface: the schema only with the token, and a deleted Hugging Face token gone
from what the node hands to the processes it starts afterwards."""

from __future__ import annotations

import time

import httpx
import psutil
import pytest

from corolla.testing.node import NodeProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    process = NodeProcess(tmp_path_factory.mktemp("hostile-node-home"), extra_env={"HF_TOKEN": ""})
    yield process
    process.stop()


def test_schema_and_docs_need_the_token(node):
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(f"{node.url}{path}").status_code in (401, 404), path
    assert httpx.get(f"{node.url}/openapi.json").status_code == 401
    schema = node.get("/openapi.json")
    assert schema.status_code == 200 and "/api/status" in schema.json()["paths"]


def _servers(node) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(node.process.pid).children():  # the server itself, not its DHT process
        try:
            if "serve" in child.cmdline() and "corolla.cli" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _server_environ(node, before: set[int], timeout: float = 60.0) -> dict[str, str]:
    """The environment of the block server the node started since `before` (the pids there were)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for server in _servers(node):
            try:
                if server.pid not in before:
                    return server.environ()
            except psutil.Error:
                continue
        time.sleep(0.3)
    raise AssertionError(f"no new block server under the node:\n{node.log_tail()}")


def _restart_contribution(node) -> set[int]:
    """Stop the contribution and start it again; returns the pids of the servers there were before."""
    node.post("/api/contribution/stop")
    node.wait_contribution("stopped")
    before = {server.pid for server in _servers(node)}
    node.post("/api/contribution/start")
    return before


def test_a_deleted_hf_token_is_not_inherited_by_later_processes(node):
    secret = "hf_" + "a" * 34
    assert node.client.put("/api/secrets/hf-token", json={"token": secret}).status_code == 200
    assert _server_environ(node, _restart_contribution(node)).get("HF_TOKEN") == secret
    assert node.client.put("/api/secrets/hf-token", json={"token": None}).status_code == 200
    assert not _server_environ(node, _restart_contribution(node)).get("HF_TOKEN")
    node.post("/api/contribution/stop")
