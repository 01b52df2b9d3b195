"""What the Contribute pane says in words: states, actions, durations, the model, the network, and
sessions served together."""

from __future__ import annotations

STATE_TEXT = {
    "online": "Contributing",
    "starting": "Starting…",
    "loading": "Loading the model…",
    "restarting": "Restarting after a crash",
    "paused": "Paused",
    "stopped": "Not contributing",
    "failed": "Failed",
}


ACTION_TEXT = {
    "start": "Starting…",
    "pause": "Pausing…",
    "pause-free": "Pausing and unloading the model…",
    "resume": "Resuming…",
    "stop": "Stopping…",
}


def duration(seconds: float) -> str:
    """3725 -> "1 h 2 min"; 42 -> "42 s"."""
    seconds = int(seconds or 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} days {hours % 24} h"


def model_text(status: dict) -> str:
    """The model, and for the embedded default its size and licence (named honestly, random weights too)."""
    card = status.get("model_card")
    if not card or card["random_weights"]:  # the demo model's name already says "random weights"
        return card["name"] if card else status["model"]
    size = f"{card['parameters'] / 1e6:.0f} M parameters, " if card.get("parameters") else ""
    return f"{card['name']} ({size}licence {card['license']})"


def network_text(reachability: dict | None) -> str:
    """Where this computer stands: reachable directly, via a relay, or not, with what to do."""
    if not reachability or reachability.get("state") == "not_checked":
        return "Checked when this computer contributes"
    headline = {
        "checking": "Checking…",
        "direct": "Reachable directly",
        "relay": "Via a relay (slower)",
        "unreachable": "Not reachable",
        "unknown": "Unknown (acting as reachable)",
        "local": "This computer only",
    }.get(reachability["state"], reachability["state"])
    advice = reachability.get("advice") or ""
    return f"{headline}. {advice}".strip() if advice and advice != "Nothing to do." else headline


def together_text(contribution: dict) -> str:
    """How many chats shared each computed step (continuous batching), in words."""
    steps, forwards = contribution.get("token_steps", 0), contribution.get("step_forwards", 0)
    if not forwards:
        return "–"
    busiest = [label for label, count in (contribution.get("batch_sizes") or {}).items() if count]
    most = busiest[-1].replace("-", "–") if busiest else "1"
    return f"{steps / forwards:.1f} chats a step on average, up to {most} at once"
