"""When the client holds back its own copy of a pushed step (client/copies.py): the rule, step by step."""

from __future__ import annotations

from corolla.swarm.client import copies
from corolla.swarm.client.copies import CopyTiming


def won(timing: CopyTiming, seconds: float = 0.001, held_back: bool = False) -> None:
    timing.observe(seconds, pushed=True, held_back=held_back, late=False)


def test_copies_go_at_once_until_pushes_have_won_warmup_times_in_a_row():
    timing = CopyTiming()
    assert timing.wait_s() is None
    for _ in range(copies.WARMUP - 1):
        won(timing)
        assert timing.wait_s() is None
    timing.observe(0.001, pushed=False, held_back=False, late=False)  # the client's copy won this one
    for _ in range(copies.WARMUP - 1):
        won(timing)
        assert timing.wait_s() is None  # the copy's win is still among the last WARMUP
    won(timing)
    assert timing.wait_s() == copies.FACTOR * 0.001


def test_the_wait_follows_the_pushed_replies_within_its_bounds():
    timing = CopyTiming()
    for _ in range(copies.WARMUP):
        won(timing, 0.0001)
    assert timing.wait_s() == copies.MIN_WAIT_S  # loopback: scheduling jitter bounds it from below
    for _ in range(50):
        won(timing, 10.0, held_back=True)
    assert timing.wait_s() == copies.MAX_WAIT_S  # a stalled link costs at most this, once
    timing = CopyTiming()
    for _ in range(copies.WARMUP):
        won(timing, 0.030)  # 25 ms links
    assert abs(timing.wait_s() - copies.FACTOR * 0.030) < 1e-9
    won(timing, 0.060, held_back=True)  # smoothed, not replaced
    assert copies.FACTOR * 0.030 < timing.wait_s() < copies.FACTOR * 0.060


def test_a_late_reply_or_a_winning_copy_sends_copies_at_once_again():
    timing = CopyTiming()
    for _ in range(copies.WARMUP):
        won(timing)
    assert timing.wait_s() is not None
    timing.observe(0.5, pushed=True, held_back=True, late=True)  # the push came, but after the wait
    assert timing.wait_s() is None
    for _ in range(copies.WARMUP):
        won(timing)
    assert timing.wait_s() is not None
    timing.observe(0.001, pushed=False, held_back=False, late=False)  # a recheck: the copy was faster
    assert timing.wait_s() is None


def test_one_copy_in_recheck_every_goes_at_once():
    timing = CopyTiming()
    for _ in range(copies.WARMUP):
        won(timing)
    at_once = []
    for step in range(3 * copies.RECHECK_EVERY):
        wait = timing.wait_s()
        if wait is None:
            at_once.append(step)
        won(timing, held_back=wait is not None)
    assert len(at_once) == 2 and at_once[1] - at_once[0] == copies.RECHECK_EVERY, at_once
