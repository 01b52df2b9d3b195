"""OpenAI-compatible completions (openai_api.py) written by the block server's engine while the node
contributes (chat_engine/), as the node's chats are: the node then never loads torch or the model's
embeddings for them (issue 29). Where the engine cannot be reached, the node's own client answers."""

from __future__ import annotations

import logging
from collections.abc import Callable

from corolla.chat_engine.channel import ChannelError
from corolla.node.engine_link import EngineAddress, EngineReply
from corolla.node.errors import NodeError
from corolla.node.swarm_link import engine_error

logger = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 256


def engine_request(node, request, kind: str) -> dict:
    """The engine's "complete" request for an OpenAI request (`kind` "chat" or "text"); raises NoSwarm
    when the request's privacy names nobody now (run it through node.call_swarm)."""
    stored = node.check_privacy_choice(request.corolla_privacy) if request.corolla_privacy else None
    body = {
        "type": "complete",
        "max_new_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
        "stop": request.stops(),
        "sampling": {"temperature": request.temperature, "top_p": request.top_p, "seed": request.seed},
        **node.engine_context({"privacy": stored}),
    }
    if kind == "chat":
        body["messages"] = [m.model_dump() for m in request.messages]
    else:
        body["prompt"] = request.prompt
    return body


async def open_reply(address: EngineAddress, body: dict) -> EngineReply | None:
    """The engine's reply under way, or None when the engine cannot take it (the node answers itself)."""
    try:
        return await EngineReply.open(address, body)
    except (OSError, ChannelError) as exc:
        logger.warning("the block server's chat engine cannot be reached (%s): this node answers itself", exc)
        return None


async def read_reply(node, reply: EngineReply, on_text: Callable[[str], None], should_stop: Callable[[], bool]) -> dict:
    """The engine's "done" message (text, tokens, prompt_tokens, finish_reason, seen_by); pieces go to
    `on_text` as they come; once `should_stop()` the engine is told to stop. NodeError on failure."""
    stopping = False
    try:
        async for message in reply.messages():
            kind = message["type"]
            if kind == "piece":
                on_text(message["text"])
            elif kind in ("flag", "slow"):  # a server the engine's client flagged or found slow: kept here
                node.record_engine_note(message)
            elif kind == "done":
                return message
            elif kind == "error":
                raise engine_error(message)
            if should_stop() and not stopping:
                stopping = True
                await reply.stop()
    except ChannelError as exc:
        raise NodeError(503, f"the block server stopped in the middle of this answer ({exc}); ask again") from exc
    finally:
        await reply.close()
    raise NodeError(503, "the block server ended this answer without a result; ask again")
