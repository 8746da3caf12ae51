"""The answer to each refusal of the tree (:mod:`domain.errors`), per transport.

One table per transport, looked up along the error's class hierarchy (the most
specific entry wins), so a new leaf answers as its family until it is given a
line of its own:

* :data:`HTTP_STATUS`: the status of a POST route's (and the stream handshake's)
  answer; ``Retry-After`` is the error's ``retry_after``. :class:`AuthError` carries
  its own status (401, or 403 for a valid token without the permission), as does a
  :class:`telemetry.errors.ApiError`.
* :data:`STREAM`: what the pose stream does with a batch refused so: wait (flow
  control: offer the same batch again after a pause, for up to
  :data:`FLOW_WAIT_MAX_S`) or nack it (with the status the POST path would answer),
  and the close code after the nack, if the stream cannot go on.

Lookups never raise and cost a dict hit per error type after the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from domain.errors import (
    AmbiguousSession,
    BodyTimeout,
    BodyTooLarge,
    ConsentRequired,
    FixRequest,
    InternalError,
    MailboxFull,
    MediaFinished,
    MethodNotAllowed,
    NotFound,
    OriginNotAllowed,
    Refused,
    RetryLater,
    SequenceAheadOfWindow,
    SessionEnded,
    SessionNotLive,
    ShuttingDown,
    StorageFull,
    TelemetryError,
    TooManySessions,
    UnsupportedEncoding,
    UnsupportedMediaType,
    UpgradeRequired,
    Wait,
)
from domain.errors import RateLimited as _RateLimited

HTTP_STATUS: dict[type[TelemetryError], int] = {
    TelemetryError: 500,
    # wait: the same data later
    Wait: 503,
    _RateLimited: 429,
    # retry later: the service side
    RetryLater: 503,
    TooManySessions: 429,
    InternalError: 500,
    # fix the request
    FixRequest: 400,
    BodyTooLarge: 413,
    BodyTimeout: 408,
    UnsupportedMediaType: 415,
    UnsupportedEncoding: 415,
    MethodNotAllowed: 405,
    UpgradeRequired: 426,
    NotFound: 404,
    # refused
    Refused: 409,
    ConsentRequired: 403,
    OriginNotAllowed: 403,
    SessionNotLive: 404,
    AmbiguousSession: 409,
    SessionEnded: 409,
    MediaFinished: 409,
}

# Quart's (werkzeug's) own HTTP errors, by status: the code their JSON body carries.
FRAMEWORK_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
                   400: "bad_request", 408: "body_timeout", 500: "internal_error"}

CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_RESTART = 1012
CLOSE_TRY_LATER = 1013
CLOSE_TOKEN = 4401
CLOSE_IDLE = 4408
CLOSE_ENDED = 4409
# The close reasons of the stream's metrics, by close code.
CLOSE_CODES = {
    CLOSE_UNSUPPORTED: "text_message", CLOSE_RESTART: "shutting_down",
    CLOSE_TRY_LATER: "too_many_sessions", CLOSE_TOKEN: "token_expired",
    CLOSE_IDLE: "idle_timeout", CLOSE_ENDED: "session_ended",
}

# How long a batch may wait for capacity (rate limit, mailbox, spool) before it is
# refused with the POST path's 429/503; the client sees slow acks meanwhile.
FLOW_WAIT_MAX_S = 30.0
# Retry pauses while waiting: short for a mailbox the actor is emptying, longer
# for a spool that is full; otherwise the error's retry_after, within these bounds.
MAILBOX_PAUSE_S = 0.02
SPOOL_PAUSE_S = 1.0
_PAUSE_MIN_S, _PAUSE_MAX_S = 0.005, 1.0


@dataclass(frozen=True)
class StreamAnswer:
    """``wait``: offer the batch again after :func:`stream_pause`; else nack it, then
    close with ``close`` if set."""

    wait: bool = False
    pause: float | None = None  # None: the error's retry_after, within bounds
    close: int | None = None


NACK = StreamAnswer()

STREAM: dict[type[TelemetryError], StreamAnswer] = {
    TelemetryError: NACK,
    Wait: StreamAnswer(wait=True),
    MailboxFull: StreamAnswer(wait=True, pause=MAILBOX_PAUSE_S),
    StorageFull: StreamAnswer(wait=True, pause=SPOOL_PAUSE_S),
    # The stream is in order: the batches before this one come after it on the
    # same socket, so waiting would only wait for itself.
    SequenceAheadOfWindow: NACK,
    # The session is over, or this instance will not serve it.
    SessionEnded: StreamAnswer(close=CLOSE_ENDED),
    ShuttingDown: StreamAnswer(close=CLOSE_RESTART),
    TooManySessions: StreamAnswer(close=CLOSE_TRY_LATER),
}

T = TypeVar("T")

_status_of: dict[type[TelemetryError], int] = {}
_stream_of: dict[type[TelemetryError], StreamAnswer] = {}


def _lookup(table: dict[type[TelemetryError], T], cache: dict[type[TelemetryError], T],
            cls: type[TelemetryError]) -> T:
    try:
        return cache[cls]
    except KeyError:
        pass
    for base in cls.__mro__:
        if base in table:
            cache[cls] = found = table[base]
            return found
    raise AssertionError("TelemetryError is in every table")


def http_status(exc: TelemetryError) -> int:
    """The HTTP status that answers ``exc``."""
    own = getattr(exc, "status", None)
    if own is not None:
        return int(own)
    return _lookup(HTTP_STATUS, _status_of, type(exc))


def stream_answer(exc: TelemetryError) -> StreamAnswer:
    """What the pose stream does with a batch refused with ``exc``."""
    return _lookup(STREAM, _stream_of, type(exc))


def stream_pause(answer: StreamAnswer, exc: TelemetryError) -> float:
    """How long to wait before offering a batch again (``answer.wait``)."""
    if answer.pause is not None:
        return answer.pause
    return min(max(exc.retry_after or MAILBOX_PAUSE_S, _PAUSE_MIN_S), _PAUSE_MAX_S)
