"""The local API's paths, named once. The node declares its routes with these constants and the window,
the CLI and the tests build their requests with the functions, so a path renamed on one side cannot
quietly miss on the other (tests/test_api_contract.py checks that every path here is served)."""

from __future__ import annotations

from urllib.parse import quote, urlencode

PING = "/api/ping"
STATUS = "/api/status"
HARDWARE = "/api/hardware"
SETTINGS = "/api/settings"
JOIN = "/api/settings/join"
LAN_SWARMS = "/api/lan/swarms"
HF_TOKEN = "/api/secrets/hf-token"
CONTRIBUTION = "/api/contribution/{action}"
CONTRIBUTION_LOG = "/api/contribution/log"
SWARM = "/api/swarm"
SWARM_CHECK = "/api/swarm/check"
STATS_HISTORY = "/api/stats/history"
CHATS = "/api/chats"
CHAT = "/api/chats/{chat_id}"
CHAT_MESSAGES = "/api/chats/{chat_id}/messages"
CHAT_REGENERATE = "/api/chats/{chat_id}/regenerate"
CHAT_CONTINUE = "/api/chats/{chat_id}/continue"
SHUTDOWN = "/api/shutdown"

ALL = (
    PING, STATUS, HARDWARE, SETTINGS, JOIN, LAN_SWARMS, HF_TOKEN, CONTRIBUTION, CONTRIBUTION_LOG, SWARM,
    SWARM_CHECK, STATS_HISTORY, CHATS, CHAT, CHAT_MESSAGES, CHAT_REGENERATE, CHAT_CONTINUE, SHUTDOWN,
)  # fmt: skip


def _id(value: str) -> str:
    return quote(str(value), safe="")


def contribution(action: str) -> str:
    """start, stop, pause, pause-free, resume: what the Contribute pane's buttons send."""
    return CONTRIBUTION.format(action=_id(action))


def contribution_log(lines: int) -> str:
    return f"{CONTRIBUTION_LOG}?{urlencode({'lines': lines})}"


def hardware(query: dict[str, object] | None = None) -> str:
    """This computer's hardware and, with `query` (model, dtype, ...), the plan for that model."""
    return f"{HARDWARE}?{urlencode(query)}" if query else HARDWARE


def stats_history(hours: int) -> str:
    return f"{STATS_HISTORY}?{urlencode({'hours': hours})}"


def chats(search: str | None = None) -> str:
    return f"{CHATS}?{urlencode({'q': search})}" if search else CHATS


def chat(chat_id: str) -> str:
    return CHAT.format(chat_id=_id(chat_id))


def chat_messages(chat_id: str) -> str:
    return CHAT_MESSAGES.format(chat_id=_id(chat_id))


def chat_regenerate(chat_id: str) -> str:
    return CHAT_REGENERATE.format(chat_id=_id(chat_id))


def chat_continue(chat_id: str) -> str:
    return CHAT_CONTINUE.format(chat_id=_id(chat_id))
