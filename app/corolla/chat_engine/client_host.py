"""One swarm client for a target (the model and the peers to join through), created on first use and
replaced when the target changes. The node uses it when it chats itself; the engine in the block
server's process uses it while the node contributes (engine.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from corolla.node.lazy_imports import engine_imports

logger = logging.getLogger(__name__)
CONNECT_ATTEMPTS = 3


class NoSwarm(RuntimeError):
    """No swarm to chat with (explained to the user, with what to do)."""


@dataclass(frozen=True)
class ClientTarget:
    model: str
    dht_prefix: str | None
    peers: tuple[str, ...]
    loopback_only: bool
    local_edge_blocks: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ClientTarget:
        """From a channel request (checked: a malformed target is a ValueError, not a half-made client)."""
        model, prefix, peers = data.get("model"), data.get("dht_prefix"), data.get("peers")
        if not isinstance(model, str) or not (prefix is None or isinstance(prefix, str)):
            raise ValueError("a chat target needs a model name and a prefix")
        if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers) or len(peers) > 1024:
            raise ValueError("a chat target's peers must be a list of addresses")
        edges = data.get("local_edge_blocks", 0)
        if type(edges) is not int or edges < 0:
            raise ValueError("local_edge_blocks must be a whole number")
        return cls(model, prefix, tuple(peers), bool(data.get("loopback_only")), edges)


def peer_id_of(address: str) -> str | None:
    """The peer id a multiaddr ends with (/p2p/ID), if any."""
    return address.rsplit("/p2p/", 1)[1] if "/p2p/" in address else None


@dataclass(frozen=True)
class SharedSwarm:
    """The block server of this process, lent to its chat engine's client (issue 29: one DHT and one p2pd
    per computer): its running DHT, its handlers for in-process calls (swarm/local_calls.py) and the
    peers its swarm is known by (its own id and those of the peers it joined through)."""

    dht: Any
    local_server: Any  # swarm.local_calls.LocalServer
    peer_ids: frozenset[str]

    def joins(self, target: ClientTarget) -> bool:
        """Whether `target` names this server's swarm: one of its peers is this server or one the server
        joined through (the node derives both from the same settings: a target that names none of them
        is another swarm, reached with a DHT of its own)."""
        return any(peer_id_of(peer) in self.peer_ids for peer in target.peers)


class SwarmClientHost:
    """One swarm client for the current model and peers (`target()`, or the target given to get), created
    on first use. `shared()`: the block server's swarm to use when the target is that swarm (no DHT of
    the client's own then)."""

    def __init__(
        self,
        target: Callable[[], ClientTarget],
        token: Callable[[], str | None],
        shared: Callable[[], SharedSwarm | None] = lambda: None,
    ):
        self._target, self._token, self._shared = target, token, shared
        self._lock = threading.Lock()
        self._client = None
        self._client_target: ClientTarget | None = None
        self._client_shared: SharedSwarm | None = None
        self.on_new_client: Callable[[Any], None] | None = None  # e.g. to restore the node's flagged servers

    def get(self, target: ClientTarget | None = None):
        target = target or self._target()
        shared = self._shared()
        shared = shared if shared is not None and shared.joins(target) else None
        with self._lock:
            if self._client is not None and self._client_target == target and self._client_shared is shared:
                return self._client
            self.close()
            if not target.peers:
                raise NoSwarm(
                    "no swarm to reach: start contributing (the private swarm runs on this computer) "
                    "or choose the public swarm or custom peers in the settings"
                )
            # Imported once there is a swarm: torch and the client stay out of a node that has none.
            with engine_imports():
                from corolla.swarm.client.remote_model import AutoDistributedModelForCausalLM

            options = {"use_relay": False, "auto_nat": False} if target.loopback_only else {}
            if shared is not None:  # the server's DHT and p2pd, its own blocks reached in-process
                options = {"dht": shared.dht, "local_server": shared.local_server}
            for attempt in range(CONNECT_ATTEMPTS):
                try:
                    self._client = AutoDistributedModelForCausalLM.from_pretrained(
                        target.model,
                        initial_peers=list(target.peers),
                        dht_prefix=target.dht_prefix,
                        token=self._token(),
                        local_edge_blocks=target.local_edge_blocks,
                        **options,
                    )
                    break
                except Exception as exc:
                    # p2pd gives up on bootstrap peers it cannot reach quickly (a busy machine, a peer
                    # that is just starting): try again before reporting the swarm unreachable.
                    if "bootstrap" not in str(exc):
                        raise
                    if attempt + 1 == CONNECT_ATTEMPTS:
                        raise NoSwarm(
                            f"None of the swarm's known members answered ({len(target.peers)} address(es) tried; "
                            f"{str(exc)[:200]}): check that a member's Corolla is contributing, or paste a "
                            "fresh invite from a member under Settings, Swarm"
                        ) from exc
                    logger.warning("connecting to the swarm failed (%s); retrying", exc)
            self._client_target, self._client_shared = target, shared
            if self.on_new_client is not None:
                self.on_new_client(self._client)
            return self._client

    def dht_prefix(self) -> str | None:
        """The prefix the open client found for the model (None before the first swarm read)."""
        client = self._client
        return getattr(client, "dht_prefix", None) if client is not None else None

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                logger.warning("closing the swarm client failed", exc_info=True)
        self._client, self._client_target, self._client_shared = None, None, None
