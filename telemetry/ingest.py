"""Pose ingest shared by both transports: the POST path and the WebSocket stream.

One :class:`PoseIngest` per app holds the steps every pose batch goes through,
whichever way it came: authenticate the session token, check consent, decode the
batch, submit it on the supervisor's durable path, and turn a refusal into the
same :class:`ApiError` (status, code, message, Retry-After). So the two transports
cannot drift apart in what they accept or how they refuse it.

Nothing here reads a request or writes a response; the transports do that.
:meth:`PoseIngest.submit` may raise ``trio.Cancelled`` (the caller was cancelled
while the spool was writing): the batch is then not acknowledged, and a retry of
it is a duplicate or a new accept, never a loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from actors.sequencer import Verdict
from actors.session import Offer, SessionEnding
from actors.supervisor import NotFinalised, SupervisorClosed, TooManySessions
from domain.pose_batch import BatchError, PoseBatch, decode_batch
from domain.privacy import truncate_ip
from storage.blobs import BlobStoreError
from storage.spool import SpoolError, SpoolFull
from telemetry import logs
from telemetry.auth import AuthError, SessionClaims
from telemetry.errors import ApiError

if TYPE_CHECKING:
    from telemetry.app import AppState

log = logging.getLogger("telemetry.http")

# Offer verdicts that mean "not now, the same batch later": the stream waits them
# out (flow control); the POST path answers them with 429/503 and Retry-After.
# ``session_ending``: the session's end is not durable yet; the retry gets 409 once
# it is (or, after a restart that found no end mark, the batch is taken).
TRANSIENT = frozenset({"rate_limited", "mailbox_full", "session_ending"})


class PoseIngest:
    """The transport-independent steps of pose ingest for one app's state."""

    def __init__(self, state: AppState) -> None:
        self._state = state
        self._max_frames = state.settings.max_frames_per_batch

    def claims(self, get_token: Callable[[], str], client: str | None) -> SessionClaims:
        """The verified session claims of the token ``get_token`` returns (it may
        raise :class:`AuthError`, e.g. for a malformed header); :class:`ApiError`
        401 otherwise. A failure is counted and logged
        (truncated client address, never the token). On success the request's log
        lines carry the session's pseudonym from here on."""
        state = self._state
        try:
            claims = state.verifier.verify_session(get_token())
        except AuthError as exc:
            state.metrics.auth_failures.labels("session", exc.reason).inc()
            log.info("auth failed", extra={"reason": exc.reason, "kind": "session",
                                           "client": truncate_ip(client)})
            raise ApiError(exc.status, exc.reason, exc.detail) from None
        logs.set_session(state.pseudonyms.session(claims.org_id, claims.session_id))
        return claims

    @staticmethod
    def require_consent(claims: SessionClaims) -> None:
        """:class:`ApiError` 403 unless the patient consented to pose capture."""
        if not claims.biometric_consent:
            raise ApiError(403, "consent_required",
                           "pose ingest needs the patient's biometric consent")

    def decode(self, body: bytes) -> PoseBatch:
        """The decoded batch; :class:`ApiError` 400 naming the first fault."""
        try:
            return decode_batch(body, max_frames=self._max_frames)
        except BatchError as exc:
            raise ApiError(400, exc.code, str(exc)) from None

    async def submit(self, claims: SessionClaims, batch: PoseBatch, body: bytes) -> Offer:
        """Submit on the durable path. An accepted offer means the batch is on disk;
        storage and capacity failures raise :class:`ApiError` (see
        :func:`admission_errors`); other refusals come back as the offer."""
        # try/except rather than admission_errors(): this runs for every batch.
        try:
            offer = await self._state.supervisor.submit(claims, batch, body)
        except Exception as exc:
            answer = admission_error(exc)
            if answer is None:
                raise
            raise answer from None
        if offer.verdict is Verdict.ACCEPT:
            # Counted here, once for both transports, and only for what is new.
            self._state.metrics.count_pose_received(batch.n, len(body))
        return offer


def refusal(offer: Offer) -> ApiError:
    """The answer to an offer that was not accepted."""
    v = offer.verdict
    if v == "ended":
        return ApiError(409, "session_ended", "session has ended; no more frames accepted")
    if v is Verdict.SKIPPED:
        return ApiError(409, "sequence_skipped", offer.message)
    if v is Verdict.AHEAD_OF_WINDOW:
        return ApiError(503, "sequence_ahead_of_window", offer.message,
                        retry_after=offer.retry_after)
    if v == "rate_limited":
        return ApiError(429, "rate_limited", offer.message, retry_after=offer.retry_after)
    if v == "mailbox_full":
        return ApiError(503, "mailbox_full", offer.message, retry_after=offer.retry_after)
    if v == "session_ending":
        return ApiError(503, "session_ending", offer.message, retry_after=offer.retry_after)
    if v is Verdict.OVERLAP:
        return ApiError(400, "timestamps_overlap", offer.message)
    return ApiError(400, str(getattr(v, "value", v)), offer.message)


def admission_error(exc: Exception) -> ApiError | None:
    """The answer to a way a session can refuse new data (or an end call cannot
    answer yet), or None if ``exc`` is not one. Call it inside the ``except`` block
    (a storage failure is logged with its traceback)."""
    if isinstance(exc, SpoolFull):
        return ApiError(503, "spool_full", str(exc), retry_after=30)
    if isinstance(exc, SpoolError | OSError | BlobStoreError):
        # The spool could not make it durable, or the blob store could not say whether
        # the session ended before: nothing was acknowledged, the client retries.
        log.exception("storage failed while admitting data")
        return ApiError(503, "storage_unavailable", "could not store the data durably",
                        retry_after=5)
    if isinstance(exc, SupervisorClosed):
        return ApiError(503, "shutting_down", str(exc), retry_after=5)
    if isinstance(exc, SessionEnding):
        return ApiError(503, "session_ending", str(exc), retry_after=exc.retry_after)
    if isinstance(exc, NotFinalised):
        # The end call's promise (docs/durability.md): 200 only once the blob is
        # stored and the event is in the outbox. Until then: retry, same answer later.
        if exc.recorded:
            return ApiError(503, "finalising", str(exc), retry_after=exc.retry_after)
        return ApiError(503, "storage_unavailable", str(exc), retry_after=exc.retry_after)
    if isinstance(exc, TooManySessions):
        return ApiError(429, "too_many_sessions", str(exc), retry_after=exc.retry_after)
    return None


@contextmanager
def admission_errors() -> Iterator[None]:
    """Raise :func:`admission_error`'s answer for what the block raises."""
    try:
        yield
    except Exception as exc:
        answer = admission_error(exc)
        if answer is None:
            raise
        raise answer from None
