"""The HTTP API (quart-trio): ingest, session end, admin and health endpoints.

Handlers authenticate, validate and hand work to the :class:`Supervisor`; they
never touch storage clients directly. Every refusal is an :class:`ApiError` with
a JSON body (see :mod:`telemetry.errors`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from actors.media_correlate import MediaTrackerError
from actors.sequencer import Verdict
from actors.session import SessionEnded
from actors.supervisor import Supervisor, SupervisorClosed, TooManySessions
from storage.blobs import BlobStoreError
from storage.spool import SpoolError, SpoolFull
from telemetry import errors
from telemetry.auth import AuthError, SessionClaims, TokenVerifier, bearer_token, is_safe_id
from telemetry.config import Settings
from telemetry.errors import ApiError
from telemetry.media_wire import MediaBatchError, decode_media_batch
from telemetry.privacy import Pseudonymiser, truncate_ip
from telemetry.wire import CONTENT_TYPE, BatchError, decode_batch

log = logging.getLogger("telemetry.http")


@dataclass
class AppState:
    settings: Settings
    supervisor: Supervisor
    verifier: TokenVerifier
    pseudonyms: Pseudonymiser
    ready: bool = True
    port: int = 0
    counters: dict[str, int] = field(default_factory=dict)


def create_app(state: AppState) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = state.settings.max_body_bytes
    errors.register(app)
    s = state.settings

    def count(name: str) -> None:
        state.counters[name] = state.counters.get(name, 0) + 1

    def session_claims() -> SessionClaims:
        try:
            return state.verifier.verify_session(bearer_token(request.headers))
        except AuthError as exc:
            count(f"auth_failed:{exc.reason}")
            log.info("auth failed", extra={"reason": exc.reason,
                                           "client": truncate_ip(request.remote_addr)})
            raise ApiError(exc.status, exc.reason, exc.detail) from None

    def admin() -> None:
        try:
            state.verifier.verify_service(bearer_token(request.headers))
        except AuthError as exc:
            count(f"auth_failed:{exc.reason}")
            # A valid session token here is a wrong kind of credential, not a bad one.
            status = exc.status
            if exc.reason == "wrong_audience" and _is_session_token(state, request.headers):
                status = 403
            raise ApiError(status, exc.reason, exc.detail) from None

    async def read_body() -> bytes:
        encoding = (request.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            # Compressed bodies are not accepted: nothing to decompress, nothing to bomb.
            raise ApiError(415, "unsupported_content_encoding",
                           f"Content-Encoding {encoding!r} is not accepted; send identity")
        length = request.content_length
        if length is not None and length > s.max_body_bytes:
            raise ApiError(413, "body_too_large",
                           f"body of {length} bytes exceeds the cap of {s.max_body_bytes}")
        return await request.get_data(cache=False)

    @app.post("/v1/pose/frames")
    async def pose_frames() -> Response | tuple[Response, int]:
        claims = session_claims()
        if not claims.biometric_consent:
            raise ApiError(403, "consent_required",
                           "pose ingest needs the patient's biometric consent")
        ctype = (request.mimetype or "").lower()
        if ctype != CONTENT_TYPE:
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type must be {CONTENT_TYPE}, got {ctype or 'none'!r}")
        body = await read_body()
        try:
            batch = decode_batch(body, max_frames=s.max_frames_per_batch)
        except BatchError as exc:
            count("batch_rejected")
            raise ApiError(400, exc.code, str(exc)) from None
        with admission_errors():
            offer = await state.supervisor.submit(claims, batch, body)
        v = offer.verdict
        if offer.accepted:
            count("batch_duplicate" if v is Verdict.DUPLICATE else "batch_accepted")
            return jsonify({"seq": batch.seq, "duplicate": v is Verdict.DUPLICATE}), 202
        count(f"batch_refused:{getattr(v, 'value', v)}")
        if v == "ended":
            raise ApiError(409, "session_ended", "session has ended; no more frames accepted")
        if v is Verdict.SKIPPED:
            raise ApiError(409, "sequence_skipped", offer.message)
        if v is Verdict.AHEAD_OF_WINDOW:
            raise ApiError(503, "sequence_ahead_of_window", offer.message,
                           retry_after=offer.retry_after)
        if v == "rate_limited":
            raise ApiError(429, "rate_limited", offer.message, retry_after=offer.retry_after)
        if v == "mailbox_full":
            raise ApiError(503, "mailbox_full", offer.message, retry_after=offer.retry_after)
        if v is Verdict.OVERLAP:
            raise ApiError(400, "timestamps_overlap", offer.message)
        raise ApiError(400, str(getattr(v, "value", v)), offer.message)

    @app.post("/v1/media/events")
    async def media_events() -> tuple[Response, int]:
        claims = session_claims()
        if not claims.analytics_consent:
            raise ApiError(403, "consent_required",
                           "media events need the patient's analytics consent")
        ctype = (request.mimetype or "").lower()
        if ctype != "application/json":
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type must be application/json, got {ctype or 'none'!r}")
        body = await read_body()
        try:
            batch = decode_media_batch(body, max_events=s.max_events_per_batch,
                                       max_bytes=s.max_body_bytes)
        except MediaBatchError as exc:
            count("media_rejected")
            status = 413 if exc.code == "body_too_large" else 400
            raise ApiError(status, exc.code, str(exc)) from None
        try:
            with admission_errors():
                applied, not_applied = await state.supervisor.submit_media(claims, batch, body)
        except SessionEnded:
            raise ApiError(409, "session_ended", "session has ended; no more events accepted")\
                from None
        except MediaTrackerError as exc:
            status = 409 if exc.code == "finished" else 400
            raise ApiError(status, exc.code, str(exc)) from None
        count("media_accepted")
        return jsonify({"view_id": batch.view_id, "applied": applied,
                        "duplicates": not_applied}), 202

    @app.post("/v1/sessions/<session_id>/end")
    async def end_session(session_id: str) -> Response:
        claims = session_claims()
        if session_id != claims.session_id:
            # The locked design answers a token used outside its scope with 401.
            raise ApiError(401, "scope_mismatch", "token is not valid for this session")
        try:
            summary = await state.supervisor.end(claims)
        except SessionEnded as exc:
            raise ApiError(409, "session_ended", str(exc)) from None
        return jsonify(summary)

    @app.get("/v1/healthz")
    async def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/v1/readyz")
    async def readyz() -> tuple[Response, int]:
        ok = state.ready and state.supervisor.accepting
        return jsonify({"ready": ok}), 200 if ok else 503

    @app.get("/v1/admin/sessions")
    async def admin_sessions() -> Response:
        admin()
        live = [a.snapshot() for a in state.supervisor.live()]
        return jsonify({"sessions": live, "count": len(live)})

    def one(session_id: str) -> Any:
        if not is_safe_id(session_id):
            raise ApiError(400, "invalid_session_id", "session id has invalid characters")
        org = request.args.get("org_id")
        found = state.supervisor.find(session_id, org)
        if not found:
            raise ApiError(404, "session_not_live", f"no live session {session_id!r}")
        if len(found) > 1:
            raise ApiError(409, "ambiguous_session",
                           "session id is live in several organisations; pass ?org_id=")
        return found[0]

    @app.get("/v1/admin/sessions/<session_id>")
    async def admin_session(session_id: str) -> Response:
        admin()
        return jsonify(one(session_id).snapshot())

    @app.post("/v1/admin/sessions/<session_id>/end")
    async def admin_end(session_id: str) -> Response:
        admin()
        actor = one(session_id)
        summary = await state.supervisor.end(actor.claims, reason="admin")
        return jsonify(summary)

    return app


@contextmanager
def admission_errors() -> Iterator[None]:
    """Map the ways a session can refuse new data to their answers."""
    try:
        yield
    except SpoolFull as exc:
        raise ApiError(503, "spool_full", str(exc), retry_after=30) from None
    except (SpoolError, OSError, BlobStoreError):
        # The spool could not make it durable, or the blob store could not say whether
        # the session ended before: nothing was acknowledged, the client retries.
        log.exception("storage failed while admitting data")
        raise ApiError(503, "storage_unavailable", "could not store the data durably",
                       retry_after=5) from None
    except SupervisorClosed as exc:
        raise ApiError(503, "shutting_down", str(exc), retry_after=5) from None
    except TooManySessions as exc:
        raise ApiError(429, "too_many_sessions", str(exc), retry_after=exc.retry_after) \
            from None


def _is_session_token(state: AppState, headers: Any) -> bool:
    try:
        state.verifier.verify_session(bearer_token(headers))
    except AuthError:
        return False
    return True
