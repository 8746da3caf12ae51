"""The hot endpoints as raw ASGI, in front of the Quart app.

Every pose batch costs a request; through Quart that request costs more CPU than
the rest of the ingest path together (routing, request and response objects, the
before/after hooks, a receive task per request: measured in ``docs/performance.md``).
So the two pose transports are served here directly on the ASGI interface, and
everything else goes on to Quart:

* ``POST /v1/pose/frames`` (:func:`LeanApp._pose_post`): the same answers as every
  other endpoint — JSON errors with stable codes, Retry-After, the body cap checked
  before reading, the request id, metrics and the request log line — through the
  primitives the Quart routes use (:mod:`telemetry.http.pipeline`);
* ``/v1/pose/stream`` (WebSocket, :mod:`telemetry.stream`).

The CORS and connection-close wrappers (:mod:`telemetry.cors`,
:mod:`telemetry.connection_close`) sit outside this one, so they apply to both.

Cancellation: a handler cancelled while the supervisor makes a batch durable sends
no answer; the client retries, and the sequencer makes the retry a duplicate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from actors.sequencer import Verdict
from domain.errors import InternalError, MethodNotAllowed, TelemetryError, UnsupportedMediaType
from domain.pose_batch import CONTENT_TYPE
from telemetry import logs
from telemetry.asgi import Receive, Scope, Send, client_of
from telemetry.auth import bearer_token
from telemetry.http.answers import http_status
from telemetry.http.pipeline import (
    BodyCutOff,
    Disconnected,
    Headers,
    RawHeaders,
    asgi_consumer,
    check_body_head,
    content_length,
    observe,
    read_body,
    send_error,
    send_json,
    settle,
)
from telemetry.http.state import AppState
from telemetry.ingest import PoseIngest
from telemetry.metrics import method_label
from telemetry.stream import STREAM_PATH, PoseStream

POSE_PATH = "/v1/pose/frames"
# The operations served here, as the OpenAPI document names them.
ROUTES = frozenset({f"POST {POSE_PATH}", f"GET {STREAM_PATH}"})

log = logging.getLogger("telemetry.http")


class LeanApp:
    """The app the server runs: pose ingest here, everything else to ``quart``.

    ``quart`` is the Quart app (its ``url_map`` lists the other routes);
    :data:`ROUTES` lists these."""

    def __init__(self, quart: Any, state: AppState) -> None:
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
        elif kind == "websocket":
            await self.stream.refuse_elsewhere(scope, send)
        else:
            await self.quart(scope, receive, send)

    async def _pose_post(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one POST. The answer is counted and logged before it is sent, as the
        Quart routes do, so a client that has its answer sees it in ``/metrics``."""
        t0 = time.perf_counter()
        headers = Headers.of(scope)
        ctx = logs.begin_request(headers.get("x-request-id"))
        method = scope.get("method", "")
        answer = _Answer()
        try:
            try:
                await self._decide(scope, headers, receive, method, answer)
            except TelemetryError as exc:
                answer.error = exc
                if not answer.body_read and method == "POST":
                    cap = self.state.settings.max_body_bytes
                    answer.close = not await settle(content_length(headers), cap,
                                                    asgi_consumer(receive, cap))
            except BodyCutOff as cut:
                answer.error, answer.close = cut.error, True
            except Disconnected:
                answer.status, answer.code = 499, "client_disconnected"
        except Exception:
            log.exception("unhandled exception",
                          extra={"method": method_label(method), "endpoint": POSE_PATH})
            answer.error, answer.close = InternalError(), True
        try:
            self._observe(scope, method, answer, t0)
            if answer.status == 499:
                return
            if answer.error is not None:
                exc = answer.error
                await send_error(send, exc, ctx.request_id, close=answer.close,
                                 allow=b"OPTIONS, POST" if isinstance(exc, MethodNotAllowed)
                                 else None)
            else:
                await send_json(send, answer.status, answer.body, ctx.request_id,
                                extra=answer.headers)
        finally:
            logs.end_request()

    async def _decide(self, scope: Scope, headers: Headers, receive: Receive,
                      method: str, answer: _Answer) -> None:
        """Fill in ``answer``, or raise the error of the tree that is the answer."""
        if method == "OPTIONS":
            answer.status, answer.headers = 200, [(b"allow", b"OPTIONS, POST")]
            return
        if method != "POST":
            raise MethodNotAllowed
        claims = self.ingest.claims(lambda: bearer_token(headers), client_of(scope))
        answer.authenticated = True
        self.ingest.require_consent(claims)
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != CONTENT_TYPE:
            raise UnsupportedMediaType(
                f"Content-Type must be {CONTENT_TYPE}, got {ctype or 'none'!r}")
        s = self.state.settings
        check_body_head(headers.get("content-encoding"), content_length(headers),
                        s.max_body_bytes)
        body = await read_body(receive, s.max_body_bytes, s.body_timeout_s)
        answer.body_read = True
        batch = self.ingest.decode(body)
        offer = await self.ingest.submit(claims, batch, body)
        if offer.refusal is not None:
            raise offer.refusal
        answer.duplicate = offer.verdict is Verdict.DUPLICATE
        answer.status = 202
        answer.body = _accepted_body(batch.seq, answer.duplicate)

    def _observe(self, scope: Scope, method: str, answer: _Answer, t0: float) -> None:
        """Count and log one answer, as the Quart app does for its routes."""
        error = answer.error
        observe(self.state.metrics, log, method=method_label(method), endpoint=POSE_PATH,
                status=http_status(error) if error is not None else answer.status,
                seconds=time.perf_counter() - t0,
                code=error.code if error is not None else answer.code,
                client=client_of(scope), quiet=True,
                batch="pose" if answer.authenticated else None,
                outcome="duplicate" if answer.duplicate else "accepted")


@dataclass
class _Answer:
    """What one POST is answered, decided before anything is sent."""

    status: int = 500
    body: bytes | None = None
    headers: RawHeaders | None = None
    error: TelemetryError | None = None
    code: str | None = None
    close: bool = False
    authenticated: bool = False
    duplicate: bool = False
    body_read: bool = False


def _accepted_body(seq: int, duplicate: bool) -> bytes:
    """The 202's body, byte for byte what ``json_bytes({"duplicate": ..., "seq": ...})``
    makes, without the JSON encoder (it runs for every batch)."""
    return b'{"duplicate":%s,"seq":%d}\n' % (b"true" if duplicate else b"false", seq)
