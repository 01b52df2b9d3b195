"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions and /v1/completions (streamed or not),
so the official `openai` client pointed at the node works unchanged."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from corolla.api.models import MAX_MESSAGE_CHARS, MAX_NEW_TOKENS, PrivacyChoice
from corolla.node.lazy_imports import engine_imports
from corolla.node.openai_engine import DEFAULT_MAX_TOKENS, engine_request, open_reply, read_reply


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=MAX_MESSAGE_CHARS)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields Corolla does not use
    model: str = Field(..., max_length=1024)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    # Corolla's extension: who may receive this request's hidden states (None: the node's default).
    corolla_privacy: PrivacyChoice | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(len(s) > 256 for s in stops):
            raise HTTPException(400, "at most 4 stop sequences of at most 256 characters")
        return stops

    def sampling(self) -> dict:
        with engine_imports():
            from corolla.swarm.client.generation import sampling_kwargs  # lazy: an idle node never imports torch

        return sampling_kwargs(self.temperature, self.top_p, seed=self.seed)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)


class CompletionRequest(_Sampling):
    prompt: str = Field(..., max_length=MAX_MESSAGE_CHARS)


def make_router(node, auth) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(auth)], tags=["openai"])

    def model_name() -> str:
        return node.model_display_name()

    def check_model(requested: str) -> None:
        if requested not in (model_name(), node.model_id()):
            raise HTTPException(404, f"model {requested!r} is not served by this node; use {model_name()!r}")

    @router.get("/models")
    def list_models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name(), "object": "model", "created": int(node.started_at), "owned_by": "corolla"}],
        }

    def generate(prompt_ids: list[int], request: _Sampling, on_text, should_stop) -> tuple[str, int, str, list]:
        with engine_imports():
            from corolla.chat_engine.completion import complete

        model = node.chats.clients.get()
        stored = node.check_privacy_choice(request.corolla_privacy) if request.corolla_privacy else None
        privacy = node.privacy_for(stored)
        return complete(
            model,
            prompt_ids,
            max_new_tokens=request.max_tokens or DEFAULT_MAX_TOKENS,
            stops=request.stops(),
            sampling=request.sampling(),
            privacy=privacy,
            on_text=on_text,
            should_stop=should_stop,
        )

    def chat_prompt(request: ChatCompletionRequest) -> list[int]:
        with engine_imports():
            from corolla.chat_engine.completion import prompt_ids

        return prompt_ids(node.chats.clients.get().tokenizer, messages=[m.model_dump() for m in request.messages])

    def completion_prompt(request: CompletionRequest) -> list[int]:
        with engine_imports():
            from corolla.chat_engine.completion import EmptyPrompt, prompt_ids

        try:
            return prompt_ids(node.chats.clients.get().tokenizer, prompt=request.prompt)
        except EmptyPrompt as exc:
            raise HTTPException(400, str(exc)) from exc

    async def respond(request: _Sampling, prompt_fn, kind: str):
        check_model(request.model)
        if request.corolla_privacy is not None:
            node.check_privacy_choice(request.corolla_privacy)  # a bad peer list: 400 before anything runs
        created, ident = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        reply = None
        address = node.supervisor.chat_engine()  # contributing: the block server's engine writes it
        if address is not None:
            body = await asyncio.to_thread(node.call_swarm, engine_request, node, request, kind)
            reply = await open_reply(address, body)
        if reply is not None:

            async def produce(on_text, should_stop) -> tuple[str, int, str, list, int]:
                done = await read_reply(node, reply, on_text, should_stop)
                return done["text"], done["tokens"], done["finish_reason"], done["seen_by"], done["prompt_tokens"]

        else:
            prompt_ids = await asyncio.to_thread(node.call_swarm, prompt_fn, request)

            async def produce(on_text, should_stop) -> tuple[str, int, str, list, int]:
                text, tokens, finish, seen = await asyncio.to_thread(
                    node.call_swarm, generate, prompt_ids, request, on_text, should_stop
                )
                return text, tokens, finish, seen, len(prompt_ids)

        if not request.stream:
            text, tokens, finish, recipients, usage_prompt = await produce(lambda piece: None, lambda: False)
            usage = {"prompt_tokens": usage_prompt, "completion_tokens": tokens, "total_tokens": usage_prompt + tokens}
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                return {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": request.model,
                    "choices": [choice],
                    "usage": usage,
                    "corolla_seen_by": recipients,
                }
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": request.model,
                "choices": [choice],
                "usage": usage,
                "corolla_seen_by": recipients,
            }
        return StreamingResponse(_stream(request, produce, kind, ident, created), media_type="text/event-stream")

    async def _stream(request, produce, kind, ident, created):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        loop_thread = threading.get_ident()

        def on_text(piece: str) -> None:  # from the node's own client's thread, or on this loop (the engine)
            if threading.get_ident() == loop_thread:
                queue.put_nowait(("piece", piece))
            else:
                loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))

        def chunk(delta: dict | None, text: str | None, finish: str | None, seen: list | None = None) -> str:
            if kind == "chat":
                body = {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": request.model,
                    "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
                }
            else:
                body = {
                    "id": ident,
                    "object": "text_completion",
                    "created": created,
                    "model": request.model,
                    "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}],
                }
            if seen is not None:
                body["corolla_seen_by"] = seen
            return f"data: {json.dumps(body)}\n\n"

        async def run() -> None:
            try:
                _, _, finish, seen, _ = await produce(on_text, cancel.is_set)
                queue.put_nowait(("finish", (finish, seen)))
            except Exception as exc:
                queue.put_nowait(("error", exc.detail if isinstance(exc, HTTPException) else str(exc)))

        worker = asyncio.ensure_future(run())
        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""}, None, None)
            while True:
                what, value = await queue.get()
                if what == "piece":
                    yield chunk({"content": value}, value, None)
                elif what == "finish":
                    yield chunk({}, "", value[0], value[1])
                    break
                else:
                    yield f"data: {json.dumps({'error': {'message': value, 'type': 'swarm_error'}})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()
            await asyncio.shield(worker)

    @router.post("/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        return await respond(request, chat_prompt, "chat")

    @router.post("/completions")
    async def completions(request: CompletionRequest):
        return await respond(request, completion_prompt, "text")

    return router
