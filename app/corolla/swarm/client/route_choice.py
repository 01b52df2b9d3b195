"""What pays on a route: server-to-server push per hop and speculative steps, from measured round trips.

Push (push.py) saves, for each pushed hop, the client's round trip to that server less the one-way trip
between the two servers; it costs an extra message per server per step (the push, and the client's own
copy where it is not held back: copies.py). Through p2pd that extra message costs the few CPU cores more than the
round trips it saves on short links (loopback, tiny Llama, 3 servers: 115 tok/s with push against 176
without, same run), so such a hop is pushed only where the saving is at least PUSH_MIN_SAVING_S, judged
from the smallest round trip the client measured to each server (its pings and its own direct token
steps) and the servers' own `next_pings`. Between two servers that both took the client's direct links,
the push goes on a direct link too (server/push_stream.py), and it paid at every distance measured
(loopback, interleaved: 2 servers 4.59 against 5.11 ms a token, 3 servers 7.60 against 8.08; lab at 0 ms
a link: 10.4 against 10.9): such a hop is pushed wherever it saves anything.

Speculative steps (speculative.py) save a trip per accepted draft token, but transformers' assisted loop
costs more per token than its plain one even when no draft is made (loopback, 1 server: 209 tok/s with
it against 392 without, 3 drafts, none accepted). It pays where a trip through the route is long
against that overhead, or where drafts get accepted: measured on the session's earlier generations,
and before any, where the text already repeats itself (prompt lookup drafts only from repeats).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from corolla.swarm.client.speculative import MIN_NGRAM, NgramIndex, SpeculationStats

if TYPE_CHECKING:
    from corolla.swarm.client.routing import SwarmView

PUSH_MIN_SAVING_S = 0.002  # a hop pushed through p2pd must save at least this much per step
DIRECT_PUSH_MIN_SAVING_S = 0.0  # the same for a hop between two servers on direct links
SPECULATE_TRIP_S = 0.05  # a trip through the route at least this long: speculation's overhead is small beside it
PAYING_ACCEPTANCE = 0.3  # measured acceptance (accepted / drafted) at which drafts pay on short routes
PROBE_STEPS = 3  # direct token steps timed per server pushed into (then one every REPROBE_EVERY positions)
REPROBE_EVERY = 256
MIN_DRAFTED = 8  # draft tokens a session needs before its own acceptance decides
REPEATED_SHARE = 0.1  # share of the prompt's n-grams seen earlier in it that makes drafts likely


def _finite(rtt: float | None) -> float | None:
    return rtt if rtt is not None and math.isfinite(rtt) and rtt >= 0 else None


def pushed_hops(
    mode: bool | None,
    peers: Sequence[str],
    rtts: dict[str, float],
    next_pings: Sequence[dict | None],
    direct: Sequence[bool] | None = None,
) -> list[bool]:
    """For each server of the route, whether the one before it should push into it (the first: never).

    `mode` True pushes every hop, False none; None decides per hop from the client's round trip to the
    server (`rtts`) and the previous server's announced round trip to it (`next_pings[i - 1]`): a hop is
    pushed when that saves at least PUSH_MIN_SAVING_S, or DIRECT_PUSH_MIN_SAVING_S where the client
    reaches both servers of the hop over direct links (`direct[i - 1]` and `direct[i]`: they listen for
    them, so the push goes on one). A server the client has no round trip for is pushed into (the choice
    that does not lose on long links, where not knowing costs most).
    """
    hops = [False] * len(peers)
    for index in range(1, len(peers)):
        if mode is not None:
            hops[index] = bool(mode)
            continue
        client_rtt = _finite(rtts.get(peers[index]))
        if client_rtt is None:
            hops[index] = True
            continue
        pings = next_pings[index - 1] or {}
        # A push that arrives after the client's own copy costs no time (the copy is used, and the client
        # keeps sending it at once where it wins: copies.py), so a link the server announces as longer
        # than the client's counts as the client's: announced pings are EMAs of unary calls, which a busy
        # machine inflates. A link announced unreachable (`inf`) counts as unknown: a push that cannot be
        # sent costs the step nothing either (at most one late copy), and one failed dial (the server's
        # ping landing in libp2p's dial backoff) kept a 25 ms/link chain off push for a minute.
        link_rtt = _finite(pings.get(peers[index]))
        one_way = min(link_rtt if link_rtt is not None else client_rtt, client_rtt) / 2
        on_direct_links = direct is not None and direct[index - 1] and direct[index]
        hops[index] = client_rtt - one_way >= (DIRECT_PUSH_MIN_SAVING_S if on_direct_links else PUSH_MIN_SAVING_S)
    return hops


def note_direct_step(view: SwarmView, peer: str, seconds: float) -> None:
    """A token step sent straight to `peer` (not pushed into) took `seconds`, round trip and compute: an
    upper bound of the link's round trip, and unlike a ping (a unary call through both p2pd daemons, which a
    busy machine inflates several-fold) measured on the session's own stream."""
    if seconds < view.direct_step_s.get(peer, math.inf):
        view.direct_step_s[peer] = seconds
    view.direct_steps[peer] = view.direct_steps.get(peer, 0) + 1


def link_rtts(view: SwarmView, peers: Sequence[str]) -> dict[str, float]:
    """The client's round trip to each of `peers`: the smaller of its pings and its fastest direct token step."""
    floors = view.direct_step_s
    rtts = {}
    for peer in peers:
        known = [x for x in (_finite(view.rtts.get(peer)), floors.get(peer)) if x is not None]
        if known:
            rtts[peer] = min(known)
    return rtts


def unmeasured_pushed(view: SwarmView, route: Sequence, hops: Sequence[bool], position: int) -> bool:
    """Whether to time the servers this route pushes into with a direct token step now: until each has
    PROBE_STEPS of them (one can land on a busy moment), then every REPROBE_EVERY positions."""
    pushed = [segment.peer_id for segment, hop in zip(route, hops, strict=True) if hop]
    if any(view.direct_steps.get(peer, 0) < PROBE_STEPS for peer in pushed):
        return True
    return bool(pushed) and position % REPROBE_EVERY == 0


def route_trip_s(peers: Sequence[str], rtts: dict[str, float]) -> float | None:
    """A step's network time through the route without push (a round trip per server); None if unknown."""
    known = [_finite(rtts.get(peer)) for peer in peers]
    if not known or any(rtt is None for rtt in known):
        return None
    return sum(known)


def repeats_itself(input_ids: torch.Tensor) -> bool:
    """Whether prompt lookup could draft from this text: its last MIN_NGRAM tokens occur earlier, or a
    tenth of its n-grams do (quotes, code, rewriting)."""
    tokens = input_ids[0].tolist() if input_ids.ndim == 2 else input_ids.tolist()
    if len(tokens) <= MIN_NGRAM:
        return False
    if NgramIndex(MIN_NGRAM).seen_before(torch.tensor(tokens)):
        return True
    seen, repeated = set(), 0
    for i in range(len(tokens) - MIN_NGRAM + 1):
        gram = tuple(tokens[i : i + MIN_NGRAM])
        repeated += gram in seen
        seen.add(gram)
    return repeated >= REPEATED_SHARE * (len(tokens) - MIN_NGRAM + 1)


def speculation_pays(trip_s: float | None, measured: SpeculationStats | None, input_ids: torch.Tensor) -> bool:
    """Whether a greedy generation should draft: on a long route always (the adaptive draft length and
    pauses bound what failed drafts cost there); else by the session's measured acceptance once it has
    drafted enough, and before that by whether the text repeats itself."""
    if trip_s is not None and trip_s >= SPECULATE_TRIP_S:
        return True
    if measured is not None and measured.drafted >= MIN_DRAFTED:
        return measured.acceptance >= PAYING_ACCEPTANCE
    return repeats_itself(input_ids)
