"""Petals-compatible swarm code: model engine, block server, client. No Qt and no HTTP in here."""
