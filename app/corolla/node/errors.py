"""Errors the node's services raise for the API to answer (api.py turns each into a JSON error body with
its HTTP status): the services themselves know nothing of HTTP frameworks."""

from __future__ import annotations


class NodeError(Exception):
    """A request the node cannot do, with the status to answer and a sentence that says what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def sentence_of(exc: Exception) -> str:
    text = str(exc).strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")
