"""The engine's Unix socket in the block server's process: one connection per reply (or per read of
the swarm for the Swarm pane: a "swarm" request, answered with "alive" messages, then the report).

A connection says the secret ("hello"), gets "ready", sends one "generate" request (a chat's reply) or
"complete" request (an OpenAI-style completion) and reads "piece"
messages, "alive" while nothing else is sent, any "flag"/"slow" notes, then "done" or "error"; or one
"swarm" or "check" request ("Check this server"), answered once, "alive" meanwhile. A "stop"
from the node, or the node hanging up, stops the reply (the node keeps what it has received). The
replies are generated on their own threads, never the server's compute thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from corolla.chat_engine.channel import (
    ALIVE_EVERY_S,
    HELLO_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    SECRET_ENV,
    SOCKET_ENV,
    ChannelError,
    close_writer,
    read_message,
    secret_matches,
    write_message,
)

logger = logging.getLogger(__name__)
MAX_REPLIES_AT_ONCE = 4
STOP_GRACE_S = 30.0  # a stopped reply's thread ends within a step; this bounds the wait for it


class ChatListener:
    def __init__(self, path: str, secret: str):
        self.path, self.secret = path, secret
        self._server: asyncio.AbstractServer | None = None
        self._engine = None  # ChatEngine, made on the first request (the client's imports come with it)
        self._engine_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=MAX_REPLIES_AT_ONCE, thread_name_prefix="corolla-chat")
        self._replies = asyncio.Semaphore(MAX_REPLIES_AT_ONCE)
        self.shared = None  # SharedSwarm: the block server's DHT and handlers, once it has joined (share_swarm)

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a previous run's socket
        self._server = await asyncio.start_unix_server(self._handle, self.path, limit=MAX_MESSAGE_BYTES + 1)
        os.chmod(self.path, 0o600)  # this user only (the secret is checked all the same)
        logger.info("chat engine listening on %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._executor.shutdown(wait=False, cancel_futures=True)
        engine = self._engine
        if engine is not None:  # its swarm client leaves (p2pd with it), bounded
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(engine.close), 10.0)

    def share_swarm(self, shared) -> None:
        """The block server joined its swarm: chats in that swarm go through its DHT and p2pd (one per
        computer) and reach its blocks in-process, instead of a DHT and p2pd of the engine's own."""
        self.shared = shared

    def drop_client(self) -> None:
        """The server paused: its chat client and sessions go (closed on a thread, bounded), as the node's
        own client went when its server paused; the next chat after resuming starts a fresh one. Replies
        still waiting on the paused server end with an error instead of retrying until it is back."""
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            threading.Thread(target=engine.close, name="corolla-chat-close", daemon=True).start()

    def _get_engine(self):
        with self._engine_lock:
            if self._engine is None:
                from corolla.chat_engine.engine import ChatEngine

                self._engine = ChatEngine(lambda: self.shared)
            return self._engine

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await read_message(reader, HELLO_TIMEOUT_S)
            if hello["type"] != "hello" or not secret_matches(hello.get("secret"), self.secret):
                await write_message(writer, {"type": "error", "kind": "unauthorized", "message": "wrong secret"})
                return
            await write_message(writer, {"type": "ready"})
            request = await read_message(reader, HELLO_TIMEOUT_S)
            if request["type"] == "ping":
                await write_message(writer, {"type": "pong"})
            elif request["type"] in ("generate", "complete"):
                async with self._replies:
                    await self._generate(request, reader, writer)
            elif request["type"] in ("swarm", "check"):
                async with self._replies:
                    await self._swarm(request, writer)
            else:
                await write_message(writer, {"type": "error", "kind": "bad_request", "message": "unknown request"})
        except ChannelError as exc:
            logger.info("chat channel: %s", exc)
            with contextlib.suppress(ChannelError):
                await write_message(writer, {"type": "error", "kind": "channel", "message": str(exc)}, 2.0)
        finally:
            await close_writer(writer)

    async def _generate(self, request: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, {"type": "piece", "text": piece})

        def run() -> dict:
            engine = self._get_engine()
            write = engine.complete if request["type"] == "complete" else engine.answer  # an OpenAI request, a chat
            return write(request, on_text, stop.is_set)

        reply = loop.run_in_executor(self._executor, run)
        watch = asyncio.create_task(_stop_when_told(reader, stop))
        try:
            while True:
                getting = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getting, reply}, timeout=ALIVE_EVERY_S, return_when="FIRST_COMPLETED")
                if getting in done:
                    await write_message(writer, getting.result())
                    continue
                getting.cancel()
                if reply.done():
                    while not queue.empty():  # pieces sent just before the end
                        await write_message(writer, queue.get_nowait())
                    for note in self._engine.take_notes() if self._engine is not None else []:
                        await write_message(writer, note)
                    await write_message(writer, reply.result())
                    return
                await write_message(writer, {"type": "alive"})
        finally:
            stop.set()  # the node went away (or this failed): the reply stops at its next token
            watch.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(reply), STOP_GRACE_S)

    async def _swarm(self, request: dict, writer: asyncio.StreamWriter) -> None:
        """The Swarm pane's report, or a server's check: "alive" meanwhile (a first read starts the client)."""
        loop = asyncio.get_running_loop()

        def answer() -> dict:
            engine = self._get_engine()
            return engine.check(request) if request["type"] == "check" else engine.swarm(request)

        report = loop.run_in_executor(self._executor, answer)
        while True:
            done, _ = await asyncio.wait({report}, timeout=ALIVE_EVERY_S)
            if done:
                await write_message(writer, report.result())
                return
            await write_message(writer, {"type": "alive"})


async def _stop_when_told(reader: asyncio.StreamReader, stop: threading.Event) -> None:
    """Reads what the node sends during a reply: "stop", or its end (it hung up) stops the reply."""
    try:
        while True:
            message = await read_message(reader, timeout=24 * 3600)
            if message["type"] == "stop":
                break
    except ChannelError:
        pass
    stop.set()


async def start_from_env() -> ChatListener | None:
    """The listener the node asked for in this server's environment (None: no node, e.g. `corolla serve`
    by hand, or it could not listen: the node then chats with its own client)."""
    path, secret = os.environ.get(SOCKET_ENV), os.environ.pop(SECRET_ENV, None)  # not inherited by p2pd
    if not path or not secret:
        return None
    listener = ChatListener(path, secret)
    try:
        await listener.start()
    except (OSError, NotImplementedError) as exc:  # e.g. a path over AF_UNIX's ~104 bytes, or no Unix sockets
        logger.warning("the chat engine cannot listen on %s: %s", path, exc)
        return None
    return listener
