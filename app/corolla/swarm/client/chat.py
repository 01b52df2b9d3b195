"""Chat over a remote model: the model's chat template, one reused session, streamed UTF-8-safe text.

Each turn renders the whole conversation with the chat template and sends only the tokens the
servers have not seen yet. Where the rendering differs from what was sent (a reply that re-tokenises
differently, a template that rewrites earlier turns), the session rolls back to the common prefix if
every server on the route is known to honour rollback (Corolla servers); otherwise it starts over.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from corolla.swarm.client.privacy import Privacy
from corolla.swarm.client.remote_model import DistributedModelForCausalLM, RemoteSession

ABANDON_TIMEOUT_S = 5.0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return min(n, len(a) - 1)  # always send at least one token


class TextStream:
    """Turns token ids into text pieces without ever splitting a multi-byte character.

    Each token decodes a short window (the tokens of the last piece, for context, and the new ones), not
    the whole reply again: the cost per token stays flat as the reply grows. The context matters because
    tokenizers decode a word's leading space or a byte sequence differently at the start of a text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = ""
        self._context = 0  # where the window decoded for the next piece starts
        self._shown = 0  # tokens whose text has been handed out

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self._decode(self.tokens[self._context : self._shown])
        text = self._decode(self.tokens[self._context :])
        if len(text) <= len(before) or text.endswith("\ufffd"):  # nothing new yet, or half a character
            return ""
        piece = text[len(before) :]
        self._context, self._shown = self._shown, len(self.tokens)
        self.emitted += piece
        return piece

    def text(self) -> str:
        """Everything so far, without a multi-byte character cut off at the end (a reply that stops
        there reads the same streamed and not streamed)."""
        text = self._decode(self.tokens)
        return self.emitted if text.endswith("\ufffd") else text


class ReplyWatcher:
    """A `generate()` streamer: stops at an end-of-sequence token, a stop string or a cancellation, and
    hands out UTF-8-safe text pieces as they complete."""

    def __init__(
        self,
        tokenizer,
        eos_token_ids: list[int],
        stop: list[str] | None = None,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.stream = TextStream(tokenizer)
        self.eos = set(eos_token_ids)
        self.stops = [s for s in (stop or []) if s]
        self._longest_stop = max((len(s) for s in self.stops), default=1)
        self.on_text, self.should_stop = on_text, should_stop
        self.stopped_by = "length"  # or "eos", "stop string", "cancelled"
        self._shown = ""  # text handed out before a rewind, not to be handed out twice

    def rewind(self) -> None:
        """generate() re-runs from the start of this reply (a server was caught returning wrong
        results): forget the tokens; text already handed out is not repeated where the re-run agrees."""
        self._shown = self._shown or self.stream.emitted
        self.stream = TextStream(self.stream.tokenizer)
        self.stopped_by = "length"

    def _unseen(self, piece: str) -> str:
        if not self._shown:
            return piece
        emitted = self.stream.emitted
        if self._shown.startswith(emitted):
            return ""  # shown already
        if emitted.startswith(self._shown):
            piece, self._shown = emitted[len(self._shown) :], ""
            return piece
        self._shown = ""  # the re-run differs from what was shown: the rest follows as it comes
        return piece

    def __call__(self, tokens: torch.Tensor) -> bool:
        token = int(tokens[0])
        if token in self.eos:
            self.stopped_by = "eos"
            return True
        new = self.stream.push(token)
        piece = self._unseen(new)
        # A stop string that was not there before overlaps the new text: only the end is searched.
        tail = self.stream.emitted[-(len(new) + self._longest_stop - 1) :] if new else ""
        if self.stops and any(s in tail for s in self.stops):
            self.stopped_by = "stop string"
            return True
        if piece and self.on_text is not None:
            self.on_text(piece)
        if self.should_stop is not None and self.should_stop():
            self.stopped_by = "cancelled"
            return True
        return False

    def text(self) -> str:
        """The reply, cut before the first stop string."""
        text = self.stream.text()
        for s in self.stops:
            if s in text:
                text = text[: text.index(s)]
        return text


@dataclass
class ChatReply:
    text: str
    tokens: int
    seconds: float
    stopped_by: str  # "eos", "stop string", "length" or "cancelled"
    seen_by: list[dict] = field(default_factory=list)  # the servers that received this turn's hidden states

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ChatSession:
    model: DistributedModelForCausalLM
    system_prompt: str | None = None
    max_length: int = 2048
    messages: list[dict] = field(default_factory=list)
    privacy: Privacy | None = None  # who may receive this chat's hidden states (None: the model's policy)
    _session: RemoteSession | None = None
    _sent: list[int] = field(default_factory=list)
    last_seen_by: list[dict] = field(default_factory=list)  # the last turn's recipients (also when it failed)

    def _render(self, continuing: bool = False) -> list[int]:
        """The conversation as token ids, ready for the assistant to write; `continuing`: the last message
        is the assistant's, left open so that generation goes on from its end."""
        tokenizer = self.model.tokenizer
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + self.messages
        if tokenizer.chat_template:
            if continuing:
                text = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
            else:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False).input_ids
        if continuing:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1])
            return tokenizer(text + f"assistant: {messages[-1]['content']}").input_ids
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tokenizer(text).input_ids

    def send(
        self,
        text: str,
        *,
        max_new_tokens: int = 256,
        stop: list[str] | None = None,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        **sampling,
    ) -> ChatReply:
        """Add a user message and generate the assistant's reply, streaming text pieces to `on_text`."""
        self.messages.append({"role": "user", "content": text})
        return self._generate(self._render(), max_new_tokens, stop, on_text, should_stop, sampling)

    def continue_reply(
        self,
        *,
        max_new_tokens: int = 256,
        stop: list[str] | None = None,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        **sampling,
    ) -> ChatReply:
        """Write more of the last assistant message (one cut at the token limit): the reply returned is
        the new text only; the message in `messages` grows by it."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("there is no answer to continue")
        ids = self._render(continuing=True)
        before = self.messages.pop()["content"]  # _generate appends what it writes as a message
        try:
            reply = self._generate(ids, max_new_tokens, stop, on_text, should_stop, sampling)
        finally:
            written = self.messages.pop()["content"] if self.messages[-1]["role"] == "assistant" else ""
            self.messages.append({"role": "assistant", "content": before + written})
        return reply

    def _generate(self, ids: list[int], max_new_tokens: int, stop, on_text, should_stop, sampling) -> ChatReply:
        common = _common_prefix(ids, self._sent)
        if (
            self._session is not None
            and len(ids) + max_new_tokens <= self.max_length
            and common > 0
            and (common == len(self._sent) or self._session.supports_rollback)
        ):
            if common < len(self._sent):
                self._session.rollback(common)  # e.g. the reply re-tokenised differently
            new = ids[common:]
        else:
            self.reset_session()
            new = ids
        if self._session is None:
            self._session = self.model.inference_session(
                max_length=max(self.max_length, len(ids) + max_new_tokens), privacy=self.privacy
            )
        self._session.recipients.clear()  # from here on: who receives this turn's hidden states
        self.last_seen_by = []
        watcher = ReplyWatcher(self.model.tokenizer, self.model.eos_token_ids, stop, on_text, should_stop)
        started = time.perf_counter()
        try:
            self.model.generate(
                torch.tensor([new]),
                max_new_tokens=max_new_tokens,
                session=self._session,
                streamer=watcher,
                eos_token_id=[],
                **sampling,
            )
        except BaseException:
            self.last_seen_by = seen_by(self._session)
            # Interrupted mid-step (a hard Ctrl-C, an error): what the servers hold is unknown, so the
            # reply keeps what was shown and the next turn starts a fresh session from the rendering.
            self.messages.append({"role": "assistant", "content": watcher.text()})
            self.abandon_session()
            raise
        elapsed = time.perf_counter() - started
        reply, generated = watcher.text(), watcher.stream.tokens
        # What the servers hold now: everything sent, plus generated tokens but the pending last one.
        self._sent = ids + generated[:-1] if generated else list(ids)
        self._sent = self._sent[: self._session.position]
        self._session.pending = None  # the last token comes back in the next turn's rendering
        self.messages.append({"role": "assistant", "content": reply})
        self.last_seen_by = seen_by(self._session)
        return ChatReply(reply, len(generated), elapsed, watcher.stopped_by, self.last_seen_by)

    def abandon_session(self) -> None:
        """Drop the session without trusting it (bounded: a server that does not answer is left)."""
        session, self._session, self._sent = self._session, None, []
        if session is not None:
            with contextlib.suppress(BaseException):
                session.close(timeout=ABANDON_TIMEOUT_S)

    def reset_session(self) -> None:
        if self._session is not None:
            self._session.close()
        self._session, self._sent = None, []

    def close(self) -> None:
        self.reset_session()


def seen_by(session: RemoteSession) -> list[dict]:
    """The servers that received a session's hidden states since its recipients were last cleared:
    [{"peer_id", "name", "blocks": [[start, end], ...]}], ordered by their first block."""
    names = session.server_names()
    rows = [
        {"peer_id": peer, "name": names.get(peer, ""), "blocks": [list(r) for r in sorted(ranges)]}
        for peer, ranges in session.recipients.items()
    ]
    return sorted(rows, key=lambda row: (row["blocks"][0] if row["blocks"] else [0, 0], row["peer_id"]))
