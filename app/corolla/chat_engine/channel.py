"""The local chat channel's wire: one JSON object per line, each line bounded, each read and write
under a timeout, and a handshake that proves the caller holds the run's secret.

No pickle and nothing else that executes what it reads: a peer on the same computer that is not the
node (another user's program, a stale process) gets one error line and the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets as _secrets
from typing import Any

SOCKET_ENV = "COROLLA_CHAT_SOCKET"  # where the block server's engine listens (a path in its folder)
SECRET_ENV = "COROLLA_CHAT_SECRET"  # what a caller must say first (new for each server run)
MAX_MESSAGE_BYTES = 32 * 2**20  # a request carries the chat's history: 100k-character messages, many of them
HELLO_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 30.0
ALIVE_EVERY_S = 10.0  # the engine says it is alive this often while a reply is being prepared
READ_TIMEOUT_S = 6 * ALIVE_EVERY_S  # then the other side is taken for gone


class ChannelError(RuntimeError):
    """The other side broke the protocol, went away, or said nothing in time."""


def new_secret() -> str:
    return _secrets.token_urlsafe(32)


def secret_matches(given: Any, secret: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), secret.encode())


async def read_message(reader: asyncio.StreamReader, timeout: float = READ_TIMEOUT_S) -> dict:
    """The next message; ChannelError on end of stream, a line over MAX_MESSAGE_BYTES, bad JSON or silence.
    The reader must have been opened with limit=MAX_MESSAGE_BYTES + 1 (open_channel / the listener do)."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError as exc:
        raise ChannelError(f"no message within {timeout:.0f} s") from exc
    except (ValueError, asyncio.LimitOverrunError) as exc:  # the line is longer than the reader's limit
        raise ChannelError(f"a message over {MAX_MESSAGE_BYTES} bytes") from exc
    except (ConnectionError, OSError) as exc:
        raise ChannelError(f"the connection broke ({exc})") from exc
    if not line.endswith(b"\n"):
        raise ChannelError("the other side closed the channel")
    if len(line) > MAX_MESSAGE_BYTES + 1:
        raise ChannelError(f"a message over {MAX_MESSAGE_BYTES} bytes")
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise ChannelError("a message that is not JSON") from exc
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ChannelError("a message without a type")
    return message


def encode(message: dict) -> bytes:
    data = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_MESSAGE_BYTES + 1:
        raise ChannelError(f"a message of {len(data)} bytes is over the channel's limit of {MAX_MESSAGE_BYTES}")
    return data


async def write_message(writer: asyncio.StreamWriter, message: dict, timeout: float = WRITE_TIMEOUT_S) -> None:
    data = encode(message)
    try:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), timeout)
    except TimeoutError as exc:
        raise ChannelError(f"the other side read nothing for {timeout:.0f} s") from exc
    except (ConnectionError, OSError) as exc:
        raise ChannelError(f"the connection broke ({exc})") from exc


async def open_channel(path: str, secret: str, timeout: float = HELLO_TIMEOUT_S):
    """Connect and say the secret; returns (reader, writer) once the engine has answered "ready".
    OSError when nothing listens there; ChannelError when it refused the secret or did not answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=MAX_MESSAGE_BYTES + 1), timeout)
    try:
        await write_message(writer, {"type": "hello", "secret": secret}, timeout)
        answer = await read_message(reader, timeout)
        if answer["type"] != "ready":
            raise ChannelError(f"the engine refused the connection: {answer.get('message', answer['type'])}")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        await asyncio.wait_for(writer.wait_closed(), 2.0)


def socket_path_is_ours(path: str) -> bool:
    """The socket file exists and belongs to this user (a listener of someone else is never talked to)."""
    try:
        return os.stat(path).st_uid == os.getuid()
    except OSError:
        return False
