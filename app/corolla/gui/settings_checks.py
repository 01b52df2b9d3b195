"""The settings dialog's checks before it sends anything, and the node's validation messages as a person
reads them."""

from __future__ import annotations

import re

TIME_WINDOW = re.compile(r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$")
FIELD_NAMES = {
    "time_window": "Daily window",
    "custom_peers": "Custom peers",
    "memory_cap_gib": "Memory",
    "model": "Model",
    "invite": "Invite",
    "dht_prefix": "Swarm prefix",
    "trusted_peers": "Trusted peers",
}


def friendly_error(message: str) -> str:
    """The node's validation message, as a person reads it: "time_window: Value error, time_window must
    look like 22:00-07:00" -> "Daily window: must look like 22:00-07:00"."""
    parts = []
    for problem in message.split("; "):
        field, _, text = problem.partition(": ")
        if not text:
            parts.append(problem)
            continue
        key = field.split(".")[0]
        text = text.removeprefix("Value error, ").removeprefix(f"{key} ")
        parts.append(f"{FIELD_NAMES.get(key, key.replace('_', ' ').capitalize())}: {text}")
    return "; ".join(parts)


def local_problems(window: str, peers: list[str], custom: bool, invite: str | None) -> list[str]:
    """What can be said before asking the node (the node checks again)."""
    problems = []
    if window and not TIME_WINDOW.match(window):
        problems.append("Daily window: write it as HH:MM-HH:MM, e.g. 22:00-07:00 (it may wrap midnight)")
    if custom:
        if not peers:
            problems.append("Custom peers: add at least one address, one per line")
        bad = [p for p in peers if not p.startswith("/") or "/p2p/" not in p]
        if bad:
            problems.append(f"Custom peers: {bad[0][:80]!r} is not a multiaddr ending in /p2p/<peer id>")
    if invite is not None and not invite.startswith("corolla-invite:"):
        problems.append("Invite: paste the whole string, starting with corolla-invite:")
    return problems
