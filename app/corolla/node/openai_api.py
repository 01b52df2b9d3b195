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
            import torch

            from corolla.swarm.client.chat import ReplyWatcher, seen_by

        model = node.chats.clients.get()
        stored = node.check_privacy_choice(request.corolla_privacy) if request.corolla_privacy else None
        watcher = ReplyWatcher(model.tokenizer, model.eos_token_ids, request.stops(), on_text, should_stop)
        length = len(prompt_ids) + (request.max_tokens or 256)
        session = model.inference_session(max_length=length, privacy=node.privacy_for(stored))
        try:
            model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=request.max_tokens or 256,
                eos_token_id=[],
                streamer=watcher,
                session=session,
                **request.sampling(),
            )
            recipients = seen_by(session)
        finally:
            session.close_in_background()  # the reply need not wait for the servers' goodbyes
        finish = "stop" if watcher.stopped_by in ("eos", "stop string") else "length"
        return watcher.text(), len(watcher.stream.tokens), finish, recipients

    def chat_prompt(request: ChatCompletionRequest) -> list[int]:
        tokenizer = node.chats.clients.get().tokenizer
        messages = [m.model_dump() for m in request.messages]
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False).input_ids
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tokenizer(text).input_ids

    def completion_prompt(request: CompletionRequest) -> list[int]:
        ids = node.chats.clients.get().tokenizer(request.prompt).input_ids
        if not ids:
            raise HTTPException(400, "the prompt is empty after tokenisation")
        return ids

    async def respond(request: _Sampling, prompt_fn, kind: str):
        check_model(request.model)
        if request.corolla_privacy is not None:
            node.check_privacy_choice(request.corolla_privacy)  # a bad peer list: 400 before anything runs
        prompt_ids = await asyncio.to_thread(node.call_swarm, prompt_fn, request)
        created, ident = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        usage_prompt = len(prompt_ids)
        if not request.stream:
            text, tokens, finish, recipients = await asyncio.to_thread(
                node.call_swarm, generate, prompt_ids, request, lambda piece: None, lambda: False
            )
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
        return StreamingResponse(_stream(request, prompt_ids, kind, ident, created), media_type="text/event-stream")

    async def _stream(request, prompt_ids, kind, ident, created):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

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

        def run():
            try:
                _, _, finish, seen = node.call_swarm(
                    generate,
                    prompt_ids,
                    request,
                    lambda piece: loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece)),
                    cancel.is_set,
                )
                loop.call_soon_threadsafe(queue.put_nowait, ("finish", (finish, seen)))
            except Exception as exc:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", str(exc)))

        worker = loop.run_in_executor(None, run)
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
