"""What the window says about the node in one line: the tray's status, the memory it uses, the quit question."""

from __future__ import annotations

from corolla.api.models import NodeStatus
from corolla.gui.widgets import block_span, plural


def status_line(status: NodeStatus | None) -> str:
    """One line for the tray menu and tooltip."""
    if status is None:
        return "The node is not running"
    if status.awaiting_consent:
        return "Not contributing: waiting for your go-ahead"
    c = status.contribution
    state = c.state
    if state == "online":
        blocks = block_span(c.start_block, c.end_block)
        return f"Contributing {blocks or 'blocks'} · {plural(c.sessions_active, 'active session')}"
    if state == "paused":
        rule = status.pause_rule
        return f"Paused ({rule.until})" if rule else "Paused by you"
    return {
        "starting": "Starting the block server…",
        "loading": "Loading the model…",
        "restarting": "The block server crashed; restarting",
        "failed": "Contribution failed",
        "stopped": "Not contributing",
    }.get(state, state)


def node_memory(paths=None) -> int | None:
    """Bytes of memory the node and its block server hold, or None if unknown: each process's own pages
    (USS), so the libraries they share are not counted once per process."""
    try:
        import psutil

        from corolla.gui.launcher import running_pid

        pid = running_pid(paths)
        if pid is None:
            return None
        node = psutil.Process(pid)
        total = 0
        for process in (node, *node.children(recursive=True)):
            try:
                total += process.memory_full_info().uss
            except psutil.AccessDenied:
                total += process.memory_info().rss
        return total
    except Exception:  # psutil missing, the node gone meanwhile, no permission: say nothing
        return None


def quit_question(status: NodeStatus | None, memory: int | None) -> str:
    """What quitting leaves running, in a person's words."""
    from corolla.units import human_bytes

    state = status.contribution.state if status is not None else None
    held = f", holding about {human_bytes(memory)} of memory" if memory else ""
    if state in ("online", "starting", "loading", "restarting"):
        doing = f"keeps contributing to the swarm in the background{held}"
    elif state == "paused":
        doing = f"stays paused in the background{held}"
    else:
        doing = f"keeps running in the background{held}, ready for chats"
    return (
        f"When the window quits, Corolla's node {doing}. Stop it too if you want this computer's memory and "
        "processor back; it starts again the next time you open Corolla."
    )
