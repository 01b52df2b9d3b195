"""The one node client core: how a request to the node is made and how its answer is read. The CLI and
scripts use its synchronous face (`SyncNodeClient`, urllib); the window uses the Qt face in
gui/node_client.py, which builds requests and reads errors with the same functions."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

from corolla.api.sse import json_events

# What a call hears when the node has no such endpoint (an older node): a 404 without the node's own
# error message (its own 404s, such as an unknown peer, always say what was not found).
ENDPOINT_MISSING = "the node answered 404"


class NodeError(Exception):
    """The node did not answer, or answered with an error (its message, for the user)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def request_headers(token: str, json_body: bool = True) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if json_body:
        headers["Content-Type"] = "application/json"
    # One connection per request: the node forks helper processes (hivemind's DHT) that inherit its open
    # sockets, so a kept-alive connection the node has closed can stay open in the child and a request
    # reusing it would hang until its timeout. Loopback connections cost next to nothing.
    headers["Connection"] = "close"
    return headers


def encode_body(body: object | None) -> bytes | None:
    return None if body is None else json.dumps(body).encode()


def decode_payload(raw: bytes) -> object | None:
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None


def error_message(status: int, payload: object | None) -> str:
    """The user-facing message of an error answer: the node's own (its error envelope), else the status."""
    message = payload.get("message") if isinstance(payload, dict) else None
    return message or f"the node answered {status}"


def unreachable_message(reason: str) -> str:
    return f"the node does not answer ({reason})"


class SyncNodeClient:
    """Blocking calls to the node (the CLI, `corolla demo`, scripts)."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url.rstrip("/"), token

    def _open(self, method: str, path: str, body: object | None, timeout: float):
        request = urllib.request.Request(
            self.url + path,
            data=encode_body(body),
            method=method,
            headers=request_headers(self.token, json_body=body is not None),
        )
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise NodeError(error_message(exc.code, decode_payload(exc.read())), exc.code) from exc
        except OSError as exc:
            raise NodeError(unreachable_message(str(getattr(exc, "reason", exc))), None) from exc

    def call(self, method: str, path: str, body: object | None = None, timeout: float = 30) -> object | None:
        with self._open(method, path, body, timeout) as response:
            return decode_payload(response.read())

    def stream(self, path: str, body: object, timeout: float = 120) -> Iterator[tuple[str, object]]:
        """POST and yield (event, JSON data) as the node sends them."""
        with self._open("POST", path, body, timeout) as response:
            yield from json_events(response)


def ping(url: str, timeout: float = 2.0) -> bool:
    """Whether a node answers at `url` (liveness: no token needed)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/ping", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False
