"""Inference sessions over a chain of servers that survive servers failing mid-session.

Each span of the route keeps every input it has received (`history`). When a server fails (crash,
timeout, error reply), the client bans it, routes around it for that span's blocks only, and sends
the replacement(s) the whole history in one first message; the replacement's output is cut to the
current step's positions before it goes downstream. Downstream servers never notice, and the output
equals what the failed server would have produced. (Petals' own client loses the position here:
its issue 587.)

A server that stays connected but answers late is handled the same way, in seconds: each step has a
deadline from what this client expects of that server (speed.py); an overdue step is hedged (the
same replay on another server of the same blocks, racing the overdue one; the first answer wins),
and a server consistently slower than it announces is replaced at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from corolla.swarm import protocol, steptrace, wire
from corolla.swarm.client import push, route_choice
from corolla.swarm.client.privacy import PrivacyViolation
from corolla.swarm.client.routing import (
    MissingBlocksError,
    PrivacyCoverageError,
    RouteSegment,
    SwarmView,
    describe_route,
)
from corolla.swarm.client.speed import speed_of
from corolla.swarm.client.verification import SessionVerifier

logger = logging.getLogger(__name__)
NOBODY_SERVES_ATTEMPTS = 3  # DHT reads that find no record at all of a model before saying nobody serves it
ARGS_STRUCTURE = ((b"__T0", b"__T1", b"__T2"), {})
# Corolla servers read the padding mask as a keyword (stock servers never get one: see _check_padding).
MASKED_ARGS_STRUCTURE = ((b"__T0", b"__T1", b"__T2"), {"attention_mask": b"__T3"})
_DUMMY = serialize_torch_tensor(torch.zeros(0))
_DUMMY_IDS = serialize_torch_tensor(torch.zeros(0, dtype=torch.int64))
CLOSE_TIMEOUT = 5.0
_CLOSING: set[asyncio.Task] = set()  # streams of replaced servers, closing in the background (CLOSE_TIMEOUT each)


class ServerFailure(RuntimeError):
    pass


@dataclass
class StepExtras:
    """What a step sends besides hidden states: this span's deep prompts (first step only), the beams'
    reordering of the servers' caches, the padding mask over every position so far."""

    prompts: torch.Tensor | None = None  # [span blocks, batch or 1, P, hidden]
    hypo_ids: torch.Tensor | None = None  # int64 [batch]
    mask: torch.Tensor | None = None  # int64 [batch, position + length]
    next_servers: list | None = None  # where this server pushes its output (push.py)
    upstream: str | None = None  # the server that pushes into this one (push.py)


@dataclass
class _ServerStream:
    """One rpc_inference stream to one server for blocks [start, end)."""

    segment: RouteSegment
    dht_prefix: str
    max_length: int
    adapter: str | None = None
    history: torch.Tensor | None = None  # every input this span has received, [batch, positions, hidden]
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    _outbox: asyncio.Queue | None = None
    _responses: object | None = None
    _stepped: bool = False
    _unread_replies: int = 0  # replies to register() still to be read before the next step's
    corolla: bool = False  # a Corolla server (announces corolla_version): reads next_servers in any step
    slow: dict | None = None  # evidence that its server is consistently slow (speed.py): replaced at the next step
    kept_slow: bool = False  # ... unless nobody else serves its blocks

    @property
    def position(self) -> int:
        return 0 if self.history is None else self.history.shape[1]

    async def open(self, view: SwarmView, timeout: float) -> None:
        self._outbox = outbox = asyncio.Queue()

        async def requests():
            while True:  # its own reference: close() drops self._outbox while this may still run
                request = await outbox.get()
                if request is None:
                    return
                yield request

        stub = view.stub(self.segment.peer_id)  # refuses a peer outside the privacy policy
        self._responses = await asyncio.wait_for(stub.rpc_inference(requests()), timeout)

    def register(self, batch: int, hidden_size: int) -> None:
        """Open the session at the server with an empty step (max_length, no tokens) without waiting for
        its reply, so the route's first real step can already be pushed into it (a server takes pushes
        only into sessions it knows). Corolla servers only: what a stock server makes of an empty first
        step is not part of the protocol."""
        if self._outbox is None or self._stepped:
            return
        empty = torch.zeros(batch, 0, hidden_size)
        metadata = {
            "session_id": self.session_id,
            "step_id": str(uuid.uuid4()),
            "points": 0.0,
            "args_structure": ARGS_STRUCTURE,
            "start_from_position": 0,
            "max_length": self.max_length,
            "active_adapter": self.adapter,
        }
        uid = protocol.chain_uids(self.dht_prefix, self.segment.start, self.segment.end)
        tensors = [serialize_torch_tensor(empty), _DUMMY, _DUMMY_IDS]
        self._outbox.put_nowait(
            runtime_pb2.ExpertRequest(uid=uid, tensors=tensors, metadata=MSGPackSerializer.dumps(metadata))
        )
        self._stepped = True
        self._unread_replies += 1

    async def step(
        self,
        inputs: torch.Tensor,
        step_id: str,
        position: int,
        timeout: float | None,
        extras: StepExtras | None = None,
    ) -> torch.Tensor:
        """Send one step and wait (at most `timeout`) for its reply."""
        self.send(inputs, step_id, position, extras)
        return await self.read(inputs, step_id, timeout)

    def send(self, inputs: torch.Tensor, step_id: str, position: int, extras: StepExtras | None = None) -> None:
        if self._outbox is None:
            raise ServerFailure(f"the session with server …{self.segment.peer_id[-6:]} is closed")
        uid = protocol.chain_uids(self.dht_prefix, self.segment.start, self.segment.end)
        extras = extras or StepExtras()
        metadata = {
            "session_id": self.session_id,
            "step_id": step_id,
            "points": 0.0,
            "args_structure": ARGS_STRUCTURE if extras.mask is None else MASKED_ARGS_STRUCTURE,
            "start_from_position": position,
        }
        if not self._stepped:
            metadata.update(max_length=self.max_length, active_adapter=self.adapter)
        # Not in a stock server's first step: Petals 2.1-2.3.0.dev1 would keep pushing every later step
        # to the chain named there, stale after a failover.
        if extras.next_servers and (self._stepped or self.corolla):
            metadata["next_servers"] = extras.next_servers
        if extras.upstream:
            metadata["corolla_upstream"] = extras.upstream
        tensors = [
            wire.serialize_plain(inputs),
            _DUMMY if extras.prompts is None else serialize_torch_tensor(extras.prompts),
            _DUMMY_IDS if extras.hypo_ids is None else serialize_torch_tensor(extras.hypo_ids),
        ]
        if extras.mask is not None:
            tensors.append(serialize_torch_tensor(extras.mask))
        request = runtime_pb2.ExpertRequest(uid=uid, tensors=tensors, metadata=MSGPackSerializer.dumps(metadata))
        self._outbox.put_nowait(request)
        steptrace.mark("client_send", step=step_id, server=self.segment.peer_id[-6:])
        self._stepped = True

    async def read(self, inputs: torch.Tensor, step_id: str, timeout: float | None) -> torch.Tensor:
        """The server's reply to the step just sent (`timeout` None: the caller bounds the wait)."""
        try:
            async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra task per token
                while self._unread_replies:  # register()'s reply came long ago; it carries nothing
                    await anext(self._responses)
                    self._unread_replies -= 1
                response = await anext(self._responses)
        except StopAsyncIteration as exc:
            raise ServerFailure(f"server …{self.segment.peer_id[-6:]} closed the session") from exc
        steptrace.mark("client_reply", step=step_id, server=self.segment.peer_id[-6:])
        output = deserialize_torch_tensor(response.tensors[0])
        if output.shape != inputs.shape:
            raise ServerFailure(f"server returned shape {tuple(output.shape)} for inputs {tuple(inputs.shape)}")
        return output

    async def close(self) -> None:
        if self._outbox is None:
            return
        if self._stepped:
            self._outbox.put_nowait(runtime_pb2.ExpertRequest())  # the empty request closes the session
        self._outbox.put_nowait(None)
        try:
            # A server that never closes its side must not hold the client (or a node's thread) forever.
            async with asyncio.timeout(CLOSE_TIMEOUT):
                async for _ in self._responses:
                    pass
        except Exception:
            pass  # a stream that breaks or stalls while closing changes nothing
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._responses.aclose(), CLOSE_TIMEOUT)
        self._outbox = None


class InferenceSession:
    """A session over [0, num_blocks) of a model. Use from the client's event loop."""

    def __init__(
        self,
        view: SwarmView,
        max_length: int,
        *,
        adapter: str | None = None,
        prompts: torch.Tensor | None = None,
    ):
        self.view = view
        self.max_length = max_length
        self.adapter = adapter
        # Deep prompts [num_blocks, batch or 1, P, hidden]: each span gets its blocks' slice with the
        # step that starts at position 0 (the first one, and every replay).
        self.prompts = prompts
        self.streams: list[_ServerStream] = []
        self.position = 0
        self.replacements = 0
        self.padded = False  # the batch has padding: every step sends the mask
        self._mask: torch.Tensor | None = None
        self._started = False
        # Every server this session has sent hidden states to (route, failover, spot-check replays):
        # peer id -> the block ranges it received. What the node keeps per reply ("who saw it").
        self.recipients: dict[str, set[tuple[int, int]]] = {}
        self.verifier = SessionVerifier(self)  # spot checks of the servers' outputs (verification.py)

    @property
    def route(self) -> list[RouteSegment]:
        return [s.segment for s in self.streams]

    def describe(self) -> str:
        return describe_route(self.route)

    def saw(self, segments: list[RouteSegment]) -> None:
        """Note that these servers received (or are about to receive) this session's hidden states."""
        for segment in segments:
            self.recipients.setdefault(segment.peer_id, set()).add((segment.start, segment.end))

    async def _open_segments(self, segments: list[RouteSegment]) -> list[_ServerStream]:
        """One session per segment, opened all at once (each open may cost a round trip to its server)."""
        streams = [_ServerStream(s, self.view.dht_prefix, self.max_length, self.adapter) for s in segments]
        self.saw(segments)
        for stream in streams:
            span = self.view.spans.get(stream.segment.peer_id)
            stream.corolla = span is not None and bool(span.server_info.extra.get("corolla_version"))
        results = await asyncio.gather(
            *(stream.open(self.view, self.view.config.connect_timeout) for stream in streams), return_exceptions=True
        )
        failed = [(stream, r) for stream, r in zip(streams, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            for stream, result in zip(streams, results, strict=True):
                if not isinstance(result, BaseException):
                    await stream.close()
            for stream, _ in failed:
                self.view.ban(stream.segment.peer_id)
            stream, exc = failed[0]
            if not isinstance(exc, Exception) or isinstance(exc, PrivacyViolation):
                raise exc
            peer = stream.segment.peer_id[-6:]
            raise ServerFailure(f"could not open a session with server …{peer}: {exc}") from exc
        return streams

    async def _start(self, batch: int) -> None:
        steptrace.mark("session_start")
        config = self.view.config
        for attempt in range(config.max_retries + 1):
            try:
                if attempt:
                    await asyncio.sleep(min(config.min_backoff * 2 ** (attempt - 1), config.max_backoff))
                    await self.view.refresh()
                else:
                    await self.view.refresh_if_stale()
                route = self.view.route(
                    0, self.view.num_blocks, cache_tokens_needed=batch * self.max_length, adapter=self.adapter
                )
                self.streams = await self._open_segments(route)
                break
            except PrivacyCoverageError:
                raise  # waiting would not help: only the policy or a trusted server could
            except MissingBlocksError as exc:
                if not self.view.announced and attempt >= NOBODY_SERVES_ATTEMPTS - 1:
                    raise MissingBlocksError(exc.blocks, self.view.dht_prefix, nobody=True) from None
                if attempt == config.max_retries:
                    raise
                delay = min(config.min_backoff * 2**attempt, config.max_backoff)
                logger.warning(
                    "looking for servers: %s; again in %.0f s (%d/%d)", exc, delay, attempt + 1, config.max_retries
                )
            except Exception as exc:  # a server that fails to open: ban it and route again
                for stream in self.streams:
                    await stream.close()
                self.streams = []
                if attempt == config.max_retries:
                    raise ServerFailure(f"could not open an inference session: {exc}") from exc
        self._started = True
        steptrace.mark("session_opened")
        logger.info("route: %s", self.describe())

    async def rollback(self, position: int) -> None:
        """Forget every token from `position` on (the servers roll back at the next step)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to {position}: the session is at {self.position}")
        for stream in self.streams:
            if stream.history is not None:
                stream.history = stream.history[:, :position]
        self.position = position
        if position == 0:
            self.padded = False

    def _extras(self, stream: _ServerStream, position: int, hypo_ids, mask, pushing: bool = False) -> StepExtras:
        prompts = None
        if position == 0 and self.prompts is not None:
            prompts = self.prompts[stream.segment.start : stream.segment.end]
        next_servers = upstream = None
        if pushing:
            index = self.streams.index(stream)
            hops = self._pushed_hops()
            next_servers = push.next_servers(self.streams, index, hops)
            upstream = self.streams[index - 1].segment.peer_id if hops[index] else None
        return StepExtras(prompts, hypo_ids, mask, next_servers, upstream)

    def _probe_direct(self) -> bool:
        """Whether this step goes without push to time the servers it would push into (a few times per server
        and client, only where the client chooses per route: see route_choice.unmeasured_pushed)."""
        if self.view.config.use_server_to_server is not None or self.position == 0:
            return False
        return route_choice.unmeasured_pushed(self.view, self.route, self._pushed_hops(), self.position)

    def _pushed_hops(self) -> list[bool]:
        """Per stream, whether the server before it pushes into it (route_choice.py)."""
        peers = [s.segment.peer_id for s in self.streams]
        infos = [getattr(self.view.spans.get(p), "server_info", None) for p in peers]
        pings = [info.next_pings if info is not None else None for info in infos]
        rtts = route_choice.link_rtts(self.view, peers)
        return route_choice.pushed_hops(self.view.config.use_server_to_server, peers, rtts, pings)

    def _step_mask(self, attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
        """The padding mask to send with this step (None without padding); checks its shape."""
        if attention_mask is None:
            if self.padded:
                raise ValueError("this session's batch is padded: every step needs its attention_mask")
            return None
        if tuple(attention_mask.shape) != (batch, self.position + length):
            raise ValueError(
                f"attention_mask must be [batch, past + length] = [{batch}, {self.position + length}], "
                f"got {tuple(attention_mask.shape)}"
            )
        has_padding = bool((attention_mask == 0).any())
        if has_padding and self.position > 0 and not self.padded:
            raise ValueError("padding must be in a session's first step (left padding of the prompt)")
        if self.position == 0:
            self.padded = has_padding
        return attention_mask.to(torch.int64) if self.padded else None

    def _register_downstream(self, batch: int, hidden_size: int) -> None:
        """Open every Corolla server's session after the first one before the first step, so that step is
        pushed along the chain too (else it costs a client round trip per server, as without push)."""
        hops = self._pushed_hops()
        for index, stream in enumerate(self.streams[1:], start=1):
            if not stream.corolla or not hops[index]:
                return  # the push chain stops at the first session that is not open (push.next_servers)
            stream.register(batch, hidden_size)

    def _check_padding_support(self) -> None:
        spans = self.view.spans
        for stream in self.streams:
            span = spans.get(stream.segment.peer_id)
            if span is None or not span.server_info.extra.get("corolla_version"):
                raise ValueError(
                    "padded batches need Corolla servers on the whole route (stock Petals servers take no "
                    f"attention mask); server …{stream.segment.peer_id[-6:]} is not one"
                )

    async def step(
        self,
        hidden: torch.Tensor,
        *,
        hypo_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Send [batch, t, hidden] through every block; returns the last block's outputs.

        `hypo_ids` [batch] reorders the rows of every server's cache first (beam search);
        `attention_mask` [batch, position + t] is the padding mask (needed on every step of a padded batch).
        """
        length = hidden.shape[1]
        if self.position + length > self.max_length:
            raise ValueError(protocol.err_max_length_exceeded(self.position, length, self.max_length))
        mask = self._step_mask(attention_mask, hidden.shape[0], length)
        self.verifier.raise_if_caught()
        if not self._started:
            await self._start(hidden.shape[0])
        if mask is not None:
            self._check_padding_support()
        self.saw(self.route)
        if hypo_ids is not None:
            hypo_ids = hypo_ids.to(torch.int64).cpu()
            for stream in self.streams:  # replays must see the reordered rows too
                if stream.history is not None:
                    stream.history = stream.history[hypo_ids]
            self.verifier.reorder(hypo_ids)
        self._mask = mask
        step_id = str(uuid.uuid4())
        self._refusals: dict[str, int] = {}
        pushing = (
            self.view.config.use_server_to_server is not False
            and push.can_push(
                has_prompts=self.prompts is not None, padded=mask is not None, reorders=hypo_ids is not None
            )
            and any(self._pushed_hops())
            and not self._probe_direct()
        )
        if pushing and self.position == 0:
            self._register_downstream(hidden.shape[0], hidden.shape[2])
        index = 0
        while index < len(self.streams):
            stream = self.streams[index]
            if stream.slow is not None and not stream.kept_slow:
                replaced, output = await self._leave_slow(index, hidden)
                if replaced:
                    hidden = output
                    index += replaced
                    continue
            attempt = 0
            while True:
                try:
                    replaced, output = await self._race(
                        index, hidden, step_id, self._extras(stream, stream.position, hypo_ids, mask, pushing)
                    )
                    if replaced:  # a hedge answered first: its servers stand in the overdue one's place
                        hidden = output
                        index += replaced
                        break
                    self.view.on_success(stream.segment.peer_id)
                    stream.history = hidden if stream.history is None else torch.cat([stream.history, hidden], 1)
                    self.verifier.observe(stream, output)
                    hidden = output
                    index += 1
                    break
                except Exception as exc:
                    attempt += 1
                    self._note_refusal(exc)
                    if isinstance(exc, PrivacyViolation):
                        raise
                    if attempt > self.view.config.max_retries:
                        if isinstance(exc, MissingBlocksError):
                            raise
                        cause = self._last_refusal or exc
                        raise ServerFailure(f"step failed after {attempt} attempts: {cause}") from exc
                    logger.warning(
                        "server …%s failed at step %d (%s); replacing it",
                        stream.segment.peer_id[-6:],
                        self.position,
                        exc,
                    )
                    try:
                        replaced, hidden_out = await self._replace(index, hidden, attempt)
                    except MissingBlocksError as missing:
                        if isinstance(missing, PrivacyCoverageError) or attempt >= self.view.config.max_retries:
                            raise
                        logger.warning("%s; retrying", missing)
                        continue
                    if replaced:
                        hidden = hidden_out
                        index += replaced
                        break
                    self._raise_if_refused_again()
                    stream = self.streams[index]
        self.position += length
        return hidden

    async def _race(
        self, index: int, hidden: torch.Tensor, step_id: str, extras: StepExtras
    ) -> tuple[int, torch.Tensor]:
        """Stream `index`'s step, with a deadline from what this client expects of its server (speed.py).

        Overdue, the step is hedged: another server of the same blocks gets the kept inputs replayed and
        this step, and whichever answers first wins. Returns (0, output) when the stream's own server
        answered, (n, output) when the n streams of the hedge now stand in its place. Without hedging
        (or past request_timeout) an overdue step raises, and the caller fails over as for any error.
        """
        stream = self.streams[index]
        config = self.view.config
        speed = speed_of(self.view)
        segment = stream.segment
        tokens = hidden.shape[0] * hidden.shape[1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = speed.deadline(self.view, segment.peer_id, segment.end - segment.start, tokens)
        stream.send(hidden, step_id, stream.position, extras)
        hedge: asyncio.Task | None = None
        racing = True

        def hedge_done(task: asyncio.Task) -> None:
            if racing and not limit.expired() and not task.cancelled() and task.exception() is None:
                limit.reschedule(loop.time())  # stop waiting for the overdue server: the hedge answered

        def overdue() -> None:
            nonlocal hedge
            if not racing or limit.expired():
                return
            if not config.hedge:
                limit.reschedule(loop.time())
                return
            hedge = loop.create_task(self._hedge(index, hidden))
            hedge.add_done_callback(hedge_done)

        try:
            async with asyncio.timeout(config.request_timeout) as limit:
                timer = loop.call_at(started + deadline, overdue) if deadline < config.request_timeout else None
                try:
                    output = await stream.read(hidden, step_id, None)
                finally:
                    racing = False
                    if timer is not None:
                        timer.cancel()
        except Exception as exc:
            try:
                if hedge is not None and not hedge.done():  # the overdue server failed; the hedge still runs
                    await asyncio.wait({hedge}, timeout=max(config.request_timeout - (loop.time() - started), 0.0))
            except BaseException:
                self._drop_hedge(hedge)
                raise
            if hedge is not None and hedge.done() and not hedge.cancelled() and hedge.exception() is None:
                return self._hedge_won(index, hedge.result(), tokens, loop.time() - started, hidden.shape[1])
            if hedge is not None:
                self._drop_hedge(hedge)
            if isinstance(exc, TimeoutError):  # overdue and no hedge answered: a failure of this server
                speed.stalled(self.view, segment.peer_id, segment.start, segment.end, tokens, loop.time() - started)
            raise
        except BaseException:
            if hedge is not None:
                self._drop_hedge(hedge)
            raise
        speed.observe(segment.peer_id, tokens, loop.time() - started)
        if extras.upstream is None and hidden.shape[1] == 1:  # a direct token step: bounds the link's round trip
            route_choice.note_direct_step(self.view, segment.peer_id, loop.time() - started)
        if hedge is not None:
            self._drop_hedge(hedge)  # the overdue server answered first after all
        if stream.slow is None:
            stream.slow = speed.judge(self.view, segment.peer_id, segment.start, segment.end, tokens)
            if stream.slow is not None:
                speed.mark_slow(stream.slow)
        return 0, output

    async def _hedge(self, index: int, inputs: torch.Tensor) -> tuple[list[_ServerStream], torch.Tensor]:
        """The overdue stream `index`'s blocks on other servers, with its history and `inputs` replayed."""
        overdue = self.streams[index]
        segment = overdue.segment
        speed = speed_of(self.view)
        speed.hedges += 1
        logger.warning(
            "server …%s is overdue at step %d; sending the step to another server too",
            segment.peer_id[-6:],
            self.position,
        )
        try:
            route = self._route_around(segment, inputs.shape[0])
        except MissingBlocksError:
            await self.view.refresh()
            route = self._route_around(segment, inputs.shape[0])
        history = inputs if overdue.history is None else torch.cat([overdue.history, inputs], dim=1)
        return await self._replay(route, history)

    def _route_around(self, segment: RouteSegment, batch: int) -> list[RouteSegment]:
        return self.view.route(
            segment.start,
            segment.end,
            cache_tokens_needed=batch * self.max_length,
            adapter=self.adapter,
            avoid={segment.peer_id},
        )

    def _hedge_won(
        self, index: int, won: tuple[list[_ServerStream], torch.Tensor], tokens: int, waited: float, length: int
    ) -> tuple[int, torch.Tensor]:
        streams, full = won
        loser = self.streams[index]
        segment = loser.segment
        speed = speed_of(self.view)
        speed.hedges_won += 1
        speed.stalled(self.view, segment.peer_id, segment.start, segment.end, tokens, waited)
        self.view.ban(segment.peer_id)
        self.streams[index : index + 1] = streams
        self._close_later(loser)
        self.replacements += 1
        logger.info("the hedge answered first; new route: %s", self.describe())
        return len(streams), full[:, -length:]

    def _drop_hedge(self, hedge: asyncio.Task) -> None:
        """A hedge that lost (or is no longer needed): cancel it, or close what it opened."""
        if not hedge.done():
            hedge.cancel()  # _replay closes its streams on the way out
        elif not hedge.cancelled() and hedge.exception() is None:
            for stream in hedge.result()[0]:
                self._close_later(stream)

    async def _leave_slow(self, index: int, inputs: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Replace stream `index`, judged slow, by other servers (its history and `inputs` replayed); keep
        it if nobody else can take its blocks. Returns (0, None) when it stays."""
        slow = self.streams[index]
        try:
            route = self._route_around(slow.segment, inputs.shape[0])
            history = inputs if slow.history is None else torch.cat([slow.history, inputs], dim=1)
            streams, full = await self._replay(route, history)
        except Exception as exc:
            logger.info("keeping slow server …%s: no other route (%s)", slow.segment.peer_id[-6:], exc)
            slow.kept_slow = True
            return 0, None
        self.streams[index : index + 1] = streams
        self._close_later(slow)
        self.replacements += 1
        logger.info("left slow server …%s; new route: %s", slow.segment.peer_id[-6:], self.describe())
        return len(streams), full[:, -inputs.shape[1] :]

    async def _replay(
        self, route: list[RouteSegment], history: torch.Tensor
    ) -> tuple[list[_ServerStream], torch.Tensor]:
        """New sessions along `route`, each sent the whole `history` (the previous one's full output):
        the streams and the last one's output. On failure (or cancellation) nothing stays open."""
        new_streams: list[_ServerStream] = []
        speed = speed_of(self.view)
        loop = asyncio.get_running_loop()
        try:
            new_streams = await self._open_segments(route)
            full = history
            for stream in new_streams:  # replay: each new server gets the previous one's full output
                extras = self._extras(stream, 0, None, self._mask)
                started = loop.time()
                output = await stream.step(full, str(uuid.uuid4()), 0, self.view.config.request_timeout, extras)
                speed.observe(stream.segment.peer_id, full.shape[0] * full.shape[1], loop.time() - started)
                stream.history = full
                full = output
        except BaseException:
            for stream in new_streams:
                self._close_later(stream)
            raise
        return new_streams, full

    @staticmethod
    def _close_later(stream: _ServerStream) -> None:
        """Close a stream without waiting for its server (a staller would hold the step for CLOSE_TIMEOUT)."""
        task = asyncio.get_running_loop().create_task(stream.close())
        _CLOSING.add(task)  # a strong reference: the loop keeps only weak ones
        task.add_done_callback(_CLOSING.discard)

    async def _replace(self, index: int, inputs: torch.Tensor, attempt: int) -> tuple[int, torch.Tensor | None]:
        """Swap stream `index` for new servers covering its blocks and replay its history through them.

        Returns how many streams now stand in its place and their output for this step (0 on failure).
        """
        failed = self.streams[index]
        self.view.ban(failed.segment.peer_id)
        self._close_later(failed)
        delay = (
            0.0
            if attempt == 1
            else min(self.view.config.min_backoff * 2 ** (attempt - 2), self.view.config.max_backoff)
        )
        await asyncio.sleep(delay)
        await self.view.refresh()
        segment = failed.segment
        route = self.view.route(
            segment.start, segment.end, cache_tokens_needed=inputs.shape[0] * self.max_length, adapter=self.adapter
        )
        history = inputs if failed.history is None else torch.cat([failed.history, inputs], dim=1)
        try:
            new_streams, full = await self._replay(route, history)
        except Exception as exc:
            self._note_refusal(exc)
            logger.warning("replacement route %s failed: %s", describe_route(route), exc)
            for segment in route:
                self.view.ban(segment.peer_id)
            # Leave a placeholder that fails at once, so the caller retries with a fresh route.
            return 0, None
        self.streams[index : index + 1] = new_streams
        self.replacements += 1
        logger.info("new route: %s", self.describe())
        return len(new_streams), full[:, -inputs.shape[1] :]

    def _note_refusal(self, exc: Exception) -> None:
        """Count what servers answer with an error of their own (not a timeout or a broken stream)."""
        said = server_refusal(exc)
        if said is not None:
            self._refusals[said] = self._refusals.get(said, 0) + 1

    @property
    def _last_refusal(self) -> str | None:
        refusals = getattr(self, "_refusals", {})
        return max(refusals, key=refusals.get) if refusals else None

    def _raise_if_refused_again(self) -> None:
        """The same refusal from the server and from its replacement: this request cannot succeed (too
        long a session, say); retrying would only hide the reason."""
        said = self._last_refusal
        if said is not None and self._refusals[said] >= 2:
            raise ServerFailure(f"the server refused: {said}")

    async def close(self) -> None:
        self.verifier.detach()  # checks still in flight finish on their own (and can still flag)
        steptrace.mark("session_close")
        # All at once: each close waits for its server to end the stream, a round trip away.
        await asyncio.gather(*(stream.close() for stream in self.streams), return_exceptions=True)
        self.streams = []
        steptrace.mark("session_closed")


def server_refusal(exc: BaseException) -> str | None:
    """The server's own error text from hivemind's "Failed to call handler `X` at PEER: TEXT"; None for
    failures that are not a server's answer (timeouts, closed streams)."""
    if not isinstance(exc, P2PHandlerError):
        return None
    text = str(exc)
    marker = text.find(": ", text.find(" at ") + 1) if " at " in text else -1
    return (text[marker + 2 :] if marker >= 0 else text).strip()[:500] or None
