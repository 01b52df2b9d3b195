"""Server-sent events: the one parser (the window, the CLI, scripts and tests read streams with it)
and the node's encoder of a reply event."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pydantic import BaseModel


class SseEvent(NamedTuple):
    event: str  # "message" when the stream names none (as the OpenAI-compatible endpoint's)
    data: str

    def json(self):
        return json.loads(self.data)


class SseParser:
    """Incremental: feed it lines or raw chunks as they arrive, it returns the events they complete."""

    def __init__(self) -> None:
        self._partial = b""
        self._event: str | None = None
        self._data: list[str] = []

    def feed_line(self, line: str) -> SseEvent | None:
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self._event = value.strip()
        elif field == "data":
            self._data.append(value)
        return None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        events = [self.feed_line(line.decode(errors="replace")) for line in lines]
        return [event for event in events if event is not None]

    def _dispatch(self) -> SseEvent | None:
        event, data = self._event or "message", self._data
        self._event, self._data = None, []
        return SseEvent(event, "\n".join(data)) if data else None


def parse_lines(lines: Iterable[str | bytes]) -> Iterator[SseEvent]:
    """The events of a stream read line by line (urllib's response, httpx's iter_lines)."""
    parser = SseParser()
    for line in lines:
        event = parser.feed_line(line.decode(errors="replace") if isinstance(line, bytes) else line)
        if event is not None:
            yield event
    event = parser.feed_line("")  # a last event without its blank line
    if event is not None:
        yield event


def json_events(lines: Iterable[str | bytes]) -> Iterator[tuple[str, object]]:
    """(event, JSON data) pairs; a malformed event is skipped and the stream goes on."""
    for event in parse_lines(lines):
        try:
            yield event.event, event.json()
        except json.JSONDecodeError:
            continue


def encode_event(event: BaseModel) -> str:
    """One reply event as an SSE frame: its `type` names the event."""
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"
