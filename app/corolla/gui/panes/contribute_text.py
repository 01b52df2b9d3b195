"""What the Contribute pane says in words: states, actions, durations, the model, the network, and
sessions served together."""

from __future__ import annotations

from corolla.api.models import ContributionStatus, NodeStatus, Reachability

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


def model_text(status: NodeStatus) -> str:
    """The model, and for the embedded default its size and licence (named honestly, random weights too)."""
    card = status.model_card
    if not card or card.random_weights:  # the demo model's name already says "random weights"
        return card.name if card else status.model
    size = f"{card.parameters / 1e6:.0f} M parameters, " if card.parameters else ""
    return f"{card.name} ({size}licence {card.license})"


def network_text(reachability: Reachability | None) -> str:
    """Where this computer stands: reachable directly, via a relay, or not, with what to do."""
    if not reachability or reachability.state == "not_checked":
        return "Checked when this computer contributes"
    headline = {
        "checking": "Checking…",
        "direct": "Reachable directly",
        "relay": "Via a relay (slower)",
        "unreachable": "Not reachable",
        "unknown": "Unknown (acting as reachable)",
        "local": "This computer only",
    }.get(reachability.state, reachability.state)
    advice = reachability.advice
    return f"{headline}. {advice}".strip() if advice and advice != "Nothing to do." else headline


def together_text(contribution: ContributionStatus) -> str:
    """How many chats shared each computed step (continuous batching), in words."""
    steps, forwards = contribution.token_steps, contribution.step_forwards
    if not forwards:
        return "–"
    busiest = [label for label, count in contribution.batch_sizes.items() if count]
    most = busiest[-1].replace("-", "–") if busiest else "1"
    return f"{steps / forwards:.1f} chats a step on average, up to {most} at once"
