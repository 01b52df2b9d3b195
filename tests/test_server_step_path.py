"""The per-step path of a token step, piece by piece: a session's one inbox for the client's messages and
pushed steps, the stream budget's fast path, hivemind's framing as the client reads it, and the thread
count of the steps a server runs inline."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from corolla.swarm import wire
from corolla.swarm.server import streams
from corolla.swarm.server.inference import SessionInputs
from corolla.swarm.server.packing import BadRequest
from corolla.swarm.server.step_threads import PROBE_EVERY, SAMPLES, StepThreads
from corolla.swarm.server.streams import StreamLimits, StreamRequests, receive_message
from corolla.swarm.step_metadata import StepMetadata


def _request(step_id: str) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid="x", metadata=StepMetadata(session_id="s", step_id=step_id).pack())


def _leftover_tasks() -> list[asyncio.Task]:
    return [task for task in asyncio.all_tasks() if task is not asyncio.current_task() and not task.done()]


def test_client_messages_and_pushes_reach_the_session_through_one_inbox_in_arrival_order():
    async def scenario() -> None:
        client: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (request := await client.get()) is not None:
                yield request

        pushes: asyncio.Queue = asyncio.Queue(maxsize=16)
        inputs = SessionInputs(requests(), pushes)
        client.put_nowait(_request("a"))
        request, metadata = await inputs.next(timeout=5)
        assert (metadata.step_id, inputs.last_was_pushed) == ("a", False)

        pushed = _request("b")
        pushes.put_nowait((pushed, StepMetadata(session_id="s", step_id="b")))
        request, metadata = await inputs.next(timeout=5)
        assert (request, metadata.step_id, inputs.last_was_pushed) == (pushed, "b", True)

        assert await inputs.next(timeout=0.05) is None  # nothing came: None, and nothing lost
        client.put_nowait(_request("c"))
        _, metadata = await inputs.next(timeout=5)
        assert (metadata.step_id, inputs.last_was_pushed, inputs.client_done) == ("c", False, False)

        client.put_nowait(None)  # the client ends its stream
        assert await inputs.next(timeout=5) is None
        assert inputs.client_done
        inputs.close()
        await asyncio.sleep(0)
        assert _leftover_tasks() == []

    asyncio.run(scenario())


def test_a_client_message_with_refused_metadata_fails_the_session_at_its_turn():
    async def scenario() -> None:
        async def requests():
            yield _request("a")
            yield runtime_pb2.ExpertRequest(uid="x", metadata=b"\xc1 not msgpack")

        inputs = SessionInputs(requests(), asyncio.Queue(maxsize=16))
        _, metadata = await inputs.next(timeout=5)
        assert metadata.step_id == "a"  # the message before it is still served first
        with pytest.raises(BadRequest):
            await inputs.next(timeout=5)
        inputs.close()

    asyncio.run(scenario())


def _stream(limits: StreamLimits) -> StreamRequests:
    return StreamRequests(asyncio.Queue(5), limits)


async def _read(stream: StreamRequests, limits: StreamLimits, request: runtime_pb2.ExpertRequest | None) -> None:
    """What the stream's reader does with one message it read (streams.add_stream_handler)."""
    nbytes = 0 if request is None else 2 * request.ByteSize()
    await limits.reserve(nbytes)
    await stream.put(request, nbytes)


def test_the_stream_reader_hands_client_messages_to_the_session_inbox_after_what_was_queued():
    async def scenario() -> None:
        limits = StreamLimits(max_message_bytes=1 << 20, buffered_bytes=1 << 20, streams_per_peer=1)
        stream = _stream(limits)
        await _read(stream, limits, _request("a"))  # queued before the session reads: goes first
        await _read(stream, limits, _request("b"))
        pushes: asyncio.Queue = asyncio.Queue(maxsize=16)
        inputs = SessionInputs(stream, pushes)
        assert [(await inputs.next(timeout=5))[1].step_id for _ in range(2)] == ["a", "b"]
        await asyncio.sleep(0)
        assert stream.sink is not None and _leftover_tasks() == []  # read out: no task of its own any more
        assert limits.buffered == 0

        await _read(stream, limits, _request("c"))  # from now on straight into the inbox, in arrival order
        pushed = _request("d")
        pushes.put_nowait((pushed, StepMetadata(session_id="s", step_id="d")))
        await _read(stream, limits, _request("e"))
        assert limits.buffered == 0 and pushes.qsize() == 3
        got = [(await inputs.next(timeout=5))[1].step_id for _ in range(3)]
        assert got == ["c", "d", "e"]
        await _read(stream, limits, None)  # the client ends its stream
        assert await inputs.next(timeout=5) is None and inputs.client_done
        inputs.close()

    asyncio.run(scenario())


def test_a_refused_message_handed_over_directly_fails_the_session_and_later_ones_are_dropped():
    async def scenario() -> None:
        limits = StreamLimits(max_message_bytes=1 << 20, buffered_bytes=1 << 20, streams_per_peer=1)
        stream = _stream(limits)
        inputs = SessionInputs(stream, asyncio.Queue(maxsize=16))
        waiting = asyncio.create_task(inputs.next(timeout=5))
        await asyncio.sleep(0)
        assert stream.sink is not None  # nothing queued: handed over at the first read
        await _read(stream, limits, _request("a"))
        assert (await waiting)[1].step_id == "a"
        await _read(stream, limits, runtime_pb2.ExpertRequest(uid="x", metadata=b"\xc1 not msgpack"))
        await _read(stream, limits, _request("b"))
        with pytest.raises(BadRequest):
            await inputs.next(timeout=5)
        assert await inputs.next(timeout=0.05) is None  # what came after the refused one is dropped
        assert limits.buffered == 0
        inputs.close()

    asyncio.run(scenario())


def test_a_full_session_inbox_holds_the_stream_reader_back_until_the_session_reads_or_closes():
    async def scenario() -> None:
        limits = StreamLimits(max_message_bytes=1 << 20, buffered_bytes=1 << 20, streams_per_peer=1)
        stream = _stream(limits)
        inputs = SessionInputs(stream, asyncio.Queue(maxsize=2))
        assert await inputs.next(timeout=0.01) is None and stream.sink is not None
        for step in ("a", "b"):
            await _read(stream, limits, _request(step))
        reading = asyncio.create_task(_read(stream, limits, _request("c")))
        await asyncio.sleep(0.05)
        assert not reading.done()  # bounded: the reader reads no further while the inbox is full
        assert (await inputs.next(timeout=5))[1].step_id == "a"
        await asyncio.wait_for(reading, 5)
        late = asyncio.create_task(_read(stream, limits, _request("d")))
        await asyncio.sleep(0.05)
        assert not late.done()
        inputs.close()  # the session ended: the reader goes on (and drops what still comes)
        await asyncio.wait_for(late, 5)
        await asyncio.wait_for(_read(stream, limits, _request("e")), 5)
        assert limits.buffered == 0

    asyncio.run(scenario())


def test_the_stream_budget_reserves_at_once_while_there_is_room_and_wakes_a_waiter_on_release():
    async def scenario() -> None:
        limits = StreamLimits(max_message_bytes=100, buffered_bytes=100, streams_per_peer=1)
        await limits.reserve(60)
        assert limits.buffered == 60
        waiting = asyncio.create_task(limits.reserve(60))
        await asyncio.sleep(0.01)
        assert not waiting.done() and limits.buffered == 60
        limits.release(60)
        await asyncio.wait_for(waiting, 5)
        assert limits.buffered == 60 and limits._waiting == 0
        limits.release(60)
        assert limits.buffered == 0

    asyncio.run(scenario())


def test_the_server_reads_a_buffered_message_without_a_timer_and_still_times_out_a_stalled_body(monkeypatch):
    """A token step's message usually arrives whole: it is read without arming a timer. A body that has
    not all arrived is read under the body deadline: one that comes in late pieces is read, one that
    stalls ends in TimeoutError with its reservation given back."""
    monkeypatch.setattr(streams, "BODY_GRACE_S", 0.3)
    message = _request("whole")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        limits = StreamLimits(max_message_bytes=2**20, buffered_bytes=2**20, streams_per_peer=1)
        reader = asyncio.StreamReader()
        reader.feed_data(wire.frame(message))
        timers_before = len(loop._scheduled)
        request, reserved = await receive_message(runtime_pb2.ExpertRequest, reader, limits)
        assert request == message and reserved == limits.buffered > 0
        assert len(loop._scheduled) == timers_before  # no timer was armed (nor left behind)
        limits.release(reserved)

        framed = wire.frame(_request("late"))
        reader.feed_data(framed[:20])
        loop.call_later(0.05, reader.feed_data, framed[20:])
        request, reserved = await receive_message(runtime_pb2.ExpertRequest, reader, limits)
        assert request.metadata == _request("late").metadata
        limits.release(reserved)

        reader.feed_data(wire.frame(_request("stalled"))[:20])
        with pytest.raises(TimeoutError):
            await receive_message(runtime_pb2.ExpertRequest, reader, limits)
        assert limits.buffered == 0

    asyncio.run(scenario())


def test_the_client_reads_hivemind_framed_replies_and_errors():
    async def scenario() -> None:
        reader = asyncio.StreamReader()
        reply = runtime_pb2.ExpertResponse(tensors=[wire.serialize_plain(torch.ones(1, 1, 4))])
        reader.feed_data(wire.frame(reply))
        reader.feed_data(wire.frame(RPCError(message="refused: why")))
        reader.feed_data(wire.frame(P2P.END_OF_STREAM)[:3])  # cut short: the stream ended mid-message
        reader.feed_eof()
        message, error = await wire.receive_protobuf(runtime_pb2.ExpertResponse, reader, 2**20)
        assert error is None and message == reply
        message, error = await wire.receive_protobuf(runtime_pb2.ExpertResponse, reader, 2**20)
        assert message is None and error.message == "refused: why"
        with pytest.raises(asyncio.IncompleteReadError):
            await wire.receive_protobuf(runtime_pb2.ExpertResponse, reader, 2**20)

    asyncio.run(scenario())


def test_the_client_does_not_read_a_reply_longer_than_its_step_allows():
    """A server announcing a huge reply (8 bytes of length are up to 2**64) is not read: the client would
    otherwise buffer whatever it sends."""

    async def scenario() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(P2P.MESSAGE_MARKER + (2**40).to_bytes(8, "big") + b"x" * 100)
        with pytest.raises(wire.OversizeMessage, match="over the limit"):
            await wire.receive_protobuf(runtime_pb2.ExpertResponse, reader, 2**20)
        assert len(reader._buffer) == 100  # nothing of the body was taken in

    asyncio.run(scenario())


def test_the_frame_is_hivemind_framing_byte_for_byte():
    message = runtime_pb2.ExpertRequest(uid="blocks.0", metadata=b"m")
    body = message.SerializeToString()
    assert wire.frame(message) == P2P.MESSAGE_MARKER + len(body).to_bytes(8, "big") + body
    assert wire.frame(P2P.END_OF_STREAM) == P2P.ERROR_MARKER + bytes(8)


def test_inline_steps_run_under_the_faster_thread_count_and_try_the_other_now_and_then():
    threads = StepThreads(4)
    for _ in range(SAMPLES):  # each choice is measured before any is preferred
        assert threads.choose() == 4
        threads.record(4, 2.0)
    for _ in range(SAMPLES):
        assert threads.choose() == 1
        threads.record(1, 1.0)
    assert threads.best() == 1
    choices = [threads.choose() for _ in range(2 * PROBE_EVERY)]
    assert choices.count(4) == 2 and choices.count(1) == 2 * PROBE_EVERY - 2
    for _ in range(SAMPLES):  # one thread got slower (a bigger model, a busier machine): back to all
        threads.record(1, 3.0)
    assert threads.best() == 4
    single = StepThreads(1)
    assert single.options == (1,) and {single.choose() for _ in range(2 * PROBE_EVERY)} == {1}


def test_an_inline_step_leaves_the_servers_thread_count_as_it_was_also_when_it_fails():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = StepThreads(2)
        seen = [threads.run(torch.get_num_threads) for _ in range(2 * SAMPLES)]
        assert sorted(set(seen)) == [1, 2]
        assert torch.get_num_threads() == 2

        def fails() -> None:
            raise RuntimeError("boom")

        for _ in range(3):
            with contextlib.suppress(RuntimeError):
                threads.run(fails)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
