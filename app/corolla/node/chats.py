"""Chats over the swarm: the swarm client for the node's model, and replies streamed as events while
every piece is written to the database first (so a killed node keeps what it streamed)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

from corolla.api import events as ev
from corolla.api.models import Message
from corolla.chat_engine.channel import ChannelError
from corolla.chat_engine.client_host import ClientTarget, NoSwarm, SwarmClientHost
from corolla.node.db import Database
from corolla.node.engine_link import EngineReply
from corolla.node.engine_replies import FINISH_REASON, EngineChats, relay, until_reply_ends
from corolla.node.lazy_imports import engine_imports

__all__ = [
    "FINISH_REASON",
    "MAX_CACHED_SESSIONS",
    "ChatService",
    "ClientTarget",
    "NoSwarm",
    "SwarmClientHost",
    "merged_recipients",
]


logger = logging.getLogger(__name__)
MAX_CACHED_SESSIONS = 8


class ChatService:
    def __init__(self, db: Database, clients: SwarmClientHost):
        self.db, self.clients = db, clients
        # chat id -> ChatSession (reuses server caches across turns), least recently used first. Each
        # holds KV cache on the swarm's servers, so only the MAX_CACHED_SESSIONS latest stay open.
        self._sessions: OrderedDict[str, object] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        # A chat's stored privacy choice -> the client's Privacy (the node resolves members and local).
        self.privacy_for: Callable[[dict | None], Any] = lambda stored: None
        # While the node contributes, replies are written in the block server's process (engine_replies.py).
        self.engine = EngineChats()

    def forget(self, chat_id: str) -> None:
        session = self._sessions.pop(chat_id, None)
        if session is not None:
            session.close()

    def _session_for(self, chat: dict, exclude: set[str]):
        with engine_imports():
            from corolla.swarm.client.chat import ChatSession

        model = self.clients.get()
        privacy = self.privacy_for(chat.get("privacy"))
        session = self._sessions.get(chat["id"])
        if session is not None and (session.model is not model or session.privacy != privacy):
            self.forget(chat["id"])  # another client, or the chat's trusted servers changed
            session = None
        if session is None:
            history = [
                {"role": m["role"], "content": m["content"]}
                for m in self.db.messages(chat["id"])
                if m["content"] and m["id"] not in exclude
            ]
            session = ChatSession(
                model, system_prompt=chat["system_prompt"], max_length=4096, messages=history, privacy=privacy
            )
            self._sessions[chat["id"]] = session
        self._sessions.move_to_end(chat["id"])
        self._evict(keep=chat["id"])
        return session

    def _evict(self, keep: str) -> None:
        """Close the least recently used sessions beyond MAX_CACHED_SESSIONS (never one that is
        answering right now: its chat's lock is held)."""
        for chat_id in list(self._sessions):
            if len(self._sessions) <= MAX_CACHED_SESSIONS:
                break
            lock = self._locks.get(chat_id)
            if chat_id == keep or (lock is not None and lock.locked()):
                continue
            self.forget(chat_id)
            if lock is not None:
                self._locks.pop(chat_id, None)

    async def stream_regenerate(self, chat: dict, request) -> AsyncIterator[ev.ReplyEvent]:
        """Answer the last user message again: the replies after it are deleted first."""
        lock = self._locks.setdefault(chat["id"], asyncio.Lock())
        async with lock:
            last_user = [m for m in self.db.messages(chat["id"]) if m["role"] == "user"][-1]
            self.db.delete_messages_after(chat["id"], last_user["seq"])
            self.forget(chat["id"])
            async for event in self._stream(chat, request, last_user, last_user["content"]):
                yield event

    async def stream_reply(self, chat: dict, request) -> AsyncIterator[ev.ReplyEvent]:
        """Events: MessageSaved for the user message, then for the reply, then TokenPiece pieces, then
        ReplyDone (or ReplyFailed). The reply is saved as `streaming` first and each piece appended to it."""
        lock = self._locks.setdefault(chat["id"], asyncio.Lock())
        async with lock:
            user = self.db.add_message(chat["id"], "user", request.content)
            yield ev.MessageSaved(message=Message(**user))
            async for event in self._stream(chat, request, user, request.content):
                yield event

    async def stream_continue(self, chat: dict, request) -> AsyncIterator[ev.ReplyEvent]:
        """Write more of the last answer: "token" pieces appended to it, then "done" with its whole text."""
        lock = self._locks.setdefault(chat["id"], asyncio.Lock())
        async with lock:
            messages = self.db.messages(chat["id"])
            if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
                yield ev.ReplyFailed(kind="nothing_to_continue", message="there is no answer to continue")
                return
            async for event in self._stream(chat, request, None, None, continuing=messages[-1]):
                yield event

    async def _stream(
        self, chat: dict, request, user: dict | None, content: str | None, continuing: dict | None = None
    ) -> AsyncIterator[ev.ReplyEvent]:
        if continuing is None:
            reply = self.db.add_message(chat["id"], "assistant", "", status="streaming")
            yield ev.MessageSaved(message=Message(**reply))
            before, tokens_before = "", 0
        else:
            reply, before, tokens_before = continuing, continuing["content"], continuing["tokens"]
            self.db.update_message(reply["id"], before, tokens_before, "streaming")
        earlier_seen_by = (continuing or {}).get("seen_by") or []
        try:
            call = await self._engine_call(chat, request, user, content, reply, continuing is not None)
        except Exception as exc:  # e.g. the chat's privacy names nobody now: as when this node answers
            self.db.update_message(reply["id"], before, tokens_before, "failed")
            yield ev.ReplyFailed(kind="no_swarm" if isinstance(exc, NoSwarm) else type(exc).__name__, message=str(exc))
            return
        if call is not None:
            self.forget(chat["id"])  # a session this node held for the chat: its servers' cache is freed
            async for event in relay(
                self.db, call, reply, before, tokens_before, earlier_seen_by, self.engine.on_note, merged_recipients
            ):
                yield event
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        pieces: list[str] = []

        def on_text(piece: str) -> None:
            pieces.append(piece)
            # Written first, appended (not the whole reply again: that was quadratic in its length).
            self.db.append_to_message(reply["id"], piece, tokens_before + len(pieces))
            loop.call_soon_threadsafe(queue.put_nowait, ev.TokenPiece(text=piece))

        session = None

        def run():
            try:
                answer()
            except BaseException as exc:  # the error handling itself failed: the stream must still end
                logger.exception("a reply failed while its failure was being recorded")
                event = ev.ReplyFailed(kind=type(exc).__name__, message=f"internal error: {exc}")
                loop.call_soon_threadsafe(queue.put_nowait, event)

        def answer():
            nonlocal session
            try:
                generate = dict(max_new_tokens=request.max_new_tokens, stop=request.stop, on_text=on_text)
                generate.update(should_stop=cancel.is_set, **request.generate_kwargs())
                if continuing is None:
                    session = self._session_for(chat, exclude={user["id"], reply["id"]})
                    result = session.send(content, **generate)
                else:
                    session = self._session_for(chat, exclude=set())
                    result = session.continue_reply(**generate)
                status = "stopped" if result.stopped_by == "cancelled" else "complete"
                seen_by = merged_recipients((continuing or {}).get("seen_by") or [], result.seen_by)
                self.db.set_seen_by(reply["id"], seen_by)
                finish = FINISH_REASON.get(result.stopped_by)
                text, tokens = before + result.text, tokens_before + result.tokens
                self.db.update_message(reply["id"], text, tokens, status, finish)
                done = ev.ReplyDone(
                    status=status,
                    text=text,
                    tokens=result.tokens,
                    tokens_per_second=round(result.tokens_per_second, 2),
                    stopped_by=result.stopped_by,
                    seen_by=seen_by,
                    finish_reason=finish,
                )
                loop.call_soon_threadsafe(queue.put_nowait, done)
            except Exception as exc:  # reported to the user; the partial reply stays
                if session is not None and session.last_seen_by:  # they received it all the same
                    earlier = (continuing or {}).get("seen_by") or []
                    self.db.set_seen_by(reply["id"], merged_recipients(earlier, session.last_seen_by))
                self.forget(chat["id"])
                self.db.update_message(reply["id"], before + "".join(pieces), tokens_before + len(pieces), "failed")
                kind = "no_swarm" if isinstance(exc, NoSwarm) else type(exc).__name__
                loop.call_soon_threadsafe(queue.put_nowait, ev.ReplyFailed(kind=kind, message=str(exc)))

        worker = loop.run_in_executor(None, run)
        try:
            async for event in until_reply_ends(queue):
                yield event
        finally:
            cancel.set()  # the client went away: stop generating, keep what was written
            await asyncio.shield(worker)

    async def _engine_call(
        self, chat: dict, request, user: dict | None, content: str | None, reply: dict, continuing: bool
    ) -> EngineReply | None:
        """The reply asked of the block server's engine; None when there is none to ask (not contributing)
        or it cannot be reached: this node then answers with its own client, as before."""
        address = self.engine.address()
        if address is None:
            return None
        payload = self.engine.request(self.db, chat, request, user, content, reply, continuing)
        try:
            return await EngineReply.open(address, payload)
        except (OSError, ChannelError, TimeoutError) as exc:
            logger.warning("the block server's chat engine cannot be reached (%s): this node answers itself", exc)
            return None


def merged_recipients(earlier: list[dict], later: list[dict] | None) -> list[dict]:
    """A reply's recipients over all its parts (a continued answer keeps who saw its first part)."""
    merged, seen = [], set()
    for recipient in [*earlier, *(later or [])]:
        key = repr(sorted(recipient.items()))  # blocks are lists of ranges: compared as text
        if key not in seen:
            seen.add(key)
            merged.append(recipient)
    return merged
