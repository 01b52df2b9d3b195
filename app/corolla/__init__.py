"""Corolla: join and use a Petals swarm from a desktop app.

- swarm/: the Petals-compatible swarm (engine, block server, client); no Qt, no HTTP.
- node/: the per-user daemon (`corolla node`): local API, supervisor of the block server, history.
- api/: the node's API contract (types, reply events, SSE, the client core), shared by all sides.
- gui/: the window and tray; talks to the node only through its API; never imports torch or hivemind.
- cli/: the `corolla` command line, one module per command group.
- executable.py: how to start `corolla` again (source install or bundle); units.py: human-readable sizes;
  uninstall.py: what `corolla uninstall` clears.
"""

__version__ = "0.1.0"

__all__ = ["AutoDistributedModelForCausalLM", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import corolla` (e.g. from the GUI) never pulls in torch or hivemind.
    if name == "AutoDistributedModelForCausalLM":
        from corolla.swarm.client.remote_model import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(f"module 'corolla' has no attribute {name!r}")
