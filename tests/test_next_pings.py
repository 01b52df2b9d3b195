"""next_pings: what servers measure and announce, what a stock reader accepts, how the router uses it."""

from __future__ import annotations

import math
import subprocess

import pytest
from hivemind.utils import MSGPackSerializer

from corolla.swarm import protocol
from corolla.swarm.client.routing import choose_route
from corolla.swarm.dht_records import RemoteSpan
from corolla.swarm.protocol import ServerInfo, ServerState
from corolla.swarm.server.pings import PINGS_PER_GROUP, NextPings
from corolla.testing.swarm import reference_env, reference_python, require_reference


def _span(peer, start, end, next_pings=None):
    info = ServerInfo(state=ServerState.ONLINE, throughput=1.0, inference_rps=1000.0, next_pings=next_pings)
    return RemoteSpan(peer, start, end, info)


def test_router_prices_the_hop_each_server_measured():
    """Two ways through blocks 2:4: the client sees both at the same distance, but the first server
    measured that B2 is far from it and B1 near: the route takes B1."""
    spans = {
        "A": _span("A", 0, 2, next_pings={"B1": 0.002, "B2": 0.4}),
        "B1": _span("B1", 2, 4),
        "B2": _span("B2", 2, 4),
    }
    rtts = {"A": 0.05, "B1": 0.3, "B2": 0.3}
    assert [s.peer_id for s in choose_route(spans, 0, 4, rtts)] == ["A", "B1"]
    spans["A"] = _span("A", 0, 2, next_pings={"B1": 0.4, "B2": 0.002})
    assert [s.peer_id for s in choose_route(spans, 0, 4, rtts)] == ["A", "B2"]
    # Without next_pings the client's own round trips decide, as before.
    spans["A"] = _span("A", 0, 2)
    assert [s.peer_id for s in choose_route(spans, 0, 4, {"A": 0.05, "B1": 0.01, "B2": 0.3})] == ["A", "B1"]


def test_a_link_announced_unreachable_costs_the_clients_own_trip():
    """A's `inf` for B1 means no push there, not a road block: the client's copy reaches B1 as it would
    reach any server it has no hop measure for."""
    spans = {
        "A": _span("A", 0, 2, next_pings={"B1": math.inf, "B2": 0.3}),
        "B1": _span("B1", 2, 4),
        "B2": _span("B2", 2, 4),
    }
    assert [s.peer_id for s in choose_route(spans, 0, 4, {"A": 0.05, "B1": 0.01, "B2": 0.3})] == ["A", "B1"]
    assert [s.peer_id for s in choose_route(spans, 0, 4, {"A": 0.05, "B1": 0.6, "B2": 0.3})] == ["A", "B2"]


def test_router_counts_the_way_back_to_the_client():
    spans = {"A": _span("A", 0, 2), "B": _span("B", 0, 2)}
    assert [s.peer_id for s in choose_route(spans, 0, 2, {"A": 0.5, "B": 0.01})] == ["B"]


def test_a_hostile_peers_pings_are_clamped():
    pings = {f"peer{i}": 0.01 for i in range(500)} | {"neg": -5.0, "nan": float("nan")}
    info = ServerInfo(state=ServerState.ONLINE, throughput=1.0, next_pings=pings).clamped()
    assert len(info.next_pings) <= protocol.MAX_NEXT_PINGS
    assert all(v >= 0.0 for v in info.next_pings.values()) and all(v == v for v in info.next_pings.values())
    negative = ServerInfo(state=ServerState.ONLINE, throughput=1.0, next_pings={"x": -5.0, "y": math.nan}).clamped()
    assert negative.next_pings == {"x": 0.0}
    # A peer claiming instant hops or endless ones moves a route by a bounded cost only.
    spans = {"A": _span("A", 0, 1, next_pings={"B": -100.0}), "B": _span("B", 1, 2)}
    assert [s.peer_id for s in choose_route(spans, 0, 2, {})] == ["A", "B"]


def test_candidates_are_bounded_and_exclude_self():
    pinger = NextPings(p2p=None, own_peer_id="me")
    online = ServerState.ONLINE
    inner = [{f"in{b}-{i}": online for i in range(20)} | {"me": online} for b in range(3)]
    after = {f"next{i}": online for i in range(20)} | {"off": ServerState.OFFLINE}
    chosen = pinger.candidates([*inner, after])
    assert "me" not in chosen and "off" not in chosen and len(set(chosen)) == len(chosen)
    assert sum(p.startswith("next") for p in chosen) == PINGS_PER_GROUP
    assert sum(p.startswith("in") for p in chosen) == PINGS_PER_GROUP


def test_moving_average_unreachable_and_expiry():
    pinger = NextPings(p2p=None, own_peer_id="me")
    pinger.record("a", 0.1, now=0)
    pinger.record("a", 0.2, now=1)
    pinger.record("b", math.inf, now=1)
    assert pinger.announced(now=2) == {"a": pytest.approx(0.12), "b": math.inf}
    pinger.record("b", 0.05, now=3)  # after inf, the new measurement replaces it
    assert pinger.announced(now=4)["b"] == 0.05
    # A peer that answered before: one failed ping keeps its round trip, two in a row make it unreachable.
    pinger.record("a", math.inf, now=5)
    assert pinger.announced(now=6)["a"] == pytest.approx(0.12)
    pinger.record("a", math.inf, now=7)
    assert pinger.announced(now=8)["a"] == math.inf
    pinger.record("a", 0.2, now=9)  # and a good one resets the count
    pinger.record("a", math.inf, now=10)
    assert pinger.announced(now=11)["a"] == 0.2
    assert pinger.announced(now=400) == {}


@pytest.mark.slow
def test_stock_petals_reader_accepts_next_pings():
    """Petals' own ServerInfo.from_tuple (pydantic v1, strict floats) reads Corolla's record."""
    require_reference()
    pinger = NextPings(p2p=None, own_peer_id="me")
    pinger.record("12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo", 0.0123, now=0)
    pinger.record("12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq", math.inf, now=0)
    info = ServerInfo(state=ServerState.ONLINE, throughput=10.0, start_block=0, end_block=2)
    info.next_pings = pinger.announced(now=1)
    wire = MSGPackSerializer.dumps(info.to_tuple())
    script = (
        "import sys, json; from hivemind.utils import MSGPackSerializer; from petals.data_structures import ServerInfo;"
        "info = ServerInfo.from_tuple(MSGPackSerializer.loads(sys.stdin.buffer.read()));"
        "print(json.dumps({k: str(v) for k, v in info.next_pings.items()}))"
    )
    result = subprocess.run(
        [str(reference_python()), "-c", script], input=wire, capture_output=True, env=reference_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert "0.0123" in result.stdout.decode() and "inf" in result.stdout.decode()
