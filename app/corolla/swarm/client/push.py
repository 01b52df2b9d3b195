"""Server-to-server push: which downstream sessions a step's output may be pushed to.

With `next_servers` in a step's metadata, each server sends its output straight to the next server
of the chain (`rpc_push`) as well as back to the client, so the next server starts computing a leg
earlier. The client may send every server its own copy of the step too (same `step_id`; the server
drops whichever copy arrives second): at once, or only when the push has not brought the reply in
time (copies.py). Failover is exact either way: the client keeps every span's inputs itself, and each
span keeps the inputs it was sent, whoever delivered them first. Wire format as Petals' (protocol doc §2.8): a
list of `(peer_id_b58, session_id, start, end)` tuples, the whole rest of the chain.

Stock Petals 2.1-2.3.0.dev1 servers ignore `next_servers` (they read it from the first message
only), so through them the step simply takes the client's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class _Stream(Protocol):
    session_id: str
    _stepped: bool

    @property
    def segment(self): ...


def next_servers(
    streams: Sequence[_Stream], index: int, pushed: Sequence[bool] | None = None
) -> list[tuple[str, str, int, int]] | None:
    """The downstream chain that stream `index` should push this step to, or None.

    Only sessions that have already stepped can take a push (a server registers a session with its
    first message, and a session's first message carries its whole history, which only the client
    has), and the chain must be contiguous, so it stops at the first one that has not, and at the
    first hop not to be pushed (`pushed[i]`: whether stream i takes pushes; route_choice.py).
    """
    chain = []
    for offset, stream in enumerate(streams[index + 1 :], start=index + 1):
        if not stream._stepped or (pushed is not None and not pushed[offset]):
            break
        segment = stream.segment
        chain.append((segment.peer_id, stream.session_id, segment.start, segment.end))
    return chain or None


def can_push(*, has_prompts: bool, padded: bool, reorders: bool) -> bool:
    """Servers push the trailing tensors of the request they computed; deep prompts and padding masks
    are per span or per step, and a beam reordering is per step too: such steps take the client's path."""
    return not (has_prompts or padded or reorders)
