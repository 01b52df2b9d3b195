"""Many sessions through one server at once (continuous batching, swarm/server/step_batcher.py):
each session's greedy tokens equal its tokens alone, on SmolLM2's real weights, and the server's
stats show the steps that shared a forward."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoTokenizer

import corolla
from corolla.testing.swarm import CorollaServer

PREFIX = "crowd-test"
TOPICS = ["bees", "the sea", "bread", "winter", "a robot", "the moon", "trains", "a garden", "rain", "mountains",
          "a library", "coffee", "a cat", "the desert", "music", "a river"]  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    server = CorollaServer(
        tmp_path_factory.mktemp("crowd"),
        smollm2,
        "--new-swarm",
        "--dht-prefix",
        PREFIX,
        "--torch-dtype",
        "float32",
        "--throughput",
        "50",
        "--step-timeout",
        "120",
    )
    try:
        server.wait_state("online", timeout=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prompts(smollm2) -> list[torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    out = []
    for i, topic in enumerate(TOPICS):
        text = f"Write a short poem about {topic}." + " Please." * (i % 4)  # prompts of several lengths
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append(torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)]))
    return out


def _generate_all(server, smollm2, prompts, new_tokens: int, together: bool, speculative: bool) -> list[list[int]]:
    with corolla.AutoDistributedModelForCausalLM.from_pretrained(
        smollm2,
        initial_peers=[server.maddr],
        dht_prefix=PREFIX,
        use_relay=False,
        auto_nat=False,
        speculative=speculative,
        spot_check_rate=0.0,
        request_timeout=120.0,
    ) as remote:
        barrier = threading.Barrier(len(prompts) if together else 1)

        def one(ids: torch.Tensor) -> list[int]:
            barrier.wait(timeout=120)
            out = remote.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=[])
            return out[0, ids.shape[1] :].tolist()

        if not together:
            return [one(ids) for ids in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(one, prompts))


def test_sixteen_sessions_at_once_are_token_exact(server, smollm2, prompts):
    alone = _generate_all(server, smollm2, prompts, 64, together=False, speculative=False)
    before = server.stats()
    together = _generate_all(server, smollm2, prompts, 64, together=True, speculative=False)
    after = server.stats()
    for i, (want, got) in enumerate(zip(alone, together, strict=True)):
        assert got == want, f"session {i} differs in a crowd: {got} vs alone {want}"
    joint = after["joint_forwards"] - before["joint_forwards"]
    steps = after["token_steps"] - before["token_steps"]
    forwards = after["step_forwards"] - before["step_forwards"]
    assert joint > 0 and forwards < steps, f"no step shared a forward: {steps} steps in {forwards} forwards"
    assert after["sessions_peak"] >= 8
    assert sum(after["batch_sizes"][b] for b in ("5-8", "9-16")) > 0, after["batch_sizes"]


def test_speculative_drafts_in_a_crowd_are_token_exact(server, smollm2, prompts):
    """Greedy drafts (steps of several tokens, rolled back when rejected) beside one-token steps."""
    few = prompts[:6]
    alone = _generate_all(server, smollm2, few, 32, together=False, speculative=True)
    together = _generate_all(server, smollm2, few, 32, together=True, speculative=True)
    assert together == alone
