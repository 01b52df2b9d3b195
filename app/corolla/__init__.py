"""Corolla: join and use a Petals swarm from a desktop app."""

__version__ = "0.1.0"

__all__ = ["AutoDistributedModelForCausalLM", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import corolla` (e.g. from the GUI) never pulls in torch or hivemind.
    if name == "AutoDistributedModelForCausalLM":
        from corolla.swarm.client.remote_model import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(f"module 'corolla' has no attribute {name!r}")
