"""Server-to-server push under failure: a middle server of a pushing chain dies mid-generation."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import corolla
from corolla.testing.swarm import CorollaServer

# Push on every hop: on loopback the client would choose direct round trips (route_choice.py).
CLIENT_OPTIONS = {
    "use_relay": False,
    "auto_nat": False,
    "request_timeout": 10.0,
    "max_retries": 4,
    "min_backoff": 0.2,
    "use_server_to_server": True,
}


def serve(tmp, model, prefix, blocks, *extra, name):
    return CorollaServer(
        tmp,
        model,
        "--dht-prefix",
        prefix,
        "--blocks",
        blocks,
        "--torch-dtype",
        "float32",
        "--throughput",
        "10",
        "--step-timeout",
        "30",
        "--update-period",
        "5",  # next_pings are measured (and announced) every 5 s
        *extra,
        name=name,
    )


@pytest.mark.slow
def test_middle_server_killed_mid_push_gives_the_same_tokens(tiny_models, tmp_path):
    model_dir = tiny_models.get("llama")
    prefix = "tiny-push-failover"
    head = serve(tmp_path, model_dir, prefix, "0:2", "--new-swarm", name="head")
    peers = []
    try:
        join = ["--initial-peers", head.maddr]
        victim = serve(tmp_path, model_dir, prefix, "2:4", *join, name="victim")
        tail = serve(tmp_path, model_dir, prefix, "4:6", *join, name="tail")
        peers += [victim, tail]
        for peer in peers:
            peer.wait_state("online")
        local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        base = torch.randint(6, 500, (1, 6), generator=torch.Generator().manual_seed(5))
        ids = torch.cat([base, base, base[:, :2]], dim=1)  # repetitive: speculative steps draft from it
        want = local.generate(
            ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids), eos_token_id=None
        )
        model = corolla.AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=[head.maddr], dht_prefix=prefix, **CLIENT_OPTIONS
        )
        try:
            # The head measured its round trip to the next server and announced it (next_pings).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                model._loop.run(model.view.refresh())
                pings = model.view.spans[head.peer_id].server_info.next_pings or {}
                if victim.peer_id in pings:
                    break
                time.sleep(1)
            assert 0 < pings[victim.peer_id] < 2.0
            with model.inference_session(max_length=60) as session:
                standby = None
                tokens = 0

                def on_token(_tokens):
                    nonlocal standby, tokens
                    tokens += 1
                    if tokens == 2:  # pushes flow from the second step on (the first carries the prompt)
                        standby = serve(tmp_path, model_dir, prefix, "2:4", *join, name="standby")
                        peers.append(standby)
                        standby.wait_state("online")
                    if tokens == 6:
                        victim.kill()  # SIGKILL while the head is pushing to it

                first_route = model.route()
                got = model.generate(ids, max_new_tokens=20, eos_token_id=[], session=session, streamer=on_token)
                assert victim.peer_id[-6:] in first_route
                assert session.replacements >= 1 and victim.peer_id[-6:] not in session.route
            assert torch.equal(got, want)
            assert model.speculation.stats.steps > 0  # multi-token steps and rollbacks happened around the kill
            deadline = time.monotonic() + 10  # the stats files are rewritten every second
            while time.monotonic() < deadline and (
                head.stats()["pushes_sent"] < 10 or tail.stats()["pushes_received"] < 10
            ):
                time.sleep(0.5)
            # About 19 decode steps pushed by the head (to the victim, then to the standby), and into the tail.
            assert head.stats()["pushes_sent"] >= 10 and tail.stats()["pushes_received"] >= 10
        finally:
            model.close()
    finally:
        for peer in peers:
            peer.kill()
        head.stop()
