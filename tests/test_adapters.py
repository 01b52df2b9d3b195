"""Server-side LoRA adapters: `corolla serve --adapters PATH` loads a PEFT adapter for its blocks and
announces it; a client's `active_adapter=` routes only through servers that have it, and its outputs
(generation, logits, loss and gradients) equal the local PEFT model's; without it, the base model's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import corolla
from corolla.testing.swarm import LOOPBACK_FLAGS, CorollaServer, start_chain

peft = pytest.importorskip("peft")
PREFIX = "tiny-lora"
CLIENT_OPTIONS = {"use_relay": False, "auto_nat": False, "request_timeout": 20.0, "max_retries": 2, "min_backoff": 0.2}
NO_EOS = {"eos_token_id": None, "pad_token_id": 3}


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    """A tiny random LoRA adapter (non-zero B, so it changes every output), saved by PEFT itself."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    folder = tmp_path_factory.mktemp("adapters") / "tiny-lora"
    peft.get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def local_peft(model_dir, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.fixture(scope="module")
def local_base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def swarm(model_dir, adapter_dir, tmp_path_factory):
    """Blocks 0:3 and 3:6 with the adapter, and a whole-model server without it."""
    tmp = tmp_path_factory.mktemp("lora-swarm")
    servers = start_chain(tmp, model_dir, ["0:3", "3:6"], "--dht-prefix", PREFIX, "--adapters", str(adapter_dir))
    plain = CorollaServer(
        tmp,
        model_dir,
        "--initial-peers",
        servers[0].maddr,
        "--dht-prefix",
        PREFIX,
        "--blocks",
        "0:6",
        "--torch-dtype",
        "float32",
        "--throughput",
        "10",
        name="plain",
    )
    servers.append(plain)
    try:
        plain.wait_state("online")
        yield servers
    finally:
        for server in servers:
            server.stop()


def connect(model_dir, swarm, adapter=None):
    return corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[swarm[0].maddr], dht_prefix=PREFIX, active_adapter=adapter, **CLIENT_OPTIONS
    )


def test_adapter_is_announced_and_routes_only_through_its_servers(model_dir, adapter_dir, swarm):
    with connect(model_dir, swarm, str(adapter_dir)) as remote:
        route = remote.route()
        remote._loop.run(remote.view.refresh())
        announced = {peer: span.server_info.adapters for peer, span in remote.view.spans.items()}
        assert announced[swarm[0].peer_id] == (str(adapter_dir),)
        assert announced[swarm[2].peer_id] == ()
        assert swarm[2].peer_id[-6:] not in route
        assert swarm[0].peer_id[-6:] in route and swarm[1].peer_id[-6:] in route


def test_outputs_with_and_without_the_adapter_equal_local_models(model_dir, adapter_dir, swarm, local_peft, local_base):
    ids = torch.randint(6, 500, (2, 6), generator=torch.Generator().manual_seed(4))
    for adapter, local in ((str(adapter_dir), local_peft), (None, local_base)):
        with connect(model_dir, swarm, adapter) as remote:
            want = local.generate(input_ids=ids, max_new_tokens=8, attention_mask=torch.ones_like(ids), **NO_EOS)
            assert torch.equal(remote.generate(ids, max_new_tokens=8, **NO_EOS), want), adapter
            with torch.no_grad():
                expected = local(input_ids=ids, labels=ids)
            embeds = remote.get_input_embeddings()(ids).detach().requires_grad_(True)
            got = remote(inputs_embeds=embeds, labels=ids)
            assert torch.allclose(got.logits, expected.logits, atol=1e-4), adapter
            assert abs(got.loss.item() - expected.loss.item()) < 1e-4
            got.loss.backward()  # the adapter also applies in rpc_backward
            assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    assert not torch.allclose(local_peft(input_ids=ids).logits, local_base(input_ids=ids).logits, atol=1e-3)


def test_adapter_gradients_equal_local_peft(model_dir, adapter_dir, swarm, local_peft):
    ids = torch.randint(6, 500, (2, 6), generator=torch.Generator().manual_seed(5))
    with connect(model_dir, swarm, str(adapter_dir)) as remote:
        embeds = remote.get_input_embeddings()(ids).detach().requires_grad_(True)
        remote(inputs_embeds=embeds, labels=ids).loss.backward()
    local_embeds = embeds.detach().clone().requires_grad_(True)
    local_peft(inputs_embeds=local_embeds, labels=ids).loss.backward()
    assert torch.allclose(embeds.grad, local_embeds.grad, atol=1e-5)


def test_a_bad_adapter_folder_stops_the_server_with_a_clear_error(model_dir, tmp_path):
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    serve_args = ["--dht-prefix", PREFIX + "-bad", "--blocks", "0:6", "--adapters", str(empty)]
    result = subprocess.run(
        [sys.executable, "-m", "corolla.cli", "serve", str(model_dir), "--new-swarm", *LOOPBACK_FLAGS, *serve_args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "adapter_config.json and adapter_model.safetensors" in result.stderr
