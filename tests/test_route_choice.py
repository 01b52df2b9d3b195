"""What the client chooses per route (route_choice.py): server-to-server push per hop, and speculative steps.

The arithmetic on given round trips first; then the choices on a real loopback chain of three Corolla
servers, where the thresholds are set to both ends (never / always worth it) so what is checked is what
reaches the servers and that the tokens stay exact, never how fast anything was.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import corolla
from corolla.swarm.client import route_choice
from corolla.swarm.client.speculative import SpeculationStats
from corolla.testing.swarm import TINY_SWARM_PREFIX

CLIENT_OPTIONS = {"use_relay": False, "auto_nat": False, "request_timeout": 10.0, "max_retries": 4, "min_backoff": 0.2}
PEERS = ["a", "b", "c"]


# --- the arithmetic ---------------------------------------------------------------------------------


def test_long_links_are_pushed_short_ones_are_not():
    long, short = 0.050, 0.0008
    assert route_choice.pushed_hops(None, PEERS, {"a": long, "b": long, "c": long}, [None] * 3) == [False, True, True]
    assert route_choice.pushed_hops(None, PEERS, {"a": short, "b": short, "c": short}, [None] * 3) == [
        False,
        False,
        False,
    ]
    # Per hop: only the server far from the client is pushed into.
    assert route_choice.pushed_hops(None, PEERS, {"a": short, "b": short, "c": long}, [None] * 3) == [
        False,
        False,
        True,
    ]


def test_the_servers_own_link_counts_against_the_saving():
    rtts = {"a": 0.001, "b": 0.003, "c": 0.003}
    # b is 3 ms from the client: by that alone a push saves 1.5 ms, not enough.
    assert not route_choice.pushed_hops(None, PEERS, rtts, [None, None, None])[1]
    assert not route_choice.pushed_hops(None, PEERS, rtts, [{"b": 0.003}, None, None])[1]
    # a is 0.5 ms from b: its push arrives 2.75 ms before the client's copy would.
    assert route_choice.pushed_hops(None, PEERS, rtts, [{"b": 0.0005}, None, None])[1]
    # A link announced longer than the client's own counts as the client's (a late push costs no time).
    assert route_choice.pushed_hops(None, PEERS, {"b": 0.006}, [{"b": 0.009}, None, None])[1]
    # Unreachable (inf) from a counts as unknown: the client's own round trip decides (a push that cannot
    # be sent costs nothing; one failed dial must not keep a long link off push). An unknown round trip
    # from the client: pushed (safe on long links).
    assert not route_choice.pushed_hops(None, PEERS, rtts, [{"b": math.inf}, None, None])[1]
    assert route_choice.pushed_hops(None, PEERS, {"b": 0.05}, [{"b": math.inf}, None, None])[1]
    assert route_choice.pushed_hops(None, PEERS, {"a": 0.001}, [None] * 3) == [False, True, True]


def test_a_hop_between_two_servers_on_direct_links_is_pushed_at_any_saving():
    """The client reaches both servers of the hop over direct links: the push goes on one too, and pays
    even on loopback; a hop with a server through p2pd keeps the p2pd threshold."""
    short = {p: 0.0008 for p in PEERS}
    assert route_choice.pushed_hops(None, PEERS, short, [None] * 3, [True, True, True]) == [False, True, True]
    assert route_choice.pushed_hops(None, PEERS, short, [None] * 3, [True, True, False]) == [False, True, False]
    assert route_choice.pushed_hops(None, PEERS, short, [None] * 3, [False, True, True]) == [False, False, True]
    assert route_choice.pushed_hops(False, PEERS, short, [None] * 3, [True] * 3) == [False, False, False]


def test_forced_modes_ignore_the_round_trips():
    short = {p: 0.0005 for p in PEERS}
    assert route_choice.pushed_hops(True, PEERS, short, [None] * 3) == [False, True, True]
    assert route_choice.pushed_hops(False, PEERS, {p: 1.0 for p in PEERS}, [None] * 3) == [False, False, False]


def test_speculation_pays_on_long_routes_good_sessions_and_repeating_text():
    free = torch.tensor([[1, 384, 456, 17, 90]])
    repeating = torch.tensor([[5, 6, 7, 8, 9, 5, 6]])
    assert not route_choice.repeats_itself(free) and route_choice.repeats_itself(repeating)
    assert route_choice.speculation_pays(0.05, None, free)  # a long trip: always
    assert not route_choice.speculation_pays(0.002, None, free)
    assert route_choice.speculation_pays(0.002, None, repeating)
    assert route_choice.speculation_pays(None, None, repeating)
    # Once the session drafted enough, its own acceptance decides on short routes.
    assert not route_choice.speculation_pays(0.002, SpeculationStats(steps=4, drafted=20, accepted=2), repeating)
    assert route_choice.speculation_pays(0.002, SpeculationStats(steps=4, drafted=20, accepted=15), free)
    assert route_choice.speculation_pays(0.002, SpeculationStats(steps=1, drafted=3, accepted=0), repeating)


# --- on a real chain --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote(model_dir, tiny_swarm):
    model = corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[tiny_swarm[0].maddr], dht_prefix=TINY_SWARM_PREFIX, **CLIENT_OPTIONS
    )
    yield model
    model.close()


def _pushes(swarm, before=None) -> tuple[list[int], list[int]]:
    """Pushes sent and received per server since `before` (stats files are rewritten every second)."""
    time.sleep(1.5)
    stats = [server.stats() for server in swarm]
    sent = [s.get("pushes_sent", 0) for s in stats]
    received = [s.get("pushes_received", 0) for s in stats]
    if before is None:
        return sent, received
    return [a - b for a, b in zip(sent, before[0], strict=True)], [
        a - b for a, b in zip(received, before[1], strict=True)
    ]


def _greedy(remote, local, seed: int, **kwargs) -> None:
    ids = torch.randint(6, 500, (1, 6), generator=torch.Generator().manual_seed(seed))
    want = local.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    got = remote.generate(ids, max_new_tokens=12, do_sample=False, **kwargs)
    assert torch.equal(got, want)


def test_auto_push_follows_the_threshold_on_a_real_chain(remote, local, tiny_swarm, monkeypatch):
    assert remote.client_config.use_server_to_server is None  # the default: chosen per route
    monkeypatch.setattr(route_choice, "PUSH_MIN_SAVING_S", math.inf)  # no link is long enough
    monkeypatch.setattr(route_choice, "DIRECT_PUSH_MIN_SAVING_S", math.inf)  # direct links or not
    before = _pushes(tiny_swarm)
    _greedy(remote, local, seed=41, prompt_lookup_num_tokens=None)
    sent, received = _pushes(tiny_swarm, before)
    assert sent == [0, 0, 0] and received == [0, 0, 0], (sent, received)

    monkeypatch.setattr(route_choice, "PUSH_MIN_SAVING_S", -math.inf)  # every link is
    monkeypatch.setattr(route_choice, "DIRECT_PUSH_MIN_SAVING_S", -math.inf)
    before = _pushes(tiny_swarm)
    _greedy(remote, local, seed=42, prompt_lookup_num_tokens=None)
    sent, received = _pushes(tiny_swarm, before)
    # 11 decode steps, all pushed: the servers pushed into were timed directly above.
    assert sent[0] >= 9 and sent[1] >= 9 and sent[2] == 0, sent
    assert received[0] == 0 and received[1] >= 9 and received[2] >= 9, received
    # Every server of the route had a direct token step timed: the measure the choice rests on.
    route_peers = {server.peer_id for server in tiny_swarm}
    assert route_peers <= set(remote.view.direct_step_s)


def test_a_new_pushed_server_gets_one_direct_step_first(model_dir, local, tiny_swarm, monkeypatch):
    """A fresh client whose pings call for push sends a few steps without push, to time the servers it
    would push into on its own stream (pings through both daemons run slow on a busy machine), then pushes."""
    monkeypatch.setattr(route_choice, "PUSH_MIN_SAVING_S", -math.inf)
    model = corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[tiny_swarm[0].maddr], dht_prefix=TINY_SWARM_PREFIX, **CLIENT_OPTIONS
    )
    try:
        before = _pushes(tiny_swarm)
        _greedy(model, local, seed=43, prompt_lookup_num_tokens=None)
        sent, _ = _pushes(tiny_swarm, before)
        assert {server.peer_id for server in tiny_swarm} <= set(model.view.direct_step_s)
        # 12 steps: the prompt's (pushed: sessions registered), three direct, the rest pushed.
        assert all(model.view.direct_steps[server.peer_id] >= route_choice.PROBE_STEPS for server in tiny_swarm)
        assert 6 <= sent[0] <= 9 and 6 <= sent[1] <= 9, sent
    finally:
        model.close()


def test_speculation_is_chosen_by_text_and_measured_acceptance(remote, local, monkeypatch):
    monkeypatch.setattr(route_choice, "SPECULATE_TRIP_S", math.inf)  # no route is long enough alone
    free = torch.randint(6, 500, (1, 6), generator=torch.Generator().manual_seed(44))
    remote.generate(free, max_new_tokens=8, eos_token_id=[])
    assert remote.speculation is None  # nothing to draft from: the plain loop
    base = torch.randint(6, 500, (1, 8), generator=torch.Generator().manual_seed(45))
    repeating = torch.cat([base, base, base[:, :3]], dim=1)
    want = local.generate(repeating, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(repeating))
    with remote.inference_session(max_length=80) as session:
        got = remote.generate(repeating, max_new_tokens=16, eos_token_id=[], session=session)
        assert torch.equal(got, want)
        assert remote.speculation is not None and session.speculated.drafted > 0
        assert session.speculated.accepted == remote.speculation.stats.accepted
        # A session whose drafts were mostly refused stops drafting, repeating text or not.
        session.speculated = SpeculationStats(steps=10, drafted=40, accepted=1)
        remote.generate(base[:, :3], max_new_tokens=4, eos_token_id=[], session=session)
        assert remote.speculation is None
