"""A stock Petals 2.2 server serves a span of the SmolLM2 folder `corolla model import` made, next to a
Corolla server: the stock client and the Corolla client are both token-exact through the mixed chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import corolla
from corolla.testing.swarm import CorollaServer, PetalsServer, require_reference, run_reference_script

pytestmark = pytest.mark.slow
PREFIX = "SmolLM2-135M-Instruct-Q4_1-hf"
HERE = Path(__file__).parent / "interop"


@pytest.fixture(scope="module")
def mixed_chain(smollm2, tmp_path_factory):
    """Stock Petals serves blocks 0:15, Corolla serves 15:30."""
    require_reference()
    workdir = tmp_path_factory.mktemp("smollm2-mixed")
    corolla_server = CorollaServer(
        workdir, smollm2, "--new-swarm", "--blocks", "15:30", "--torch-dtype", "float32", "--throughput", "10"
    )
    petals = None
    try:
        corolla_server.wait_state("online")
        petals = PetalsServer(workdir, smollm2, corolla_server.maddr, "0:15", PREFIX)
        petals.wait_started()
        yield corolla_server, petals
    finally:
        if petals is not None:
            petals.stop()
        corolla_server.stop()


def test_stock_client_is_token_exact_through_the_mixed_chain(smollm2, mixed_chain):
    corolla_server, _ = mixed_chain
    steps_before = corolla_server.stats().get("inference_steps", 0)
    result = run_reference_script(
        HERE / "petals_smollm2_check.py", str(smollm2), corolla_server.maddr, PREFIX, "32", timeout=600
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON from the reference script:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    report = json.loads(lines[-1])
    assert result.returncode == 0 and report["ok"], report
    assert "Paris" in report["results"][0]["answer"]
    assert corolla_server.stats()["inference_steps"] > steps_before  # the chain really went through Corolla


def test_corolla_client_is_token_exact_through_the_mixed_chain(smollm2, mixed_chain):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corolla_server, _ = mixed_chain
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    local = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with corolla.AutoDistributedModelForCausalLM.from_pretrained(
        smollm2, initial_peers=[corolla_server.maddr], use_relay=False, auto_nat=False
    ) as remote:
        assert "0:15 via" in remote.route() and "15:30 via" in remote.route()
        for question in ("What is the capital of France?", "Name three colours."):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
            want = local.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False, eos_token_id=None
            )
            got = remote.generate(ids, max_new_tokens=64, eos_token_id=[])
            assert torch.equal(got, want), (tokenizer.decode(got[0]), tokenizer.decode(want[0]))
