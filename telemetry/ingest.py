"""Pose ingest shared by both transports: the POST path and the WebSocket stream.

One :class:`PoseIngest` per app holds the steps every pose batch goes through,
whichever way it came: authenticate the session token, check consent, decode the
batch and submit it on the supervisor's durable path. So the two transports
cannot drift apart in what they accept or how they refuse it.

Nothing here reads a request, writes a response or knows a status: refusals are
errors of the tree (:mod:`domain.errors`), raised, or, for a batch the session
refuses, carried by the returned :class:`~actors.admission.Offer`; each transport
turns them into its answer (:mod:`telemetry.http.answers`). Storage errors outside
the tree are mapped here, once (:func:`storage_boundary`).

:meth:`PoseIngest.submit` may raise ``trio.Cancelled`` (the caller was cancelled
while the spool was writing): the batch is then not acknowledged, and a retry of
it is a duplicate or a new accept, never a loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from actors.admission import Offer
from actors.sequencer import Verdict
from domain.claims import SessionClaims
from domain.errors import AuthError, ConsentRequired, StorageUnavailable, TelemetryError
from domain.pose_batch import PoseBatch, decode_batch
from domain.privacy import truncate_ip
from storage.blobs import BlobStoreError
from storage.journal import JournalError, JournalUnavailable
from telemetry import logs

if TYPE_CHECKING:
    from telemetry.http.state import AppState

log = logging.getLogger("telemetry.http")

# The storage failures admission can meet that are not refusals of the tree: the
# spool could not make it durable, or the blob store could not say whether the
# session ended before. Nothing was acknowledged; the client retries.
STORAGE_ERRORS = (JournalError, OSError, BlobStoreError)

# Retry-After for a batch the journal did not acknowledge in time.
JOURNAL_RETRY_S = 1.0

# Session pseudonyms kept for the log lines (about 100 bytes each); past this many
# the whole map is dropped and refilled by the sessions still sending.
PSEUDONYMS_KEPT = 20_000


def storage_unavailable(exc: BaseException) -> StorageUnavailable:
    """The tree's answer to a storage failure; logs it (call it inside the ``except``
    block). A journal that could not acknowledge in time (a NATS leader election, a
    node lost) is an expected condition, one WARNING line each; anything else (a
    disk error, the blob store) is logged with its traceback."""
    if isinstance(exc, JournalUnavailable):
        log.warning("journal unavailable while admitting data: %s: %s",
                    type(exc).__name__, exc)
        # A leader election takes seconds: retry soon, well inside the gap timeout,
        # or the session skips this batch before its retry comes (a cut session).
        return StorageUnavailable(retry_after=JOURNAL_RETRY_S)
    log.exception("storage failed while admitting data", exc_info=exc)
    return StorageUnavailable()


@contextmanager
def storage_boundary() -> Iterator[None]:
    """Raise :class:`StorageUnavailable` for a storage failure of the block; the
    tree's errors (a full spool included) pass through as they are."""
    try:
        yield
    except TelemetryError:
        raise
    except STORAGE_ERRORS as exc:
        raise storage_unavailable(exc) from None


class PoseIngest:
    """The transport-independent steps of pose ingest for one app's state."""

    def __init__(self, state: AppState) -> None:
        self._state = state
        self._max_frames = state.settings.max_frames_per_batch
        self._pseudonyms: dict[tuple[str, str], str] = {}

    def claims(self, get_token: Callable[[], str], client: str | None) -> SessionClaims:
        """The verified session claims of the token ``get_token`` returns; the
        :class:`AuthError` of a missing or bad one (``get_token`` may raise it too,
        e.g. for a malformed header). A failure is counted and logged (truncated
        client address, never the token). On success the request's log lines carry
        the session's pseudonym from here on."""
        state = self._state
        try:
            claims = state.verifier.verify_session(get_token())
        except AuthError as exc:
            state.metrics.auth_failures.labels("session", exc.reason).inc()
            log.info("auth failed", extra={"reason": exc.reason, "kind": "session",
                                           "client": truncate_ip(client)})
            raise
        if logs.current_request() is not None:
            logs.set_session(self._pseudonym(claims))
        return claims

    def _pseudonym(self, claims: SessionClaims) -> str:
        """The session's pseudonym (an HMAC), kept per session: a session sends a
        batch a second, and its pseudonym never changes. The bound only caps memory."""
        key = (claims.org_id, claims.session_id)
        pseudonym = self._pseudonyms.get(key)
        if pseudonym is None:
            if len(self._pseudonyms) >= PSEUDONYMS_KEPT:
                self._pseudonyms.clear()
            pseudonym = self._pseudonyms[key] = self._state.pseudonyms.session(*key)
        return pseudonym

    @staticmethod
    def require_consent(claims: SessionClaims) -> None:
        """:class:`ConsentRequired` unless the patient consented to pose capture."""
        if not claims.biometric_consent:
            raise ConsentRequired("pose ingest needs the patient's biometric consent")

    def decode(self, body: bytes) -> PoseBatch:
        """The decoded batch; :class:`~domain.errors.BatchError` naming the first fault."""
        return decode_batch(body, max_frames=self._max_frames)

    async def submit(self, claims: SessionClaims, batch: PoseBatch, body: bytes) -> Offer:
        """Submit on the durable path. An accepted offer means the batch is on disk;
        the session's refusals come back as the offer's ``refusal``; capacity,
        shutdown and storage failures are raised (see :func:`storage_boundary`)."""
        # try/except rather than storage_boundary(): this runs for every batch.
        try:
            offer = await self._state.supervisor.submit(claims, batch, body)
        except TelemetryError:
            raise
        except STORAGE_ERRORS as exc:
            raise storage_unavailable(exc) from None
        if offer.verdict is Verdict.ACCEPT:
            # Counted here, once for both transports, and only for what is new.
            self._state.metrics.count_pose_received(batch.n, len(body))
        return offer
