"""The window's face of the node client (corolla/api/client.py is the core): non-blocking, every call
returns at once and reports through callbacks."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QByteArray, QObject, QUrl, Signal
from PySide6.QtNetwork import QNetworkAccessManager, QNetworkReply, QNetworkRequest

from corolla.api.client import ENDPOINT_MISSING, decode_payload, encode_body, error_message, request_headers
from corolla.api.client import unreachable_message as _unreachable
from corolla.api.sse import SseParser

__all__ = ["ENDPOINT_MISSING", "NodeClient"]

OnOk = Callable[[object], None]
OnError = Callable[[str], None]


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
        for name, value in request_headers(self.token).items():
            request.setRawHeader(name.encode(), value.encode())
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
        data = QByteArray(encode_body(body) or b"")
        reply = self.manager.sendCustomRequest(self._request(path, timeout_ms), method.encode(), data)

        def finished():
            reply.deleteLater()
            raw = bytes(reply.readAll())
            status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
            if reply.error() != QNetworkReply.NetworkError.NoError and not status:
                self._fail(on_error, _unreachable(reply.errorString()))
                return
            payload = decode_payload(raw)
            if status and status >= 400:
                self._fail(on_error, error_message(status, payload))
            elif on_ok is not None:
                on_ok(payload)

        reply.finished.connect(finished)
        return reply

    def stream(
        self, path: str, body: dict, on_event: Callable[[str, dict], None], on_error: OnError | None = None
    ) -> QNetworkReply:
        """POST and read server-sent events as they arrive: on_event(event name, JSON data)."""
        reply = self.manager.post(self._request(path), QByteArray(encode_body(body)))
        parser = SseParser()

        def ready():
            for event in parser.feed(bytes(reply.readAll())):
                payload = decode_payload(event.data.encode())
                if payload is not None:  # a malformed event is skipped; the stream goes on
                    on_event(event.event, payload)

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
