"""Training through the swarm: prompt tuning (ptune, deep_ptune) through a 2-server chain equals local
training of the same setup at every step; a server SIGKILLed mid-training changes nothing; bad
training requests get clear errors and leave the server's cache budget as it was."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

import corolla
from corolla.swarm.client.remote_forward import _call, _call_with_reply_metadata
from corolla.swarm.client.routing import RouteSegment
from corolla.swarm.step_metadata import CallMetadata, ForwardReply
from corolla.testing.swarm import start_chain

PREFIX = "tiny-train"
CLIENT_OPTIONS = {"use_relay": False, "auto_nat": False, "request_timeout": 20.0, "max_retries": 4, "min_backoff": 0.2}
PRE_SEQ_LEN = 3
STEPS = 30


@pytest.fixture(scope="module")
def local(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    servers = start_chain(tmp_path_factory.mktemp("train-swarm"), model_dir, ["0:3", "3:6"], "--dht-prefix", PREFIX)
    yield servers
    for server in servers:
        server.stop()


def connect(model_dir, peer, **options):
    return corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[peer], dht_prefix=PREFIX, **{**CLIENT_OPTIONS, **options}
    )


def task(batch=4, length=8):
    ids = torch.randint(6, 500, (batch, length), generator=torch.Generator().manual_seed(21))
    return ids, ids.clone()


def local_loss(local, tuning, ids, labels):
    logits = local_logits(local, tuning, ids)
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])


def local_logits(local, tuning, ids):
    """The same prompt-tuned model run locally: prompts prepended, deep prompts added before each layer."""
    batch = ids.shape[0]
    embeds = torch.cat([tuning.input_prompts(batch), local.get_input_embeddings()(ids)], dim=1)
    handles = []
    if tuning.deep:
        deep = tuning.deep_prompts(batch)
        for index, layer in enumerate(local.model.layers):

            def add_prompt(module, args, kwargs, prompt=deep[index]):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = torch.cat([hidden[:, : prompt.shape[1]] + prompt, hidden[:, prompt.shape[1] :]], dim=1)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            handles.append(layer.register_forward_pre_hook(add_prompt, with_kwargs=True))
    try:
        return local(inputs_embeds=embeds).logits[:, tuning.pre_seq_len :].contiguous()
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def local_greedy(local, tuning, ids, new_tokens):
    for _ in range(new_tokens):
        ids = torch.cat([ids, local_logits(local, tuning, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def train(loss_fn, params, steps=STEPS, on_step=None):
    optimizer = torch.optim.Adam(params, lr=0.05)
    losses = []
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuning_matches_local_training(model_dir, local, swarm, mode):
    ids, labels = task()
    remote = connect(model_dir, swarm[0].maddr, tuning_mode=mode, pre_seq_len=PRE_SEQ_LEN)
    try:
        trainable = [p for p in remote.parameters() if p.requires_grad]
        assert trainable and all(any(p is q for q in remote.prompt_tuning.parameters()) for p in trainable)
        reference = copy.deepcopy(remote.prompt_tuning)
        remote_losses = train(lambda: remote(ids, labels=labels).loss, remote.prompt_tuning.parameters())
        # The trained prompts also steer generation (deep prompts go with the session's first step).
        trained = copy.deepcopy(remote.prompt_tuning)
        generated = remote.generate(ids[:2, :5], max_new_tokens=6, eos_token_id=[])
        assert torch.equal(generated, local_greedy(local, trained, ids[:2, :5], 6))
    finally:
        remote.close()
    local_losses = train(lambda: local_loss(local, reference, ids, labels), reference.parameters())
    assert max(abs(a - b) for a, b in zip(remote_losses, local_losses, strict=True)) < 1e-4
    assert remote_losses[-1] < remote_losses[0] * 0.9  # it learns
    # The servers backpropagated through the graphs they kept from each forward pass (no re-run).
    deadline = time.monotonic() + 10  # the stats file is rewritten every second
    while time.monotonic() < deadline and swarm[1].stats().get("backward_graphs_reused", 0) < STEPS:
        time.sleep(0.2)
    assert swarm[1].stats()["backward_graphs_reused"] >= STEPS


def test_gradients_through_the_swarm_equal_local(model_dir, local, swarm):
    """Input gradients, streamed (a batch over 1 MiB) and with a padded row, equal local autograd."""
    remote = connect(model_dir, swarm[0].maddr)
    try:
        batch, length = 48, 96  # 48 x 96 x 64 floats = 1.2 MB: the streamed RPCs, in 1024-token chunks
        ids = torch.randint(6, 500, (batch, length), generator=torch.Generator().manual_seed(3))
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        embeds = remote.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = remote(inputs_embeds=embeds, attention_mask=mask, labels=ids)
        out.loss.backward()
        local_embeds = embeds.detach().clone().requires_grad_(True)
        want = local(inputs_embeds=local_embeds, attention_mask=mask, labels=ids)
        want.loss.backward()
        assert abs(out.loss.item() - want.loss.item()) < 1e-4
        assert torch.allclose(embeds.grad, local_embeds.grad, atol=1e-5)
    finally:
        remote.close()


def _budget(server) -> int:
    return server.stats()["cache_bytes_left"]


def test_bad_training_requests_are_clear_errors(model_dir, swarm):
    remote = connect(model_dir, swarm[0].maddr)
    try:
        remote.route()
        view = remote.view
        server = swarm[0]
        segment = RouteSegment(server.peer_id, 0, 3)
        before = _budget(server), server.stats()["requests_refused"]
        hidden = torch.randn(2, 5, 64)

        def call(method, args, mask=None, adapter=None):
            return remote._loop.run(_call(view, segment, method, args, mask, adapter, 20.0))

        cases = [
            ("rpc_forward", [hidden, torch.randn(2, 2, 2, 64)], None, None, "prompts are for 2 blocks"),
            ("rpc_forward", [hidden, torch.randn(3, 2, 9, 64)], None, None, "prompts cover 9 positions"),
            ("rpc_forward", [hidden, torch.randn(3, 5, 2, 64)], None, None, "prompts have 5 rows"),
            ("rpc_forward", [hidden, torch.randn(3, 2, 2, 32)], None, None, "hidden size 32"),
            ("rpc_backward", [hidden, torch.randn(2, 5, 64), torch.randn(3, 2)], None, None, "prompts must be"),
            ("rpc_backward", [hidden, torch.randn(2, 4, 64)], None, None, "grad_outputs must have the shape"),
            ("rpc_forward", [hidden, torch.zeros(0)], torch.ones(2, 4, dtype=torch.int64), None, "attention_mask"),
            ("rpc_forward", [hidden, torch.zeros(0)], None, "no-such-adapter", "adapter no-such-adapter not found"),
            ("rpc_backward", [torch.randn(1, 9000, 64), torch.randn(1, 9000, 64)], None, None, "max_batch_size"),
        ]
        for method, args, mask, adapter, message in cases:
            with pytest.raises(Exception, match=message):
                call(method, args, mask, adapter)
        # The server still works, and its cache budget is untouched.
        (out,) = call("rpc_forward", [hidden, torch.zeros(0)])
        assert out.shape == hidden.shape
        deadline = time.monotonic() + 10  # the stats file is rewritten every second
        while server.stats().get("requests_refused", 0) < before[1] + len(cases) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.stats()["requests_refused"] >= before[1] + len(cases)
        assert _budget(server) == before[0]
    finally:
        remote.close()


def test_backward_sends_no_inputs_when_the_server_kept_the_graph(model_dir, swarm):
    """The forward reply says the graph was kept; a backward with only the output gradients then equals
    the full request's; a graph that is gone is a clear error, and the client falls back to the full
    request by itself. A backward may ask for the input gradients of the first positions only."""
    remote = connect(model_dir, swarm[0].maddr)
    try:
        remote.route()
        segment = RouteSegment(swarm[0].peer_id, 0, 3)
        hidden, grad = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
        none = torch.zeros(0)

        def call(method, args, extra=None):
            run = _call_with_reply_metadata(remote.view, segment, method, args, None, None, 20.0, extra)
            return remote._loop.run(run)

        _, reply = call("rpc_forward", [hidden, none], CallMetadata(keep_graph="k1"))
        assert reply == ForwardReply(graph_kept=True)
        (lite,), _ = call("rpc_backward", [none, grad, none], CallMetadata(graph="k1"))
        (full,), _ = call("rpc_backward", [hidden, grad, none])
        assert torch.allclose(lite, full, atol=1e-6)
        with pytest.raises(Exception, match="forward graph of this backward request is not kept"):
            call("rpc_backward", [none, grad, none], CallMetadata(graph="k1"))  # taken by the first backward
        # Prompt tuning needs the input gradients of the prompts' positions only: the first 2 here.
        (prefix,), _ = call("rpc_backward", [hidden, grad, none], CallMetadata(grad_prefix=2))
        assert prefix.shape == (2, 2, 64) and torch.allclose(prefix, full[:, :2], atol=1e-6)
        with pytest.raises(Exception, match="must be a positive int"):
            call("rpc_backward", [hidden, grad, none], CallMetadata(grad_prefix=-1))
        assert call("rpc_forward", [hidden, none])[1] == ForwardReply()  # no graph asked for, none kept

        # The client's own fallback: the graph is gone (taken here first), the full request follows.
        blocks = remote.blocks
        _, hops = remote._loop.run(blocks.forward(hidden, keep_graphs=True))
        assert all(all(hop.graphs_kept) for hop in hops)
        first = hops[0]
        call("rpc_backward", [none, grad, none], CallMetadata(graph=first.graph_keys[0]))
        grads, _ = remote._loop.run(blocks.backward(hops, grad))
        _, fresh = remote._loop.run(blocks.forward(hidden, keep_graphs=True))
        want, _ = remote._loop.run(blocks.backward(fresh, grad))
        assert torch.allclose(grads, want, atol=1e-6)
    finally:
        remote.close()


def test_unknown_adapter_is_a_clear_client_error(model_dir, swarm):
    remote = connect(model_dir, swarm[0].maddr, active_adapter="someone/missing-lora", max_retries=1)
    try:
        with pytest.raises(Exception, match="missing-lora"):
            remote.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
        with pytest.raises(Exception, match="missing-lora"):
            remote(torch.tensor([[5, 6, 7]]))
    finally:
        remote.close()


@pytest.mark.slow
def test_sigkilled_server_does_not_change_the_losses(model_dir, local, tmp_path):
    servers = start_chain(tmp_path, model_dir, ["0:3", "3:6", "3:6"], "--dht-prefix", PREFIX + "-kill")
    try:
        remote = corolla.AutoDistributedModelForCausalLM.from_pretrained(
            model_dir,
            initial_peers=[servers[0].maddr],
            dht_prefix=PREFIX + "-kill",
            tuning_mode="deep_ptune",
            pre_seq_len=PRE_SEQ_LEN,
            **CLIENT_OPTIONS,
        )
        ids, labels = task()
        killed = []

        def kill_the_route_server(step):
            if step == 10:
                used = {segment.peer_id for segment in remote.blocks.last_route}
                victim = next(s for s in servers[1:] if s.peer_id in used)
                victim.kill()
                killed.append(victim)

        try:
            reference = copy.deepcopy(remote.prompt_tuning)
            losses = train(
                lambda: remote(ids, labels=labels).loss,
                remote.prompt_tuning.parameters(),
                on_step=kill_the_route_server,
            )
            assert killed and killed[0].peer_id not in {s.peer_id for s in remote.blocks.last_route}
        finally:
            remote.close()
        want = train(lambda: local_loss(local, reference, ids, labels), reference.parameters())
        assert max(abs(a - b) for a, b in zip(losses, want, strict=True)) < 1e-4
    finally:
        for server in servers:
            server.stop()
