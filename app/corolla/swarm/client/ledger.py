"""What one client knows about servers' honesty (steps seen, checks passed, flags with evidence), kept on
its SwarmView and shared by the views restricted to a privacy level. The checks themselves are in
verification.py."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corolla.swarm.client.routing import SwarmView

logger = logging.getLogger(__name__)
FIRST_STEPS = 8  # a server's first steps in this client are all checked


@dataclass
class Ledger:
    """What one client knows about servers' honesty: steps seen, checks passed, flags with evidence."""

    first_steps: int = FIRST_STEPS
    rng: random.Random = field(default_factory=random.Random)
    steps: Counter = field(default_factory=Counter)
    checks: Counter = field(default_factory=Counter)
    flagged: dict[str, dict] = field(default_factory=dict)
    disputes: int = 0
    infos: dict = field(default_factory=dict)  # the last announcement seen of each server (its precision)
    on_flag: list[Callable[[dict], None]] = field(default_factory=list)
    background: set = field(default_factory=set)  # checks of closed sessions, still running

    def should_check(self, peer: str, rate: float) -> bool:
        self.steps[peer] += 1
        if self.steps[peer] <= self.first_steps:
            return True
        return rate > 0 and self.rng.random() < rate

    def state(self, peer: str) -> str:
        if peer in self.flagged:
            return "flagged"
        return "verified" if self.checks[peer] else "unverified"

    def flag(self, view: SwarmView, evidence: dict) -> None:
        peer = evidence["peer_id"]
        block(view, peer)
        if peer in self.flagged:  # checks still in flight confirm it: the first evidence stays
            return
        self.flagged[peer] = evidence
        logger.warning("flagged server %s: %s", peer, evidence["detail"])
        for callback in self.on_flag:
            try:
                callback(evidence)
            except Exception:
                logger.exception("recording a flagged server failed")


def block(view: SwarmView, peer: str) -> None:
    """Never route through `peer` again in this client."""
    if peer not in view.config.blocked_servers:
        view.config.blocked_servers.append(peer)
    view.ban(peer)


def ledger_of(view: SwarmView) -> Ledger:
    if view.verification is None:
        view.verification = Ledger()
    return view.verification
