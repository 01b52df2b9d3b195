"""The node's chat service keeps at most MAX_CACHED_SESSIONS chat sessions open on the swarm: the least
recently used one is evicted and its inference session closed, which the servers see as its KV cache
coming back. Real ChatService, real SQLite, real swarm client against the session's tiny swarm."""

from __future__ import annotations

import asyncio
import time

import pytest

from corolla.api.models import SendMessage
from corolla.node.chats import MAX_CACHED_SESSIONS, ChatService, ClientTarget, SwarmClientHost
from corolla.node.db import Database
from corolla.testing.swarm import TINY_SWARM_PREFIX
from corolla.testing.wire import WireClient


@pytest.fixture
def service(tiny_models, tiny_swarm, tmp_path):
    target = ClientTarget(str(tiny_models.get("llama")), TINY_SWARM_PREFIX, (tiny_swarm[0].maddr,), True)
    host = SwarmClientHost(lambda: target, lambda: None)
    chats = ChatService(Database(tmp_path / "chats.db"), host)
    yield chats
    for chat_id in list(chats._sessions):
        chats.forget(chat_id)
    host.close()
    chats.db.close()


def reply(service: ChatService, chat: dict):
    async def run() -> dict:
        request = SendMessage(content="hello there", max_new_tokens=2)
        events = [event async for event in service.stream_reply(chat, request)]
        return events[-1]

    return asyncio.run(run())


def cache_free(wire: WireClient, servers) -> list[int]:
    return [wire.info(server.peer_id)["cache_tokens_available"] for server in servers]


def cache_settles_at(wire: WireClient, servers, expected: list[int], within_s: float = 15.0) -> list[int]:
    """The servers' free cache once it equals `expected` (a closed stream is released on the server's
    side a moment later), or as it is after `within_s`."""
    deadline = time.monotonic() + within_s
    while (free := cache_free(wire, servers)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return free


def test_least_recently_used_chat_session_is_evicted_and_closed(service, tiny_swarm):
    chats = [service.db.create_chat(f"chat {i}", None, None) for i in range(MAX_CACHED_SESSIONS + 1)]
    with WireClient(tiny_swarm[0].maddr) as wire:
        full = cache_free(wire, tiny_swarm)
        for chat in chats[:MAX_CACHED_SESSIONS]:
            assert reply(service, chat).type == "done"
        first = service._sessions[chats[0]["id"]]
        assert list(service._sessions) == [c["id"] for c in chats[:MAX_CACHED_SESSIONS]]  # at the cap, kept
        held = cache_free(wire, tiny_swarm)
        per_session = [(f - h) // MAX_CACHED_SESSIONS for f, h in zip(full, held, strict=True)]
        assert all(p > 0 for p in per_session)  # each open chat holds KV cache on every server

        assert reply(service, chats[-1]).type == "done"  # one more chat: the oldest goes
        assert len(service._sessions) == MAX_CACHED_SESSIONS and chats[0]["id"] not in service._sessions
        assert first._session is None  # its inference session was closed, not just dropped
        # ... and the servers got its cache back: still 8 sessions' worth held, not 9.
        assert cache_settles_at(wire, tiny_swarm, held) == held

        # Using a chat makes it the most recent: the next eviction takes chat 1, not chat 2.
        assert reply(service, chats[2]).type == "done"
        assert reply(service, chats[0]).type == "done"  # chat 0 comes back with its history
        assert chats[1]["id"] not in service._sessions and chats[2]["id"] in service._sessions
        assert [m["role"] for m in service.db.messages(chats[0]["id"])] == ["user", "assistant"] * 2
