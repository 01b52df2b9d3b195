"""The generating side of the local chat channel, in the block server's process (torch is there already).

The node sends everything a reply needs in one request (the chat's history, the target, the privacy
choice resolved to peer ids, the servers it has flagged or found slow); this side keeps one ChatSession
per chat, reused while the history the node sends is the one the session holds (its KV cache stays on
the servers across turns, as it did in the node), and answers with pieces, then "done" or "error".
The client and its modules are imported on the first request: a server nobody chats through stays as
it was.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from corolla.chat_engine.client_host import ClientTarget, NoSwarm, SharedSwarm, SwarmClientHost

logger = logging.getLogger(__name__)
MAX_CACHED_SESSIONS = 8  # as the node's ChatService: each holds KV cache on the swarm's servers
MAX_NOTES = 256
CHAT_BUSY_WAIT_S = 30.0  # a new reply waits this long for the chat's previous one to wind down
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")


class RequestError(ValueError):
    """A request this engine cannot act on (malformed): answered with an error, nothing generated."""


class _Kept:
    def __init__(self, session: Any, system_prompt: str | None, privacy: Any):
        self.session, self.system_prompt, self.privacy = session, system_prompt, privacy


class ChatEngine:
    def __init__(self, shared: Callable[[], SharedSwarm | None] = lambda: None) -> None:
        """`shared()`: the block server's swarm, which the client joins through when a chat targets it."""
        self.clients = SwarmClientHost(lambda: None, lambda: os.environ.get("HF_TOKEN"), shared)
        self.clients.on_new_client = self._on_new_client
        self._sessions: OrderedDict[str, _Kept] = OrderedDict()
        self._lock = threading.Lock()
        self._chat_locks: dict[str, threading.Lock] = {}  # held while a reply for the chat is written
        self._applied: set[str] = set()  # flags and slow verdicts of the node already given to this client
        self.notes: deque[dict] = deque(maxlen=MAX_NOTES)  # new flags and slow verdicts, for the node's database

    # --- one reply -----------------------------------------------------------------------------------
    def answer(self, request: dict, on_text: Callable[[str], None], should_stop: Callable[[], bool]) -> dict:
        """Generate one reply (in a worker thread); returns the last message: "done" or "error". One reply
        per chat at a time: a new one waits a while for the previous one to wind down (a stopped reply
        ends at its next token)."""
        kept, lock = None, None
        try:
            chat_id, mode = _text(request, "chat_id"), request.get("mode")
            if mode not in ("send", "continue"):
                raise RequestError("mode must be send or continue")
            lock = self._chat_lock(chat_id)
            if not lock.acquire(timeout=CHAT_BUSY_WAIT_S):
                lock = None
                raise RuntimeError("this chat's previous reply is still being written; try again in a moment")
            model = self._client_for(request)
            privacy = self._privacy(model, request.get("privacy"))
            kept = self._session_for(chat_id, model, request, privacy)
            generate = dict(max_new_tokens=_count(request), stop=_stops(request), on_text=on_text)
            generate.update(should_stop=should_stop, **self._sampling(request))
            if mode == "send":
                result = kept.session.send(_text(request, "content"), **generate)
            else:
                result = kept.session.continue_reply(**generate)
            return {
                "type": "done",
                "text": result.text,
                "tokens": result.tokens,
                "tokens_per_second": result.tokens_per_second,
                "stopped_by": result.stopped_by,
                "seen_by": result.seen_by,
            }
        except Exception as exc:  # told to the node, which keeps what streamed and tells the user
            seen = list(kept.session.last_seen_by) if kept is not None else []
            if lock is not None:  # this reply's session is not trusted any more (never another reply's)
                self.forget(request["chat_id"])
            if not isinstance(exc, (NoSwarm, RequestError)):
                logger.warning("a chat reply failed: %s", exc, exc_info=not isinstance(exc, RuntimeError))
            return {**_error_answer(exc), "seen_by": seen}
        finally:
            if lock is not None:
                lock.release()

    def _chat_lock(self, chat_id: str) -> threading.Lock:
        with self._lock:
            return self._chat_locks.setdefault(chat_id, threading.Lock())

    # --- the Swarm pane's report -------------------------------------------------------------------------
    def swarm(self, request: dict) -> dict:
        """The swarm as this engine's client sees it (swarm_report.py), with the node's records."""
        from corolla.chat_engine.swarm_report import swarm_report

        try:
            model = self._client_for(request)
            own = request.get("own") if isinstance(request.get("own"), str) else None
            slow = {e["peer_id"]: e for e in request.get("slow") or [] if isinstance(e, dict) and "peer_id" in e}
            return {"type": "swarm", "models": swarm_report(model, own, request.get("flagged") or {}, slow)}
        except Exception as exc:  # the node says it as it would its own failure
            return _error_answer(exc)

    def check(self, request: dict) -> dict:
        """ "Check this server" (the API's POST /api/swarm/check) with this engine's client, and the flags it
        raised for the node's database."""
        from corolla.chat_engine.swarm_report import check_answer
        from corolla.swarm.client.server_check import check_server

        try:
            model = self._client_for(request)
            peer = _text(request, "peer_id")
            verdict = model.run_async(check_server(model, peer), timeout=180)
            return {"type": "check", "verdict": check_answer(peer, verdict), "notes": self.take_notes()}
        except Exception as exc:
            return _error_answer(exc)

    # --- an OpenAI-style completion (node/openai_api.py) ----------------------------------------------
    def complete(self, request: dict, on_text: Callable[[str], None], should_stop: Callable[[], bool]) -> dict:
        """One completion of a prompt (text, or chat messages), streamed as a reply is; no session kept."""
        from corolla.chat_engine.completion import EmptyPrompt, complete, prompt_ids

        try:
            model = self._client_for(request)
            privacy = self._privacy(model, request.get("privacy"))
            messages = request.get("messages")
            if messages is not None:
                messages = _history({"history": messages})
            elif not isinstance(request.get("prompt"), str):
                raise RequestError("a completion needs messages or a prompt")
            try:
                ids = prompt_ids(model.tokenizer, messages, request.get("prompt"))
            except EmptyPrompt as exc:
                raise RequestError(str(exc)) from exc
            text, tokens, finish, seen = complete(
                model,
                ids,
                max_new_tokens=_count(request),
                stops=_stops(request),
                sampling=self._sampling(request),
                privacy=privacy,
                on_text=on_text,
                should_stop=should_stop,
            )
            return {
                "type": "done",
                "text": text,
                "tokens": tokens,
                "prompt_tokens": len(ids),
                "finish_reason": finish,
                "seen_by": seen,
            }
        except Exception as exc:  # told to the node, which answers the HTTP request with it
            if not isinstance(exc, (NoSwarm, RequestError)):
                logger.warning("a completion failed: %s", exc, exc_info=not isinstance(exc, RuntimeError))
            return _error_answer(exc)

    def _session_for(self, chat_id: str, model: Any, request: dict, privacy: Any) -> _Kept:
        """The chat's session if it holds exactly the history sent (same model, privacy, system prompt),
        else a new one from that history (the servers' caches are filled again on its first step)."""
        from corolla.swarm.client.chat import ChatSession

        history = _history(request)
        system_prompt = request.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise RequestError("system_prompt must be text")
        with self._lock:
            kept = self._sessions.get(chat_id)
            if kept is not None:
                same = kept.session.model is model and kept.privacy == privacy and kept.system_prompt == system_prompt
                if not (same and kept.session.messages == history):
                    self._sessions.pop(chat_id)
                    kept.session.close()
                    kept = None
            if kept is None:
                session = ChatSession(
                    model, system_prompt=system_prompt, max_length=4096, messages=history, privacy=privacy
                )
                kept = self._sessions[chat_id] = _Kept(session, system_prompt, privacy)
            self._sessions.move_to_end(chat_id)
            for other in list(self._sessions)[: max(len(self._sessions) - MAX_CACHED_SESSIONS, 0)]:
                lock = self._chat_locks.get(other)
                if other != chat_id and (lock is None or not lock.locked()):  # never a chat answering now
                    self._sessions.pop(other).session.close()  # (its lock stays: a few bytes per chat)
            return kept

    def forget(self, chat_id: str) -> None:
        with self._lock:
            kept = self._sessions.pop(chat_id, None)
        if kept is not None:
            try:
                kept.session.close()
            except Exception:
                logger.warning("closing a chat session failed", exc_info=True)

    # --- what the node decides and keeps --------------------------------------------------------------
    @staticmethod
    def _privacy(model: Any, spec: Any) -> Any:
        """The client's Privacy for the node's resolved choice; "members" in the node's own private swarm
        adds every server in it, as the node did."""
        from corolla.swarm.client.privacy import Privacy, as_privacy

        if spec is None:
            return Privacy()
        if not isinstance(spec, dict):
            raise RequestError("privacy must be an object")
        spec = dict(spec)
        if spec.pop("with_swarm_servers", False):
            model.run_async(model.view.refresh_if_stale(), timeout=30)
            spec["peers"] = sorted({*(spec.get("peers") or ()), *model.view.spans})
        return as_privacy(spec)

    @staticmethod
    def _sampling(request: dict) -> dict:
        from corolla.swarm.client.generation import sampling_kwargs

        sampling = _dict(request, "sampling")
        unknown = set(sampling) - set(SAMPLING_FIELDS)
        if unknown or "temperature" not in sampling:
            raise RequestError(f"sampling takes {', '.join(SAMPLING_FIELDS)} (temperature required)")
        return sampling_kwargs(**sampling)

    def _on_new_client(self, model: Any) -> None:
        from corolla.swarm.client.speed import speed_of
        from corolla.swarm.client.verification import ledger_of

        self._applied = set()
        with self._lock:  # the replaced client's sessions ended with it (its close ends their streams)
            for chat_id in [c for c, kept in self._sessions.items() if kept.session.model is not model]:
                self._sessions.pop(chat_id)
        ledger_of(model.view).on_flag.append(lambda evidence: self.notes.append({"type": "flag", "evidence": evidence}))
        speed_of(model.view).on_slow.append(lambda evidence: self.notes.append({"type": "slow", "evidence": evidence}))

    def _client_for(self, request: dict) -> Any:
        """The swarm client for the request's target, with the node's flagged and slow servers applied."""
        model = self.clients.get(ClientTarget.from_dict(_dict(request, "target")))
        self._apply_node_records(model, request)
        return model

    def _apply_node_records(self, model: Any, request: dict) -> None:
        """The servers the node has flagged stay blocked, those found slow keep their discount (each given
        to this client once)."""
        from corolla.swarm.client.speed import speed_of
        from corolla.swarm.client.verification import block, ledger_of

        flagged, slow = request.get("flagged") or {}, request.get("slow") or []
        if not isinstance(flagged, dict) or not isinstance(slow, list):
            raise RequestError("flagged must be an object and slow a list")
        ledger, speed = ledger_of(model.view), speed_of(model.view)
        for peer, evidence in flagged.items():
            if f"flag:{peer}" not in self._applied and isinstance(evidence, dict):
                self._applied.add(f"flag:{peer}")
                ledger.flagged[peer] = evidence
                block(model.view, peer)
        callbacks, speed.on_slow[:] = list(speed.on_slow), []  # the node's own records are not echoed back
        try:
            for evidence in slow:
                key = f"slow:{evidence.get('peer_id')}" if isinstance(evidence, dict) else None
                if key is not None and key not in self._applied:
                    self._applied.add(key)
                    speed.mark_slow(evidence)
        finally:
            speed.on_slow[:] = callbacks

    def take_notes(self) -> list[dict]:
        notes = []
        while self.notes:
            notes.append(self.notes.popleft())
        return notes

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), OrderedDict()
        for kept in sessions:
            try:
                kept.session.close()
            except Exception:
                logger.warning("closing a chat session failed", exc_info=True)
        self.clients.close()


def _error_answer(exc: Exception) -> dict:
    """A failure as the node reads it (engine_error): "no_swarm" for NoSwarm, else the exception's type."""
    kind = "no_swarm" if isinstance(exc, NoSwarm) else type(exc).__name__
    return {"type": "error", "kind": kind, "message": str(exc)}


def _dict(request: dict, key: str) -> dict:
    value = request.get(key)
    if not isinstance(value, dict):
        raise RequestError(f"{key} must be an object")
    return value


def _text(request: dict, key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise RequestError(f"{key} must be text")
    return value


def _count(request: dict) -> int:
    value = request.get("max_new_tokens")
    if type(value) is not int or not 1 <= value <= 1_000_000:
        raise RequestError("max_new_tokens must be a positive whole number")
    return value


def _stops(request: dict) -> list[str]:
    stops = request.get("stop") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a list of texts")
    return stops


def _history(request: dict) -> list[dict]:
    history = request.get("history")
    if not isinstance(history, list):
        raise RequestError("history must be a list of messages")
    messages = []
    for item in history:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("role"), str)
            or not isinstance(item.get("content"), str)
        ):
            raise RequestError("each message of the history needs a role and a content")
        messages.append({"role": item["role"], "content": item["content"]})
    return messages
