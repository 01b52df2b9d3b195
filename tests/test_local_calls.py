"""A swarm client that shares its block server's DHT and p2pd (issue 29) reaches that server's handlers
in-process (swarm/local_calls.py): the real handler over a tiny model's blocks, attached to a real p2pd
on its own event loop thread as in the block server; the client on another loop, as the chat engine's;
and a second peer that reaches the same server through p2pd, to compare with. Whatever the server
answers or refuses, the in-process caller gets the same."""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from corolla.swarm import protocol
from corolla.swarm.client.client_loop import ClientLoop
from corolla.swarm.client.remote_model import AutoDistributedModelForCausalLM
from corolla.swarm.client.routing import RouteSegment
from corolla.swarm.client.streams import ServerStream, server_refusal
from corolla.swarm.local_calls import LocalServer, SharedP2P
from corolla.swarm.models import load_span
from corolla.swarm.peers import start_dht
from corolla.swarm.server.handler import HandlerLimits, TransformerConnectionHandler
from corolla.swarm.server.memory_cache import CacheBudget
from corolla.swarm.server.stats import ServerStats

PREFIX = "tiny-local-calls"
BLOCKS = 2
MAX_LENGTH = 32
HIDDEN = 64  # the tiny Llama's
INFERENCE = f"{protocol.HANDLER_CLASS_NAME}.rpc_inference"


class Server:
    """The serving half of a block server: its in-process DHT (p2pd its child), the real handler attached
    to the DHT's P2P on the server's own loop thread, and what it lends a client in its process."""

    def __init__(self, model_dir):
        self.span = load_span(model_dir, 0, BLOCKS)
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.dht = start_dht(use_relay=False, auto_nat=False, in_process=True)
        self.loop = ClientLoop()  # a loop on a thread, as the server's main loop
        self.p2p, self.local = self.loop.run(self._join())
        self.handler = self.attach()

    async def _join(self) -> tuple[P2P, LocalServer]:
        p2p = await self.dht.replicate_p2p()
        return p2p, LocalServer(p2p)

    def attach(self) -> TransformerConnectionHandler:
        async def attach() -> TransformerConnectionHandler:
            per_token_block = self.span.family.kv_dim(self.span.config) * 2 * 4
            budget = CacheBudget(BLOCKS * 4 * MAX_LENGTH * per_token_block, per_token_block, max_alloc_timeout=1.0)
            limits = HandlerLimits(
                inference_max_length=MAX_LENGTH,
                max_batch_size=256,
                max_open_sessions=8,
                request_timeout=30.0,
                session_timeout=600.0,
                step_timeout=300.0,  # a session its client left is not ended by the server's timeout in a test
            )
            handler = TransformerConnectionHandler(self.span, PREFIX, budget, limits, ServerStats(), self.executor)
            await handler.attach(self.p2p)
            return handler

        return self.loop.run(attach(), timeout=30)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run(self.handler.detach(), timeout=10)
        self.loop.stop()
        self.dht.shutdown()
        self.executor.shutdown(wait=False)


class Caller:
    """A P2P of a client and the loop it lives on: `run(coroutine)` there."""

    def __init__(self, p2p_of, dht):
        self.loop = ClientLoop()
        self.p2p = self.loop.run(p2p_of(), timeout=60)
        self.dht = dht

    def run(self, coroutine, timeout: float = 60):
        return self.loop.run(coroutine, timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.p2p.shutdown(), timeout=10)
        self.loop.stop()
        if self.dht is not None:
            self.dht.shutdown()


@pytest.fixture(scope="module")
def server(model_dir):
    server = Server(model_dir)
    yield server
    server.close()


@pytest.fixture(scope="module")
def own(server):
    """The chat engine's case: the server's own p2pd, its handlers reached in-process."""
    caller = Caller(lambda: _shared(server), None)
    yield caller
    caller.close()


async def _shared(server: Server) -> SharedP2P:
    return SharedP2P(await server.dht.new_p2p(), server.local)


@pytest.fixture(scope="module")
def remote(server):
    """Another peer of the swarm, which reaches the server through p2pd (a client of any other computer)."""
    dht = start_dht(
        [str(a) for a in server.dht.get_visible_maddrs()],
        client_mode=True,
        use_relay=False,
        auto_nat=False,
        in_process=True,
    )
    caller = Caller(dht.replicate_p2p, dht)
    yield caller
    caller.close()


def _session(caller: Caller, server: Server, inputs: torch.Tensor, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """One inference session of one step through `caller`'s P2P (the client's own stream code)."""

    async def run() -> torch.Tensor:
        stream = ServerStream(RouteSegment(server.local.peer_id.to_base58(), 0, BLOCKS), PREFIX, max_length)
        view = types.SimpleNamespace(p2p=caller.p2p, stub=lambda peer: None)  # no privacy policy to apply here
        await stream.open(view, timeout=30)
        try:
            return await stream.step(inputs, "step-0", 0, timeout=30)
        finally:
            await stream.close()

    return caller.run(run())


def _inputs(length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, length, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_a_session_with_the_own_server_runs_in_process_and_answers_as_through_p2pd(server, own, remote):
    inputs = _inputs()
    through_p2pd = _session(remote, server, inputs)
    in_process = _session(own, server, inputs)
    assert torch.equal(in_process, through_p2pd)
    # The reason for all this: through p2pd, the server's own peer id cannot be dialled (libp2p refuses
    # to dial itself), so without the in-process path the own blocks were out of a sharing client's reach.
    with pytest.raises(Exception):  # noqa: B017 (p2pd's wording for it is not ours to pin)
        own.run(asyncio.wait_for(own.p2p.replica.call_binary_stream_handler(server.local.peer_id, INFERENCE), 20))


def test_the_own_server_refuses_a_session_over_its_max_length_as_it_refuses_a_remote_one(server, own, remote):
    refusals = []
    for caller in (remote, own):
        with pytest.raises(P2PHandlerError) as caught:
            _session(caller, server, _inputs(), max_length=MAX_LENGTH + 1)
        refusals.append(server_refusal(caught.value))
    assert refusals[0] == refusals[1] and str(MAX_LENGTH) in refusals[0], refusals
    # ... and the same for a step longer than the session it opened.
    longer = []
    for caller in (remote, own):
        with pytest.raises(P2PHandlerError) as caught:
            _session(caller, server, _inputs(length=9), max_length=8)
        longer.append(server_refusal(caught.value))
    assert longer[0] == longer[1] and longer[0] != refusals[0], longer


def test_unary_calls_reach_the_own_server_in_process_with_p2pds_error_wording(server, own, remote):
    peer = server.local.peer_id
    infos = [
        c.run(protocol.server_stub(c.p2p, peer).rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=20))
        for c in (remote, own)
    ]
    assert infos[0].serialized_info and type(infos[0]) is type(infos[1])
    # A forward the server refuses: the caller reads the same refusal either way.
    bad = runtime_pb2.ExpertRequest(uid=protocol.chain_uids("no-such-model", 0, 1))
    texts = []
    for caller in (remote, own):
        with pytest.raises(P2PHandlerError) as caught:
            caller.run(protocol.server_stub(caller.p2p, peer).rpc_forward(bad, timeout=20))
        texts.append(server_refusal(caught.value))
    assert texts[0] and texts[0] == texts[1], texts


def test_a_client_on_the_servers_dht_closes_without_taking_the_dht_or_p2pd_with_it(server, model_dir, remote):
    p2pd = [p for p in psutil.Process().children() if p.name() == "p2pd"]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(model_dir), initial_peers=[], dht_prefix=PREFIX, dht=server.dht, local_server=server.local
    )
    assert model.shares_dht and isinstance(model.view.p2p, SharedP2P)
    assert [p.name() for p in psutil.Process().children() if p.name() == "p2pd"] == [p.name() for p in p2pd]
    model.close()
    assert server.dht.is_alive() and all(p.is_running() for p in p2pd)
    # The server goes on serving other peers, and a new client on its DHT works as the first did.
    assert _session(remote, server, _inputs()).shape == (1, 5, HIDDEN)
    again = Caller(lambda: _shared(server), None)
    try:
        assert torch.equal(_session(again, server, _inputs(seed=1)), _session(remote, server, _inputs(seed=1)))
    finally:
        again.close()
    assert server.dht.is_alive()


def test_handlers_the_server_removed_are_gone_for_the_in_process_caller_too(server, own, remote):
    server.loop.run(server.handler.detach(), timeout=10)
    try:
        with pytest.raises(P2PDaemonError):
            _session(own, server, _inputs())
        with pytest.raises(P2PDaemonError):
            own.run(
                protocol.server_stub(own.p2p, server.local.peer_id).rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=20)
            )
    finally:
        server.handler = server.attach()
    assert torch.equal(_session(own, server, _inputs()), _session(remote, server, _inputs()))


def test_a_closing_client_ends_its_open_sessions_with_the_own_server_and_through_p2pd(server, remote):
    """p2pd outlives a client that shares it: the client's shutdown ends its streams itself, so the server
    frees those sessions' caches at once instead of at their timeouts."""
    caller = Caller(lambda: _shared(server), None)
    other = Caller(lambda: _shared_through_p2pd(remote), None)
    full = server.handler.budget.bytes_left

    async def open_session(p2p) -> ServerStream:
        stream = ServerStream(RouteSegment(server.local.peer_id.to_base58(), 0, BLOCKS), PREFIX, MAX_LENGTH)
        await stream.open(types.SimpleNamespace(p2p=p2p, stub=lambda peer: None), timeout=30)
        await stream.step(_inputs(), "step-0", 0, timeout=30)
        return stream

    kept = [caller.run(open_session(caller.p2p)), other.run(open_session(other.p2p))]
    assert len(server.handler.sessions) == 2 and server.handler.budget.bytes_left < full
    caller.close()
    other.close()
    deadline = time.monotonic() + 60  # well before the server's own step timeout would end them
    while (server.handler.sessions or server.handler.budget.bytes_left != full) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.handler.sessions and server.handler.budget.bytes_left == full, kept


async def _shared_through_p2pd(remote: Caller) -> SharedP2P:
    """Another client on the remote peer's p2pd (no server of its own): it reaches the server through p2pd."""
    return SharedP2P(await remote.dht.new_p2p())


def test_the_engine_shares_the_servers_swarm_only_for_a_chat_in_that_swarm(server):
    """A chat target whose peers name the server or a peer it joined through is the server's swarm (its
    DHT and p2pd are shared); any other target is another swarm, joined with a DHT of the client's own."""
    from corolla.chat_engine.client_host import ClientTarget
    from corolla.swarm.server.server import shared_swarm

    joined_through = "/ip4/10.0.0.7/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"

    async def lend():  # on the server's loop, as the server does once it joined
        return shared_swarm(server.dht, server.p2p, [joined_through])

    shared = server.loop.run(lend())
    own = [str(a) for a in server.dht.get_visible_maddrs()]
    assert shared.local_server.peer_id == server.local.peer_id

    def target(*peers: str) -> ClientTarget:
        return ClientTarget("model", None, peers, loopback_only=True)

    assert shared.joins(target(*own)) and shared.joins(target(joined_through))
    stranger = "/ip4/10.0.0.8/tcp/31337/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
    assert not shared.joins(target(stranger)) and not shared.joins(target())
