"""The window's face of the node client (corolla/api/client.py is the core): non-blocking, every call
returns at once and reports through callbacks."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

from PySide6.QtCore import QByteArray, QObject, QTimer, QUrl, Signal
from PySide6.QtNetwork import QNetworkAccessManager, QNetworkReply, QNetworkRequest

from corolla.api.client import ENDPOINT_MISSING, decode_payload, encode_body, error_message, request_headers
from corolla.api.client import unreachable_message as _unreachable
from corolla.api.sse import SseParser

if TYPE_CHECKING:
    from pydantic import BaseModel, TypeAdapter

# pydantic is imported where it is used: imported here, before Qt, half of it would load after Qt's
# import hook, which trips over pydantic's lazy attributes (a circular import at the next model).

__all__ = ["ENDPOINT_MISSING", "NodeClient", "Unreadable", "UnreadableAnswer", "parse_answer"]

OnOk = Callable[[object], None]
OnError = Callable[[str], None]


_REFUSED = object()  # a request body that does not fit its model: not sent


class Unreadable(str):
    """The message of an answer that does not parse as the window's model of it (a node of another
    version): one sentence for the window, never a traceback."""


@lru_cache(maxsize=64)
def _adapter(answer) -> TypeAdapter:
    from pydantic import TypeAdapter

    return TypeAdapter(answer)


class UnreadableAnswer(ValueError):
    pass


def parse_answer(answer, payload: object, what: str):
    """`payload` read as `answer` (a corolla.api model, or list[...] of one); UnreadableAnswer, whose
    message is an Unreadable sentence, when it does not fit."""
    from pydantic import ValidationError

    try:
        return _adapter(answer).validate_python(payload)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.error_count() else {}
        where = ".".join(str(part) for part in first.get("loc", ())) or "the answer"
        version = payload.get("version") if isinstance(payload, dict) else None
        node = f"the node (Corolla {version})" if isinstance(version, str) else "the node"
        raise UnreadableAnswer(
            f"{node} answered {what} in a form this window does not read ({where}: {first.get('msg', 'invalid')}); "
            "restart the node so that both run the same version of Corolla"
        ) from None


def request_body(request: type[BaseModel], body: object) -> dict:
    """`body` read as the node's request model (the fields given, as the node reads them); a ValueError
    with the message the node's own check would give (field: problem; ...) when it does not fit."""
    from pydantic import ValidationError

    try:
        model = body if isinstance(body, request) else request.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in exc.errors()[:5]
        )
        raise ValueError(problems or "invalid request") from None
    return model.model_dump(mode="json", exclude_unset=True)


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
        answer=None,
        request: type[BaseModel] | None = None,
    ) -> QNetworkReply | None:
        """`request`: the node's model of the body, which is sent as that model (a body that does not fit
        is not sent: on_error hears why, as the node would say it; the call returns None). `answer`: the
        corolla.api model the payload is read as before on_ok sees it (None: the raw JSON); an answer
        that does not fit reaches on_error as an `Unreadable` message."""
        body = self._checked_body(request, body, on_error)
        if body is _REFUSED:
            return None
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
                if answer is not None:
                    try:
                        payload = parse_answer(answer, payload, f"{method} {path.partition('?')[0]}")
                    except UnreadableAnswer as exc:
                        self._fail(on_error, Unreadable(exc))
                        return
                on_ok(payload)

        reply.finished.connect(finished)
        return reply

    def _checked_body(self, request: type[BaseModel] | None, body, on_error: OnError | None):
        """The body as the node's `request` model sends it; _REFUSED (and on_error told why, as the node
        would say it) for one that does not fit."""
        if request is None:
            return body
        try:
            return request_body(request, body)
        except ValueError as exc:
            QTimer.singleShot(0, lambda message=str(exc): self._fail(on_error, message))
            return _REFUSED

    def stream(
        self,
        path: str,
        body: dict,
        on_event: Callable[[str, dict], None],
        on_error: OnError | None = None,
        request: type[BaseModel] | None = None,
    ) -> QNetworkReply | None:
        """POST and read server-sent events as they arrive: on_event(event name, JSON data). `request`:
        as for call()."""
        body = self._checked_body(request, body, on_error)
        if body is _REFUSED:
            return None
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
