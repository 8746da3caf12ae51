"""The hot endpoints as raw ASGI, in front of the Quart app.

Every pose batch costs a request; through Quart that request costs more CPU than
the rest of the ingest path together (routing, request and response objects, the
before/after hooks, a receive task per request: measured in ``docs/performance.md``).
So the two pose transports are served here directly on the ASGI interface, and
everything else goes on to Quart:

* ``POST /v1/pose/frames`` (:func:`LeanApp._pose_post`): the same answers as every
  other endpoint — JSON errors with stable codes, Retry-After, the body cap checked
  before reading, the request id, metrics and the request log line — written by
  hand against the ASGI messages;
* ``/v1/pose/stream`` (WebSocket, :mod:`telemetry.stream`).

The CORS and connection-close wrappers (:mod:`telemetry.cors`,
:mod:`telemetry.connection_close`) sit outside this one, so they apply to both.

Cancellation: a handler cancelled while the supervisor makes a batch durable sends
no answer; the client retries, and the sequencer makes the retry a duplicate.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import trio

from actors.sequencer import Verdict
from domain.pose_batch import CONTENT_TYPE
from telemetry import logs
from telemetry.asgi import HeaderMap, Receive, Scope, Send, client_of, headers_of
from telemetry.auth import bearer_token
from telemetry.errors import ApiError
from telemetry.ingest import PoseIngest, refusal
from telemetry.metrics import method_label

POSE_PATH = "/v1/pose/frames"
STREAM_PATH = "/v1/pose/stream"
# The operations served here, as the OpenAPI document names them.
ROUTES = frozenset({f"POST {POSE_PATH}", f"GET {STREAM_PATH}"})
# A refused body within the cap is read and dropped so the connection stays usable
# (see telemetry.errors._settle_body); reading it may take this long at most.
DRAIN_TIMEOUT_S = 5.0

log = logging.getLogger("telemetry.http")


class LeanApp:
    """The app the server runs: pose ingest here, everything else to ``quart``.

    ``quart`` is the Quart app (its ``url_map`` lists the other routes);
    :data:`ROUTES` lists these."""

    def __init__(self, quart: Any, state: Any) -> None:
        from telemetry.stream import PoseStream  # the stream module imports this one

        self.quart = quart
        self.state = state
        self.ingest = PoseIngest(state)
        self.stream = state.streams = PoseStream(state, self.ingest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        path = scope.get("path")
        if path == POSE_PATH and kind == "http":
            await self._pose_post(scope, receive, send)
        elif path == STREAM_PATH and kind in ("http", "websocket"):
            await self.stream(scope, receive, send)
        else:
            await self.quart(scope, receive, send)

    async def _pose_post(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one POST. The answer is counted and logged before it is sent, as the
        Quart routes do, so a client that has its answer sees it in ``/metrics``."""
        t0 = time.perf_counter()
        headers = headers_of(scope)
        ctx = logs.begin_request(headers.get(logs.REQUEST_ID_HEADER.lower()))
        method = scope.get("method", "")
        answer = _Answer()
        try:
            try:
                await self._decide(scope, headers, receive, method, answer)
            except ApiError as exc:
                answer.error = exc
                if isinstance(exc, _BodyLeftUnread):
                    answer.close = True
                elif not answer.body_read and method == "POST":
                    answer.close = not await _drain(headers, receive,
                                                    self.state.settings.max_body_bytes)
            except _Disconnected:
                answer.status, answer.code = 499, "client_disconnected"
        except Exception:
            log.exception("unhandled exception",
                          extra={"method": method_label(method), "endpoint": POSE_PATH})
            answer.error = ApiError(500, "internal_error", "internal server error")
            answer.close = True
        try:
            self._observe(scope, method, answer, t0)
            if answer.status == 499:
                return
            if answer.error is not None:
                exc = answer.error
                await send_error(send, exc, ctx.request_id, close=answer.close,
                                 allow=b"OPTIONS, POST" if exc.status == 405 else None)
            else:
                await send_json(send, answer.status, answer.body, ctx.request_id,
                                extra=answer.headers)
        finally:
            logs.end_request()

    async def _decide(self, scope: Scope, headers: dict[str, str], receive: Receive,
                      method: str, answer: _Answer) -> None:
        """Fill in ``answer``, or raise the :class:`ApiError` that is the answer."""
        if method == "OPTIONS":
            answer.status, answer.headers = 200, [(b"allow", b"OPTIONS, POST")]
            return
        if method != "POST":
            raise ApiError(405, "method_not_allowed",
                           "The method is not allowed for the requested URL.")
        claims = self.ingest.claims(lambda: bearer_token(HeaderMap(headers)),
                                    client_of(scope))
        answer.authenticated = True
        self.ingest.require_consent(claims)
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != CONTENT_TYPE:
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type must be {CONTENT_TYPE}, got {ctype or 'none'!r}")
        body = await self._read_body(headers, receive)
        answer.body_read = True
        batch = self.ingest.decode(body)
        offer = await self.ingest.submit(claims, batch, body)
        if not offer.accepted:
            raise refusal(offer)
        answer.duplicate = offer.verdict is Verdict.DUPLICATE
        answer.status = 202
        answer.body = {"duplicate": answer.duplicate, "seq": batch.seq}

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        encoding = (headers.get("content-encoding") or "identity").strip().lower()
        if encoding != "identity":
            # Compressed bodies are not accepted: nothing to decompress, nothing to bomb.
            raise ApiError(415, "unsupported_content_encoding",
                           f"Content-Encoding {encoding!r} is not accepted; send identity")
        cap = self.state.settings.max_body_bytes
        length = _content_length(headers)
        if length is not None and length > cap:
            raise ApiError(413, "body_too_large",
                           f"body of {length} bytes exceeds the cap of {cap}")
        chunks: list[bytes] = []
        size = 0
        timeout = self.state.settings.body_timeout_s
        # hypercorn times out headers, not bodies: a body trickled a byte at a time
        # would hold the request (and its session's slot) for ever.
        with trio.move_on_after(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > cap:
                    # A body with no (or a false) length that runs past the cap: what
                    # is left of it stays in the connection, so the answer closes it.
                    raise _BodyLeftUnread(413, "body_too_large",
                                          f"body exceeds the cap of {cap} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        raise _BodyLeftUnread(408, "body_timeout",
                              f"the request body did not arrive within {timeout:g} s")

    def _observe(self, scope: Scope, method: str, answer: _Answer, t0: float) -> None:
        """Count and log one answer, as the Quart app does for its routes."""
        m = self.state.metrics
        status = answer.error.status if answer.error is not None else answer.status
        code = answer.error.code if answer.error is not None else answer.code
        elapsed = time.perf_counter() - t0
        m.count_request(method_label(method), POSE_PATH, status, elapsed)
        if answer.authenticated:
            if status < 400:
                m.count_batch("pose", "duplicate" if answer.duplicate else "accepted")
            else:
                m.count_batch("pose", "rejected", code)
        logs.log_request(log, logs.request_level(status, quiet=True),
                         method=method_label(method), endpoint=POSE_PATH, status=status,
                         seconds=elapsed, code=code, client=client_of(scope))


@dataclass
class _Answer:
    """What one POST is answered, decided before anything is sent."""

    status: int = 500
    body: Any = None
    headers: list[tuple[bytes, bytes]] | None = None
    error: ApiError | None = None
    code: str | None = None
    close: bool = False
    authenticated: bool = False
    duplicate: bool = False
    body_read: bool = False


class _Disconnected(Exception):
    """The client went away before its body was read: nothing to answer."""


class _BodyLeftUnread(ApiError):
    """An answer decided while the body was being read: 413 (it ran past the cap)
    or 408 (too slow). The rest of the body is unread, so the answer closes."""


def _content_length(headers: dict[str, str]) -> int | None:
    raw = headers.get("content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


async def _drain(headers: dict[str, str], receive: Receive, cap: int) -> bool:
    """Read and drop what is left of a refused request's body; False if the answer
    must close the connection instead (no length, over the cap, too slow, gone)."""
    length = _content_length(headers)
    if length == 0:
        return True
    if length is None or length > cap:
        return False
    read = 0
    with trio.move_on_after(DRAIN_TIMEOUT_S):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            read += len(message.get("body", b""))
            if read > cap:
                return False
            if not message.get("more_body", False):
                return True
    return False


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


async def send_json(send: Send, status: int, obj: Any, request_id: str, *,
                    extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """One complete JSON response (``obj`` None: an empty body)."""
    body = b"" if obj is None else _json(obj) + b"\n"
    headers = [(b"content-length", str(len(body)).encode()),
               (logs.REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
    if obj is not None:
        headers.insert(0, (b"content-type", b"application/json"))
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_body(exc: ApiError) -> dict[str, Any]:
    """The JSON error shape of :mod:`telemetry.errors`."""
    return {"error": {"code": exc.code, "message": exc.message, **exc.extra}}


async def send_error(send: Send, exc: ApiError, request_id: str, *, close: bool = False,
                     allow: bytes | None = None) -> None:
    extra: list[tuple[bytes, bytes]] = []
    if exc.retry_after is not None:
        extra.append((b"retry-after", str(max(1, int(round(exc.retry_after)))).encode()))
    if allow is not None:
        extra.append((b"allow", allow))
    if close or isinstance(exc, _BodyLeftUnread):
        extra.append((b"connection", b"close"))
    await send_json(send, exc.status, error_body(exc), request_id, extra=extra)
