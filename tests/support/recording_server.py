"""A block server that logs every tensor it receives, for the privacy tests only (never a server flag).

    python tests/support/recording_server.py LOG_PATH -- PYTHON -m corolla.cli serve ARGS...

It runs the real `corolla serve` with the handler class swapped for a subclass that appends one JSON
line per received message carrying tensors (method, sending peer, tensor shapes, bytes) to LOG_PATH,
then handles the message as usual: a stand-in for a server that keeps what it is sent.
"""

from __future__ import annotations

import functools
import json
import sys
import threading

from corolla.swarm.server import server as server_module
from corolla.swarm.server.handler import TransformerConnectionHandler


def recording_handler(path: str) -> type:
    lock = threading.Lock()

    def record(method: str, context, request) -> None:
        tensors = [t for t in request.tensors if t.buffer]
        if not tensors:
            return
        line = {
            "method": method,
            "peer": str(context.remote_id),
            "shapes": [list(t.size) for t in tensors],
            "bytes": sum(len(t.buffer) for t in tensors),
        }
        with lock, open(path, "a") as log:
            log.write(json.dumps(line) + "\n")

    async def recorded(method: str, requests, context):
        async for request in requests:
            record(method, context, request)
            yield request

    class RecordingHandler(TransformerConnectionHandler):  # the class name stays on the wire (its base's)
        async def rpc_inference(self, requests, context):
            async for response in super().rpc_inference(recorded("rpc_inference", requests, context), context):
                yield response

        async def rpc_forward(self, request, context):
            record("rpc_forward", context, request)
            return await super().rpc_forward(request, context)

        async def rpc_forward_stream(self, requests, context):
            async for response in super().rpc_forward_stream(recorded("rpc_forward", requests, context), context):
                yield response

        async def rpc_backward(self, request, context):
            record("rpc_backward", context, request)
            return await super().rpc_backward(request, context)

        async def rpc_backward_stream(self, requests, context):
            async for response in super().rpc_backward_stream(recorded("rpc_backward", requests, context), context):
                yield response

        async def rpc_push(self, request, context):
            record("rpc_push", context, request)
            return await super().rpc_push(request, context)

    methods = ("rpc_inference", "rpc_forward", "rpc_forward_stream", "rpc_backward", "rpc_backward_stream", "rpc_push")
    for name in methods:
        # hivemind reads each handler's request and reply types from its annotations (the base's).
        setattr(
            RecordingHandler,
            name,
            functools.wraps(getattr(TransformerConnectionHandler, name))(getattr(RecordingHandler, name)),
        )
    RecordingHandler.__name__ = RecordingHandler.__qualname__ = "TransformerConnectionHandler"
    return RecordingHandler


def main() -> int:
    path, separator, *command = sys.argv[1:]
    assert separator == "--" and command[1:3] == ["-m", "corolla.cli"], sys.argv
    server_module.TransformerConnectionHandler = recording_handler(path)
    from corolla.cli import main as cli_main

    return cli_main(command[3:])


if __name__ == "__main__":
    sys.exit(main())
