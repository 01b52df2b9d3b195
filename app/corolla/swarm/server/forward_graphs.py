"""Autograd graphs of recent forward passes, kept so that the matching backward pass skips its re-run.

Petals' backward re-runs the forward pass to get the activations, which makes a training step cost
three forward passes per block. A Corolla client names each forward request (`corolla_keep_graph`)
and its backward (`corolla_graph`); the server keeps that forward's graph for a short while, within
a byte budget, and the backward only backpropagates through it. Anything unusual (another peer, other
inputs, an evicted or expired graph) falls back to the re-run, so results never depend on the cache.
Stock peers never send these keys. The forward reply tells the client (GRAPH_KEPT_KEY in its metadata)
that the graph was kept, and the client's backward then sends only the output gradients: the inputs
and prompts are the kept graph's (at most ERR_GRAPH_GONE, and the full request follows).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class KeptGraph:
    peer: Any
    uid: str
    inputs: torch.Tensor
    prompts: torch.Tensor | None
    mask: torch.Tensor | None
    leaf: torch.Tensor
    prompt_leaf: torch.Tensor | None
    out: torch.Tensor
    nbytes: int
    expires: float


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


class ForwardGraphs:
    def __init__(self, max_bytes: int = 256 * 1024 * 1024, ttl: float = 60.0, per_peer: int = 16):
        self.max_bytes, self.ttl, self.per_peer = max_bytes, ttl, per_peer
        self._graphs: OrderedDict[tuple[Any, str], KeptGraph] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def _drop(self, key: tuple[Any, str]) -> None:
        self.nbytes -= self._graphs.pop(key).nbytes

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, g in self._graphs.items() if g.expires < now]:
            self._drop(key)

    def keep(self, key: str, graph: KeptGraph) -> bool:
        """Keep `graph` under `key` (evicting older ones); False if it is too large to keep."""
        self._expire()
        if graph.nbytes > self.max_bytes:
            return False
        full_key = (graph.peer, key)
        if full_key in self._graphs:
            self._drop(full_key)
        mine = [k for k in self._graphs if k[0] == graph.peer]
        while len(mine) >= self.per_peer:
            self._drop(mine.pop(0))
        while self._graphs and self.nbytes + graph.nbytes > self.max_bytes:
            self._drop(next(iter(self._graphs)))
        graph.expires = time.monotonic() + self.ttl
        self._graphs[full_key] = graph
        self.nbytes += graph.nbytes
        return True

    def take(
        self,
        key: str,
        peer: Any,
        uid: str,
        inputs: torch.Tensor,
        prompts: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> KeptGraph | None:
        """The graph of the forward pass with exactly these inputs from this peer, removed; or None."""
        graph = self.take_trusted(key, peer, uid)
        if graph is None or not (
            _same(graph.inputs, inputs) and _same(graph.prompts, prompts) and _same(graph.mask, mask)
        ):
            return None
        return graph

    def take_trusted(self, key: str, peer: Any, uid: str) -> KeptGraph | None:
        """The graph this peer kept under `key` for these blocks, removed; or None. For a backward
        request that sends no inputs: the graph's own inputs, prompts and mask are the request's."""
        self._expire()
        graph = self._graphs.get((peer, key))
        if graph is None:
            return None
        self._drop((peer, key))
        return graph if graph.uid == uid else None
