"""Spot checks against real servers on 127.0.0.1: liars (a test-only handler subclass) are caught and
banned, generation returns what honest servers give, honest servers of every precision are never
flagged, and a span nobody else serves stays unverified."""

from __future__ import annotations

import sys

import pytest
import torch

import corolla
from corolla.swarm.client.verification import ledger_of, promised_steps
from tests.support.swarm import REPO, CorollaServer

PREFIX = "tiny-verify"
LIAR = [sys.executable, str(REPO / "tests" / "support" / "liar_server.py")]
LIES = {"noise": "noise:0.1", "zeros": "zeros", "previous": "previous", "late": "after:20:zeros"}
HONEST = {"f32a": ("float32", "none"), "f32b": ("float32", "none"), "bf16": ("bfloat16", "none")}
QUANTIZED = {"fp16": ("float16", "none"), "int8": ("float32", "int8"), "nf4": ("float32", "nf4")}
CLIENT = {"use_relay": False, "auto_nat": False, "request_timeout": 20.0, "max_retries": 3, "min_backoff": 0.2}


def _serve(tmp, model, name, dtype, quant, join, launcher=()):
    return CorollaServer(
        tmp,
        model,
        *join,
        "--dht-prefix",
        PREFIX,
        "--blocks",
        "0:6",
        "--torch-dtype",
        dtype,
        "--quant-type",
        quant,
        "--throughput",
        "10",
        "--step-timeout",
        "60",
        name=name,
        launcher=launcher,
    )


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models.get("llama")


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    """Six honest servers of every precision and four liars, all serving the whole tiny model."""
    tmp = tmp_path_factory.mktemp("verify-swarm")
    servers: dict[str, CorollaServer] = {}
    try:
        servers["f32a"] = _serve(tmp, model_dir, "f32a", "float32", "none", ["--new-swarm"])
        join = ["--initial-peers", servers["f32a"].maddr]
        for name, (dtype, quant) in {**HONEST, **QUANTIZED}.items():
            if name != "f32a":
                servers[name] = _serve(tmp, model_dir, name, dtype, quant, join)
        for name, lie in LIES.items():
            servers[name] = _serve(tmp, model_dir, name, "float32", "none", join, [*LIAR, lie, "--"])
        for server in servers.values():
            server.wait_state("online", timeout=300)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def _client(model_dir, swarm, usable: list[str], rate: float):
    blocked = [server.peer_id for name, server in swarm.items() if name not in usable]
    return corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir,
        initial_peers=[swarm["f32a"].maddr],
        dht_prefix=PREFIX,
        blocked_servers=blocked,
        spot_check_rate=rate,
        **CLIENT,
    )


def _prefer(model, peer: str) -> None:
    """Make `peer` the closest server, so routes go through it first (the liar's best case)."""
    model._loop.run(model.view.refresh())
    for other in model.view.rtts:
        model.view.rtts[other] = 0.5
    model.view.rtts[peer] = 0.0001


def _prompt(seed: int, length: int = 5) -> torch.Tensor:
    return torch.randint(6, 500, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def honest_tokens(model_dir, swarm):
    model = _client(model_dir, swarm, ["f32a", "f32b"], rate=0.0)
    try:
        yield {seed: model.generate(_prompt(seed), max_new_tokens=30, do_sample=False) for seed in range(2)}
    finally:
        model.close()


@pytest.mark.parametrize("lie", list(LIES))
def test_a_liar_is_flagged_and_the_output_is_the_honest_one(model_dir, swarm, honest_tokens, lie):
    rate = 0.5
    liar = swarm[lie].peer_id
    model = _client(model_dir, swarm, ["f32a", "f32b", lie], rate=rate)
    try:
        ledger = ledger_of(model.view)
        _prefer(model, liar)
        assert liar[-6:] in model.route()
        for seed in range(2):
            tokens = model.generate(_prompt(seed), max_new_tokens=30, do_sample=False)
            assert torch.equal(tokens, honest_tokens[seed]), f"seed {seed}: the liar's tokens reached the output"
        evidence = ledger.flagged.get(liar)
        assert evidence is not None, f"the {lie} liar was not flagged"
        assert evidence["blocks"] == [0, 6] and evidence["error"] > evidence["tolerance"]
        assert set(evidence["disagreed_with"]) == {swarm["f32a"].peer_id, swarm["f32b"].peer_id}
        # Caught within the steps the rate promises after it started lying (the late liar lies from its
        # 21st step on; the others from their first, but a server's first steps are all checked).
        lied_from = 21 if lie == "late" else 1
        assert evidence["step"] is not None
        assert evidence["step"] - lied_from + 1 <= promised_steps(rate) + ledger.first_steps
        assert liar in model.view.config.blocked_servers and liar[-6:] not in model.route()
        assert not set(ledger.flagged) - {liar}, "an honest server was flagged"
    finally:
        model.close()
