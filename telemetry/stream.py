"""The streaming transport: one WebSocket per session carrying pose batches.

``GET /v1/pose/stream`` upgrades to a WebSocket (protocol in
``docs/pose-stream.md``). Each binary message is one pose batch, byte for byte the
body ``POST /v1/pose/frames`` takes; each is decoded, validated and made durable
on the same path (:class:`telemetry.ingest.PoseIngest`), and answered in order by
one text message: ``{"seq":N,"status":202,"duplicate":false}`` once the batch is
on disk, or ``{"seq":N,"status":S,"error":{...}}`` with the status and code the POST
path would have answered.

Flow control instead of 503: a batch the session cannot take *yet* (its rate limit,
a full mailbox, a full spool) is held and retried, for up to
:data:`FLOW_WAIT_MAX_S`, while the socket is not read; the client sees its acks
slow down and TCP pushes back. Only past that wait is it refused like a POST.
Which refusals are waited out, and which close the stream after their nack, is
one table (:data:`telemetry.http.answers.STREAM`).

The socket closes (codes in :data:`CLOSE_CODES`) when the client closes it, when
the session ends (4409), when the token expires (4401: reconnect with a fresh one),
after :attr:`Settings.idle_timeout_s` without a message (4408), and at shutdown
(1012, after the batch in hand is answered: reconnect elsewhere and resend what was
not acknowledged). Nothing acknowledged is lost in any of these.

Cancellation: a connection cancelled while a batch is being made durable sends no
ack for it; the client resends it on its next connection and the sequencer makes
that a duplicate.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from actors.sequencer import Verdict
from domain.claims import SessionClaims
from domain.errors import (
    AuthError,
    MethodNotAllowed,
    NotFound,
    OriginNotAllowed,
    ShuttingDown,
    TelemetryError,
    UpgradeRequired,
)
from domain.pose_batch import HEADER
from telemetry import logs
from telemetry.asgi import Receive, Scope, Send, client_of
from telemetry.auth import bearer_token
from telemetry.cors import CorsConfigError, normalise_origin
from telemetry.http.answers import (
    CLOSE_CODES,
    CLOSE_ENDED,
    CLOSE_IDLE,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_RESTART,
    CLOSE_TOKEN,
    CLOSE_TRY_LATER,
    CLOSE_UNSUPPORTED,
    FLOW_WAIT_MAX_S,
    http_status,
    stream_answer,
    stream_pause,
)
from telemetry.http.pipeline import (
    Headers,
    error_body,
    observe,
    retry_after_value,
    send_error,
)
from telemetry.ingest import PoseIngest
from telemetry.metrics import UNMATCHED

if TYPE_CHECKING:
    from telemetry.http.state import AppState

__all__ = ["CLOSE_CODES", "CLOSE_ENDED", "CLOSE_IDLE", "CLOSE_NORMAL", "CLOSE_RESTART",
           "CLOSE_TOKEN", "CLOSE_TRY_LATER", "CLOSE_UNSUPPORTED", "FLOW_WAIT_MAX_S",
           "STREAM_PATH", "SUBPROTOCOL", "PoseStream"]

log = logging.getLogger("telemetry.stream")

STREAM_PATH = "/v1/pose/stream"
SUBPROTOCOL = "restartix.pose.v1"
# Browsers cannot set headers on a WebSocket: they offer the token as a second
# subprotocol, "bearer.<token>" (JWT characters are all valid in a subprotocol).
BEARER_PREFIX = "bearer."


@dataclass(eq=False)
class _Conn:
    """One open stream: what shutdown needs to stop it between batches."""

    claims: SessionClaims
    token: str
    generation: int  # the keyset generation the token was last verified under
    stop: bool = False
    waiting: trio.CancelScope | None = None
    acked: int = 0
    refused: int = 0
    opened: float = field(default_factory=time.monotonic)


class PoseStream:
    """The ``/v1/pose/stream`` endpoint of one app (an ASGI callable)."""

    def __init__(self, state: AppState, ingest: PoseIngest) -> None:
        self._state = state
        self._ingest = ingest
        self._open: set[_Conn] = set()
        self._stopping = False
        # Browsers send Origin on a WebSocket handshake but no CORS applies to it: the
        # origins the POST path allows (if any are configured) are checked here.
        self._origins = frozenset(normalise_origin(o) for o in state.settings.cors_origins)
        self._ack_seconds = state.metrics.stream_ack_seconds

    def close_all(self) -> None:
        """Shutdown: refuse new streams, and close every open one once the batch it
        is handling (if any) has been answered. Returns at once."""
        self._stopping = True
        for conn in self._open:
            conn.stop = True
            if conn.waiting is not None:
                conn.waiting.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._not_upgraded(scope, send)
            return
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        headers = Headers.of(scope)
        ctx = logs.begin_request(headers.get("x-request-id"))
        try:
            subprotocols = list(scope.get("subprotocols") or ())
            try:
                claims, token = self._handshake(scope, headers, subprotocols)
            except TelemetryError as exc:
                self._count_handshake(http_status(exc))
                await _deny(scope, send, exc, ctx.request_id)
                return
            self._count_handshake(101)
            await self._serve(claims, token, receive, send, {
                "type": "websocket.accept",
                "subprotocol": SUBPROTOCOL if SUBPROTOCOL in subprotocols else None,
                "headers": [(b"x-request-id", ctx.request_id.encode())]})
        finally:
            logs.end_request()

    def _handshake(self, scope: Scope, headers: Headers,
                   subprotocols: list[str]) -> tuple[SessionClaims, str]:
        """The verified claims and the token they came from."""
        state = self._state
        if self._stopping or not state.ready or not state.supervisor.accepting:
            raise ShuttingDown("the service is shutting down; reconnect", retry_after=1)
        origin = headers.get("origin")
        if self._origins and origin is not None and not self._origin_allowed(origin):
            raise OriginNotAllowed("this origin may not open a pose stream")

        def token() -> str:
            """The token from the Authorization header if there is one, else from the
            one bearer subprotocol: taken as it is (the verifier checks its size)."""
            offered = [p for p in subprotocols if p.startswith(BEARER_PREFIX)]
            if "authorization" in headers or not offered:
                return bearer_token(headers)
            if len(offered) > 1:
                raise AuthError("malformed_token", "more than one bearer subprotocol")
            token = offered[0][len(BEARER_PREFIX):]
            if not token:
                raise AuthError("malformed_token", "the bearer subprotocol holds no token")
            return token

        taken = ""

        def kept() -> str:  # the stream keeps it, to verify it again after a key reload
            nonlocal taken
            taken = token()
            return taken

        claims = self._ingest.claims(kept, client_of(scope))
        self._ingest.require_consent(claims)
        return claims, taken

    def _origin_allowed(self, origin: str) -> bool:
        try:
            return normalise_origin(origin) in self._origins
        except CorsConfigError:
            return False

    async def _serve(self, claims: SessionClaims, token: str, receive: Receive, send: Send,
                     accept: dict[str, Any]) -> None:
        conn = _Conn(claims, token, self._state.verifier.keystore.generation)
        self._open.add(conn)
        self._state.metrics.streams_open.inc()
        code = CLOSE_NORMAL
        try:
            await send(accept)
            code = await self._loop(conn, receive, send)
        finally:
            self._open.discard(conn)
            m = self._state.metrics
            m.streams_open.dec()
            reason = CLOSE_CODES.get(code, "closed")
            m.streams_closed.labels(reason).inc()
            log.info("stream closed", extra={
                "close": reason, "batches": conn.acked, "refused": conn.refused,
                "duration_s": round(time.monotonic() - conn.opened, 1)})

    async def _loop(self, conn: _Conn, receive: Receive, send: Send) -> int:
        """Serve batches until the stream ends; the close code it ended with."""
        idle_s = self._state.settings.idle_timeout_s
        # The handshake accepted the token within the clock leeway; so does the stream.
        token_deadline = (trio.current_time() + conn.claims.expires_at - time.time()
                          + self._state.settings.jwt_leeway_s)
        while True:
            if conn.stop:
                return await _close(send, CLOSE_RESTART, "service restarting; reconnect")
            with trio.CancelScope(deadline=min(token_deadline,
                                               trio.current_time() + idle_s)) as waiting:
                conn.waiting = waiting
                message = await receive()
            conn.waiting = None
            if waiting.cancelled_caught:
                if conn.stop:
                    continue
                if trio.current_time() >= token_deadline:
                    return await _close(send, CLOSE_TOKEN, "token expired; reconnect with "
                                        "a fresh token")
                return await _close(send, CLOSE_IDLE, "no message within the idle timeout")
            kind = message["type"]
            if kind == "websocket.disconnect":
                return int(message.get("code", CLOSE_NORMAL))
            data = message.get("bytes")
            if data is None:
                return await _close(send, CLOSE_UNSUPPORTED,
                                    "send pose batches as binary messages")
            if self._state.verifier.keystore.generation != conn.generation \
                    and not self._still_valid(conn):
                return await _close(send, CLOSE_TOKEN, "token no longer valid; reconnect "
                                    "with a fresh token")
            code = await self._batch(conn, data, send)
            if code is not None:
                return await _close(send, code, CLOSE_CODES.get(code, "closed"))

    async def _batch(self, conn: _Conn, body: bytes, send: Send) -> int | None:
        """Answer one batch; a close code if the stream must end after it."""
        t0 = trio.current_time()
        batch = None
        try:
            batch = self._ingest.decode(body)
            waited = 0.0
            while True:
                try:
                    offer = await self._ingest.submit(conn.claims, batch, body)
                except TelemetryError as exc:
                    refusal = exc
                else:
                    if offer.refusal is None:
                        break
                    refusal = offer.refusal
                answer = stream_answer(refusal)
                if not answer.wait or waited >= FLOW_WAIT_MAX_S or conn.stop:
                    raise refusal
                pause = stream_pause(answer, refusal)
                await trio.sleep(pause)
                waited += pause
        except TelemetryError as exc:
            conn.refused += 1
            status = http_status(exc)
            self._state.metrics.count_batch("pose", "rejected", exc.code)
            level = logs.request_level(status, quiet=True)
            log.log(level, "stream batch refused", extra={"status": status,
                                                          "code": exc.code})
            seq = batch.seq if batch is not None else _peek_seq(body)
            await send({"type": "websocket.send", "text": _nack(seq, exc, status)})
            return stream_answer(exc).close
        duplicate = offer.verdict is Verdict.DUPLICATE
        conn.acked += 1
        self._state.metrics.count_batch("pose", "duplicate" if duplicate else "accepted")
        await send({"type": "websocket.send", "text": _ack(batch.seq, duplicate)})
        self._ack_seconds.observe(trio.current_time() - t0)
        return None

    def _still_valid(self, conn: _Conn) -> bool:
        """After a keyset reload: whether the stream's token still verifies (its
        signing key may have been removed, e.g. revoked after a leak). A stream is
        authenticated at its handshake; this is what makes a revocation reach it,
        at its next batch, instead of at the token's expiry."""
        verifier = self._state.verifier
        generation = verifier.keystore.generation
        try:
            verifier.verify_session(conn.token)
        except AuthError as exc:
            self._state.metrics.auth_failures.labels("session", exc.reason).inc()
            log.info("stream token no longer valid", extra={"reason": exc.reason})
            return False
        conn.generation = generation
        return True

    async def refuse_elsewhere(self, scope: Scope, send: Send) -> None:
        """A WebSocket handshake on any path but :data:`STREAM_PATH`, the service's
        only WebSocket endpoint: refused with the JSON 404 that an unknown URL gets
        over HTTP. (Handed to Quart, it failed in error handlers that need an HTTP
        request context, and hypercorn answered a bare 500.)"""
        ctx = logs.begin_request(Headers.of(scope).get("x-request-id"))
        try:
            exc = NotFound(f"no WebSocket endpoint at this path; the pose stream is "
                           f"{STREAM_PATH}")
            await _deny(scope, send, exc, ctx.request_id)
            observe(self._state.metrics, log, method="GET", endpoint=UNMATCHED,
                    status=http_status(exc), seconds=0.0, code=exc.code,
                    client=client_of(scope), quiet=False)
        finally:
            logs.end_request()

    def _count_handshake(self, status: int) -> None:
        self._state.metrics.requests.labels("GET", STREAM_PATH, str(status)).inc()

    async def _not_upgraded(self, scope: Scope, send: Send) -> None:
        """A plain HTTP request on the stream's path: a GET is answered 426, saying how
        to upgrade; any other method 405 with ``Allow`` (the handshake is a GET)."""
        ctx = logs.begin_request(Headers.of(scope).get("x-request-id"))
        try:
            get = scope.get("method") == "GET"
            exc: TelemetryError
            if get:
                exc = UpgradeRequired(f"{STREAM_PATH} is a WebSocket endpoint; connect with "
                                      "Upgrade: websocket")
            else:
                exc = MethodNotAllowed()
            # RFC 9110 15.5.22: a 426 names the protocol to upgrade to.
            await send_error(send, exc, ctx.request_id, close=True,
                             allow=None if get else b"GET",
                             headers=[(b"upgrade", b"websocket")] if get else None)
            method = "GET" if get else "other"
            status = http_status(exc)
            self._state.metrics.requests.labels(method, STREAM_PATH, str(status)).inc()
            logs.log_request(log, logs.request_level(status, quiet=False), method=method,
                             endpoint=STREAM_PATH, status=status, seconds=0.0,
                             code=exc.code, client=client_of(scope))
        finally:
            logs.end_request()


def _peek_seq(body: bytes) -> int | None:
    """The sequence number in a batch's header, if it has one (for refusals of
    batches that do not decode)."""
    if len(body) < HEADER.size:
        return None
    return int.from_bytes(body[8:12], "little")


def _ack(seq: int, duplicate: bool) -> str:
    return f'{{"seq":{seq},"status":202,"duplicate":{"true" if duplicate else "false"}}}'


def _nack(seq: int | None, exc: TelemetryError, status: int) -> str:
    """The refusal of one batch: the status and error the POST path would answer."""
    out: dict[str, Any] = {"seq": seq, "status": status, **error_body(exc)}
    if exc.retry_after is not None:
        out["retry_after"] = retry_after_value(exc.retry_after)
    return json.dumps(out, separators=(",", ":"))


async def _close(send: Send, code: int, reason: str) -> int:
    await send({"type": "websocket.close", "code": code, "reason": reason})
    return code


async def _deny(scope: Scope, send: Send, exc: TelemetryError, request_id: str) -> None:
    """Refuse the handshake with the JSON error an HTTP request would get, where the
    server supports it (hypercorn does); a bare 403 otherwise."""
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": CLOSE_POLICY})
        return
    await send_error(send, exc, request_id, kind="websocket.http")
