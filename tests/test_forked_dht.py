"""The forked DHT child (the CLI's and the bootstrap peer's) dying after it was ready: a caller waiting
for its answer gets an error instead of waiting forever (hivemind's own wait has no end)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from corolla.swarm.peers import CHILD_POLL_S, DHTChildDiedError, start_dht
from tests.support.procs import descendants, wait_gone


def test_a_dead_dht_child_fails_the_waiting_calls_instead_of_holding_them():
    dht = start_dht(use_relay=False, auto_nat=False)
    tree = descendants(dht.pid) if dht.pid else []
    try:
        assert dht.get_visible_maddrs()  # it answers while it runs
        os.kill(dht.pid, signal.SIGKILL)
        for call in (
            dht.get_visible_maddrs,
            lambda: dht.get("some-key"),
            lambda: dht.store("k", b"v", time.time() + 60),
        ):
            started = time.monotonic()
            with pytest.raises(DHTChildDiedError, match="exit code -9"):
                call()
            assert time.monotonic() - started < 10 * CHILD_POLL_S
    finally:
        dht.shutdown()
    assert not wait_gone(tree, 10)  # p2pd goes with it
