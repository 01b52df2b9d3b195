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
import logging
import uuid

import torch

from corolla.swarm import protocol, steptrace
from corolla.swarm.client import push, route_choice
from corolla.swarm.client.failover import FailoverMixin
from corolla.swarm.client.privacy import PrivacyViolation
from corolla.swarm.client.routing import (
    MissingBlocksError,
    PrivacyCoverageError,
    RouteSegment,
    SwarmView,
    describe_route,
)
from corolla.swarm.client.streams import CLOSE_TIMEOUT, ServerFailure, ServerStream, StepExtras, replay
from corolla.swarm.client.verification import SessionVerifier

__all__ = ["CLOSE_TIMEOUT", "InferenceSession", "ServerFailure"]
logger = logging.getLogger(__name__)
NOBODY_SERVES_ATTEMPTS = 3  # DHT reads that find no record at all of a model before saying nobody serves it


class InferenceSession(FailoverMixin):
    """A session over blocks [start, end) of a model (default: all of them; a client running edge blocks
    itself routes only the middle, local_edges.py). Use from the client's event loop."""

    def __init__(
        self,
        view: SwarmView,
        max_length: int,
        *,
        adapter: str | None = None,
        prompts: torch.Tensor | None = None,
        blocks: tuple[int, int] | None = None,
    ):
        self.view = view
        self.start, self.end = blocks if blocks is not None else (0, view.num_blocks)
        self.max_length = max_length
        self.adapter = adapter
        # Deep prompts [num_blocks, batch or 1, P, hidden]: each span gets its blocks' slice with the
        # step that starts at position 0 (the first one, and every replay).
        self.prompts = prompts
        self.streams: list[ServerStream] = []
        self.position = 0
        self.replacements = 0
        self.padded = False  # the batch has padding: every step sends the mask
        self._mask: torch.Tensor | None = None
        self._started = False
        self._hops_this_step: tuple[tuple, list[bool]] | None = None  # _pushed_hops(), once per step and route
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

    async def _open_segments(self, segments: list[RouteSegment]) -> list[ServerStream]:
        """One session per segment, opened all at once (each open may cost a round trip to its server)."""
        streams = [ServerStream(s, self.view.dht_prefix, self.max_length, self.adapter) for s in segments]
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
                    self.start, self.end, cache_tokens_needed=batch * self.max_length, adapter=self.adapter
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

    async def restart(self, position: int) -> None:
        """Re-route the whole session (flagged servers are blocked) and rebuild every cache up to
        `position` from the client's own first-span inputs: exact failover for a chain some of whose
        outputs were wrong (verification.py caught a liar)."""
        await self.rollback(position)
        self.verifier.cancel()  # checks of the old route: its liar is blocked already
        self.verifier.kept.clear()
        self.verifier.caught = None
        first = self.streams[0].history if self.streams else None
        for stream in self.streams:
            await stream.close()
        self.streams = []
        await self.view.refresh()
        batch = first.shape[0] if first is not None else 1
        route = self.view.route(self.start, self.end, cache_tokens_needed=batch * self.max_length, adapter=self.adapter)
        self.streams = await self._open_segments(route)
        self.position = position
        if first is None or position == 0:
            return
        mask = self._mask[:, :position] if self._mask is not None else None
        await replay(
            self.streams,
            first[:, :position],
            extras_for=lambda stream: self._extras(stream, 0, None, mask),
            timeout_for=lambda stream, inputs: self.view.config.request_timeout,
            on_output=lambda stream, inputs, output, seconds: self.verifier.observe(stream, output),
        )

    def _extras(self, stream: ServerStream, position: int, hypo_ids, mask, pushing: bool = False) -> StepExtras:
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
        """Per stream, whether the server before it pushes into it (route_choice.py). Decided once per
        step (each stream's extras ask again) unless a failover changed the route within it."""
        peers = [s.segment.peer_id for s in self.streams]
        direct = [s.direct for s in self.streams]
        key = (tuple(peers), tuple(direct), self.view.config.use_server_to_server)
        if self._hops_this_step is not None and self._hops_this_step[0] == key:
            return self._hops_this_step[1]
        infos = [getattr(self.view.spans.get(p), "server_info", None) for p in peers]
        pings = [info.next_pings if info is not None else None for info in infos]
        rtts = route_choice.link_rtts(self.view, peers)
        hops = route_choice.pushed_hops(self.view.config.use_server_to_server, peers, rtts, pings, direct)
        self._hops_this_step = (key, hops)
        return hops

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
        self._hops_this_step = None  # measurements may have changed since the last step
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
                    stream.remember(hidden)
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

    async def close(self) -> None:
        self.verifier.detach()  # checks still in flight finish on their own (and can still flag)
        steptrace.mark("session_close")
        # All at once: each close waits for its server to end the stream, a round trip away.
        await asyncio.gather(*(stream.close() for stream in self.streams), return_exceptions=True)
        self.streams = []
        steptrace.mark("session_closed")
