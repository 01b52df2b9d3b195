"""The node's end of the local chat channel: one reply asked of the engine in the block server's process
(chat_engine/), read message by message. No torch here: that is the point (README, Footprint)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from corolla.chat_engine.channel import (
    READ_TIMEOUT_S,
    ChannelError,
    close_writer,
    open_channel,
    read_message,
    socket_path_is_ours,
    write_message,
)

STOP_TIMEOUT_S = 5.0
ENGINE_LOST = (
    "The block server, which writes this computer's chats while it contributes, stopped in the middle of this "
    "reply ({detail}). What it wrote is kept. Send again once contribution is back online (the window shows it); "
    "while it is not, this computer answers by itself."
)


@dataclass(frozen=True)
class EngineAddress:
    path: str
    secret: str


class EngineReply:
    """One reply being written by the engine: `messages()` yields "piece", "flag" and "slow" messages,
    then the last one, "done" or "error"; ChannelError if the engine went away before that."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self.ended = False

    @classmethod
    async def open(cls, address: EngineAddress, request: dict) -> EngineReply:
        """OSError or ChannelError when the engine cannot take it (the node then answers itself)."""
        if not socket_path_is_ours(address.path):
            raise FileNotFoundError(f"no chat engine at {address.path}")
        reader, writer = await open_channel(address.path, address.secret)
        try:
            await write_message(writer, {"type": "generate", **request})
        except BaseException:
            await close_writer(writer)
            raise
        return cls(reader, writer)

    async def messages(self) -> AsyncIterator[dict]:
        while not self.ended:
            message = await read_message(self._reader, READ_TIMEOUT_S)
            if message["type"] == "alive":
                continue
            self.ended = message["type"] in ("done", "error")
            yield message

    async def stop(self) -> None:
        """Ask the engine to stop at its next token (it then ends with "done", stopped_by "cancelled")."""
        with contextlib.suppress(ChannelError):
            await write_message(self._writer, {"type": "stop"}, STOP_TIMEOUT_S)

    async def close(self) -> None:
        await close_writer(self._writer)


def ask_engine(address: EngineAddress, request: dict, timeout: float) -> dict:
    """One request and its one answer (the swarm report), from a worker thread: OSError, ChannelError or
    TimeoutError when the engine cannot answer."""
    if not socket_path_is_ours(address.path):
        raise FileNotFoundError(f"no chat engine at {address.path}")

    async def ask() -> dict:
        reader, writer = await open_channel(address.path, address.secret)
        try:
            await write_message(writer, request)
            while True:
                answer = await read_message(reader, READ_TIMEOUT_S)
                if answer["type"] != "alive":
                    return answer
        finally:
            await close_writer(writer)

    return asyncio.run(asyncio.wait_for(ask(), timeout))
