"""How an inference session survives its servers: a failed server is replaced for its own blocks only
(the replacement is sent the span's whole history, so downstream servers never notice), an overdue step
is hedged on another server of the same blocks (the first answer wins), and a server consistently
slower than it announces is left at its next step (speed.py)."""

from __future__ import annotations

import asyncio
import logging

import torch

from corolla.swarm import protocol
from corolla.swarm.client import route_choice
from corolla.swarm.client.routing import MissingBlocksError, RouteSegment, describe_route
from corolla.swarm.client.speed import speed_of
from corolla.swarm.client.streams import ServerFailure, ServerStream, StepExtras, replay, server_refusal

logger = logging.getLogger(__name__)
_CLOSING: set[asyncio.Task] = set()  # streams of replaced servers, closing in the background (CLOSE_TIMEOUT each)


class FailoverMixin:
    """Failover, hedging and slow-server replacement for InferenceSession (session.py): uses its
    `view`, `streams`, `max_length`, `adapter`, `replacements`, `_mask`, `_refusals`, `_extras`,
    `_open_segments` and `describe`."""

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
        copy_after = self._copy_wait(index, hidden, extras)
        copied_late = False
        if copy_after is None:
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
                    if copy_after is None:
                        output = await stream.read(hidden, step_id, None)
                    else:
                        output, copied_late = await self._read_or_copy(stream, hidden, step_id, extras, copy_after)
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
        elapsed = loop.time() - started
        speed.observe(segment.peer_id, tokens, elapsed)
        if extras.upstream is not None:  # a pushed step: how long its reply takes (copies.py)
            held_back = copy_after is not None
            stream.copies.observe(elapsed, pushed=stream.reply_was_pushed, held_back=held_back, late=copied_late)
            self.view.copies.held_back += held_back
            self.view.copies.sent_late += copied_late
        elif hidden.shape[1] == 1:  # a direct token step: bounds the link's round trip
            route_choice.note_direct_step(self.view, segment.peer_id, elapsed)
        if hedge is not None:
            self._drop_hedge(hedge)  # the overdue server answered first after all
        if stream.slow is None:
            stream.slow = speed.judge(self.view, segment.peer_id, segment.start, segment.end, tokens)
            if stream.slow is not None:
                speed.mark_slow(stream.slow)
        return 0, output

    def _copy_wait(self, index: int, hidden: torch.Tensor, extras: StepExtras) -> float | None:
        """How long to wait for the reply that the upstream server's push brings before sending stream
        `index` the client's own copy of the step (copies.py); None: send it now. Only between Corolla
        servers, to the upstream this stream was last told of, for outputs small enough to push."""
        if extras.upstream is None or index == 0:
            return None
        stream, upstream = self.streams[index], self.streams[index - 1]
        if not (stream.corolla and upstream.corolla) or extras.upstream != stream.upstream_named:
            return None
        if hidden.numel() * 4 > protocol.MAX_PUSH_BYTES:  # the server's output, float32 at most: not pushed
            return None
        return stream.copies.wait_s()

    async def _read_or_copy(
        self, stream: ServerStream, hidden: torch.Tensor, step_id: str, extras: StepExtras, wait: float
    ) -> tuple[torch.Tensor, bool]:
        """The reply to a step the upstream server pushes to `stream`, and whether the client's own copy
        had to be sent (the reply had not come within `wait` seconds). The read runs as a task so that
        the wait never cuts a reply in half."""
        reading = asyncio.ensure_future(stream.read(hidden, step_id, None))
        try:
            done, _ = await asyncio.wait((reading,), timeout=wait)
            if not done:
                stream.send(hidden, step_id, stream.position, extras)
            return await reading, not done
        except BaseException:
            reading.cancel()
            raise

    async def _hedge(self, index: int, inputs: torch.Tensor) -> tuple[list[ServerStream], torch.Tensor]:
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
        self, index: int, won: tuple[list[ServerStream], torch.Tensor], tokens: int, waited: float, length: int
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
    ) -> tuple[list[ServerStream], torch.Tensor]:
        """New sessions along `route`, each sent the whole `history` (the previous one's full output):
        the streams and the last one's output. On failure (or cancellation) nothing stays open."""
        new_streams: list[ServerStream] = []
        speed = speed_of(self.view)
        try:
            new_streams = await self._open_segments(route)
            full = await replay(
                new_streams,
                history,
                extras_for=lambda stream: self._extras(stream, 0, None, self._mask),
                timeout_for=lambda stream, inputs: self.view.config.request_timeout,
                on_output=lambda stream, inputs, output, seconds: speed.observe(
                    stream.segment.peer_id, inputs.shape[0] * inputs.shape[1], seconds
                ),
            )
        except BaseException:
            for stream in new_streams:
                self._close_later(stream)
            raise
        return new_streams, full

    @staticmethod
    def _close_later(stream: ServerStream) -> None:
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
