"""Local edge blocks over real sockets: with `local_edge_blocks=k` the client runs blocks [0, k) and
[L - k, L) itself and the swarm only [k, L - k). On the shared tiny swarm (servers 0:2, 2:4, 4:6) and
k = 2, the servers holding the first and last blocks receive nothing, and every generation strategy,
multi-turn sessions with rollback, padded batches, logits, gradients and deep prompt tuning equal the
whole model run locally."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import corolla
from corolla.swarm.client.local_edges import LocalEdgesError
from corolla.testing.swarm import TINY_SWARM_PREFIX
from tests.test_training import local_greedy, local_loss, train

CLIENT = {"use_relay": False, "auto_nat": False, "request_timeout": 20.0, "max_retries": 4, "min_backoff": 0.2}
NO_EOS = {"eos_token_id": None, "pad_token_id": 3}


@pytest.fixture(scope="module")
def local(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def connect(model_dir, swarm, k, **options):
    return corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir,
        initial_peers=[swarm[1].maddr],
        dht_prefix=TINY_SWARM_PREFIX,
        local_edge_blocks=k,
        **CLIENT,
        **options,
    )


@pytest.fixture(scope="module")
def edged(model_dir, tiny_swarm):
    model = connect(model_dir, tiny_swarm, 2)
    yield model
    model.close()


def prompt(batch=1, length=6, seed=0):
    return torch.randint(6, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def both(remote, local, ids, seed=None, **kwargs):
    results = []
    for model, extra in ((remote, {}), (local, NO_EOS)):
        if seed is not None:
            torch.manual_seed(seed)
        options = {"attention_mask": torch.ones_like(ids), **kwargs, **extra}
        if model is remote:
            options["eos_token_id"] = []
            options.pop("pad_token_id", None)
        results.append(model.generate(ids, **options))
    return results


def _tokens(server) -> int:
    """The server's processed-token count once its stats file has settled (rewritten every second)."""
    previous = None
    for _ in range(10):
        count = int(server.stats().get("tokens_processed", 0))
        if count == previous:
            return count
        previous = count
        time.sleep(1.2)
    return previous


def test_the_edge_servers_receive_nothing_and_greedy_equals_local(edged, local, tiny_swarm):
    route = edged.route()
    assert route.startswith("2:4 via") and "0:2" not in route and "4:6" not in route, route
    assert "blocks 0–1 and 4–5 ran on this computer" in route
    before = [_tokens(server) for server in tiny_swarm]
    for batch in (1, 2):
        ids = prompt(batch, seed=batch)
        got, want = both(edged, local, ids, max_new_tokens=12)
        assert torch.equal(got, want)
    after = [_tokens(server) for server in tiny_swarm]
    assert after[1] > before[1]  # the middle server did the swarm's part
    assert after[0] == before[0] and after[2] == before[2], (before, after)
    with edged.inference_session(max_length=20) as session:
        edged.generate(prompt(seed=9), max_new_tokens=3, eos_token_id=[], session=session)
        assert set(session.recipients) == {tiny_swarm[1].peer_id}
        assert session.recipients[tiny_swarm[1].peer_id] == {(2, 4)}
        assert session.local_blocks == "blocks 0–1 and 4–5 ran on this computer"


@pytest.mark.parametrize(
    "options",
    [dict(do_sample=True, top_k=40, temperature=0.8), dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)],
    ids=["sampling", "beams", "beams_returned"],
)
def test_sampling_and_beam_search_equal_local(edged, local, options):
    ids = prompt(length=5, seed=3)
    got, want = both(edged, local, ids, seed=1234, max_new_tokens=8, **options)
    assert torch.equal(got, want)


def test_padded_batch_equals_local(edged, local):
    ids = prompt(batch=3, length=7, seed=14)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 3)
    for options in (dict(), dict(num_beams=2)):
        got, want = both(edged, local, ids, seed=9, max_new_tokens=6, attention_mask=mask, **options)
        assert torch.equal(got, want), options


def test_multi_turn_session_speculation_and_rollback_equal_local(edged, local):
    # A repetitive prompt: prompt lookup drafts tokens, and rejected drafts roll every cache back.
    first = torch.tensor([[7, 8, 9, 10, 7, 8, 9, 10, 7, 8]])
    second = prompt(length=3, seed=6)
    with edged.inference_session(max_length=64) as session:
        turn1 = edged.generate(first, max_new_tokens=12, eos_token_id=[], session=session)
        turn2 = edged.generate(second, max_new_tokens=6, eos_token_id=[], session=session)
        assert session.position == 10 + 12 + 3 + 5
        session.rollback(10)  # back to the end of the first prompt, then the same turn again
        session.pending = None
        again = edged.generate(turn1[:, 10:11], max_new_tokens=4, eos_token_id=[], session=session)
    want1 = local.generate(first, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(first), **NO_EOS)
    assert torch.equal(turn1, want1)
    whole = torch.cat([turn1, second], dim=1)
    want2 = local.generate(whole, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(whole), **NO_EOS)
    assert torch.equal(turn2[:, -6:], want2[:, -6:])
    assert torch.equal(again[:, 1:], want1[:, 11:15])


def test_logits_and_gradients_equal_local(edged, local):
    ids = prompt(batch=2, length=9, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    assert torch.allclose(edged(ids).logits, local(ids).logits, atol=1e-4)
    embeds = edged.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = edged(inputs_embeds=embeds, attention_mask=mask, labels=ids)
    out.loss.backward()
    local_embeds = embeds.detach().clone().requires_grad_(True)
    want = local(inputs_embeds=local_embeds, attention_mask=mask, labels=ids)
    want.loss.backward()
    assert abs(out.loss.item() - want.loss.item()) < 1e-4
    assert torch.allclose(embeds.grad, local_embeds.grad, atol=1e-5)


def test_deep_prompt_tuning_with_local_edges_trains_as_locally(model_dir, local, tiny_swarm):
    ids = torch.randint(6, 500, (4, 8), generator=torch.Generator().manual_seed(21))
    remote = connect(model_dir, tiny_swarm, 1, tuning_mode="deep_ptune", pre_seq_len=3)
    try:
        reference = copy.deepcopy(remote.prompt_tuning)
        remote_losses = train(lambda: remote(ids, labels=ids).loss, remote.prompt_tuning.parameters(), steps=6)
        trained = copy.deepcopy(remote.prompt_tuning)
        generated = remote.generate(ids[:2, :5], max_new_tokens=5, eos_token_id=[])
        assert torch.equal(generated, local_greedy(local, trained, ids[:2, :5], 5))
    finally:
        remote.close()
    local_losses = train(lambda: local_loss(local, reference, ids, ids), reference.parameters(), steps=6)
    assert max(abs(a - b) for a, b in zip(remote_losses, local_losses, strict=True)) < 1e-4


def test_impossible_edges_are_refused_before_anything_starts(model_dir):
    unreachable = ["/ip4/127.0.0.1/tcp/9/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"]
    for bad, says in [(3, "at most 2 at each end"), (-1, "whole number"), (1.5, "whole number"), ("2", "whole number")]:
        with pytest.raises(LocalEdgesError, match=says):
            corolla.AutoDistributedModelForCausalLM.from_pretrained(
                model_dir, initial_peers=unreachable, dht_prefix="edges", local_edge_blocks=bad
            )
    with pytest.raises(LocalEdgesError, match="without adapters"):
        corolla.AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=unreachable, dht_prefix="edges", local_edge_blocks=1, active_adapter="some/adapter"
        )
