"""Real weights through the swarm: SmolLM2-135M-Instruct split over three Corolla servers gives exactly
the tokens of transformers' own generate() on the same folder, greedy and with seeded sampling."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import corolla
from corolla.testing.swarm import start_chain

pytestmark = pytest.mark.slow
PREFIX = "SmolLM2-135M-Instruct-Q4_1-hf"
CLIENT_OPTIONS = dict(use_relay=False, auto_nat=False)
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about bees.",
    "Explain in two sentences why the sky is blue.",
]


@pytest.fixture(scope="module")
def swarm(smollm2, tmp_path_factory):
    servers = start_chain(tmp_path_factory.mktemp("smollm2-swarm"), smollm2, ["0:10", "10:20", "20:30"])
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def remote(smollm2, swarm):
    model = corolla.AutoDistributedModelForCausalLM.from_pretrained(
        smollm2, initial_peers=[swarm[0].maddr], **CLIENT_OPTIONS
    )
    yield model
    model.close()


@pytest.fixture(scope="module")
def local(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


def test_three_servers_cover_the_model(remote, swarm):
    route = remote.route()
    assert "0:10 via" in route and "10:20 via" in route and "20:30 via" in route


def test_greedy_64_tokens_equal_transformers_generate(remote, local, tokenizer):
    for question in QUESTIONS:
        ids = chat_ids(tokenizer, question)
        want = local.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False, eos_token_id=None
        )
        got = remote.generate(ids, max_new_tokens=64, eos_token_id=[])
        assert got.shape[1] == ids.shape[1] + 64
        assert torch.equal(got, want), (question, tokenizer.decode(got[0]), tokenizer.decode(want[0]))
    answer = tokenizer.decode(remote.generate(chat_ids(tokenizer, QUESTIONS[0]), max_new_tokens=12)[0])
    assert "Paris" in answer


def test_seeded_sampling_equals_transformers_generate(remote, local, tokenizer):
    ids = chat_ids(tokenizer, "Tell me a short story about a fox.")
    options = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=32)
    torch.manual_seed(2024)
    want = local.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=None, **options)
    got = remote.generate(ids, seed=2024, eos_token_id=[], **options)
    assert torch.equal(got, want), (tokenizer.decode(got[0]), tokenizer.decode(want[0]))


def test_corolla_chat_prompt_answers_paris(smollm2, swarm):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "corolla.cli",
            "chat",
            str(smollm2),
            "--initial-peers",
            swarm[0].maddr,
            "--no-relay",
            "--no-auto-nat",
            "--prompt",
            "What is the capital of France?",
            "--max-new-tokens",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout
