"""Corolla: join and use a Petals swarm from a desktop app."""

__version__ = "0.1.0"
