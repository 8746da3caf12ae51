"""The request primitives every route and both transports share.

Quart's routes (:mod:`telemetry.app`, :mod:`telemetry.errors`), the raw-ASGI pose
POST (:mod:`telemetry.lean`) and the pose stream (:mod:`telemetry.stream`) read,
refuse, answer, count and log through these, so they cannot drift apart:

* :class:`Headers`: a request's headers, read once from the ASGI scope;
* :func:`check_body_head`: the Content-Encoding and declared-length checks made
  before a body is read; :func:`read_body`: the capped, timed read of an ASGI body;
* :func:`settle`: after a refusal sent before the body was read, drop a body
  within the cap (for at most :data:`DRAIN_TIMEOUT_S`) so the connection stays
  usable, or say it must close;
* :func:`error_json`, :func:`retry_after_value`, :func:`send_json`,
  :func:`send_error`: the JSON error ``{"error": {"code", "message"}}`` and its
  headers, for both ASGI response kinds (HTTP, and a refused WebSocket handshake);
* :func:`observe`: count one answer in the metrics and log its ``request`` line.

Errors: the readers raise the tree's :class:`BodyTooLarge`, :class:`BodyTimeout`
and :class:`UnsupportedEncoding`, wrapped in :class:`BodyCutOff` when the rest of
the body is left in the connection, and :class:`Disconnected` when the client went
away. Cancellation passes through every await here untouched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from domain.errors import BodyTimeout, BodyTooLarge, TelemetryError, UnsupportedEncoding
from telemetry import logs
from telemetry.asgi import Receive, Scope, Send
from telemetry.http.answers import FRAMEWORK_CODES, http_status
from telemetry.metrics import Metrics

# A refused body within the cap is read and dropped so the connection stays usable;
# reading it may take this long at most.
DRAIN_TIMEOUT_S = 5.0
REQUEST_ID = logs.REQUEST_ID_HEADER.lower().encode()

RawHeaders = list[tuple[bytes, bytes]]


class Headers(dict[str, str]):
    """A request's headers by lower-case name (the first of repeated names wins, as
    Quart's ``headers.get``); :meth:`get` takes a name in any case, so code that
    reads Quart's headers (``get("Authorization")``) reads these too."""

    __slots__ = ()

    @classmethod
    def of(cls, scope: Scope) -> Headers:
        out = cls()
        for name, value in scope.get("headers") or ():
            key = name.decode("latin-1").lower()
            if key not in out:
                out[key] = value.decode("latin-1")
        return out

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)


class Disconnected(Exception):
    """The client went away before its body was read: nothing to answer."""


class BodyCutOff(Exception):
    """A refusal decided while the body was being read (``error``: over the cap, or
    too slow); the rest of the body is unread, so the answer closes the connection."""

    def __init__(self, error: TelemetryError) -> None:
        super().__init__(error.message)
        self.error = error


def content_length(headers: Headers) -> int | None:
    raw = headers.get("content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def check_body_head(encoding: str | None, length: int | None, cap: int) -> None:
    """Refuse a body by its headers, before any of it is read: a Content-Encoding
    other than identity (nothing to decompress, nothing to bomb), or a declared
    length over ``cap``."""
    encoding = (encoding or "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not accepted; "
                                  "send identity")
    if length is not None and length > cap:
        raise BodyTooLarge(f"body of {length} bytes exceeds the cap of {cap}")


async def read_body(receive: Receive, cap: int, time_limit_s: float) -> bytes:
    """The whole ASGI request body, at most ``cap`` bytes within ``time_limit_s``.

    hypercorn times out headers, not bodies: a body trickled a byte at a time would
    hold the request (and its session's slot) for ever."""
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(time_limit_s):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                # No (or a false) length, and it runs past the cap.
                raise BodyCutOff(BodyTooLarge(f"body exceeds the cap of {cap} bytes"))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    raise BodyCutOff(BodyTimeout(f"the request body did not arrive within {time_limit_s:g} s"))


async def settle(length: int | None, cap: int | None,
                 consume: Callable[[], Awaitable[bool]]) -> bool:
    """After a refusal sent before the body was read: True if the connection stays
    usable. A body within the cap is read and dropped by ``consume`` (True if it
    was read whole), for at most :data:`DRAIN_TIMEOUT_S`; a body of unknown length,
    over the cap or too slow means the answer closes the connection.

    Refusing a POST before reading its body leaves the body in the connection, and
    a client that sends its next request on it may see the socket close under it
    (measured: 11 of 4,000 requests)."""
    if length == 0:
        return True
    if length is None or (cap is not None and length > cap):
        return False
    with trio.move_on_after(DRAIN_TIMEOUT_S):
        return await consume()
    return False


def asgi_consumer(receive: Receive, cap: int) -> Callable[[], Awaitable[bool]]:
    """:func:`settle`'s ``consume`` for an ASGI request body."""

    async def consume() -> bool:
        read = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            read += len(message.get("body", b""))
            if read > cap:
                return False
            if not message.get("more_body", False):
                return True

    return consume


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def error_body(exc: TelemetryError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message}}


def error_json(exc: TelemetryError) -> bytes:
    return json_bytes(error_body(exc))


def retry_after_value(seconds: float) -> int:
    """Retry-After in whole seconds, at least 1."""
    return max(1, int(round(seconds)))


def error_headers(exc: TelemetryError) -> RawHeaders:
    if exc.retry_after is None:
        return []
    return [(b"retry-after", str(retry_after_value(exc.retry_after)).encode())]


async def send_json(send: Send, status: int, body: bytes | None, request_id: str, *,
                    extra: RawHeaders | None = None, kind: str = "http") -> None:
    """One complete JSON response (``body`` None: an empty one); ``kind``
    ``websocket.http`` refuses a WebSocket handshake with it."""
    headers = [(b"content-length", str(len(body or b"")).encode()),
               (REQUEST_ID, request_id.encode())]
    if body is not None:
        headers.insert(0, (b"content-type", b"application/json"))
    headers += extra or []
    await send({"type": f"{kind}.response.start", "status": status, "headers": headers})
    await send({"type": f"{kind}.response.body", "body": body or b""})


async def send_error(send: Send, exc: TelemetryError, request_id: str, *,
                     close: bool = False, allow: bytes | None = None,
                     kind: str = "http",
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """The JSON error answering ``exc``, its status from :func:`http_status`;
    ``headers``: more response headers."""
    extra = error_headers(exc) + (headers or [])
    if allow is not None:
        extra.append((b"allow", allow))
    if close:
        extra.append((b"connection", b"close"))
    await send_json(send, http_status(exc), error_json(exc), request_id, extra=extra,
                    kind=kind)


def observe(metrics: Metrics, log: logging.Logger, *, method: str, endpoint: str,
            status: int, seconds: float, code: str | None, client: str | None,
            quiet: bool, batch: str | None = None, outcome: str = "accepted") -> None:
    """Count one answered request and log its ``request`` line. ``batch``: the kind
    (``pose``/``media``) of an authenticated ingest batch, counted with ``outcome``
    when it was taken and as rejected with ``code`` otherwise."""
    metrics.count_request(method, endpoint, status, seconds)
    if batch is not None:
        if status < 400:
            metrics.count_batch(batch, outcome)
        else:
            metrics.count_batch(batch, "rejected",
                                code or FRAMEWORK_CODES.get(status, "http_error"))
    logs.log_request(log, logs.request_level(status, quiet=quiet), method=method,
                     endpoint=endpoint, status=status, seconds=seconds, code=code,
                     client=client)
