"""Typed node answers for window tests that draw a pane without a node: the fields a test names, the
rest as a fresh node reports them."""

from __future__ import annotations

from corolla.api.models import ContributionStatus, NodeStatus


def node_status(state: str = "stopped", contribution: dict | None = None, **fields) -> NodeStatus:
    """A NodeStatus whose contribution is in `state` (with `contribution`'s other fields), and `fields`."""
    base = {
        "version": "0.0.0",
        "pid": 1,
        "started_at": 0.0,
        "model": "test-model",
        "model_is_demo": False,
        "swarm": "private",
        "secrets_storage": "memory",
    }
    c = ContributionStatus(**{"state": state, "reason": "", "restarts": 0, **(contribution or {})})
    return NodeStatus.model_validate({**base, **fields, "contribution": c})
