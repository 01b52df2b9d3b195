"""A block server that answers slowly or never, for the slow-server tests only (never a server flag).

    python tests/support/slow_server.py KIND -- PYTHON -m corolla.cli serve ARGS...

KIND: `stall` (never answers a step with tokens), `delay:S` (answers every such step S seconds late),
`once:N:S` (only the Nth step of each session is S seconds late), optionally prefixed `after:N:` to
be honest for the first N steps of every session. Its outputs are always right: only the timing lies.
It runs the real `corolla serve` with the handler class swapped for a subclass (as liar_server.py does).
"""

from __future__ import annotations

import asyncio
import sys

from corolla.swarm.server import server as server_module
from corolla.swarm.server.handler import TransformerConnectionHandler

STALL_S = 600.0  # "never", within a test's lifetime


def delay_for(kind: str, step: int) -> float:
    """How late step `step` (1-based, of one session) is answered."""
    if kind.startswith("after:"):
        _, count, kind = kind.split(":", 2)
        if step <= int(count):
            return 0.0
    if kind == "stall":
        return STALL_S
    if kind.startswith("delay:"):
        return float(kind.split(":", 1)[1])
    if kind.startswith("once:"):
        _, which, seconds = kind.split(":")
        return float(seconds) if step == int(which) else 0.0
    raise SystemExit(f"unknown slowness {kind!r}")


def slow_handler(kind: str) -> type:
    delay_for(kind, 1)  # a typo fails at start, not at the first step

    class SlowHandler(TransformerConnectionHandler):  # the class name stays on the wire (its base's)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps: dict[int, int] = {}  # per session cache: steps with tokens so far

        async def _inference_step(self, span, cache, request, *args, **kwargs):
            if request.tensors and request.tensors[0].size and _has_tokens(request):
                step = self.steps.get(id(cache), 0) + 1
                self.steps[id(cache)] = step
                if len(self.steps) > 1000:  # closed sessions' entries: keep the newest
                    self.steps = dict(list(self.steps.items())[-500:])
                seconds = delay_for(kind, step)
                if seconds:
                    await asyncio.sleep(seconds)
            return await super()._inference_step(span, cache, request, *args, **kwargs)

    SlowHandler.__name__ = SlowHandler.__qualname__ = "TransformerConnectionHandler"
    return SlowHandler


def _has_tokens(request) -> bool:
    """An empty first step (a Corolla client opening a session ahead of its pushes) is not a step."""
    shape = list(request.tensors[0].size)
    return len(shape) >= 2 and shape[1] > 0


def main() -> int:
    kind, separator, *command = sys.argv[1:]
    assert separator == "--" and command[1:3] == ["-m", "corolla.cli"], sys.argv
    server_module.TransformerConnectionHandler = slow_handler(kind)
    from corolla.cli import main as cli_main

    return cli_main(command[3:])


if __name__ == "__main__":
    sys.exit(main())
