"""Chats written in the block server's process while the node contributes (issue 29): the node asks the
server's chat engine over a local channel and never imports torch. Real node and server processes with
the tiny default model; the channel's own checks against a real listener on a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import threading
import time

import psutil
import pytest

from corolla.chat_engine.channel import MAX_MESSAGE_BYTES, ChannelError, open_channel, read_message, write_message
from corolla.chat_engine.listener import ChatListener
from corolla.node.default_model import TINY_LAYERS, TINY_PREFIX
from corolla.swarm.models.tiny import make_tiny_model
from corolla.testing.node import NodeProcess, contributing_node, sse_events
from tests.support.procs import describe

SECRET = "the-right-secret"


# --- the channel -------------------------------------------------------------------------------------
async def _with_listener(tmp_path, body):
    listener = ChatListener(str(tmp_path / "chat.sock"), SECRET)
    await listener.start()
    try:
        return await body(str(tmp_path / "chat.sock"))
    finally:
        await listener.close()


def test_the_channel_answers_the_right_secret_only(tmp_path):
    async def body(path: str):
        assert os.stat(path).st_mode & 0o777 == 0o600
        reader, writer = await open_channel(path, SECRET)
        await write_message(writer, {"type": "ping"})
        assert (await read_message(reader, 10))["type"] == "pong"
        writer.close()
        with pytest.raises(ChannelError, match="wrong secret"):
            await open_channel(path, "a-wrong-secret")
        # A raw caller that sends something else first gets the same refusal, then the channel closes.
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(json.dumps({"type": "generate", "chat_id": "x"}).encode() + b"\n")
        answer = await read_message(reader, 10)
        assert answer == {"type": "error", "kind": "unauthorized", "message": "wrong secret"}
        assert await reader.read() == b""
        writer.close()

    asyncio.run(_with_listener(tmp_path, body))


def test_the_channel_refuses_an_oversize_message_unread(tmp_path):
    async def body(path: str):
        reader, writer = await asyncio.open_unix_connection(path)
        sent = 0
        chunk = b"x" * 2**20
        with pytest.raises((ConnectionError, OSError)):
            while sent <= 2 * MAX_MESSAGE_BYTES:  # one line that never ends: hung up on before twice the limit
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        writer.close()
        # ... and a request over the limit after the handshake: never sent by the node, hung up on by the engine.
        reader, writer = await open_channel(path, SECRET)
        with pytest.raises(ChannelError, match="over the channel's limit"):
            await write_message(writer, {"type": "generate", "history": "x" * (MAX_MESSAGE_BYTES + 1)})
        writer.write(b'{"type": "generate", "pad": "' + b"y" * (MAX_MESSAGE_BYTES + 16) + b'"}\n')
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(writer.drain(), 60)
        assert await asyncio.wait_for(reader.read(), 60) in (b"", *_error_lines("a message over"))
        writer.close()
        # The listener lives on: the next caller is answered.
        reader, writer = await open_channel(path, SECRET)
        await write_message(writer, {"type": "ping"})
        assert (await read_message(reader, 10))["type"] == "pong"
        writer.close()

    asyncio.run(_with_listener(tmp_path, body))


def _error_lines(start: str) -> list[bytes]:
    message = f"{start} {MAX_MESSAGE_BYTES} bytes"
    return [
        json.dumps({"type": "error", "kind": "channel", "message": message}, separators=(",", ":")).encode() + b"\n"
    ]


def test_the_peer_id_check_without_hivemind_agrees_with_hiveminds_peer_ids():
    """swarm/peer_ids.py checks peer lists without hivemind (whose package imports torch), for the node
    and the client's privacy policies alike: its base58 decoding gives hivemind's PeerID bytes on real
    ids, their mutations and random text."""
    from hivemind.p2p import PeerID

    from corolla.swarm.client.privacy import Privacy, PrivacyError
    from corolla.swarm.peer_ids import base58_decode, check_peer_ids

    rng = random.Random(29)
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    real = ["QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY", "12D3KooWGzBpJ6Xy5Qc4x2dkNHj5bTEGwPFrPmqjYxCrC3Xz8mTt"]
    texts = list(real)
    for _ in range(1500):
        peer = list(rng.choice(real))
        peer[rng.randrange(len(peer))] = rng.choice(alphabet)
        texts += ["".join(peer), "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))]
    for text in texts:
        try:
            expected = PeerID.from_base58(text).to_bytes()
        except Exception:
            expected = None
        assert base58_decode(text) == expected, text
    assert sum(1 for text in texts if _accepted(check_peer_ids, [text])) >= 2  # both kinds of real ids pass
    # The client's policies raise their own error with the same sentence.
    with pytest.raises(PrivacyError, match="'not-a-peer' in the peers privacy's peer list is not a peer id"):
        Privacy("peers", frozenset({"not-a-peer"}))


def _accepted(check, case) -> bool:
    try:
        check(case, "list")
    except ValueError:
        return False
    return True


# --- real node and server -------------------------------------------------------------------------------
def _messages(node: NodeProcess, chat_id: str) -> list[dict]:
    return node.get(f"/api/chats/{chat_id}").json()["messages"]


def _stream(node: NodeProcess, chat_id: str, content: str, max_new_tokens: int, until=None) -> list:
    """The reply's events; `until(events)` true closes the stream early (the window's Stop)."""
    events: list = []
    with node.client.stream(
        "POST",
        f"/api/chats/{chat_id}/messages",
        json={"content": content, "max_new_tokens": max_new_tokens, "temperature": 0.8},
    ) as response:
        assert response.status_code == 200, response.read()
        for event in sse_events(response):
            events.append(event)
            if until is not None and until(events):
                break
    return events


def _tokens(events: list) -> list[str]:
    return [data["text"] for kind, data in events if kind == "token"]


def _server_log(node: NodeProcess) -> str:
    return (node.home / "data" / "server" / "server.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    home = tmp_path_factory.mktemp("engine-home")
    # The demo model's folder made here: the node's first start would import torch to write it.
    make_tiny_model("llama", home / "data" / "demo-model", num_layers=TINY_LAYERS, dht_prefix=TINY_PREFIX)
    with contributing_node(home, "engine-node") as process:
        yield process


@pytest.mark.slow
def test_a_chat_streams_from_the_block_server_and_the_node_never_imports_torch(node):
    server = psutil.Process(node.status()["contribution"]["pid"])
    chat = node.post("/api/chats", json={"title": "engine"}).json()
    events = _stream(node, chat["id"], "hello", 12)
    assert events[-1][0] == "done" and _tokens(events), events[-3:]
    saved = _messages(node, chat["id"])
    assert saved[-1]["status"] == "complete" and saved[-1]["content"] == "".join(_tokens(events))
    # A second turn goes on in the same chat (the engine's session for it holds the first).
    again = _stream(node, chat["id"], "and again", 6)
    assert again[-1][0] == "done" and len(_messages(node, chat["id"])) == 4
    # The Swarm pane's report (the window asks every few seconds) is read by the server's client too.
    swarm = node.get("/api/swarm")
    assert swarm.status_code == 200, swarm.text
    servers = [server for model in swarm.json() for server in model["servers"]]
    assert any(server["this_computer"] for server in servers) and swarm.json()[0]["route"], swarm.json()
    assert not node.maps_torch(), "the node loaded torch: the chat did not go to the block server"
    assert "chat engine listening" in _server_log(node)
    # The chat's swarm client lives in the server and shares its DHT and p2pd (one per computer): the
    # server runs exactly one p2pd, the node none.
    assert [p.name() for p in psutil.Process(node.process.pid).children() if "p2pd" in p.name()] == []
    assert sum("p2pd" in p.name() for p in server.children()) == 1, describe([server, *server.children()])


def _server_addresses(node: NodeProcess) -> list[str]:
    """The addresses the node's block server is reached at (its stats file), as a peer of the swarm dials it."""
    stats = json.loads(next(node.home.rglob("server-stats.json")).read_text())
    return [a for a in stats["visible_maddrs"] if "/p2p/" in a]


def _remote_client_generates(node: NodeProcess, tokens: int = 6) -> int:
    """A client of another process (its own DHT and p2pd) generates through the node's server."""
    import torch

    from corolla.swarm.client.remote_model import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(node.home / "data" / "demo-model"),
        initial_peers=_server_addresses(node),
        dht_prefix=TINY_PREFIX,
        use_relay=False,
        auto_nat=False,
    )
    try:
        prompt = torch.tensor([[1, 2, 3, 4]])
        out = model.generate(prompt, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
        return out.shape[1] - prompt.shape[1]
    finally:
        model.close()


@pytest.mark.slow
def test_another_peers_client_reaches_the_server_while_the_engine_chats(node):
    """The engine's client shares the server's p2pd; clients of other peers still reach the server
    through it, while a reply streams."""
    server = node.status()["contribution"]["pid"]
    with node.chat_streaming("tell me a story", 48, tokens=2, timeout=180) as got:
        assert _remote_client_generates(node) == 6
    assert got["events"][-1][0] == "done" and _tokens(got["events"]), got["events"][-3:]
    assert node.status()["contribution"]["pid"] == server


@pytest.mark.slow
def test_a_replaced_engine_client_leaves_the_server_serving(node):
    """A chat target that changes (here: blocks run at each end on this side) replaces the engine's client:
    the old one closes without taking the server's DHT or p2pd along, and the new one shares them again."""
    server = psutil.Process(node.status()["contribution"]["pid"])
    settings = node.get("/api/settings").json()
    chat = node.post("/api/chats", json={"title": "replaced"}).json()
    try:
        for edges in (1, 0):
            node.put("/api/settings", json={**settings, "chat_local_blocks": edges}).raise_for_status()
            events = _stream(node, chat["id"], f"edges {edges}", 6)
            # Sampled from a random-weight model: the reply may end its turn at its first token, or write
            # tokens that decode to no text yet; either still ran steps through the swarm (seen_by).
            kind, done = events[-1]
            assert kind == "done" and done["seen_by"], events[-3:]
            assert done["tokens"] >= 1 or done["stopped_by"] == "eos", events[-3:]
    finally:
        node.put("/api/settings", json=settings).raise_for_status()
    assert node.status()["contribution"]["pid"] == server.pid and node.status()["contribution"]["state"] == "online"
    assert sum(p.name() == "p2pd" for p in server.children()) == 1, describe([server, *server.children()])
    assert _remote_client_generates(node, 3) == 3
    assert not node.maps_torch()


@pytest.mark.slow
def test_openai_requests_and_a_server_check_go_through_the_engine_too(node):
    """The OpenAI-compatible endpoints and "Check this server" are answered by the block server's engine
    while the node contributes, as chats are: the node never imports torch for them."""
    model = node.get("/v1/models").json()["data"][0]["id"]
    answer = node.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "temperature": 0},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert isinstance(body["choices"][0]["message"]["content"], str) and body["usage"]["prompt_tokens"] > 0
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["corolla_seen_by"], body
    own = node.status()["contribution"]["peer_id"]
    assert own in {seen["peer_id"] for seen in body["corolla_seen_by"]}, body["corolla_seen_by"]
    lines = []
    with node.client.stream(
        "POST", "/v1/completions", json={"model": model, "prompt": "once upon", "max_tokens": 5, "stream": True}
    ) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and all("error" not in json.loads(x[6:]) for x in lines[:-1]), lines
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length"), lines
    empty = node.post("/v1/completions", json={"model": model, "prompt": "", "max_tokens": 5})
    assert empty.status_code == 400 and "empty" in empty.text, empty.text
    check = node.post("/api/swarm/check", json={"peer_id": own})
    assert check.status_code == 200 and check.json()["peer_id"] == own, check.text
    assert check.json()["state"] in ("verified", "unverified"), check.json()
    assert not node.maps_torch(), "the node loaded torch: an OpenAI request or the check did not go to the server"


@pytest.mark.slow
def test_stop_mid_reply_keeps_what_was_written_and_the_next_chat_works(node):
    # The tiny model's random weights sometimes end a reply on their own before the stop arrives: a few
    # chats, until one was stopped.
    for _ in range(6):
        chat = node.post("/api/chats", json={"title": "stop"}).json()
        events = _stream(node, chat["id"], "tell me a long story", 2000, until=lambda e: len(_tokens(e)) >= 3)
        deadline = time.monotonic() + 60
        while _messages(node, chat["id"])[-1]["status"] == "streaming" and time.monotonic() < deadline:
            time.sleep(0.2)
        reply = _messages(node, chat["id"])[-1]
        assert reply["status"] in ("stopped", "complete"), reply
        assert reply["content"].startswith("".join(_tokens(events))) and reply["tokens"] < 2000
        if reply["status"] == "stopped":
            break
    assert reply["status"] == "stopped", reply
    after = _stream(node, chat["id"], "shorter, please", 4)
    assert after[-1][0] == "done"
    assert not node.maps_torch()


def _kill_after_some_tokens(pid: int, killed: threading.Event, events: list) -> bool:
    if len(_tokens(events)) >= 3 and not killed.is_set():
        os.kill(pid, signal.SIGKILL)
        killed.set()
    return False


@pytest.mark.slow
def test_a_server_killed_mid_reply_ends_it_with_a_clear_error_and_the_next_chat_works(node):
    for _ in range(3):  # a reply the tiny model ends on its own before the kill lands is tried again
        before = node.wait_contribution("online", timeout=180)["contribution"]
        chat = node.post("/api/chats", json={"title": "killed"}).json()
        killed = threading.Event()
        kill = functools.partial(_kill_after_some_tokens, before["pid"], killed)
        events = _stream(node, chat["id"], "tell me a long story", 2000, until=kill)
        assert killed.is_set(), events[-3:]
        # The supervisor restarts the server; the next chat is written by the new one.
        old = before["pid"]
        node.wait_contribution("online", timeout=180, predicate=lambda s, old=old: s["contribution"]["pid"] != old)
        if events[-1][0] == "error":
            break
    kind, data = events[-1]
    assert kind == "error" and data["kind"] == "engine_lost", events[-3:]
    assert "stopped in the middle of this reply" in data["message"] and "kept" in data["message"]
    reply = _messages(node, chat["id"])[-1]
    assert reply["status"] == "failed" and reply["content"].startswith("".join(_tokens(events))) and reply["content"]
    after = _stream(node, chat["id"], "once more", 4)
    assert after[-1][0] == "done" and _tokens(after)
    assert not node.maps_torch()


@pytest.mark.slow
def test_a_server_that_cannot_listen_leaves_the_chats_to_the_nodes_own_client(tmp_path):
    """Where the engine has no channel (no Unix sockets, as on Windows, or a path it cannot bind), the
    node chats with its own swarm client, as it did before the engine: slower to start, same reply."""
    home = tmp_path / "home"
    make_tiny_model("llama", home / "data" / "demo-model", num_layers=TINY_LAYERS, dht_prefix=TINY_PREFIX)
    (home / "data" / "server" / "chat.sock").mkdir(parents=True)  # the socket's path is taken: bind fails
    with contributing_node(home, "no-engine-node") as node:
        chat = node.post("/api/chats", json={"title": "no engine"}).json()
        events = _stream(node, chat["id"], "hello", 8)
        assert events[-1][0] == "done" and _tokens(events), events[-3:]
        assert _messages(node, chat["id"])[-1]["status"] == "complete"
        assert "chat engine cannot listen" in _server_log(node)
        assert node.maps_torch(), "the reply came from the node's own client"
