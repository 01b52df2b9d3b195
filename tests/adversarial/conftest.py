"""One real `corolla serve` (tiny Llama, 6 blocks) shared by the attack tests, an honest wire client,
and the local blocks that say what the honest client must get back, token-exact."""

from __future__ import annotations

import time

import pytest
import torch

from corolla.swarm import protocol
from corolla.swarm.models import load_span
from corolla.testing.hostile import HostilePeer, Resources
from corolla.testing.swarm import CorollaServer, tiny_block_server
from corolla.testing.wire import WireClient, new_ids, step_request

PREFIX = "tiny-hostile"
BLOCKS = 6
CACHE_TOKENS = 64
MAX_OPEN_SESSIONS = 4  # small, so that a flood of free sessions would visibly take every slot
CHAIN = protocol.chain_uids(PREFIX, 0, BLOCKS)
HIDDEN = 64


@pytest.fixture(scope="package")
def model_dir(tiny_models):
    return tiny_models.get("llama")


@pytest.fixture(scope="package")
def server(model_dir, tmp_path_factory):
    with tiny_block_server(
        tmp_path_factory.mktemp("hostile-server"),
        model_dir,
        PREFIX,
        BLOCKS,
        "--max-open-sessions",
        str(MAX_OPEN_SESSIONS),
        cache_tokens=CACHE_TOKENS,
        step_timeout=20,
        update_period=5,
    ) as process:
        yield process


@pytest.fixture(scope="package")
def honest(server):
    with WireClient(server.maddr) as wire:
        yield wire


@pytest.fixture(scope="package")
def hostile(server):
    with HostilePeer(server.maddr) as peer:
        yield peer


@pytest.fixture(scope="package")
def accomplice(server):
    with HostilePeer(server.maddr) as peer:
        yield peer


@pytest.fixture(scope="package")
def local_span(model_dir):
    return load_span(model_dir, 0, BLOCKS)


@pytest.fixture
def resources(server, check):
    """The server's memory, measured from the start of each test (the server already warm)."""
    return Resources(server.process.pid)


class Honest:
    """What an honest peer must still get from the server during and after an attack."""

    def __init__(self, client: WireClient, server: CorollaServer, local_span):
        self.client, self.server, self.local_span = client, server, local_span

    def session_matches_local(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        prompt, step1, step2 = (torch.randn(1, n, HIDDEN, generator=generator) for n in (5, 1, 1))
        ids = new_ids()
        sid = ids["session_id"]
        requests = [
            step_request(CHAIN, prompt, max_length=16, start_from_position=0, **ids),
            step_request(CHAIN, step1, session_id=sid, step_id="s1", start_from_position=5),
            step_request(CHAIN, step2, session_id=sid, step_id="s2", start_from_position=6),
            step_request("", None),
        ]
        result = self.client.session(self.server.peer_id, requests)
        assert result.error is None, result.error
        cache = self.local_span.new_cache()
        expected = [self.local_span(t, cache) for t in (prompt, step1, step2)]
        assert len(result.outputs) == 3
        for got, want in zip(result.outputs, expected, strict=True):
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    def cache_is_full(self, within_s: float = 20.0) -> None:
        """The whole cache budget is free again (sessions an attack left are closed by their streams'
        end or their step timeout, so this waits a bounded while)."""
        deadline = time.monotonic() + within_s
        while True:
            available = self.client.info(self.server.peer_id)["cache_tokens_available"]
            if available == BLOCKS * CACHE_TOKENS or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert available == BLOCKS * CACHE_TOKENS

    def all_well(self) -> None:
        assert self.server.process.poll() is None, self.server.log_tail()
        self.session_matches_local()
        self.cache_is_full()


@pytest.fixture(scope="package")
def check(honest, server, local_span) -> Honest:
    honest_peer = Honest(honest, server, local_span)
    honest_peer.session_matches_local()  # warm: first-use allocations are not an attack's doing
    return honest_peer
