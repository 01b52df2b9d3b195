"""Privacy levels over real sockets: a recording server (a test-only handler subclass that logs every
tensor it receives) serves the whole tiny model beside trusted servers of the same blocks and is the
route the client prefers; under "members of my swarms" and "only these peers" it receives nothing
across generation with spot checks and push on, a SIGKILL of a trusted server mid-generation, and a
forward/backward training step; under "any server" it does (so the recorder works)."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

import corolla
from corolla.swarm.client.privacy import Privacy, PrivacyError
from corolla.swarm.client.routing import PrivacyCoverageError
from corolla.testing.swarm import REPO, CorollaServer

PREFIX = "tiny-privacy"
RECORDER = [sys.executable, str(REPO / "tests" / "support" / "recording_server.py")]
CLIENT = {
    "use_relay": False,
    "auto_nat": False,
    "request_timeout": 20.0,
    "max_retries": 4,
    "min_backoff": 0.2,
    "spot_check_rate": 1.0,
    "use_server_to_server": True,
}
TRUSTED = {"a1": "0:3", "a2": "0:3", "b1": "3:6", "b2": "3:6"}


def _serve(tmp, model, name, blocks, throughput, join, launcher=()):
    return CorollaServer(
        tmp,
        model,
        *join,
        "--dht-prefix",
        PREFIX,
        "--blocks",
        blocks,
        "--torch-dtype",
        "float32",
        "--throughput",
        throughput,
        "--step-timeout",
        "60",
        "--update-period",
        "5",
        name=name,
        launcher=launcher,
    )


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    """Four trusted servers (two per half of the model) and a recorder of all six blocks that
    announces a hundred times their throughput: the cheapest route by far."""
    tmp = tmp_path_factory.mktemp("privacy-swarm")
    log = tmp / "recorder.jsonl"
    servers: dict[str, CorollaServer] = {}
    try:
        servers["a1"] = _serve(tmp, model_dir, "a1", "0:3", "10", ["--new-swarm"])
        join = ["--initial-peers", servers["a1"].maddr]
        for name, blocks in TRUSTED.items():
            if name != "a1":
                servers[name] = _serve(tmp, model_dir, name, blocks, "10", join)
        servers["recorder"] = _serve(tmp, model_dir, "recorder", "0:6", "1000", join, [*RECORDER, str(log), "--"])
        for server in servers.values():
            server.wait_state("online", timeout=300)
        yield servers, log
    finally:
        for server in servers.values():
            server.stop()


def _recorded(log) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _client(model_dir, servers, **options):
    entry = next(s for s in servers.values() if s.process.poll() is None)  # the first test kills one
    return corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[entry.maddr], dht_prefix=PREFIX, **CLIENT, **options
    )


def _pushes(servers, dead: str | None) -> int:
    """Steps the second half's servers received pushed from the first half's."""
    return sum(servers[n].stats().get("pushes_received", 0) for n in ("b1", "b2") if n != dead)


def _prompt(seed: int, length: int = 6) -> torch.Tensor:
    return torch.randint(6, 500, (1, length), generator=torch.Generator().manual_seed(seed))


def _wait_all_announced(model, names: set[str], servers) -> None:
    """Until every named server is in the view (records reach the DHT within a few seconds)."""
    wanted = {servers[n].peer_id for n in names}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        model._loop.run(model.view.refresh())
        if wanted <= set(model.view.spans):
            return
        time.sleep(0.5)
    raise AssertionError(f"servers not announced: {wanted - set(model.view.spans)}")


def test_a_bad_peer_list_is_refused_before_anything_starts(model_dir):
    for bad, says in [
        ([], "empty"),
        (["not-a-peer-id"], "not a peer id"),
        (["12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTNx"], "not a peer id"),
        ("12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN", "'any', a Privacy"),
        ({"level": "members", "peers": []}, "empty"),
        ({"level": "everyone"}, "privacy level must be one of"),
    ]:
        with pytest.raises(PrivacyError, match=says):
            # Fails before the DHT starts: these initial peers are never contacted.
            corolla.AutoDistributedModelForCausalLM.from_pretrained(
                model_dir,
                initial_peers=["/ip4/127.0.0.1/tcp/9/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"],
                privacy=bad,
            )


def test_members_never_reach_the_recorder_through_checks_push_failover_and_training(model_dir, swarm):
    servers, log = swarm
    recorder = servers["recorder"].peer_id
    trusted = {name: servers[name].peer_id for name in TRUSTED}
    before = len(_recorded(log))
    model = _client(model_dir, servers, privacy=Privacy.members(trusted.values()))
    try:
        _wait_all_announced(model, set(TRUSTED), servers)
        assert recorder in model.view.excluded and recorder not in model.view.spans
        route = model.route()
        assert recorder[-6:] not in route and len(route.split(",")) == 2, route

        # Generation with spot checks on every step and server-to-server push, and a SIGKILL of the
        # first trusted server of the route after a few tokens: the session re-routes to its twin.
        with model.inference_session(max_length=80) as session:
            victim_name = None
            tokens = 0

            def on_token(_tokens) -> bool:
                nonlocal victim_name, tokens
                tokens += 1
                if tokens == 4:
                    first = session._session.streams[0].segment.peer_id
                    victim_name = next(n for n, p in trusted.items() if p == first)
                    servers[victim_name].kill()
                return False

            out = model.generate(
                _prompt(0), max_new_tokens=24, do_sample=False, eos_token_id=[], session=session, streamer=on_token
            )
            assert out.shape == (1, 30)
            assert victim_name is not None and session.replacements >= 1
            assert session._session.verifier.checks_started > 0  # spot checks ran (on trusted twins only)
            assert set(session.recipients) <= set(trusted.values())
            assert len(session.recipients) >= 3  # the route, the replacement and the checkers
        deadline = time.monotonic() + 10  # the stats files are rewritten every second
        while time.monotonic() < deadline and not _pushes(servers, victim_name):
            time.sleep(0.5)
        assert _pushes(servers, victim_name) > 0, "no step was pushed from server to server"

        # A training step: forward and backward through the swarm (rpc_forward / rpc_backward).
        ids = _prompt(1, 12)
        embeddings = model.get_input_embeddings()
        embeddings.weight.requires_grad_(True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert embeddings.weight.grad is not None and torch.isfinite(embeddings.weight.grad).all()
        assert all(s.peer_id in trusted.values() for s in model.blocks.last_route)
    finally:
        model.close()
    time.sleep(1.5)  # a late message would still be logged by now
    assert _recorded(log)[before:] == [], "the recorder received tensors under 'members of my swarms'"


def test_only_these_peers_per_call_and_any_server_reaches_the_recorder(model_dir, swarm, caplog):
    servers, log = swarm
    recorder = servers["recorder"].peer_id
    alive = {n: servers[n].peer_id for n in TRUSTED if servers[n].process.poll() is None}
    model = _client(model_dir, servers)
    try:
        _wait_all_announced(model, set(alive) | {"recorder"}, servers)
        before = len(_recorded(log))
        only = Privacy.only(alive.values())
        out = model.generate(_prompt(2), max_new_tokens=12, do_sample=False, eos_token_id=[], privacy=only)
        assert out.shape == (1, 18)
        assert set(model.last_recipients) <= set(alive.values())
        time.sleep(1.5)
        assert _recorded(log)[before:] == [], "the recorder received tensors under 'only these peers'"

        # A list that cannot cover the model fails at once, naming the blocks nobody allowed holds.
        second_half = [p for n, p in alive.items() if TRUSTED[n] == "3:6"]
        caplog.clear()
        with pytest.raises(PrivacyCoverageError, match=r"block\(s\) 0, 1, 2 of"):
            model.generate(_prompt(2), max_new_tokens=4, privacy=Privacy.only(second_half))
        retries = [r.message for r in caplog.records if "looking for servers" in r.message]
        assert not retries, retries  # at once, no retries with backoff: nothing would change

        # "Any server": the cheapest route is the recorder, and it does receive the hidden states.
        out = model.generate(_prompt(3), max_new_tokens=8, do_sample=False, eos_token_id=[])
        assert recorder in model.last_recipients
        deadline = time.monotonic() + 10
        while len(_recorded(log)) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        received = _recorded(log)[before:]
        assert received and {r["method"] for r in received} >= {"rpc_inference"}
    finally:
        model.close()
