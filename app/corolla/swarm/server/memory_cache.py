"""The KV-cache budget of a server: admission control for inference sessions.

Petals reserves, for every session and every block of its chain, keys and values of
`batch x max_length` tokens, all or nothing, at open; and frees them at close. Corolla's caches
grow as tokens arrive, but the reservation is what keeps a server from accepting more sessions than
its memory holds, and its units are what stock clients read (protocol doc §3.6).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class AllocationError(Exception):
    """The cache cannot hold a new session now (the texts match Petals')."""


class CacheBudget:
    def __init__(self, max_bytes: int, bytes_per_token_block: int, max_alloc_timeout: float):
        """`bytes_per_token_block`: keys and values of one token in one block, in the server dtype."""
        self.max_bytes = max_bytes
        self.bytes_per_token_block = bytes_per_token_block
        self.max_alloc_timeout = max_alloc_timeout
        self._used = 0
        self._queued = 0
        self._changed: asyncio.Condition | None = None

    @property
    def bytes_left(self) -> int:
        return self.max_bytes - self._used

    @property
    def tokens_left_rpc_info(self) -> int:
        """rpc_info's `cache_tokens_available`: token x blocks, keys and values together."""
        return self.bytes_left // self.bytes_per_token_block

    @property
    def tokens_left_dht(self) -> int:
        """The DHT's `cache_tokens_left`: twice token x blocks (keys and values counted apart)."""
        return 2 * self.bytes_left // self.bytes_per_token_block

    def session_bytes(self, batch: int, max_length: int, num_blocks: int) -> int:
        return batch * max_length * num_blocks * self.bytes_per_token_block

    @contextlib.asynccontextmanager
    async def allocate(self, nbytes: int, timeout: float) -> AsyncIterator[None]:
        """Reserve `nbytes` for the duration of the block; released however the block exits."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        if nbytes > self.max_bytes:
            raise AllocationError(f"Could not allocate {nbytes} bytes, max cache size = {self.max_bytes} bytes")
        timeout = min(max(float(timeout), 0.0), self.max_alloc_timeout)
        async with self._changed:
            if self._used + self._queued + nbytes > self.max_bytes:
                if timeout == 0:
                    raise AllocationError(f"Could not allocate {nbytes} bytes immediately: out of memory")
                self._queued += nbytes
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self._used + nbytes <= self.max_bytes), timeout
                    )
                except TimeoutError as exc:
                    raise AllocationError(
                        f"Server's attention cache is full, failed to allocate {nbytes} bytes in {timeout} seconds"
                    ) from exc
                finally:
                    self._queued -= nbytes
            self._used += nbytes
        try:
            yield
        finally:
            async with self._changed:
                self._used -= nbytes
                self._changed.notify_all()
