"""The node's local HTTP API (FastAPI): 127.0.0.1 only, a bearer token compared in constant time, and
non-local Host or Origin headers refused (a web page cannot drive the node)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from corolla import __version__
from corolla.api import models as m
from corolla.api import routes
from corolla.api.sse import encode_event
from corolla.node.errors import NodeError
from corolla.node.settings import Settings

logger = logging.getLogger(__name__)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]"}


def create_app(node) -> FastAPI:
    app = FastAPI(
        title="Corolla node",
        version=__version__,
        description="Local API of a Corolla node: contribution, chats, swarm health, stats; plus an "
        "OpenAI-compatible API under /v1. Every call needs the bearer token from the node's "
        "token file.",
        # The schema is served below behind the token; no token-less /docs or /redoc pages (a browser
        # cannot send the bearer header, and a token in a URL ends up in its history).
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    bearer = HTTPBearer(auto_error=False)

    async def auth(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        host = (request.headers.get("host") or "").rsplit(":", 1)[0]
        if host not in LOCAL_HOSTS:
            raise HTTPException(403, "only local requests are accepted")
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1].rsplit(":", 1)[0] not in LOCAL_HOSTS:
            raise HTTPException(403, "cross-origin requests are refused")
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), node.token.encode()):
            raise HTTPException(
                401, "missing or wrong token (see the node's api-token file)", headers={"WWW-Authenticate": "Bearer"}
            )

    def error_body(status: int, message: str, headers=None) -> JSONResponse:
        kind = {401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict", 503: "swarm_unavailable"}.get(
            status, "bad_request"
        )
        return JSONResponse(m.ErrorBody(kind=kind, message=message).model_dump(), status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_body(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(NodeError)
    async def node_error(request: Request, exc: NodeError):  # the node's services say what went wrong
        return error_body(exc.status, exc.message)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        # Never a bare "Internal Server Error": the user reads a sentence, the details go to the log.
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        message = (
            f"The node could not do this ({type(exc).__name__}: {str(exc)[:300]}). Try again; if it keeps "
            "failing, the node's log has the details."
        )
        return JSONResponse(m.ErrorBody(kind="internal", message=message).model_dump(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in exc.errors()[:5]
        )
        body = m.ErrorBody(kind="invalid_request", message=problems or "invalid request").model_dump()
        return JSONResponse(body, status_code=422)

    @app.get(routes.PING, tags=["node"])
    def ping() -> m.Ping:
        """Liveness (no token needed): is a node answering here?"""
        return {"ok": True, "version": __version__}

    api = [Depends(auth)]

    @app.get("/openapi.json", dependencies=api, include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(routes.STATUS, dependencies=api, tags=["node"])
    def status() -> m.NodeStatus:
        return node.status()

    @app.get(routes.HARDWARE, dependencies=api, tags=["contribution"])
    def hardware(model: str | None = None, torch_dtype: str = "auto", quant_type: str = "none") -> m.HardwareReport:
        if torch_dtype not in ("auto", "bfloat16", "float16", "float32") or quant_type not in ("none", "int8", "nf4"):
            raise HTTPException(400, "torch_dtype must be auto|bfloat16|float16|float32, quant_type none|int8|nf4")
        return node.hardware(model, torch_dtype, quant_type)

    @app.get(routes.SETTINGS, dependencies=api, tags=["settings"])
    def get_settings() -> Settings:
        return node.settings

    @app.put(routes.SETTINGS, dependencies=api, tags=["settings"])
    def put_settings(settings: Settings) -> Settings:
        node.apply_settings(settings)
        return node.settings

    @app.post(routes.JOIN, dependencies=api, tags=["settings"])
    async def join(invite: m.Invite) -> Settings:
        """Join a private swarm with its invite: its addresses are tried first (nothing changes when
        the invite is unusable or none of them answers; the error says which were tried and what to do)."""
        return await asyncio.to_thread(node.join_swarm, invite.invite)

    @app.get(routes.LAN_SWARMS, dependencies=api, tags=["settings"])
    def lan_swarms() -> m.LanSwarms:
        """Private swarms other computers on this network announce (join one with its invite), and
        whether this computer's own swarm is announced. Empty while discovery is switched off."""
        return m.LanSwarms(**node.lan_swarms())

    @app.put(routes.HF_TOKEN, dependencies=api, tags=["settings"])
    def hf_token(body: m.HfToken) -> m.ActionResult:
        node.set_hf_token(body.token)
        return m.ActionResult(ok=True, message=f"stored in {node.secrets.storage}")

    @app.post(routes.CONTRIBUTION, dependencies=api, tags=["contribution"])
    def contribution(action: str) -> m.ActionResult:
        if action not in ("start", "stop", "pause", "pause-free", "resume"):
            raise HTTPException(404, "action must be start, stop, pause, pause-free or resume")
        return node.contribution(action)

    @app.get(routes.CONTRIBUTION_LOG, dependencies=api, tags=["contribution"])
    def contribution_log(lines: int = 200) -> m.ServerLog:
        """The block server's last log lines (at most 2000)."""
        if not 1 <= lines <= 2000:
            raise HTTPException(400, "lines must be between 1 and 2000")
        return {"log": node.server_log(lines)}

    @app.get(routes.SWARM, dependencies=api, tags=["swarm"])
    async def swarm() -> list[m.SwarmModel]:
        return await asyncio.to_thread(node.swarm_health)

    @app.post(routes.SWARM_CHECK, dependencies=api, tags=["swarm"])
    async def swarm_check(body: m.CheckServer) -> m.ServerCheck:
        """Send a server known inputs and compare its outputs with this computer's run or other servers'."""
        result = await asyncio.to_thread(node.check_server, body.peer_id)
        if result is None:
            raise HTTPException(404, f"no server {body.peer_id} serves the current model")
        return result

    @app.get(routes.STATS_HISTORY, dependencies=api, tags=["stats"])
    def stats_history(hours: int = 24) -> list[m.HourStats]:
        if not 1 <= hours <= 24 * 366:
            raise HTTPException(400, "hours must be between 1 and 8784")
        return node.db.contribution_history(int(time.time() // 3600) - hours + 1)

    @app.get(routes.CHATS, dependencies=api, tags=["chats"])
    def list_chats(q: str | None = None) -> list[m.Chat]:
        """All chats, newest first; with `q`, those whose title or messages contain it."""
        if q is not None and len(q) > 200:
            raise HTTPException(400, "the search text is limited to 200 characters")
        rows = node.db.search_chats(q) if q else node.db.list_chats()
        return [m.Chat(**c) for c in rows]

    @app.post(routes.CHATS, dependencies=api, tags=["chats"], status_code=201)
    def create_chat(body: m.ChatCreate) -> m.Chat:
        privacy = node.check_privacy_choice(body.privacy) if body.privacy is not None else None
        chat = node.db.create_chat(body.title, node.model_display_name(), body.system_prompt, privacy)
        return m.Chat(**chat)

    def _chat(chat_id: str) -> dict:
        chat = node.db.get_chat(chat_id) if len(chat_id) <= 64 else None
        if chat is None:
            raise HTTPException(404, f"no chat {chat_id!r}")
        return chat

    @app.get(routes.CHAT, dependencies=api, tags=["chats"])
    def get_chat(chat_id: str) -> m.Chat:
        chat = _chat(chat_id)
        return m.Chat(**chat, messages=[m.Message(**msg) for msg in node.db.messages(chat_id)])

    @app.patch(routes.CHAT, dependencies=api, tags=["chats"])
    def update_chat(chat_id: str, body: m.ChatUpdate) -> m.Chat:
        """Rename a chat and/or change who may receive its hidden states (from its next reply on)."""
        _chat(chat_id)
        if body.privacy is not None:
            node.db.set_chat_privacy(chat_id, node.check_privacy_choice(body.privacy))
            node.chats.forget(chat_id)  # its open session was routed under the old choice
        if body.title is not None:
            node.db.rename_chat(chat_id, body.title.strip() or "Chat")
        return m.Chat(**_chat(chat_id))

    @app.delete(routes.CHAT, dependencies=api, tags=["chats"])
    def delete_chat(chat_id: str) -> m.ActionResult:
        _chat(chat_id)
        node.chats.forget(chat_id)
        node.db.delete_chat(chat_id)
        return m.ActionResult(ok=True, message="deleted")

    @app.post(
        routes.CHAT_MESSAGES,
        dependencies=api,
        tags=["chats"],
        responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
    )
    async def send_message(chat_id: str, body: m.SendMessage):
        chat = _chat(chat_id)

        async def events():
            async for event in node.chats.stream_reply(chat, body):
                yield encode_event(event)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post(
        routes.CHAT_REGENERATE,
        dependencies=api,
        tags=["chats"],
        responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
    )
    async def regenerate(chat_id: str, body: m.Regenerate):
        chat = _chat(chat_id)
        if not any(msg["role"] == "user" for msg in node.db.messages(chat_id)):
            raise HTTPException(409, "this chat has no message to answer again")

        async def events():
            async for event in node.chats.stream_regenerate(chat, body):
                yield encode_event(event)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post(
        routes.CHAT_CONTINUE,
        dependencies=api,
        tags=["chats"],
        responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
    )
    async def continue_reply(chat_id: str, body: m.Continue):
        chat = _chat(chat_id)
        messages = node.db.messages(chat_id)
        if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
            raise HTTPException(409, "this chat has no answer to continue")

        async def events():
            async for event in node.chats.stream_continue(chat, body):
                yield encode_event(event)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post(routes.SHUTDOWN, dependencies=api, tags=["node"])
    def shutdown() -> m.ActionResult:
        node.request_shutdown()
        return m.ActionResult(ok=True, message="the node is stopping")

    from corolla.node.openai_api import make_router

    app.include_router(make_router(node, auth))
    return app
