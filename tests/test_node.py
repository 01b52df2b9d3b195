"""A real node process with a real block server child, on 127.0.0.1, driven through its API."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import httpx
import pytest

from corolla.testing.node import NodeProcess, sse_events

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    process = NodeProcess(tmp_path_factory.mktemp("node-home"))
    process.wait_contribution("online")
    yield process
    process.stop()


def _chat(node, content="hello", **options) -> tuple[str, list]:
    chat = node.post("/api/chats", json={"title": "test"}).json()
    with node.client.stream(
        "POST", f"/api/chats/{chat['id']}/messages", json={"content": content, "max_new_tokens": 8, **options}
    ) as response:
        assert response.status_code == 200
        events = list(sse_events(response))
    return chat["id"], events


def test_token_file_is_private_and_required(node):
    token_file = node.home / "config" / "api-token"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert httpx.get(f"{node.url}/api/status").status_code == 401
    assert httpx.get(f"{node.url}/api/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{node.url}/v1/models").status_code == 401
    assert node.get("/api/status", headers={"Host": "evil.example"}).status_code == 403
    assert node.get("/api/status", headers={"Origin": "https://evil.example"}).status_code == 403
    assert httpx.get(f"{node.url}/api/ping").json()["ok"] is True


def test_second_node_says_where_the_first_is(node):
    result = subprocess.run(
        [sys.executable, "-m", "corolla.cli", "node"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COROLLA_HOME": str(node.home)},
        check=False,
    )
    assert result.returncode == 1 and node.url in result.stderr


def test_contribute_chat_and_stats_end_to_end(node):
    status = node.wait_contribution("online")
    assert status["model_is_demo"] and "random weights" in status["model"]
    assert status["contribution"]["start_block"] == 0 and status["contribution"]["end_block"] == 6
    assert status["invite"] is None and status["sharing"]["choice"] == "local"  # "This computer only"
    chat_id, events = _chat(node)
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["message", "message"] and kinds[-1] == "done", events
    done = events[-1][1]
    assert done["tokens"] == 8 and done["status"] == "complete"
    streamed = "".join(data["text"] for kind, data in events if kind == "token")
    stored = node.get(f"/api/chats/{chat_id}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] == done["text"] and stored[1]["status"] == "complete"
    assert streamed.replace("\ufffd", "") in stored[1]["content"].replace("\ufffd", "") or streamed == done["text"]
    # The served tokens reach the node's counters and its hourly history.
    served = node.wait_contribution("online", predicate=lambda s: s["contribution"]["tokens_served"] > 0)
    assert served["contribution"]["tokens_served"] >= 8
    deadline = time.monotonic() + 15
    history = []
    while time.monotonic() < deadline and not any(h["tokens_served"] > 0 for h in history):
        history = node.get("/api/stats/history", params={"hours": 2}).json()
        time.sleep(0.5)
    assert any(h["tokens_served"] > 0 and h["uptime_s"] > 0 for h in history)
    swarm = node.get("/api/swarm").json()
    (model,) = swarm
    assert model["healthy"] and model["servers"][0]["this_computer"] is True
    hardware = node.get("/api/hardware").json()
    assert hardware["ram_total_bytes"] > 0 and hardware["accelerators"][-1]["kind"] == "cpu"
    assert hardware["plan"]["num_blocks"] == 6 and hardware["plan"]["recommended_blocks"] == 6
    assert node.delete(f"/api/chats/{chat_id}").status_code == 200
    assert node.get(f"/api/chats/{chat_id}").status_code == 404


def test_openai_client_streams_and_not(node):
    import openai

    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key=node.token)
    (model,) = client.models.list().data
    reply = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, seed=1
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    stream = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, seed=1, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == reply.choices[0].message.content
    completion = client.completions.create(model=model.id, prompt="the quick brown", max_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}], max_tokens=2)


def test_a_reply_says_why_it_ended_and_continue_writes_more_of_it(node):
    chat_id, events = _chat(node, "count to a hundred", max_new_tokens=3)
    done = next(data for kind, data in events if kind == "done")
    assert done["finish_reason"] == "length"  # the random-weight demo model never ends by itself
    first = node.get(f"/api/chats/{chat_id}").json()["messages"][-1]
    assert first["finish_reason"] == "length" and first["status"] == "complete"
    with node.client.stream("POST", f"/api/chats/{chat_id}/continue", json={"max_new_tokens": 3}) as response:
        assert response.status_code == 200
        events = list(sse_events(response))
    assert [kind for kind, _ in events if kind != "token"] == ["done"]  # no new message: the same one grows
    done = events[-1][1]
    pieces = "".join(data["text"] for kind, data in events if kind == "token")
    assert done["text"] == first["content"] + pieces and done["finish_reason"] == "length"
    messages = node.get(f"/api/chats/{chat_id}").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[-1]["content"] == done["text"]
    empty = node.post("/api/chats", json={"title": "empty"}).json()
    assert node.post(f"/api/chats/{empty['id']}/continue", json={}).status_code == 409


def test_contribution_defaults_and_the_processor_share():
    from corolla.node.contribution import cpu_threads
    from corolla.node.settings import Settings

    assert Settings().allow_on_battery is False  # as BOINC: not on battery unless asked
    assert Settings().cpu_percent == 100
    assert cpu_threads(50, cores=8) == 4 and cpu_threads(10, cores=2) == 1 and cpu_threads(100, cores=6) == 6


def test_killed_block_server_is_restarted_with_a_reason(node):
    before = node.wait_contribution("online")
    os.kill(before["contribution"]["pid"], signal.SIGKILL)
    # More restarts than before the kill (an earlier test in this module may have restarted it already).
    restarts = before["contribution"]["restarts"]
    restarted = node.wait_contribution(
        "online", timeout=120, predicate=lambda s: s["contribution"]["restarts"] > restarts
    )
    assert restarted["contribution"]["pid"] != before["contribution"]["pid"]
    assert restarted["contribution"]["last_failure"].startswith("killed by SIGKILL")


def test_cli_status_and_stop(tmp_path):
    other = NodeProcess(tmp_path / "home", name="cli-node")
    env = {**os.environ, "COROLLA_HOME": str(other.home)}
    try:
        other.wait_contribution("online")
        status = _cli(env, "status")
        assert status.returncode == 0 and "contribution: online" in status.stdout
        stop = _cli(env, "stop")
        assert stop.returncode == 0
        assert other.process.wait(60) == 0
        gone = _cli(env, "status")
        assert gone.returncode == 1 and "no Corolla node is running" in gone.stderr
    finally:
        other.stop()


def test_node_killed_mid_reply_keeps_the_streamed_part(tmp_path):
    home = tmp_path / "home"
    first = NodeProcess(home, name="first")
    try:
        first.wait_contribution("online")
        chat = first.post("/api/chats", json={"title": "long"}).json()
        received = []
        with first.client.stream(
            "POST",
            f"/api/chats/{chat['id']}/messages",
            json={"content": "tell me a long story", "max_new_tokens": 2000},
        ) as response:
            for kind, data in sse_events(response):
                if kind == "token":
                    received.append(data["text"])
                if len(received) >= 12:
                    first.kill()  # SIGKILL the node mid-reply
                    break
    finally:
        if first.process.poll() is None:
            first.kill()
    second = NodeProcess(home, name="second")
    try:
        status = second.status()
        assert status["interrupted_replies_recovered"] == 1
        # The window's "Last failure" says the node before was killed, not "none".
        assert "ended without shutting down" in (status["contribution"]["last_failure"] or "")
        messages = second.get(f"/api/chats/{chat['id']}").json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[0]["content"] == "tell me a long story"
        assert messages[1]["status"] == "interrupted"
        assert messages[1]["content"].startswith("".join(received))  # nothing streamed was lost
        second.wait_contribution("online")  # the orphaned server was replaced, the node serves again
        # Nothing the killed node started is left: its server stopped itself, its DHT process was reaped.
        import psutil

        leftovers = [
            p.pid
            for p in psutil.process_iter(["ppid", "cmdline"])
            if p.info["ppid"] == 1
            and "corolla.cli" in " ".join(p.info["cmdline"] or [])
            and str(home) in " ".join(p.info["cmdline"] or []) + str(_environ_home(p))
        ]
        assert leftovers == []
    finally:
        second.stop()


def test_demo_command_runs_end_to_end_on_the_embedded_default(tmp_path):
    env = {**os.environ, "COROLLA_HOME": str(tmp_path / "demo-home")}
    result = subprocess.run(
        [sys.executable, "-m", "corolla.cli", "demo", "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "random weights" in result.stdout and "(this computer)" in result.stdout
    assert "corolla: " in result.stderr  # what the node is doing while it starts: never a silent wait
    log = (tmp_path / "demo-home" / "data" / "node.log").read_text()
    assert "\r" not in log and "top_k" not in log  # no progress-bar frames, no warning on every reply
    served = int(result.stdout.split("has served ")[1].split()[0])
    assert served >= 8
    assert not (tmp_path / "demo-home" / "config" / "node.json").exists()  # the demo's node stopped again


def test_demo_fails_fast_with_the_reason_when_the_model_cannot_be_prepared(tmp_path):
    # A file where the model cache folder belongs: converting SmolLM2 fails at once. The demo (and so
    # every package's --self-test) must say why and stop, not wait out its 15-minute timeout.
    home = tmp_path / "broken-home"
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "models").write_text("not a folder")
    env = {**os.environ, "COROLLA_HOME": str(home), "COROLLA_DEFAULT_MODEL": "smollm2"}
    result = subprocess.run(
        [sys.executable, "-m", "corolla.cli", "demo", "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert "the node failed: the model could not be prepared" in result.stderr, result.stderr[-2000:]
    assert not (home / "config" / "node.json").exists()  # the demo's node stopped again


def _environ_home(process) -> str:
    try:
        return process.environ().get("COROLLA_HOME", "")
    except Exception:
        return ""


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corolla.cli", *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_a_node_too_busy_to_answer_keeps_its_lock(tmp_path):
    # A node loading a model may miss a ping; its lock must not be taken over by a second node.
    from corolla.node.instance import AlreadyRunning, claim, read_address
    from corolla.node.paths import NodePaths

    first = NodeProcess(tmp_path)
    paths = NodePaths(tmp_path / "config", tmp_path / "data", tmp_path / "cache")
    try:
        owner = read_address(paths)
        assert owner is not None and owner.pid == first.process.pid
        first.process.send_signal(signal.SIGSTOP)  # alive, but answers nothing
        with pytest.raises(AlreadyRunning):
            claim(paths, "http://127.0.0.1:1")
        assert read_address(paths) == owner
    finally:
        first.process.send_signal(signal.SIGCONT)
        first.stop()
    # Once it is gone, its lock is stale and is replaced.
    assert claim(paths, "http://127.0.0.1:1").pid == os.getpid()


def test_a_chat_keeps_its_privacy_and_who_saw_each_reply(node):
    own = node.wait_contribution("online")["contribution"]["peer_id"]
    chat = node.post("/api/chats", json={"title": "private", "privacy": {"level": "local"}}).json()
    assert chat["privacy"] == {"level": "local", "peers": None}
    with node.client.stream(
        "POST", f"/api/chats/{chat['id']}/messages", json={"content": "my secret", "max_new_tokens": 4}
    ) as response:
        events = list(sse_events(response))
    done = events[-1][1]
    assert events[-1][0] == "done", events
    assert done["seen_by"] == [{"peer_id": own, "name": done["seen_by"][0]["name"], "blocks": [[0, 6]]}]
    stored = node.get(f"/api/chats/{chat['id']}").json()
    assert stored["privacy"]["level"] == "local"
    assert stored["messages"][1]["seen_by"] == done["seen_by"] and stored["messages"][0]["seen_by"] is None

    # Bad peer lists are refused with the reason; the chat keeps its choice.
    for bad, says in [(["not-a-peer"], "not a peer id"), ([], "empty")]:
        answer = node.patch(f"/api/chats/{chat['id']}", json={"privacy": {"level": "peers", "peers": bad}})
        assert answer.status_code == 400 and says in answer.json()["message"], answer.text
    assert node.get(f"/api/chats/{chat['id']}").json()["privacy"]["level"] == "local"

    # Only a peer that serves nothing: the reply fails at once, naming the blocks nobody allowed holds.
    stranger = "QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"
    changed = node.patch(f"/api/chats/{chat['id']}", json={"privacy": {"level": "peers", "peers": [stranger]}})
    assert changed.status_code == 200 and changed.json()["privacy"]["peers"] == [stranger]
    with node.client.stream(
        "POST", f"/api/chats/{chat['id']}/messages", json={"content": "again", "max_new_tokens": 4}
    ) as response:
        events = list(sse_events(response))
    kind, error = events[-1]
    assert kind == "error" and "block(s) 0, 1, 2, 3, 4, 5" in error["message"], events

    # The OpenAI endpoint's extension field, and who saw the reply in its answer.
    body = {
        "model": node.get("/v1/models").json()["data"][0]["id"],
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "corolla_privacy": {"level": "members"},
    }
    reply = node.post("/v1/chat/completions", json=body).json()
    assert [r["peer_id"] for r in reply["corolla_seen_by"]] == [own], reply
    body["corolla_privacy"] = {"level": "peers", "peers": ["nope"]}
    assert node.post("/v1/chat/completions", json=body).status_code == 400


def test_blocks_run_on_this_computer_keep_the_edges_from_every_server(node):
    """The chat_local_blocks setting: the node's client runs the first and last k blocks itself, so its
    own server (the whole swarm here) receives only the middle; a k the model cannot spare is an error
    sentence in the chat, and a k out of the setting's range is refused."""
    own = node.wait_contribution("online")["contribution"]["peer_id"]
    before = node.get("/api/settings").json()
    assert before["chat_local_blocks"] == 0
    try:
        node.put("/api/settings", json={**before, "chat_local_blocks": 2}).raise_for_status()
        chat = node.post("/api/chats", json={"title": "edges"}).json()
        with node.client.stream(
            "POST", f"/api/chats/{chat['id']}/messages", json={"content": "hello", "max_new_tokens": 4}
        ) as response:
            events = list(sse_events(response))
        assert events[-1][0] == "done", events
        assert [(r["peer_id"], r["blocks"]) for r in events[-1][1]["seen_by"]] == [(own, [[2, 4]])]

        node.put("/api/settings", json={**before, "chat_local_blocks": 3}).raise_for_status()
        with node.client.stream(
            "POST", f"/api/chats/{chat['id']}/messages", json={"content": "again", "max_new_tokens": 4}
        ) as response:
            events = list(sse_events(response))
        kind, error = events[-1]
        assert kind == "error" and "at most 2 at each end" in error["message"], events
        assert node.get(f"/api/chats/{chat['id']}").json()["messages"][0]["content"] == "hello"  # nothing lost

        for bad in (-1, 33, "two"):
            answer = node.put("/api/settings", json={**before, "chat_local_blocks": bad})
            assert answer.status_code in (400, 422), answer.text
        assert node.get("/api/settings").json()["chat_local_blocks"] == 3
    finally:
        node.put("/api/settings", json=before).raise_for_status()
