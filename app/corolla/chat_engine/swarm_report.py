"""What the window's Swarm pane shows, read through a swarm client: every model's servers in the swarm,
with this client's verdicts on each (spot checks, speed) and the route a new chat would take. The node
asks the engine for it while it contributes (its client is there), else reads it with its own client."""

from __future__ import annotations

from typing import Any


def swarm_report(model: Any, own: str | None, flagged: dict[str, dict], slow: dict[str, dict]) -> list[dict]:
    """`own`: this computer's server's peer id; `flagged`, `slow`: the node's records (peer id -> evidence)."""
    from corolla.swarm.client.health import read_swarm_health

    extra = {model.dht_prefix: model.view.num_blocks}
    models = model.run_async(read_swarm_health(model.dht, model.view.p2p, extra), timeout=60)
    route = current_route(model)
    result = []
    for health in models:
        data = health.to_dict()
        data["route"] = route if health.dht_prefix == model.dht_prefix else []
        for server in data["servers"]:
            server["this_computer"] = server["peer_id"] == own
            server["verification"] = verification_of(model, server, data["servers"], flagged)
            server["speed"] = speed_summary(model, server, slow)
        result.append(data)
    return result


def verification_of(model: Any, server: dict, servers: list[dict], flagged: dict[str, dict]) -> dict:
    """verified | unverified | flagged, with the number of checks passed and the evidence of a flag."""
    from corolla.swarm.client.verification import ledger_of

    ledger = ledger_of(model.view)
    peer = server["peer_id"]
    evidence = ledger.flagged.get(peer) or flagged.get(peer)
    start, end = server["start_block"], server["end_block"]
    second = any(
        other["peer_id"] != peer and other["start_block"] <= start and other["end_block"] >= end for other in servers
    )
    if evidence is not None:
        state = "flagged"
    elif second and ledger.checks[peer]:
        state = "verified"
    else:
        state = "unverified"
    return {"state": state, "checks": int(ledger.checks[peer]), "evidence": evidence}


def speed_summary(model: Any, server: dict, slow: dict[str, dict]) -> dict:
    """slow | measured | unmeasured: this client's step times of the server against its announcement,
    with the evidence of a slow verdict (this session's, else the node's record)."""
    from corolla.swarm.client.speed import speed_of

    summary = speed_of(model.view).summary(server["peer_id"])
    if summary["evidence"] is None and server["peer_id"] in slow:
        summary.update(state="slow", evidence=slow[server["peer_id"]])
    return summary


def current_route(model: Any) -> list[dict]:
    """The chain of servers a new chat session would take now (the map draws it); [] if none."""
    try:
        model.run_async(model.view.refresh_if_stale(), timeout=30)
        segments = model.view.route(0, model.view.num_blocks)
    except Exception:  # no complete route: the map shows the gap instead
        return []
    return [{"peer_id": s.peer_id, "start": s.start, "end": s.end} for s in segments]


def check_answer(peer_id: str, verdict: Any) -> dict | None:
    """A deliberate check's verdict (swarm/client/server_check.py) as the API gives it; None: it serves nothing."""
    if verdict is None:
        return None
    return {
        "peer_id": peer_id,
        "state": verdict.state if verdict.state in ("verified", "flagged") else "unverified",
        "detail": verdict.detail,
        "max_error": verdict.max_error,
        "compared_with": verdict.compared_with,
    }
