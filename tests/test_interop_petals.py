"""Interoperability with stock Petals 2.2.0.post1 peers (../shared/reference-petals), on 127.0.0.1.

The reference scripts run inside the reference venv; Corolla servers run from this checkout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corolla.testing.swarm import (
    CorollaServer,
    PetalsServer,
    make_reference_model,
    reference_dir,
    require_reference,
    run_reference_script,
)

pytestmark = pytest.mark.slow
PREFIX = "tiny-llama-hf"
HERE = Path(__file__).parent / "interop"


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory):
    require_reference()
    return make_reference_model(tmp_path_factory.mktemp("ref-model") / "tiny-llama", PREFIX)


@pytest.fixture(scope="module")
def corolla_whole_model(reference_model, tmp_path_factory):
    server = CorollaServer(
        tmp_path_factory.mktemp("corolla"),
        reference_model,
        "--new-swarm",
        "--blocks",
        "0:4",
        "--torch-dtype",
        "float32",
        "--throughput",
        "10",
    )
    server.wait_state("online")
    yield server
    server.stop()


def _last_json(result) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith(("{", "SUMMARY"))]
    assert lines, f"no JSON from the reference script:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("SUMMARY "))


def _stock_client_generates(model, initial_peer: str) -> None:
    """The stock Petals client checks its generation through the swarm against the local model."""
    result = run_reference_script(
        reference_dir() / "client_check.py", str(model), initial_peer, "--dht_prefix", PREFIX, "--new_tokens", "12"
    )
    summary = _last_json(result)
    assert result.returncode == 0 and summary["ok"], result.stdout[-3000:]


def test_stock_client_generates_through_a_corolla_server(reference_model, corolla_whole_model):
    _stock_client_generates(reference_model, corolla_whole_model.maddr)


def test_stock_client_multi_turn_sessions_and_batches(reference_model, corolla_whole_model):
    result = run_reference_script(
        HERE / "petals_session_check.py", str(reference_model), corolla_whole_model.maddr, PREFIX
    )
    report = _last_json(result)
    assert result.returncode == 0 and report["ok"], (report, result.stderr[-3000:])


def test_rollback_sent_by_stock_petals_code(reference_model, corolla_whole_model):
    result = run_reference_script(
        HERE / "petals_wire_rollback.py", str(reference_model), corolla_whole_model.maddr, PREFIX
    )
    report = _last_json(result)
    assert result.returncode == 0 and report["ok"], (report, result.stderr[-3000:])


def test_stock_reader_accepts_the_announcement(corolla_whole_model):
    result = run_reference_script(HERE / "petals_dht_check.py", corolla_whole_model.maddr, PREFIX, "4")
    seen = _last_json(result)
    entry = seen[corolla_whole_model.peer_id]
    assert entry["state"] == "ONLINE" and entry["blocks"] == [0, 1, 2, 3]
    assert entry["throughput"] == 10.0 and entry["cache_tokens_left"] > 0


def test_mixed_chain_stock_server_then_corolla_server(reference_model, tmp_path):
    corolla = CorollaServer(
        tmp_path,
        reference_model,
        "--new-swarm",
        "--blocks",
        "2:4",
        "--torch-dtype",
        "float32",
        "--throughput",
        "10",
        name="corolla-2-4",
    )
    petals = None
    try:
        corolla.wait_state("online")
        petals = PetalsServer(tmp_path, reference_model, corolla.maddr, "0:2", PREFIX)
        petals.wait_started()
        seen = _last_json(run_reference_script(HERE / "petals_dht_check.py", corolla.maddr, PREFIX, "4"))
        spans = sorted(entry["blocks"] for entry in seen.values() if entry["state"] == "ONLINE")
        assert spans == [[0, 1], [2, 3]], seen
        _stock_client_generates(reference_model, corolla.maddr)
        assert corolla.stats()["inference_steps"] > 0  # the chain really went through Corolla
    finally:
        if petals is not None:
            petals.stop()
        corolla.stop()


def test_corolla_client_through_a_stock_petals_server(reference_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import corolla
    from corolla.swarm.peers import start_dht

    # a plain DHT peer for the stock server to join
    bootstrap = start_dht(use_relay=False, auto_nat=False, in_process=True)
    petals = None
    try:
        maddr = str(bootstrap.get_visible_maddrs()[0])
        petals = PetalsServer(tmp_path, reference_model, maddr, "0:4", PREFIX)
        petals.wait_started()
        local = AutoModelForCausalLM.from_pretrained(reference_model, dtype=torch.float32).eval()
        with corolla.AutoDistributedModelForCausalLM.from_pretrained(
            reference_model, initial_peers=[maddr], dht_prefix=PREFIX, use_relay=False, auto_nat=False
        ) as remote:
            for prompt in ([[1, 384, 456]], [[1, 291, 441, 410, 420]]):
                ids = torch.tensor(prompt)
                want = local.generate(
                    ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids)
                )
                got = remote.generate(ids, max_new_tokens=12, eos_token_id=[])
                assert torch.equal(got, want)
            torch.manual_seed(7)
            ids = torch.tensor([[1, 384, 456]])
            want = local.generate(
                ids,
                max_new_tokens=8,
                min_new_tokens=8,
                do_sample=True,
                top_k=20,
                temperature=0.9,
                attention_mask=torch.ones_like(ids),
            )
            assert torch.equal(
                remote.generate(
                    ids, max_new_tokens=8, eos_token_id=[], do_sample=True, top_k=20, temperature=0.9, seed=7
                ),
                want,
            )
    finally:
        if petals is not None:
            petals.stop()
        bootstrap.shutdown()


def test_push_stream_between_corolla_servers_and_rpc_push_to_a_stock_server(reference_model, tmp_path):
    """A chain Corolla -> Corolla -> stock Petals with server-to-server push: the first Corolla server
    pushes to the second on their push stream (push_stream.py), the second to the stock server by
    rpc_push (it has no push stream, and its DHT record says it is not Corolla); token-exact."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    import corolla

    common = ["--torch-dtype", "float32", "--throughput", "10", "--update-period", "5"]
    head = CorollaServer(tmp_path, reference_model, "--new-swarm", "--blocks", "0:2", *common, name="corolla-0-2")
    servers, petals = [head], None
    try:
        head.wait_state("online")
        middle = CorollaServer(
            tmp_path, reference_model, "--initial-peers", head.maddr, "--blocks", "2:3", *common, name="corolla-2-3"
        )
        servers.append(middle)
        middle.wait_state("online")
        petals = PetalsServer(tmp_path, reference_model, head.maddr, "3:4", PREFIX)
        petals.wait_started()
        local = AutoModelForCausalLM.from_pretrained(reference_model, dtype=torch.float32).eval()
        with corolla.AutoDistributedModelForCausalLM.from_pretrained(
            reference_model,
            initial_peers=[head.maddr],
            dht_prefix=PREFIX,
            use_relay=False,
            auto_nat=False,
            use_server_to_server=True,
        ) as remote:
            route = remote.wait_for_route(60)  # the stock server's record may still be on its way
            assert petals is not None and len(route.split(",")) == 3, route
            for prompt in ([[1, 384, 456]], [[1, 291, 441, 410, 420]]):
                ids = torch.tensor(prompt)
                want = local.generate(
                    ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids)
                )
                got = remote.generate(ids, max_new_tokens=12, eos_token_id=[], prompt_lookup_num_tokens=None)
                assert torch.equal(got, want)

        def counted() -> bool:
            return (
                head_stats["pushes_sent"] >= 20
                and head_stats["pushes_sent_on_stream"] >= 5
                and middle_stats["pushes_received_on_stream"] >= 5
                and middle_stats["pushes_sent"] >= 20
            )

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # each server rewrites its stats file every second
            head_stats, middle_stats = head.stats(), middle.stats()
            if counted():
                break
            time.sleep(0.5)
        assert counted(), (head_stats, middle_stats)
        assert middle_stats["pushes_sent_on_stream"] == 0, middle_stats  # to the stock server: rpc_push
    finally:
        if petals is not None:
            petals.stop()
        for server in reversed(servers):
            server.stop()
