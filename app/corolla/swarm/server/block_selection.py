"""Which blocks a server takes, and when it should move: pure functions over the swarm's spans.

Same rules as Petals (protocol doc §5.3-5.4), so Corolla and stock servers balance together: a new
server covers the weakest window; a server moves only if that raises the swarm's bottleneck
throughput enough, and never to the span it already serves.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from corolla.swarm.dht_records import RemoteSpan

EPS = 1e-3


def block_throughputs(spans: Iterable[RemoteSpan], num_blocks: int) -> list[float]:
    throughputs = [0.0] * num_blocks
    for span in sorted(spans, key=lambda s: s.peer_id):
        for block in range(max(span.start, 0), min(span.end, num_blocks)):
            throughputs[block] += span.throughput
    return throughputs


def choose_best_start(throughputs: list[float], length: int) -> int:
    """The window start whose sorted throughputs are lexicographically smallest (ties: the first)."""
    if not 1 <= length <= len(throughputs):
        raise ValueError(f"cannot place {length} blocks in a model of {len(throughputs)}")
    options = ((sorted(throughputs[i : i + length]), i) for i in range(len(throughputs) - length + 1))
    return min(options)[1]


def choose_best_blocks(num_blocks_to_serve: int, spans: Iterable[RemoteSpan], total_blocks: int) -> tuple[int, int]:
    start = choose_best_start(block_throughputs(spans, total_blocks), num_blocks_to_serve)
    return start, start + num_blocks_to_serve


def should_choose_other_blocks(
    own_peer_id: str,
    spans: dict[str, RemoteSpan],
    total_blocks: int,
    balance_quality: float,
    rng: random.Random | None = None,
) -> bool:
    """True if moving this server's span would raise the swarm's weakest block enough."""
    if balance_quality > 1.0:
        return True
    rng = rng or random.Random()
    if own_peer_id not in spans:
        return False
    spans = {peer: RemoteSpan(s.peer_id, s.start, s.end, s.server_info) for peer, s in spans.items()}
    throughputs = block_throughputs(spans.values(), total_blocks)
    initial = min(throughputs)
    own = spans[own_peer_id]
    for block in range(own.start, own.end):
        throughputs[block] -= own.throughput * (1 + EPS)
    if initial > EPS and min(throughputs) <= 0:
        return False  # moving would leave a block uncovered
    new_start = choose_best_start(throughputs, own.length)
    if new_start == own.start:
        return False  # the best place is where it already is: never unload and reload the same span
    _move(own, new_start, throughputs)
    moved = True
    while moved:  # let every server re-choose greedily until nobody moves
        moved = False
        for peer in rng.sample(list(spans), len(spans)):
            span = spans[peer]
            for block in range(span.start, span.end):
                throughputs[block] -= span.throughput * (1 + EPS)
            best = choose_best_start(throughputs, span.length)
            if best != span.start:
                moved = True
            _move(span, best, throughputs)
    new = min(throughputs)
    if new < initial or new < EPS:
        return False
    return initial / new < balance_quality - EPS


def _move(span: RemoteSpan, start: int, throughputs: list[float]) -> None:
    span.end, span.start = start + span.length, start
    for block in range(span.start, span.end):
        throughputs[block] += span.throughput
