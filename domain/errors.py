"""The service's refusals: one exception tree, one root.

Every way the service can refuse data or a request is a class below. A family says
what the *client* should do; a leaf carries the stable machine ``code`` (a class
attribute, or given per instance for the codec faults), the human ``message`` and,
where it helps, ``retry_after`` (seconds). Transports map the tree to their own
answer in one table each (HTTP: :mod:`telemetry.http.answers`; the pose stream:
the same module), never by comparing strings.

    TelemetryError                    code, message, retry_after
    ├── Wait                          flow control: send the *same* data again later
    │   ├── RateLimited               rate_limited
    │   ├── MailboxFull               mailbox_full
    │   ├── SessionEnding             session_ending (its end is not durable yet)
    │   ├── StorageFull               spool_full (storage.spool.SpoolFull)
    │   ├── SessionMoving             session_moving (taken over, here or elsewhere)
    │   └── SequenceAheadOfWindow     sequence_ahead_of_window
    ├── RetryLater                    the service cannot answer now; ask again later
    │   ├── StorageUnavailable        storage_unavailable
    │   ├── NotFinalised              finalising | storage_unavailable (end calls)
    │   ├── ShuttingDown              shutting_down
    │   ├── TooManySessions           too_many_sessions
    │   └── InternalError             internal_error
    ├── FixRequest                    the request is wrong; sending it again fails again
    │   ├── BatchError                a pose batch fault (code per fault)
    │   ├── MediaBatchError           a media batch fault (code per fault)
    │   │   └── MediaBodyTooLarge     body_too_large (also a BodyTooLarge)
    │   ├── MediaRejected             too_many_views | view_media_mismatch
    │   ├── TimestampsOverlap         timestamps_overlap
    │   ├── SpaceChanged              space_changed
    │   ├── BodyTooLarge              body_too_large
    │   ├── BodyTimeout               body_timeout
    │   ├── UnsupportedMediaType      unsupported_media_type
    │   ├── UnsupportedEncoding       unsupported_content_encoding
    │   ├── InvalidSessionId          invalid_session_id
    │   ├── MethodNotAllowed          method_not_allowed
    │   └── UpgradeRequired           upgrade_required
    └── Refused                       not for this client, or not any more
        ├── AuthError                 the token's fault as code (401, or 403)
        ├── ConsentRequired           consent_required
        ├── OriginNotAllowed          cors_origin_not_allowed
        ├── SessionEnded              session_ended
        ├── SequenceSkipped           sequence_skipped
        ├── MediaFinished             finished
        ├── SessionNotLive            session_not_live
        └── AmbiguousSession          ambiguous_session

Layers below the transports raise these (or return them, on the per-batch path,
where raising would cost every refused batch a traceback); errors that are not in
the tree (``OSError``, a storage client's own errors) are mapped once, where
admission meets storage (:func:`telemetry.ingest.storage_boundary`).

Construction never fails and does no I/O; nothing here is raised by this module.
"""

from __future__ import annotations


class TelemetryError(Exception):
    """The root: a refusal with a stable ``code``, a ``message`` for people and, for
    the families that say "later", a ``retry_after`` in seconds (None: no hint)."""

    code: str = "error"
    default_message: str = "the request was refused"
    retry_after: float | None = None

    def __init__(self, message: str | None = None, retry_after: float | None = None, *,
                 code: str | None = None) -> None:
        message = self.default_message if message is None else message
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after
        if code is not None:
            self.code = code


# -- wait: flow control ------------------------------------------------------------


class Wait(TelemetryError):
    """Not now: the session cannot take this data *yet*. Send the same data again
    after ``retry_after``; the pose stream holds it and retries by itself."""


class RateLimited(Wait):
    code = "rate_limited"


class MailboxFull(Wait):
    code = "mailbox_full"
    default_message = "session mailbox is full"
    retry_after = 1.0


class SessionEnding(Wait):
    """The session is ending but its end is not durable yet: nothing was taken;
    retry after ``retry_after`` (then :class:`SessionEnded`, or, after a restart
    that found no end mark, the session carries on)."""

    code = "session_ending"
    default_message = "session is ending and its end is not stored yet"


class StorageFull(Wait):
    """The spool's disk budget is reached; nothing was queued."""

    code = "spool_full"
    retry_after = 30.0


class SessionMoving(Wait):
    """Fleet mode: the session is changing instance (this one is taking it over, or
    another one just did); send the same data again shortly, through the router."""

    code = "session_moving"
    default_message = "the session is moving between instances; send it again"
    retry_after = 1.0


class SequenceAheadOfWindow(Wait):
    """The batch is too far ahead of the session's next one: send the ones before
    it first (on the stream it is refused at once: the stream is in order)."""

    code = "sequence_ahead_of_window"


# -- retry later: the service side --------------------------------------------------


class RetryLater(TelemetryError):
    """The service cannot answer now (storage, shutdown, capacity); ask again later,
    here or, for :class:`ShuttingDown`, on another instance."""


class StorageUnavailable(RetryLater):
    code = "storage_unavailable"
    default_message = "could not store the data durably"
    retry_after = 5.0


class NotFinalised(RetryLater):
    """An end call's wait ran out before the session's summary was stored.

    ``recorded``: the end itself is durable (the session refuses batches, and a
    restart resumes its finalisation rather than bringing it back live): code
    ``finalising``. If False, not even that is on disk yet (``storage_unavailable``),
    and after a restart the session would carry on. Either way finalisation keeps
    retrying in the background; ask again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float, *, recorded: bool) -> None:
        super().__init__(message, retry_after,
                         code="finalising" if recorded else "storage_unavailable")
        self.recorded = recorded


class ShuttingDown(RetryLater):
    """This instance is draining or stopped and admits nothing new."""

    code = "shutting_down"
    default_message = "service is shutting down"
    retry_after = 5.0


class TooManySessions(RetryLater):
    """A live-session limit (per process or per organisation) is reached."""

    code = "too_many_sessions"


class InternalError(RetryLater):
    code = "internal_error"
    default_message = "internal server error"


# -- fix the request ------------------------------------------------------------------


class FixRequest(TelemetryError):
    """The request itself is wrong; the same request is refused the same way."""


class BatchError(FixRequest, ValueError):
    """A pose batch is malformed. ``code`` names the fault, ``str()`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class MediaBatchError(FixRequest, ValueError):
    """A media batch is malformed. ``code`` is machine-readable, ``path`` names the
    offending place (``""`` for the body itself), ``str()`` says why."""

    def __new__(cls, code: str, path: str, rule: str) -> MediaBatchError:
        # A body over its cap is also a BodyTooLarge (413), whoever raises it.
        if cls is MediaBatchError and code == "body_too_large":
            cls = MediaBodyTooLarge
        return super().__new__(cls, code, path, rule)

    def __init__(self, code: str, path: str, rule: str) -> None:
        super().__init__(f"{path}: {rule}" if path else rule, code=code)
        self.path = path


class BodyTooLarge(FixRequest):
    code = "body_too_large"


class MediaBodyTooLarge(BodyTooLarge, MediaBatchError):
    """A media body over its cap, found by the decoder."""


class MediaRejected(FixRequest):
    """A media batch the session's tracker refuses as a whole (nothing applied)."""


class TimestampsOverlap(FixRequest):
    code = "timestamps_overlap"


class SpaceChanged(FixRequest):
    code = "space_changed"


class BodyTimeout(FixRequest):
    code = "body_timeout"


class UnsupportedMediaType(FixRequest):
    code = "unsupported_media_type"


class UnsupportedEncoding(FixRequest):
    code = "unsupported_content_encoding"


class InvalidSessionId(FixRequest):
    code = "invalid_session_id"
    default_message = "session id has invalid characters"


class MethodNotAllowed(FixRequest):
    code = "method_not_allowed"
    default_message = "The method is not allowed for the requested URL."


class UpgradeRequired(FixRequest):
    code = "upgrade_required"


class NotFound(FixRequest):
    """No endpoint at the requested path (the code Quart's own 404 carries)."""

    code = "not_found"


# -- refused ------------------------------------------------------------------------


class Refused(TelemetryError):
    """Not for this client, or not any more: do not send it again as it is."""


class AuthError(Refused):
    """The request's credentials are not acceptable; ``reason`` is the code.

    ``status`` is 401 for a missing, malformed, expired or badly signed token or one
    whose scope does not match the resource, 403 for a valid token that lacks the
    permission or consent the endpoint needs.
    """

    def __init__(self, reason: str, detail: str, status: int = 401) -> None:
        super().__init__(detail, code=reason)
        self.reason = reason
        self.detail = detail
        self.status = status


class ConsentRequired(Refused):
    code = "consent_required"


class OriginNotAllowed(Refused):
    code = "cors_origin_not_allowed"


class SessionEnded(Refused):
    """The session has ended (durably, with a spool); it takes nothing more."""

    code = "session_ended"
    default_message = "session has ended"


class SequenceSkipped(Refused):
    code = "sequence_skipped"


class MediaFinished(Refused):
    code = "finished"


class SessionNotLive(Refused):
    code = "session_not_live"


class AmbiguousSession(Refused):
    code = "ambiguous_session"
