"""The `corolla` command line: one module per command group (entry point: `corolla.cli:main`).

- parser.py: the argument parser of every command, and `main()` (exit codes, one-line errors, SIGTERM).
- common.py: what the commands share: argument types, model source arguments, usage errors, the running
  node's client (corolla/api/client.py).
- node.py: `node`, `status`, `stop`, `uninstall`, `demo`, `app` and `--self-test`.
- serve.py: `serve`, the headless block server.
- chat.py: `chat`, a terminal chat through the swarm.
- swarm.py: `swarm` (health, `lan`, `check PEER`).
- model.py: `model info|make-tiny|import|generate`, no swarm involved.

Every module imports torch, hivemind and the node only inside its commands: `corolla status` and the
window's start stay light.
"""

from corolla.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
