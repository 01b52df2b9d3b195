"""A chat message as the Chat pane shows it: the node's `Message` (corolla.api), plus what the window
says under a reply that failed and the way on it offers. Only the window has these two fields."""

from __future__ import annotations

import time
from typing import Literal

from corolla.api.models import Chat, Message


class Turn(Message):
    error: str | None = None  # the window's sentence under a failed reply
    error_action: Literal["retry", "resume", "start", "continue"] | None = None

    @classmethod
    def of(cls, message: Message) -> Turn:
        return cls.model_validate(message.model_dump())

    @classmethod
    def failed(cls) -> Turn:
        """A reply the node never began (the request failed first): a turn to say so under."""
        return cls(id="", role="assistant", content="", status="failed", tokens=0, created_at=time.time())


def turns_of(chat: Chat) -> list[Turn]:
    return [Turn.of(message) for message in chat.messages or []]
