"""Direct links (swarm/direct_link.py): a Corolla client's steps to Corolla servers, and one Corolla
server's pushes to the next, over a sealed TCP connection of their own, bypassing both p2pd daemons;
p2pd where a server offers none; and what a hostile peer meets at the direct port."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer

import corolla
from corolla.swarm import direct_link
from corolla.swarm.client import copies
from corolla.testing.swarm import CorollaServer, StatsGrowth, generate_pushing_every_hop

PREFIX = "tiny-direct"
CLIENT_OPTIONS = {"use_relay": False, "auto_nat": False, "request_timeout": 10.0, "max_retries": 3, "min_backoff": 0.2}


def serve(tmp, model, blocks, *extra, name):
    args = ["--dht-prefix", PREFIX, "--blocks", blocks, "--torch-dtype", "float32", "--throughput", "10", *extra]
    return CorollaServer(tmp, model, *args, name=name)


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    """Blocks 0:2 and 2:4 with direct links, 4:6 without (--no-direct-links)."""
    tmp = tmp_path_factory.mktemp("direct")
    head = serve(tmp, model_dir, "0:2", "--new-swarm", name="direct-head")
    middle = tail = None
    try:
        middle = serve(tmp, model_dir, "2:4", "--initial-peers", head.maddr, name="direct-middle")
        tail = serve(tmp, model_dir, "4:6", "--initial-peers", head.maddr, "--no-direct-links", name="direct-tail")
        for server in (head, middle, tail):
            server.wait_state("online")
        yield head, middle, tail
    finally:
        for server in (tail, middle, head):
            if server is not None:
                server.stop()


@pytest.fixture(scope="module")
def remote(model_dir, swarm):
    head = swarm[0]
    model = corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[head.maddr], dht_prefix=PREFIX, **CLIENT_OPTIONS
    )
    model.wait_for_route(60)
    yield model
    model.close()


def test_steps_go_direct_where_offered_and_through_p2pd_elsewhere_token_exact(remote, local, swarm):
    head, middle, tail = swarm
    ids = torch.randint(6, 500, (1, 7), generator=torch.Generator().manual_seed(3))
    want = local.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with remote.inference_session(max_length=32) as session:
        got = remote.generate(ids, max_new_tokens=8, do_sample=False, session=session)
        transports = {stream.segment.peer_id: stream.direct for stream in session._session.streams}
    assert torch.equal(got, want)
    assert transports == {head.peer_id: True, middle.peer_id: True, tail.peer_id: False}
    # the server without direct links is remembered: p2pd at once next time, no second try
    assert not remote.view.direct_links.worth_trying(remote.view.p2p, PeerID.from_base58(tail.peer_id))
    # a spare link to the head waits for the next session, which starts on it, token-exact again
    links, head_id = remote.view.direct_links, PeerID.from_base58(head.peer_id)
    deadline = time.monotonic() + 20
    while head_id not in links._spares and time.monotonic() < deadline:
        time.sleep(0.1)
    spare_writer = links._spares[head_id][1]
    with remote.inference_session(max_length=32) as session:
        got = remote.generate(ids, max_new_tokens=8, do_sample=False, session=session)
        head_stream = next(s for s in session._session.streams if s.segment.peer_id == head.peer_id)
        assert head_stream.direct and head_stream._writer is spare_writer
    assert torch.equal(got, want)


def test_pushes_between_servers_move_onto_direct_links_where_offered(remote, local, swarm):
    """Pushed on every hop: the head's pushes to the middle start on p2pd and move onto a direct link;
    the middle's to the tail (no direct links) stay on p2pd; the tokens are the same either way."""
    time.sleep(1.5)  # the stats files are rewritten every second: let them count the earlier tests' pushes
    growth = StatsGrowth(list(swarm))
    ids = torch.randint(6, 500, (1, 5), generator=torch.Generator().manual_seed(4))
    want = local.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(generate_pushing_every_hop(remote, ids, 24), want)
    growth.wait_until(lambda grew: grew("pushes_sent_direct")[0] >= 10 and grew("pushes_received")[2] >= 20)
    direct, on_stream = growth("pushes_sent_direct"), growth("pushes_sent_on_stream")
    assert direct[0] >= 10 and on_stream[0] >= 20, (direct, on_stream)  # the first push or two: p2pd
    assert direct[1] == 0 and on_stream[1] >= 20, (direct, on_stream)  # the tail offers no direct link
    assert min(growth("pushes_received")[1:]) >= 20, growth("pushes_received")


def test_the_clients_copy_of_a_pushed_step_is_held_back_once_pushes_win(remote, local, swarm):
    """Pushed on every hop: once the middle's and the tail's replies came from pushes WARMUP times in a
    row, the client stops sending them its own copy of each step (client/copies.py): the servers see
    few second copies, the tokens are the same."""
    time.sleep(1.5)  # the stats files are rewritten every second
    growth = StatsGrowth(list(swarm))
    counts = remote.view.copies
    held_back, sent_late = counts.held_back, counts.sent_late
    ids = torch.randint(6, 500, (1, 5), generator=torch.Generator().manual_seed(6))
    want = local.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert torch.equal(generate_pushing_every_hop(remote, ids, 32), want)
    growth.wait_until(lambda grew: min(grew("steps_from_pushes")[1:]) >= 25)
    held_back, sent_late = counts.held_back - held_back, counts.sent_late - sent_late
    # 31 token steps into each of the two: once pushes won WARMUP in a row, copies are held back (on a
    # busy machine the client's copy sometimes wins, and keeps copies going at once a while longer)
    assert held_back >= 2 * copies.WARMUP, (held_back, sent_late)
    pushed, seconds = growth("steps_from_pushes"), growth("duplicate_steps")
    assert pushed[0] == 0 and min(pushed[1:]) >= 16, pushed
    # a second copy reaches a server only for steps whose copy was sent (at once, or late): a held-back
    # step that was not late brings none (32 steps into each of the two pushed-into servers)
    assert seconds[0] == 0 and sum(seconds[1:]) <= 2 * 32 - held_back + sent_late, (seconds, held_back, sent_late)


def test_a_push_ticket_comes_only_from_a_server_that_knows_push_links():
    """A first-version server's reply names no stream: good for a client's inference stream only, never
    taken as a push link (its link would reach the inference handler)."""
    good = {"hosts": ["127.0.0.1"], "port": 4000, "ticket": b"t" * 16, "secret": b"s" * 32}
    assert direct_link.read_ticket(MSGPackSerializer.dumps(good), direct_link.INFERENCE).port == 4000
    with pytest.raises(direct_link.DirectLinkError):
        direct_link.read_ticket(MSGPackSerializer.dumps(good), direct_link.PUSH)
    for_push = MSGPackSerializer.dumps({**good, "stream": direct_link.PUSH})
    assert direct_link.read_ticket(for_push, direct_link.PUSH).port == 4000
    with pytest.raises(direct_link.DirectLinkError):
        direct_link.read_ticket(for_push, direct_link.INFERENCE)


async def _linked(server: direct_link.DirectLinkServer, peer: PeerID, stream: str = direct_link.INFERENCE):
    """A link to `server` on loopback with a ticket it issues to `peer` for `stream`."""
    ticket_id, secret = server.issue(peer, stream)
    return await direct_link.connect(direct_link.Ticket(["127.0.0.1"], server.port, ticket_id, secret))


def test_each_ticket_reaches_the_stream_it_was_asked_for():
    peer = PeerID(b"\x00\x24\x08\x01\x12\x20" + b"e" * 32)
    reached = []

    def named(name):
        async def handle(info, reader, writer):
            reached.append(name)
            writer.write(await reader.readexactly(2))
            await writer.drain()

        return handle

    async def run():
        handles = {direct_link.INFERENCE: named("inference"), direct_link.PUSH: named("push")}
        server = direct_link.DirectLinkServer(handles, "127.0.0.1", 0, ["127.0.0.1"])
        await server.listen()
        try:
            for stream in (direct_link.PUSH, direct_link.INFERENCE, direct_link.PUSH):
                reader, writer = await _linked(server, peer, stream)
                writer.write(b"ok")
                assert await asyncio.wait_for(reader.readexactly(2), 10) == b"ok"
                writer.close()
        finally:
            await server.close(None)

    asyncio.run(run())
    assert reached == ["push", "inference", "push"]


def _ticket(remote, peer_id: str) -> direct_link.Ticket:
    return remote.run_async(direct_link.ask_ticket(remote.view.p2p, PeerID.from_base58(peer_id)), timeout=30)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes this connection (without sending anything useful) in time."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _connect(ticket: direct_link.Ticket) -> socket.socket:
    return socket.create_connection((ticket.hosts[0], ticket.port), timeout=10)


def test_hostile_hellos_get_nothing_and_the_server_keeps_serving(remote, local, swarm):
    head = swarm[0]
    ticket = _ticket(remote, head.peer_id)
    assert ticket.hosts and 0 < ticket.port < 65536
    started = time.monotonic()
    for hello in (
        os.urandom(direct_link.HELLO_BYTES),  # not a direct link at all
        direct_link.MAGIC + os.urandom(direct_link.ID_BYTES + direct_link.NONCE_BYTES),  # a guessed ticket
        b"",  # says nothing: the handshake's deadline closes it
    ):
        with _connect(ticket) as sock:
            sock.sendall(hello)
            assert _closed_within(sock, direct_link.HANDSHAKE_TIMEOUT_S + 5), hello[:8]
    assert time.monotonic() - started < 3 * (direct_link.HANDSHAKE_TIMEOUT_S + 5)
    # a ticket is good once: the second hello with it is refused
    first = _ticket(remote, head.peer_id)
    reader_writer = remote.run_async(direct_link.connect(first), timeout=30)
    with _connect(first) as sock:
        sock.sendall(direct_link.MAGIC + first.ticket_id + os.urandom(direct_link.NONCE_BYTES))
        assert _closed_within(sock, 10)
    remote.run_async(_close(reader_writer[1]), timeout=10)
    test_steps_go_direct_where_offered_and_through_p2pd_elsewhere_token_exact(remote, local, swarm)


async def _close(writer) -> None:
    writer.close()
    await writer.wait_closed()


def test_a_tampered_frame_ends_the_link(remote, swarm):
    head = swarm[0]
    ticket = _ticket(remote, head.peer_id)

    async def tamper() -> bytes:
        reader, writer = await direct_link.connect(ticket)
        sealed = writer._sealer.seal(b"x" * 64)
        writer.transport.write(sealed[:-1] + bytes([sealed[-1] ^ 1]))  # one bit of the tag flipped
        return await asyncio.wait_for(reader.read(), 10)  # the server closes: end of stream, nothing read

    assert remote.run_async(tamper(), timeout=30) == b""


def test_a_server_cannot_hand_the_client_a_bad_ticket():
    good = {"hosts": ["127.0.0.1"], "port": 4000, "ticket": b"t" * 16, "secret": b"s" * 32}
    assert direct_link.read_ticket(MSGPackSerializer.dumps(good)).port == 4000
    bad = [
        b"\xc1",  # not msgpack
        MSGPackSerializer.dumps([1, 2]),
        MSGPackSerializer.dumps({**good, "hosts": ["example.org"]}),  # names, not addresses: no lookups
        MSGPackSerializer.dumps({**good, "hosts": ["127.0.0.1"] * 9}),
        MSGPackSerializer.dumps({**good, "port": 70000}),
        MSGPackSerializer.dumps({**good, "ticket": b"short"}),
        MSGPackSerializer.dumps({**good, "secret": "not bytes"}),
        MSGPackSerializer.dumps({**good, "hosts": ["127.0.0.1"], "pad": b"x" * 5000}),  # too long to read
    ]
    for reply in bad:
        with pytest.raises(direct_link.DirectLinkError):
            direct_link.read_ticket(reply)


def test_the_server_keeps_few_tickets_per_peer():
    server = direct_link.DirectLinkServer(handles={}, bind_host="127.0.0.1", port=0, advertised_hosts=["127.0.0.1"])
    peer, other = PeerID(b"\x00\x24\x08\x01\x12\x20" + b"a" * 32), PeerID(b"\x00\x24\x08\x01\x12\x20" + b"b" * 32)
    other_ticket, _ = server.issue(other)
    issued = [server.issue(peer)[0] for _ in range(100)]
    assert len(server._tickets) == direct_link.TICKETS_PER_PEER + 1
    assert set(issued[-direct_link.TICKETS_PER_PEER :]) | {other_ticket} == set(server._tickets)


def test_large_messages_cross_in_many_frames_both_ways_with_flow_control():
    """3 MiB each way (three sealed frames and more), through a server whose handler reads it all before
    it answers: the sender waits on the socket instead of buffering without bound, and every byte
    arrives in order."""
    payload = os.urandom(3 * 1024 * 1024 + 5)
    peer = PeerID(b"\x00\x24\x08\x01\x12\x20" + b"c" * 32)

    async def echo(info, reader, writer):
        assert info.peer_id == peer  # bound to the peer the ticket was issued to
        data = await reader.readexactly(len(payload))
        writer.write(data[::-1])
        await writer.drain()

    async def run():
        server = direct_link.DirectLinkServer({direct_link.INFERENCE: echo}, "127.0.0.1", 0, ["127.0.0.1"])
        await server.listen()
        try:
            reader, writer = await _linked(server, peer)
            writer.write(payload)
            await writer.drain()
            back = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
            writer.close()
            return back
        finally:
            await server.close(None)

    assert asyncio.run(run()) == payload[::-1]


def test_silent_connections_cannot_hold_the_door():
    """More silent connections than MAX_HANDSHAKING: the extra ones are closed at once, the rest at the
    handshake's deadline, and an honest link is made after that."""
    peer = PeerID(b"\x00\x24\x08\x01\x12\x20" + b"d" * 32)

    async def echo(info, reader, writer):
        writer.write(await reader.readexactly(5))
        await writer.drain()

    async def run():
        server = direct_link.DirectLinkServer({direct_link.INFERENCE: echo}, "127.0.0.1", 0, ["127.0.0.1"])
        await server.listen()
        silent = []
        try:
            for _ in range(direct_link.MAX_HANDSHAKING):
                silent.append(await asyncio.open_connection("127.0.0.1", server.port))
            await asyncio.sleep(0.2)
            reader, _ = await asyncio.open_connection("127.0.0.1", server.port)  # one too many
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at once
            for silent_reader, _ in silent:  # the others at the deadline
                assert await asyncio.wait_for(silent_reader.read(), direct_link.HANDSHAKE_TIMEOUT_S + 5) == b""
            reader, writer = await _linked(server, peer)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
            writer.close()
        finally:
            for _, silent_writer in silent:
                silent_writer.close()
            await server.close(None)

    asyncio.run(run())


def test_a_server_listening_on_every_interface_has_one_port_for_the_ticket():
    """0.0.0.0 binds one IPv4 socket, so the ticket's port is the one every advertised address answers at
    (asyncio given no host binds IPv4 and IPv6 on a port each: the ticket named the IPv6 one, and IPv4
    clients were refused)."""
    bind = direct_link.direct_bind_host(["/ip4/0.0.0.0/tcp/0"])
    assert bind == "0.0.0.0"
    assert direct_link.same_family(["10.0.0.2", "fe80::1", "127.0.0.1"], bind) == ["10.0.0.2", "127.0.0.1"]

    async def run():
        server = direct_link.DirectLinkServer({}, bind, 0, ["127.0.0.1"])
        await server.listen()
        try:
            ports = {sock.getsockname()[1] for sock in server._server.sockets}
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)  # the ticket's port answers
            writer.close()
            return ports, server.port
        finally:
            await server.close(None)

    ports, port = asyncio.run(run())
    assert ports == {port}
