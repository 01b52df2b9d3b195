"""Appending a step's positions to a session's record in place (stream histories, spot-check outputs).

A `torch.cat` per token copies everything recorded so far: O(length) a token. Here the record is the
first `kept` positions of a buffer that doubles when full, so a token costs one small copy.
"""

from __future__ import annotations

import torch


def append_positions(buffer: torch.Tensor, kept: int, new: torch.Tensor) -> torch.Tensor:
    """`buffer` [batch, capacity, hidden] holding `kept` positions, with `new` [batch, n, hidden] written after
    them: the same buffer, or a larger one when it is full. Nothing at or before `kept` is written, so views
    of the first `kept` positions taken earlier (a running check's snapshot) keep their values."""
    needed = kept + new.shape[1]
    if needed > buffer.shape[1]:
        grown = buffer.new_empty(new.shape[0], max(needed, 2 * buffer.shape[1]), new.shape[2])
        grown[:, :kept] = buffer[:, :kept]
        buffer = grown
    buffer[:, kept:needed] = new
    return buffer
