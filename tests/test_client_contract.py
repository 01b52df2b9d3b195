"""Client and server stay separate rooms: the client reaches servers through protocol.py's RPC
declaration (handler names and stubs), never by importing the server's code."""

from __future__ import annotations

import subprocess
import sys


def test_the_client_imports_no_server_module():
    code = (
        "import sys, corolla.swarm.client.remote_model, corolla.swarm.client.health, corolla.swarm.client.chat\n"
        "print(sorted(m for m in sys.modules if m.startswith('corolla.swarm.server')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_the_declared_rpcs_match_the_servers_handler():
    from corolla.swarm import protocol
    from corolla.swarm.server.handler import TransformerConnectionHandler as Server

    protocol.TransformerConnectionHandler._collect_rpc_handlers()
    Server._collect_rpc_handlers()
    declared = {
        (h.method_name, h.stream_input, h.stream_output) for h in protocol.TransformerConnectionHandler._rpc_handlers
    }
    served = {(h.method_name, h.stream_input, h.stream_output) for h in Server._rpc_handlers}
    assert declared == served
    assert protocol.TransformerConnectionHandler.__name__ == Server.__name__ == protocol.HANDLER_CLASS_NAME
