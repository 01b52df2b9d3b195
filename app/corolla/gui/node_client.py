"""A non-blocking client of the node's API: every call returns at once and reports through callbacks."""

from __future__ import annotations

import json
from collections.abc import Callable

from PySide6.QtCore import QByteArray, QObject, QUrl, Signal
from PySide6.QtNetwork import QNetworkAccessManager, QNetworkReply, QNetworkRequest

OnOk = Callable[[object], None]
OnError = Callable[[str], None]
# What a call hears when the node has no such endpoint (an older node): a 404 without the node's own
# error message (its own 404s, such as an unknown peer, always say what was not found).
ENDPOINT_MISSING = "the node answered 404"


class NodeClient(QObject):
    error = Signal(str)  # one place where unhandled failures surface

    def __init__(self, url: str, token: str, parent: QObject | None = None):
        super().__init__(parent)
        self.url, self.token = url.rstrip("/"), token
        self.manager = QNetworkAccessManager(self)

    def retarget(self, url: str, token: str) -> None:
        """Talk to a restarted node (a new port and token)."""
        self.url, self.token = url.rstrip("/"), token

    def _request(self, path: str, timeout_ms: int = 120_000) -> QNetworkRequest:
        request = QNetworkRequest(QUrl(self.url + path))
        request.setRawHeader(b"Authorization", f"Bearer {self.token}".encode())
        request.setHeader(QNetworkRequest.KnownHeaders.ContentTypeHeader, "application/json")
        # One connection per request: the node forks helper processes (hivemind's DHT) that inherit its
        # open sockets, so a kept-alive connection the node has closed can stay open in the child and a
        # request reusing it would hang until its timeout. Loopback connections cost next to nothing.
        request.setRawHeader(b"Connection", b"close")
        request.setTransferTimeout(timeout_ms)
        return request

    def call(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        on_ok: OnOk | None = None,
        on_error: OnError | None = None,
        timeout_ms: int = 120_000,
    ) -> QNetworkReply:
        data = QByteArray(json.dumps(body).encode()) if body is not None else QByteArray()
        reply = self.manager.sendCustomRequest(self._request(path, timeout_ms), method.encode(), data)

        def finished():
            reply.deleteLater()
            raw = bytes(reply.readAll())
            status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
            if reply.error() != QNetworkReply.NetworkError.NoError and not status:
                self._fail(on_error, f"the node does not answer ({reply.errorString()})")
                return
            try:
                payload = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                payload = None
            if status and status >= 400:
                message = payload.get("message") if isinstance(payload, dict) else None
                self._fail(on_error, message or f"the node answered {status}")
            elif on_ok is not None:
                on_ok(payload)

        reply.finished.connect(finished)
        return reply

    def stream(
        self, path: str, body: dict, on_event: Callable[[str, dict], None], on_error: OnError | None = None
    ) -> QNetworkReply:
        """POST and read server-sent events as they arrive."""
        reply = self.manager.post(self._request(path), QByteArray(json.dumps(body).encode()))
        buffer = bytearray()

        def ready():
            buffer.extend(bytes(reply.readAll()))
            while b"\n\n" in buffer:
                block, _, rest = bytes(buffer).partition(b"\n\n")
                buffer[:] = rest
                event, data = "message", []
                for line in block.decode(errors="replace").splitlines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                if not data:
                    continue
                try:
                    payload = json.loads("\n".join(data))
                except json.JSONDecodeError:
                    continue  # a malformed event is skipped; the stream goes on
                on_event(event, payload)

        def finished():
            reply.deleteLater()
            status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
            if (
                reply.error()
                not in (QNetworkReply.NetworkError.NoError, QNetworkReply.NetworkError.OperationCanceledError)
                or (status or 0) >= 400
            ):
                self._fail(on_error, f"the reply stream failed ({reply.errorString()})")

        reply.readyRead.connect(ready)
        reply.finished.connect(finished)
        return reply

    def _fail(self, on_error: OnError | None, message: str) -> None:
        if on_error is not None:
            on_error(message)
        else:
            self.error.emit(message)
