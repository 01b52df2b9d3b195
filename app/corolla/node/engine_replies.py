"""A chat reply written by the engine in the block server's process (chat_engine/) while the node
contributes: the request built from the chat as the database holds it, and the engine's messages turned
into the node's reply events, each piece written to the database first (as chats.py does for its own)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from corolla.api import events as ev
from corolla.chat_engine.channel import ChannelError
from corolla.node.db import Database
from corolla.node.engine_link import ENGINE_LOST, EngineAddress, EngineReply

logger = logging.getLogger(__name__)
FINISH_REASON = {"eos": "stop", "stop string": "stop", "length": "length"}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
WIND_DOWN_S = 60.0  # a stopped reply's last messages (its "done") are awaited this long at most


@dataclass
class EngineChats:
    """What the node gives the engine besides the chat itself (set by NodeService)."""

    address: Callable[[], EngineAddress | None] = lambda: None
    # chat -> {"target", "privacy", "flagged", "slow"}: raises NoSwarm when the chat's privacy names nobody
    context: Callable[[dict], dict] = lambda chat: {}
    on_note: Callable[[dict], None] = lambda note: None  # a server flagged or found slow by the engine's client

    def request(
        self, db: Database, chat: dict, request, user: dict | None, content: str | None, reply: dict, continuing: bool
    ) -> dict:
        """The engine's request: the history as the database holds it (the user's new message and the reply
        being written left out; a continued answer is the history's last message)."""
        exclude = set() if continuing else {user["id"], reply["id"]}
        history = [
            {"role": m["role"], "content": m["content"]}
            for m in db.messages(chat["id"])
            if m["content"] and m["id"] not in exclude
        ]
        return {
            "chat_id": chat["id"],
            "system_prompt": chat["system_prompt"],
            "mode": "continue" if continuing else "send",
            "history": history,
            "content": content,
            "max_new_tokens": request.max_new_tokens,
            "stop": list(request.stop),
            "sampling": {name: getattr(request, name) for name in SAMPLING_FIELDS},
            **self.context(chat),
        }


async def until_reply_ends(queue: asyncio.Queue) -> AsyncIterator[ev.ReplyEvent]:
    """A reply's events as they are queued, up to and with the one that ends it ("done" or "error")."""
    while True:
        event = await queue.get()
        yield event
        if event.type in ev.ENDS_REPLY:
            return


async def relay(
    db: Database,
    call: EngineReply,
    reply: dict,
    before: str,
    tokens_before: int,
    earlier_seen_by: list[dict],
    on_note: Callable[[dict], None],
    merged: Callable[[list[dict], list[dict] | None], list[dict]],
) -> AsyncIterator[ev.ReplyEvent]:
    """The engine's messages as reply events; the database holds each piece before it is yielded, and the
    reply's end (complete, stopped or failed) before the last event."""
    queue: asyncio.Queue = asyncio.Queue()
    pieces: list[str] = []

    def fail(kind: str, message: str, seen_by: list[dict] | None = None) -> None:
        if seen_by:  # they received it all the same
            db.set_seen_by(reply["id"], merged(earlier_seen_by, seen_by))
        db.update_message(reply["id"], before + "".join(pieces), tokens_before + len(pieces), "failed")
        queue.put_nowait(ev.ReplyFailed(kind=kind, message=message))

    async def consume() -> None:
        try:
            async for message in call.messages():
                kind = message["type"]
                if kind == "piece" and isinstance(message.get("text"), str):
                    pieces.append(message["text"])
                    db.append_to_message(reply["id"], message["text"], tokens_before + len(pieces))
                    queue.put_nowait(ev.TokenPiece(text=message["text"]))
                elif kind in ("flag", "slow") and isinstance(message.get("evidence"), dict):
                    on_note(message)
                elif kind == "done":
                    queue.put_nowait(_done(db, reply, before, tokens_before, earlier_seen_by, message, merged))
                elif kind == "error":
                    fail(
                        str(message.get("kind") or "error"),
                        str(message.get("message") or "the reply failed"),
                        message.get("seen_by"),
                    )
        except ChannelError as exc:  # the server died or restarted mid-reply: what streamed is kept
            logger.warning("the chat engine went away mid-reply: %s", exc)
            fail("engine_lost", ENGINE_LOST.format(detail=exc))
        except Exception as exc:  # e.g. a malformed message: the stream must still end
            logger.exception("relaying the engine's reply failed")
            fail(type(exc).__name__, f"internal error: {exc}")
        finally:
            await call.close()

    task = asyncio.create_task(consume())
    try:
        async for event in until_reply_ends(queue):
            yield event
    finally:
        if not task.done():  # the window went away (Stop): the engine stops, its "done" says "stopped"
            await call.stop()
            try:
                await asyncio.wait_for(asyncio.shield(task), WIND_DOWN_S)
            except TimeoutError:
                task.cancel()


def _done(db, reply, before, tokens_before, earlier_seen_by, message, merged) -> ev.ReplyDone:
    stopped_by = str(message.get("stopped_by") or "")
    status = "stopped" if stopped_by == "cancelled" else "complete"
    seen_by = merged(earlier_seen_by, message.get("seen_by") or [])
    db.set_seen_by(reply["id"], seen_by)
    finish = FINISH_REASON.get(stopped_by)
    text, tokens = before + str(message.get("text") or ""), tokens_before + int(message.get("tokens") or 0)
    db.update_message(reply["id"], text, tokens, status, finish)
    return ev.ReplyDone(
        status=status,
        text=text,
        tokens=int(message.get("tokens") or 0),
        tokens_per_second=round(float(message.get("tokens_per_second") or 0.0), 2),
        stopped_by=stopped_by,
        seen_by=seen_by,
        finish_reason=finish,
    )
