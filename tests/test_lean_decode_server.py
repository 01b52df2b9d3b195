"""A real server's sessions through the CPU's lean decode path give the tokens that the same server
gives with the path turned off (COROLLA_LEAN_DECODE=0), and the local transformers model gives:
greedy generation, and a session of speculative (multi-token, rolled back) steps on the wire."""

from __future__ import annotations

import os
import time

import pytest
import torch

import corolla
from corolla.swarm import protocol
from corolla.swarm.models.lean_decode import LEAN_DECODE_ENV
from corolla.testing.swarm import start_chain
from corolla.testing.wire import WireClient, new_ids, step_request

CLIENT_OPTIONS = {"use_relay": False, "auto_nat": False, "request_timeout": 20.0}
NO_EOS = {"eos_token_id": None, "pad_token_id": 3}
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """One whole-model server with the lean path (the default), one without it: two swarms."""
    tmp = tmp_path_factory.mktemp("lean-servers")
    started = {}
    previous = os.environ.get(LEAN_DECODE_ENV)
    try:
        for name, value in (("lean", "1"), ("transformers", "0")):
            os.environ[LEAN_DECODE_ENV] = value  # the server process inherits it
            started[name] = start_chain(tmp, model_dir, ["0:6"], "--dht-prefix", f"tiny-{name}", name=name)[0]
        yield started
    finally:
        if previous is None:
            os.environ.pop(LEAN_DECODE_ENV, None)
        else:
            os.environ[LEAN_DECODE_ENV] = previous
        for server in started.values():
            server.stop()


def generate(model_dir, server, name: str, ids: torch.Tensor, **options) -> torch.Tensor:
    with corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[server.maddr], dht_prefix=f"tiny-{name}", **CLIENT_OPTIONS
    ) as remote:
        return remote.generate(ids, max_new_tokens=NEW_TOKENS, **NO_EOS, **options)


def lean_steps(server, at_least: int, timeout: float = 15.0) -> int:
    """The server's count of lean steps, once its stats file (written every second) shows `at_least`."""
    deadline = time.monotonic() + timeout
    while True:
        steps = server.stats().get("lean_decode_steps", 0)
        if steps >= at_least or time.monotonic() > deadline:
            return steps


def test_a_server_session_through_the_lean_path_gives_the_same_tokens(model_dir, servers, local):
    ids = torch.randint(6, 500, (1, 5), generator=torch.Generator().manual_seed(9))
    before = lean_steps(servers["lean"], 0, timeout=0)
    got = generate(model_dir, servers["lean"], "lean", ids)
    expected = generate(model_dir, servers["transformers"], "transformers", ids)
    want = local.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, attention_mask=torch.ones_like(ids), **NO_EOS)
    assert torch.equal(got, expected)
    assert torch.equal(got, want)
    assert lean_steps(servers["lean"], before + NEW_TOKENS - 1) >= before + NEW_TOKENS - 1
    assert servers["transformers"].stats().get("lean_decode_steps", 0) == 0


def test_speculative_steps_rollbacks_and_reorders_on_the_wire_equal_the_transformers_path(servers):
    """Steps as a speculating client sends them: drafts of several tokens, rollbacks to the accepted
    position (start_from_position), hypo_ids; a batch of 2."""
    generator = torch.Generator().manual_seed(2)
    # (tokens, start_from_position, hypo_ids) per step after a 6-token prompt
    steps = [(1, 6, None), (4, 7, None), (2, 9, None), (1, 11, [1, 0]), (5, 12, None), (1, 13, None), (3, 14, [0, 0])]
    inputs = [torch.randn(2, 6, 64, generator=generator)] + [
        torch.randn(2, n, 64, generator=generator) for n, *_ in steps
    ]
    outputs = {}
    before = lean_steps(servers["lean"], 0, timeout=0)
    for name, server in servers.items():
        chain = protocol.chain_uids(f"tiny-{name}", 0, 6)
        ids = new_ids()
        requests = [step_request(chain, inputs[0], max_length=32, start_from_position=0, **ids)]
        for index, ((_, position, hypo_ids), hidden) in enumerate(zip(steps, inputs[1:], strict=True)):
            extra = {} if hypo_ids is None else {"hypo_ids": torch.tensor(hypo_ids)}
            requests.append(
                step_request(
                    chain,
                    hidden,
                    session_id=ids["session_id"],
                    step_id=f"s{index}",
                    start_from_position=position,
                    **extra,
                )
            )
        requests.append(step_request("", None))
        with WireClient(server.maddr) as client:
            result = client.session(server.peer_id, requests)
        assert result.error is None, result.error
        outputs[name] = result.outputs
    assert len(outputs["lean"]) == len(inputs)
    for got, want in zip(outputs["lean"], outputs["transformers"], strict=True):
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    assert lean_steps(servers["lean"], before + len(steps)) >= before + len(steps)
