"""The node's API contract (corolla/api/): the one SSE parser, the reply events' tagged union, and the
node client core. Pure functions, no processes; the node tests run them against a real node."""

from __future__ import annotations

import random
import subprocess
import sys

from corolla.api import events as ev
from corolla.api.client import error_message
from corolla.api.sse import SseParser, encode_event, json_events

FRAMES = (
    encode_event(ev.TokenPiece(text="Hé 🌸"))
    + ": keep-alive comment\n\n"
    + encode_event(ev.ReplyFailed(kind="no_swarm", message="nobody serves it"))
    + "data: [DONE]\n\n"
    + 'event: token\ndata: {"text":\n\n'  # malformed JSON: skipped by json_events
    + 'data: {"a": 1}\r\n\r\n'
)


def test_the_parser_reads_the_same_events_however_the_bytes_are_cut():
    expected = list(json_events(FRAMES.splitlines(keepends=True)))
    assert [name for name, _ in expected] == ["token", "error", "message"]
    raw = FRAMES.encode()
    rng = random.Random(0)
    for _ in range(200):
        parser, events, at = SseParser(), [], 0
        while at < len(raw):
            step = rng.randint(1, 9)
            events += parser.feed(raw[at : at + step])
            at += step
        assert [e.event for e in events] == ["token", "error", "message", "token", "message"]
        assert events[0].json() == {"type": "token", "text": "Hé 🌸"}


def test_reply_events_are_a_tagged_union_and_bad_ones_are_skipped():
    done = ev.reply_event("done", {"status": "complete", "text": "hi", "tokens": 2, "finish_reason": "stop"})
    assert isinstance(done, ev.ReplyDone) and done.seen_by is None and done.tokens_per_second == 0.0
    assert isinstance(ev.reply_event("token", {"text": "x"}), ev.TokenPiece)
    assert isinstance(ev.reply_event("error", {"kind": "x", "message": "y"}), ev.ReplyFailed)
    assert ev.reply_event("token", {}) is None  # no text
    assert ev.reply_event("surprise", {"text": "x"}) is None  # an event this window does not know
    saved = {"id": "m", "role": "user", "content": "q", "status": "complete", "tokens": 0, "created_at": 1.0}
    event = ev.reply_event("message", {"message": {**saved, "seq": 1, "chat_id": "c"}})
    assert isinstance(event, ev.MessageSaved) and event.message.content == "q"


def test_error_messages_are_the_nodes_own_or_name_the_status():
    assert error_message(409, {"kind": "conflict", "message": "no answer to continue"}) == "no answer to continue"
    assert error_message(404, None) == "the node answered 404"
    assert error_message(500, ["not", "an", "envelope"]) == "the node answered 500"


def test_the_cli_reads_the_node_without_pydantic_torch_or_hivemind():
    code = (
        "import sys; from corolla.cli import main; from corolla.api.client import SyncNodeClient; "
        "print(sorted(m for m in ('pydantic', 'torch', 'hivemind') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_the_clients_paths_are_exactly_the_ones_the_node_serves():
    """The window and the CLI build their requests from corolla.api.routes; the node declares its routes
    with the same constants, and nothing under /api is served that the module does not name."""
    from types import SimpleNamespace

    from corolla.api import routes
    from corolla.node.api import create_app

    app = create_app(SimpleNamespace(token="token"))
    served = {path for route in app.routes if (path := getattr(route, "path", "")).startswith("/api/")}
    assert served == set(routes.ALL)
    assert routes.chat("a b/c") == "/api/chats/a%20b%2Fc"  # an id never reaches another route
    assert routes.contribution_log(400) == "/api/contribution/log?lines=400"
    assert routes.hardware({"model": "x y"}) == "/api/hardware?model=x+y" and routes.hardware() == routes.HARDWARE
