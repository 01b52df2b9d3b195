"""Slow and stalling servers on 127.0.0.1 (a test-only handler subclass that answers late or never,
always with right outputs): a generation routed first through one is token-exact and costs only seconds
more than the same generation without it; a stalling spot checker cannot hold generate() up; an honest
server slow for a moment is not banned. Elapsed times are compared with a baseline run in the same test."""

from __future__ import annotations

import functools
import sys
import time

import pytest
import torch

import corolla
from corolla.swarm.client.routing import RouteSegment, choose_route
from corolla.swarm.client.speed import (
    DEADLINE_FLOOR_S,
    DISCOUNT_HALF_LIFE_S,
    SpeedLedger,
    announced_seconds,
    size_bucket,
    speed_of,
)
from corolla.swarm.client.verification import ledger_of
from corolla.swarm.dht_records import RemoteSpan
from corolla.swarm.protocol import ServerInfo, ServerState
from corolla.testing.swarm import REPO, CorollaServer, route_first_through

PREFIX = "tiny-slow"
SLOW = [sys.executable, str(REPO / "tests" / "support" / "slow_server.py")]
# name -> slowness (None: honest). The slow ones claim a high speed, as a server that wants traffic would.
SERVERS = {
    "honest": None,
    "stall": "stall",
    "delay20": "delay:20",
    "after5": "after:5:stall",
    "blip": "once:3:2",
    "sluggish": "delay:0.6",
    # A chain: the staller serves the second half, so the hedge replaces a pushed-to middle of the route.
    "head": None,
    "tail": None,
    "tail_after5": "after:5:stall",
}
BLOCKS = {"head": "0:3", "tail": "3:6", "tail_after5": "3:6"}
CLIENT = {"use_relay": False, "auto_nat": False, "request_timeout": 30.0, "max_retries": 3, "min_backoff": 0.2}
NEW_TOKENS = 16


# --- the arithmetic, without servers -------------------------------------------------------------


class _View:
    """The parts of a SwarmView the speed ledger reads."""

    def __init__(self, spans, rtts=None, request_timeout=30.0):
        self.spans, self.rtts, self.dht_prefix = spans, rtts or {}, "m"
        self.config = type("Config", (), {"request_timeout": request_timeout})()


def _span(peer, start, end, **announced):
    info = ServerInfo(state=ServerState.ONLINE, throughput=announced.pop("throughput", 10.0), **announced)
    return RemoteSpan(peer_id=peer, start=start, end=end, server_info=info)


def test_deadlines_follow_measurements_with_a_floor_and_a_cap():
    view = _View({"a": _span("a", 0, 6, throughput=1000.0), "b": _span("b", 0, 6, throughput=0.01)})
    speed = SpeedLedger()
    # Announced: a fast claim gives a deadline near the floor; an absurdly slow one is capped.
    assert DEADLINE_FLOOR_S < speed.deadline(view, "a", 6, 1) < DEADLINE_FLOOR_S + 1
    assert speed.deadline(view, "b", 6, 1) == 30.0
    # Measured: the EWMA replaces the claim; an unmeasured step size is scaled up from a smaller one.
    for _ in range(5):
        speed.observe("b", 1, 0.05)
    assert speed.measured("b", 1) == pytest.approx(0.05)
    assert speed.measured("b", 8) == pytest.approx(0.05 * 2 ** size_bucket(8))
    assert speed.deadline(view, "b", 6, 1) == pytest.approx(DEADLINE_FLOOR_S + 4 * 0.05)
    assert announced_seconds(None, 6, 1, None) > 0


def test_slow_verdicts_need_consistent_evidence_and_discount_routing():
    spans = {"fast": _span("fast", 0, 4, throughput=1000.0), "slow": _span("slow", 0, 4, throughput=1000.0)}
    view = _View(spans, {"fast": 0.001, "slow": 0.001})
    speed = SpeedLedger()
    speed.observe("slow", 1, 2.0)  # one slow step is a moment, not a verdict
    assert speed.judge(view, "slow", 0, 4, 1) is None
    for _ in range(4):
        speed.observe("slow", 1, 1.0)
        speed.observe("fast", 1, 0.004)
    assert speed.judge(view, "fast", 0, 4, 1) is None
    evidence = speed.judge(view, "slow", 0, 4, 1)
    assert evidence is not None and evidence["times_slower"] > 100 and evidence["blocks"] == [0, 4]
    recorded = []
    speed.on_slow.append(recorded.append)
    speed.mark_slow(evidence)
    assert recorded == [evidence] and speed.summary("slow")["state"] == "slow"
    assert speed.summary("fast")["state"] == "measured" and speed.summary("other")["state"] == "unmeasured"
    # Routing prefers the slow server on a lower round trip, until its speed is discounted.
    rtts = {"fast": 0.05, "slow": 0.001}
    assert choose_route(spans, 0, 4, rtts) == [RouteSegment("slow", 0, 4)]
    assert choose_route(spans, 0, 4, rtts, discounts=speed.discounts) == [RouteSegment("fast", 0, 4)]


# --- real servers --------------------------------------------------------------------------------


def _serve(tmp, model, name, slowness, join):
    return CorollaServer(
        tmp,
        model,
        *join,
        "--dht-prefix",
        PREFIX,
        "--blocks",
        BLOCKS.get(name, "0:6"),
        "--torch-dtype",
        "float32",
        "--throughput",
        "10" if slowness is None else "1000",
        "--step-timeout",
        "60",
        name=name,
        launcher=[] if slowness is None else [*SLOW, slowness, "--"],
    )


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    """One honest server and the slow ones, all serving the whole tiny model."""
    tmp = tmp_path_factory.mktemp("slow-swarm")
    servers: dict[str, CorollaServer] = {}
    try:
        servers["honest"] = _serve(tmp, model_dir, "honest", None, ["--new-swarm"])
        join = ["--initial-peers", servers["honest"].maddr]
        for name, slowness in SERVERS.items():
            if name != "honest":
                servers[name] = _serve(tmp, model_dir, name, slowness, join)
        for server in servers.values():
            server.wait_state("online", timeout=300)
        yield servers
    finally:
        for server in servers.values():
            server.kill()  # a stalled handler would hold a graceful stop for its whole timeout


def _client(model_dir, swarm, usable: list[str], rate: float = 0.0, **options):
    return corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir,
        initial_peers=[swarm["honest"].maddr],
        dht_prefix=PREFIX,
        allowed_servers=[swarm[name].peer_id for name in usable],
        spot_check_rate=rate,
        **{**CLIENT, **options},
    )


def _prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(6, 500, (1, 6), generator=torch.Generator().manual_seed(seed))


def _note_time(times: list[float], tokens) -> bool:
    times.append(time.monotonic())
    return False  # never stop


def _timed_generate(model, seed: int = 0) -> tuple[torch.Tensor, float]:
    started = time.monotonic()
    tokens = model.generate(_prompt(seed), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[])
    return tokens, time.monotonic() - started


@pytest.fixture(scope="module")
def honest_only(model_dir, swarm):
    """A client of the honest server alone: the baseline each test runs beside its own (same machine load)."""
    model = _client(model_dir, swarm, ["honest"])
    try:
        _timed_generate(model)  # warm
        yield model
    finally:
        model.close()


@pytest.fixture
def baseline(honest_only):
    """The tokens without the slow server, and how long they take now (best of two)."""
    runs = [_timed_generate(honest_only) for _ in range(2)]
    return runs[0][0], min(seconds for _, seconds in runs)


@pytest.mark.parametrize(
    ("bad", "most_extra", "hedge"),
    [("stall", 5.0, True), ("delay20", 10.0, True), ("after5", 5.0, True), ("after5", 5.0, False)],
)
def test_a_stalling_server_costs_seconds_and_the_output_stays_exact(model_dir, swarm, baseline, bad, most_extra, hedge):
    """With hedging the overdue step races on another server; without, it fails over (re-route, replay)."""
    want, baseline_s = baseline
    peer = swarm[bad].peer_id
    model = _client(model_dir, swarm, ["honest", bad], hedge=hedge)
    try:
        route_first_through(model, peer)
        assert peer[-6:] in model.route()
        tokens, seconds = _timed_generate(model)
        assert torch.equal(tokens, want), "the hedge changed the output"
        speed = speed_of(model.view)
        assert (speed.hedges_won >= 1) == hedge and speed.stalls[peer] >= 1
        assert speed.slow[peer]["kind"] == "stalled" and speed.discounts[peer] > 1
        extra = seconds - baseline_s
        print(f"{bad}{'' if hedge else ' (failover)'}: {seconds:.2f} s against {baseline_s:.2f} s (+{extra:.2f} s)")
        # The bound, with a second of slack for a busy two-core machine.
        assert extra <= most_extra + 1.0, f"{bad} cost {extra:.1f} s more than the run without it"
        assert peer[-6:] not in model.route()  # banned for now, and its speed discounted after
    finally:
        model.close()


def test_an_honest_server_slow_for_one_step_is_not_banned(model_dir, swarm, baseline):
    want, _ = baseline
    peer = swarm["blip"].peer_id
    model = _client(model_dir, swarm, ["honest", "blip"])
    try:
        route_first_through(model, peer)
        assert peer[-6:] in model.route()
        with model.inference_session(max_length=40) as session:
            tokens = model.generate(_prompt(), max_new_tokens=NEW_TOKENS, eos_token_id=[], session=session)
            assert peer[-6:] in session.route and session.replacements == 0
        assert torch.equal(tokens, want)
        speed = speed_of(model.view)
        assert speed.hedges == 0 and not speed.stalls[peer] and peer not in speed.slow
        assert peer not in model.view.bans
    finally:
        model.close()


def test_a_consistently_slow_server_is_replaced_mid_session_and_discounted(model_dir, swarm, baseline):
    want, _ = baseline
    peer = swarm["sluggish"].peer_id
    model = _client(model_dir, swarm, ["honest", "sluggish"], speculative=False)
    try:
        route_first_through(model, peer)
        assert peer[-6:] in model.route()
        with model.inference_session(max_length=40) as session:
            tokens = model.generate(_prompt(), max_new_tokens=NEW_TOKENS, eos_token_id=[], session=session)
            assert session.replacements >= 1 and peer[-6:] not in session.route
        assert torch.equal(tokens, want)
        speed = speed_of(model.view)
        evidence = speed.slow[peer]
        assert evidence["kind"] == "slow" and evidence["times_slower"] >= 4 and speed.discounts[peer] >= 4
        assert speed.hedges == 0  # slow, but never overdue: replaced on the evidence alone
        assert peer not in model.view.bans  # not a failure: only its speed is discounted
        assert peer[-6:] not in model.route()
    finally:
        model.close()


def test_a_stalling_checker_never_holds_a_generation(model_dir, swarm, baseline):
    want, baseline_s = baseline
    honest, staller = swarm["honest"].peer_id, swarm["stall"].peer_id
    model = _client(model_dir, swarm, ["honest", "stall"], rate=1.0)  # every step checked, on the staller
    try:
        route_first_through(model, honest)
        for _ in range(2):
            last_token: list[float] = []
            started = time.monotonic()
            tokens = model.generate(
                _prompt(),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=[],
                streamer=functools.partial(_note_time, last_token),
            )
            returned = time.monotonic()
            assert torch.equal(tokens, want)
            waited = returned - last_token[-1]  # after its last token, generate() only settles its checks
            print(f"checked by a staller: {returned - started:.2f} s ({baseline_s:.2f} s unchecked); {waited:.2f} s")
            assert waited <= 1.0 + 0.5  # a second at most, with slack for a busy machine
        speed = speed_of(model.view)
        deadline = time.monotonic() + 30
        while not speed.stalls[staller] and time.monotonic() < deadline:  # the checks end in the background
            time.sleep(0.2)
        assert speed.stalls[staller] >= 1 and speed.slow[staller]["kind"] == "stalled a check"
        assert staller not in ledger_of(model.view).flagged  # slow is not a lie
    finally:
        model.close()


def test_the_node_database_remembers_slow_servers_for_a_day(tmp_path):
    from corolla.node.db import SLOW_MEMORY_S, Database

    db = Database(tmp_path / "node.db")
    try:
        evidence = {"peer_id": "12D3KooWSlow", "dht_prefix": "m", "kind": "stalled", "times_slower": 500.0}
        db.note_slow_server(evidence)
        assert db.slow_servers() == {"12D3KooWSlow": evidence}
        db._execute("UPDATE slow_servers SET noted_at = noted_at - ?", (SLOW_MEMORY_S + 1,))
        assert db.slow_servers() == {}  # it may only have been busy that day
        # A new client starts with the remembered discount (what the node does for each new client).
        db.note_slow_server(evidence)
        speed = SpeedLedger()
        for remembered in db.slow_servers().values():
            speed.mark_slow(remembered)
        assert speed.discounts["12D3KooWSlow"] == pytest.approx(500.0, rel=0.01)
        assert speed.summary("12D3KooWSlow")["state"] == "slow"
        # In routing the verdict fades (the server may only have been busy); the record stays for the view.
        later = time.time() + 2 * DISCOUNT_HALF_LIFE_S
        assert speed.discount("12D3KooWSlow", later) == pytest.approx(1 + 499 / 4, rel=0.01)
    finally:
        db.close()


def test_a_stalling_server_in_the_middle_of_a_pushing_chain_is_hedged_exactly(model_dir, swarm):
    """Servers push each step to the next one; the hedge takes the staller's place in that chain."""
    honest_chain = _client(model_dir, swarm, ["head", "tail"], use_server_to_server=True)
    try:
        _timed_generate(honest_chain)  # warm
        want, baseline_s = _timed_generate(honest_chain)
        assert honest_chain.view.config.use_server_to_server
    finally:
        honest_chain.close()
    peer = swarm["tail_after5"].peer_id
    model = _client(model_dir, swarm, ["head", "tail", "tail_after5"], use_server_to_server=True)
    try:
        route_first_through(model, peer)
        assert model.route().startswith("0:3 via") and f"3:6 via …{peer[-6:]}" in model.route()
        tokens, seconds = _timed_generate(model)
        assert torch.equal(tokens, want)
        assert speed_of(model.view).hedges_won == 1 and peer[-6:] not in model.route()
        print(f"chain: {seconds:.2f} s against {baseline_s:.2f} s without the staller")
        assert seconds - baseline_s <= 5.0 + 1.0
        # The session goes on through the hedge's server, pushed to by the head as before.
        again, _ = _timed_generate(model)
        assert torch.equal(again, want)
    finally:
        model.close()
