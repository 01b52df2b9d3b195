"""The events of a streamed reply (POST /api/chats/{id}/messages, /regenerate, /continue): a tagged
union on `type`, which is also the SSE event name."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from corolla.api.models import Message, Recipient


class MessageSaved(BaseModel):
    """A message written to the chat: the user's, then the reply's (as `streaming`, before any token)."""

    type: Literal["message"] = "message"
    message: Message


class TokenPiece(BaseModel):
    type: Literal["token"] = "token"
    text: str


class ReplyDone(BaseModel):
    type: Literal["done"] = "done"
    status: str = Field(..., description='"complete" or "stopped" (the client went away or asked to stop)')
    text: str = Field(..., description="the whole reply (a continued one: with its earlier part)")
    tokens: int = Field(..., description="tokens written by this request")
    tokens_per_second: float = 0.0
    stopped_by: str | None = None
    seen_by: list[Recipient] | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ReplyFailed(BaseModel):
    type: Literal["error"] = "error"
    kind: str | None = Field(None, description='"no_swarm" when nobody serves the model; else the error class')
    message: str = "the reply failed"


ReplyEvent = Annotated[MessageSaved | TokenPiece | ReplyDone | ReplyFailed, Field(discriminator="type")]
_REPLY_EVENT: TypeAdapter[ReplyEvent] = TypeAdapter(ReplyEvent)
ENDS_REPLY = ("done", "error")


def reply_event(kind: str, data: dict) -> ReplyEvent | None:
    """The typed event of an SSE event `kind` with its JSON `data`; None for an unknown or malformed one
    (skipped: the stream goes on)."""
    try:
        return _REPLY_EVENT.validate_python({**data, "type": kind})
    except ValidationError:
        return None
