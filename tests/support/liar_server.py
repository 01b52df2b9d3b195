"""A block server that returns wrong results, for the verification tests only (never a server flag).

    python tests/support/liar_server.py KIND -- PYTHON -m corolla.cli serve ARGS...

KIND: `noise:SIZE` (adds Gaussian noise of SIZE times each output's RMS), `zeros`, `previous` (the
session's previous step output where the shapes allow), optionally prefixed `after:N:` to be honest
for the first N steps of every session (a liar that hopes checks look at a session's start).
It runs the real `corolla serve` with the handler class swapped for a subclass that corrupts
rpc_inference outputs (CorollaServer's `launcher` hook).
"""

from __future__ import annotations

import sys

import torch

from corolla.swarm.server import server as server_module
from corolla.swarm.server.handler import TransformerConnectionHandler


def lying_handler(kind: str) -> type:
    honest_steps = 0
    if kind.startswith("after:"):
        _, count, kind = kind.split(":", 2)
        honest_steps = int(count)

    class LyingHandler(TransformerConnectionHandler):  # the class name stays on the wire (its base's)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.previous: dict[int, tuple[int, torch.Tensor]] = {}  # per session cache: steps, last output

        async def _inference_step(self, span, cache, *args, **kwargs) -> torch.Tensor:
            out = await super()._inference_step(span, cache, *args, **kwargs)
            steps, previous = self.previous.get(id(cache), (0, None))
            self.previous[id(cache)] = (steps + 1, out)
            if len(self.previous) > 1000:  # closed sessions' entries: keep the newest
                self.previous = dict(list(self.previous.items())[-500:])
            if steps < honest_steps or out.numel() == 0:
                return out
            if kind == "zeros":
                return torch.zeros_like(out)
            if kind == "previous":
                return previous if previous is not None and previous.shape == out.shape else out
            if kind.startswith("noise:"):
                size = float(kind.split(":", 1)[1])
                rms = out.float().pow(2).mean().sqrt()
                return (out.float() + size * rms * torch.randn(out.shape)).to(out.dtype)
            raise SystemExit(f"unknown lie {kind!r}")

    LyingHandler.__name__ = LyingHandler.__qualname__ = "TransformerConnectionHandler"
    return LyingHandler


def main() -> int:
    kind, separator, *command = sys.argv[1:]
    assert separator == "--" and command[1:3] == ["-m", "corolla.cli"], sys.argv
    server_module.TransformerConnectionHandler = lying_handler(kind)
    from corolla.cli import main as cli_main

    return cli_main(command[3:])


if __name__ == "__main__":
    sys.exit(main())
