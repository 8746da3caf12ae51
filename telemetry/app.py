"""The HTTP API (quart-trio): ingest, session end, admin and health endpoints.

Handlers authenticate, validate and hand work to the :class:`Supervisor`; they
never touch storage clients directly. Every refusal is an error of the tree
(:mod:`domain.errors`) answered with a JSON body (see :mod:`telemetry.errors`).

Around every request (``before_request`` / ``after_request`` / ``teardown_request``):
a request id (a safe incoming ``X-Request-Id`` or a fresh one) is put on every log
line of the request and returned in the ``X-Request-Id`` response header; the
answer is counted in the Prometheus metrics (:mod:`telemetry.metrics`, served at
``GET /metrics``) and logged as one ``request`` line whose level follows the
status (see ``docs/operations.md``), by the same primitives the raw-ASGI pose
routes use (:mod:`telemetry.http.pipeline`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from quart import Response, g, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from domain.claims import SessionClaims, is_safe_id
from domain.errors import (
    AmbiguousSession,
    AuthError,
    ConsentRequired,
    InvalidSessionId,
    SessionNotLive,
    TelemetryError,
    UnsupportedMediaType,
)
from domain.media_batch import decode_media_batch
from domain.privacy import truncate_ip
from storage.outbox import Outbox
from telemetry import errors, logs
from telemetry.auth import bearer_token
from telemetry.http.answers import FRAMEWORK_CODES
from telemetry.http.pipeline import check_body_head, observe
from telemetry.http.state import AppState
from telemetry.ingest import storage_boundary
from telemetry.lean import LeanApp
from telemetry.metrics import UNMATCHED, StateCollector, StateSources, method_label

if TYPE_CHECKING:
    from storage.spool import Spool

__all__ = ["AppState", "create_app"]

log = logging.getLogger("telemetry.http")

# Route template -> the ``endpoint`` label of the batch metrics.
BATCH_ENDPOINTS = {"/v1/pose/frames": "pose", "/v1/media/events": "media"}
# Routine successes are logged at debug; every other success at info.
_QUIET_ENDPOINTS = frozenset({*BATCH_ENDPOINTS, "/v1/healthz", "/v1/readyz", "/metrics"})


class TelemetryApp(QuartTrio):
    """QuartTrio that records an error's code for the request's metrics and log
    line, and logs unhandled exceptions without the raw path (it holds ids)."""

    async def handle_user_exception(self, error: Exception) -> Any:
        if isinstance(error, TelemetryError):
            g.error_code = error.code
        elif isinstance(error, HTTPException):
            g.error_code = FRAMEWORK_CODES.get(error.code or 500, "http_error")
        return await super().handle_user_exception(error)

    def log_exception(self, exc_info: Any) -> None:
        g.error_code = "internal_error"
        log.error("unhandled exception", exc_info=exc_info,
                  extra={"method": method_label(request.method), "endpoint": _endpoint()})


def create_app(state: AppState) -> LeanApp:
    """The API for ``state`` as one ASGI app: the pose transports served lean
    (:mod:`telemetry.lean`), the rest by Quart (``.quart``). Call once per state (it
    registers ``state.metrics``'s scrape-time collector)."""
    app = TelemetryApp(__name__)
    lean = LeanApp(app, state)
    ingest = lean.ingest
    app.config["MAX_CONTENT_LENGTH"] = state.settings.max_body_bytes
    app.config["BODY_TIMEOUT"] = state.settings.body_timeout_s
    errors.register(app)
    s = state.settings
    m = state.metrics
    collector = StateCollector(StateSources(
        supervisor=lambda: state.supervisor,
        spool=lambda: _spool(state),
        outbox=lambda: _outbox(state),
        ready=lambda: state.ready and state.supervisor.accepting,
        spool_max_bytes=s.spool_max_bytes,
    ))
    m.registry.register(collector)
    finalising: set[tuple[str, str]] = set()

    @app.before_request
    async def begin_request() -> None:
        logs.begin_request(request.headers.get(logs.REQUEST_ID_HEADER))
        g.t0 = time.perf_counter()

    @app.after_request
    async def finish_request(response: Response) -> Response:
        observe_response(response)
        ctx = logs.current_request()
        if ctx is not None:
            response.headers[logs.REQUEST_ID_HEADER] = ctx.request_id
        return response

    @app.teardown_request
    async def end_request(exc: BaseException | None) -> None:
        logs.end_request()

    def observe_response(response: Response) -> None:
        """Count and log one answer (runs for handled errors and 500s alike)."""
        endpoint = _endpoint()
        kind = BATCH_ENDPOINTS.get(endpoint) if g.get("authenticated") else None
        observe(m, log, method=method_label(request.method), endpoint=endpoint,
                status=response.status_code,
                seconds=time.perf_counter() - g.get("t0", time.perf_counter()),
                code=g.get("error_code"), client=request.remote_addr,
                quiet=endpoint in _QUIET_ENDPOINTS, batch=kind,
                outcome=g.get("batch_outcome", "accepted"))

    def session_claims() -> SessionClaims:
        claims = ingest.claims(lambda: bearer_token(request.headers), request.remote_addr)
        g.authenticated = True
        return claims

    def admin() -> None:
        try:
            state.verifier.verify_service(bearer_token(request.headers))
        except AuthError as exc:
            m.auth_failures.labels("service", exc.reason).inc()
            log.info("auth failed", extra={"reason": exc.reason, "kind": "service",
                                           "client": truncate_ip(request.remote_addr)})
            # A valid session token here is a wrong kind of credential, not a bad one.
            if exc.reason == "wrong_audience" and _is_session_token(state, request.headers):
                raise AuthError(exc.reason, exc.detail, 403) from None
            raise

    async def timed_end(key: tuple[str, str], reason: str,
                        end: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """``end()`` (the supervisor's end of session ``key``), timing the first call
        that finalises a session (a repeated or concurrent end call only waits for,
        or returns, that summary).

        Answers 503 + Retry-After while the summary is not stored (the supervisor
        bounds the wait; finalisation carries on), never a 200 for an unstored blob."""
        first = key not in finalising and state.supervisor.ended_summary(*key) is None
        if first:
            finalising.add(key)
        t0 = time.perf_counter()
        try:
            # The blob store is asked whether an unknown session ended before a
            # restart; if it cannot answer, the client retries (503), not a 500.
            # Storage failing during finalisation is a 503 too (NotFinalised).
            with storage_boundary():
                summary = await end()
        finally:
            if first:
                finalising.discard(key)
        if first:
            m.finalise_seconds.labels(reason).observe(time.perf_counter() - t0)
            blob = summary.get("blob")
            if isinstance(blob, dict) and isinstance(blob.get("size"), int):
                m.blob_bytes.observe(blob["size"])
        return summary

    async def read_body() -> bytes:
        check_body_head(request.headers.get("Content-Encoding"), request.content_length,
                        s.max_body_bytes)
        # Quart enforces the cap (MAX_CONTENT_LENGTH) and the timeout (BODY_TIMEOUT).
        body = await request.get_data(cache=False)
        errors.mark_body_read()
        return body

    @app.post("/v1/media/events")
    async def media_events() -> tuple[Response, int]:
        claims = session_claims()
        if not claims.analytics_consent:
            raise ConsentRequired("media events need the patient's analytics consent")
        ctype = (request.mimetype or "").lower()
        if ctype != "application/json":
            raise UnsupportedMediaType(
                f"Content-Type must be application/json, got {ctype or 'none'!r}")
        body = await read_body()
        batch = decode_media_batch(body, max_events=s.max_events_per_batch,
                                   max_bytes=s.max_body_bytes)
        with storage_boundary():
            applied, not_applied = await state.supervisor.submit_media(claims, batch, body)
        m.media_events.labels("applied").inc(applied)
        m.media_events.labels("not_applied").inc(not_applied)
        m.count_media_received(len(body))
        return jsonify({"view_id": batch.view_id, "applied": applied,
                        "duplicates": not_applied}), 202

    @app.post("/v1/sessions/<session_id>/end")
    async def end_session(session_id: str) -> Response:
        claims = session_claims()
        if session_id != claims.session_id:
            # The locked design answers a token used outside its scope with 401.
            raise AuthError("scope_mismatch", "token is not valid for this session")
        summary = await timed_end(
            (claims.org_id, claims.session_id), "client_end",
            lambda: state.supervisor.end(claims, reason="client_end"))
        return jsonify(summary)

    @app.get("/v1/healthz")
    async def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/v1/readyz")
    async def readyz() -> tuple[Response, int]:
        ok = state.ready and state.supervisor.accepting
        return jsonify({"ready": ok}), 200 if ok else 503

    @app.get("/metrics")
    async def metrics() -> Response:
        # No auth: the load balancer does not route /metrics (docs/operations.md).
        await collector.prepare()
        body, content_type = m.render(request.headers.get("Accept"))
        return Response(body, status=200, content_type=content_type)

    @app.get("/v1/admin/sessions")
    async def admin_sessions() -> Response:
        admin()
        live = [a.snapshot() for a in state.supervisor.live()]
        fleet = state.supervisor.fleet
        if fleet is None:
            return jsonify({"sessions": live, "count": len(live), "scope": "instance"})
        # Fleet mode: this instance's sessions with their figures, and every
        # instance's sessions (ids and owners) from the ownership records.
        with storage_boundary():
            everywhere = await fleet.listing()
        return jsonify({"sessions": live, "count": len(live), "scope": "instance",
                        "fleet": everywhere})

    def one(session_id: str) -> Any:
        if not is_safe_id(session_id):
            raise InvalidSessionId
        org = request.args.get("org_id")
        found = state.supervisor.find(session_id, org)
        if not found:
            raise SessionNotLive(f"no live session {session_id!r}")
        if len(found) > 1:
            raise AmbiguousSession("session id is live in several organisations; pass ?org_id=")
        logs.set_session(found[0].log_id)
        return found[0]

    async def one_anywhere(session_id: str) -> Any:
        """:func:`one`; in fleet mode a session live on another instance is taken
        over here first (the end call works on whichever instance it reaches)."""
        fleet = state.supervisor.fleet
        if fleet is None or not is_safe_id(session_id) or state.supervisor.find(
                session_id, request.args.get("org_id")):
            return one(session_id)
        with storage_boundary():
            keys = await fleet.find(session_id, request.args.get("org_id"))
            if len(keys) > 1:
                raise AmbiguousSession("session id is live in several organisations; "
                                       "pass ?org_id=")
            if keys:
                await fleet.acquire(keys[0])
        return one(session_id)

    @app.get("/v1/admin/sessions/<session_id>")
    async def admin_session(session_id: str) -> Response:
        admin()
        return jsonify(one(session_id).snapshot())

    @app.post("/v1/admin/sessions/<session_id>/end")
    async def admin_end(session_id: str) -> Response:
        admin()
        if is_safe_id(session_id) and not state.supervisor.find(
                session_id, request.args.get("org_id")):
            # Asked again after a 503: the session is no longer live but held as
            # ended (possibly still being finished); answer as the session's end does.
            ended = state.supervisor.find_ended(session_id, request.args.get("org_id"))
            if len(ended) == 1:
                key = ended[0]
                logs.set_session(state.pseudonyms.session(*key))
                try:
                    return jsonify(await timed_end(
                        key, "admin", lambda: state.supervisor.end_ended(key)))
                except KeyError:
                    pass  # expired meanwhile: not live, as below
        actor = await one_anywhere(session_id)
        summary = await timed_end((actor.org_id, actor.session_id), "admin",
                                  lambda: state.supervisor.end(actor.claims, reason="admin"))
        return jsonify(summary)

    return lean


def _endpoint() -> str:
    """The request's route template (``/v1/sessions/<session_id>/end``): never the
    raw path, which holds ids."""
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED


def _spool(state: AppState) -> Spool | None:
    if state.storage is not None:
        return state.storage.spool
    return getattr(state.supervisor, "_journal", None)


def _outbox(state: AppState) -> Outbox | None:
    bus = state.storage.bus if state.storage is not None else getattr(
        state.supervisor, "_bus", None)
    return bus if isinstance(bus, Outbox) else None


def _is_session_token(state: AppState, headers: Any) -> bool:
    try:
        state.verifier.verify_session(bearer_token(headers))
    except AuthError:
        return False
    return True
