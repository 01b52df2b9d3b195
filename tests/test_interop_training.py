"""Training interop with stock Petals 2.2: the stock client's prompt-tuning step through Corolla
servers gives the same loss and gradients as through stock servers, and so does Corolla's client,
through either."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import corolla
from corolla.swarm.peers import start_dht
from corolla.testing.swarm import (
    PetalsServer,
    make_reference_model,
    require_reference,
    run_reference_script,
    start_chain,
)

pytestmark = pytest.mark.slow
PREFIX = "tiny-llama-hf"
SCRIPT = Path(__file__).parent / "interop" / "petals_train_step.py"
PRE_SEQ_LEN = 3
BATCH, LENGTH = 2, 7


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory):
    require_reference()
    return make_reference_model(tmp_path_factory.mktemp("ref-model") / "tiny-llama", PREFIX)


@pytest.fixture(scope="module")
def stock_swarm(reference_model, tmp_path_factory):
    bootstrap = start_dht(use_relay=False, auto_nat=False, in_process=True)
    tmp = tmp_path_factory.mktemp("stock")
    maddr = str(bootstrap.get_visible_maddrs()[0])
    servers = [
        PetalsServer(tmp, reference_model, maddr, blocks, PREFIX, name=f"stock-{blocks}") for blocks in ("0:2", "2:4")
    ]
    try:
        for server in servers:
            server.wait_started()
        yield maddr
    finally:
        for server in servers:
            server.stop()
        bootstrap.shutdown()


@pytest.fixture(scope="module")
def corolla_swarm(reference_model, tmp_path_factory):
    servers = start_chain(tmp_path_factory.mktemp("corolla"), reference_model, ["0:2", "2:4"], "--dht-prefix", PREFIX)
    yield servers
    for server in servers:
        server.stop()


def stock_client_step(model: Path, peer: str, mode: str) -> dict:
    result = run_reference_script(
        SCRIPT, str(model), peer, PREFIX, mode, str(PRE_SEQ_LEN), str(BATCH), str(LENGTH), "1", timeout=300
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1])


def corolla_client_step(model: Path, peer: str, mode: str) -> dict:
    """The same step by Corolla's client, with the same seeded prompts as the stock script."""
    with corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model,
        initial_peers=[peer],
        dht_prefix=PREFIX,
        tuning_mode=mode,
        pre_seq_len=PRE_SEQ_LEN,
        use_relay=False,
        auto_nat=False,
    ) as remote:
        generator = torch.Generator().manual_seed(0)
        trainable = [(name, p) for name, p in remote.named_parameters() if p.requires_grad]
        with torch.no_grad():
            for _, param in trainable:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        ids = torch.randint(6, 500, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
        loss = remote(input_ids=ids, labels=ids).loss
        loss.backward()
        return {"loss": loss.item(), "grads": {n.split(".")[-2]: p.grad.flatten().tolist() for n, p in trainable}}


def assert_same_step(a: dict, b: dict) -> None:
    assert abs(a["loss"] - b["loss"]) < 1e-5  # float32 noise: the stock servers run transformers 4.x kernels
    assert a["grads"].keys() == b["grads"].keys() and a["grads"]
    for name in a["grads"]:
        got, want = torch.tensor(a["grads"][name]), torch.tensor(b["grads"][name])
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_stock_and_corolla_clients_train_alike_through_either_servers(
    reference_model, stock_swarm, corolla_swarm, mode
):
    through_stock = stock_client_step(reference_model, stock_swarm, mode)
    through_corolla = stock_client_step(reference_model, corolla_swarm[0].maddr, mode)
    assert_same_step(through_stock, through_corolla)
    assert corolla_swarm[1].stats()["backward_requests"] > 0  # it really went through Corolla
    assert_same_step(through_stock, corolla_client_step(reference_model, stock_swarm, mode))
    assert_same_step(through_stock, corolla_client_step(reference_model, corolla_swarm[0].maddr, mode))
