"""Structured JSON logging: one object per line, extra fields carried through.

Callers pass only pseudonymised identifiers in ``extra`` (see
:mod:`domain.privacy`); this module adds nothing personal of its own.

Every line written while an HTTP request is being handled also carries that
request's ``request_id`` and, once the request's token has named a session, the
session's pseudonym ``session`` (``s_...``, never the raw id). The request context
lives in a :class:`~contextvars.ContextVar` set by the app's request hooks
(:func:`begin_request` / :func:`end_request`) and is added to records by
:class:`RequestContextFilter`, which :func:`configure` installs on the handler.

A record's exception is not rendered by :mod:`traceback`: exception messages are
text nobody wrote for a log (an OSError names the spool file of ``org/session``, a
library puts a repr of its argument in its message), so :func:`format_exception`
keeps the shape of a traceback -- the chain, exception groups, each frame's file,
line and function -- but writes each message through
:func:`domain.privacy.exception_text` and no source lines. An uncaught exception
that ends the process goes through the same formatter (:func:`configure` installs
``sys.excepthook``), not Python's default printout.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import time
import traceback
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

from domain.privacy import exception_text, redact, truncate_ip

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

REQUEST_ID_HEADER = "X-Request-Id"
# What an incoming X-Request-Id may be to be kept: a short token (a UUID, a trace
# id). Anything else is replaced by a fresh id, so a header can't smuggle text into logs.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


@dataclass
class RequestContext:
    """What log lines of one request carry. ``active`` goes false when the request
    is done: a task started during the request (a session actor) shares this object
    through its copied context, and must not go on tagging its lines with it."""

    request_id: str
    session: str | None = None
    active: bool = True


_current: ContextVar[RequestContext | None] = ContextVar("telemetry_request", default=None)


def new_request_id() -> str:
    """A fresh request id: 16 hex digits (64 random bits)."""
    return secrets.token_hex(8)


def safe_request_id(incoming: str | None) -> str | None:
    """``incoming`` if it is a safe short token, else ``None``."""
    if incoming and _SAFE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return None


def begin_request(incoming: str | None = None) -> RequestContext:
    """Start the current task's request context: keep a safe incoming request id,
    generate one otherwise."""
    ctx = RequestContext(safe_request_id(incoming) or new_request_id())
    _current.set(ctx)
    return ctx


def end_request() -> None:
    """End the current request context; later lines carry no request id."""
    ctx = _current.get()
    if ctx is not None:
        ctx.active = False
        _current.set(None)


def current_request() -> RequestContext | None:
    """The active request context of this task, if any."""
    ctx = _current.get()
    return ctx if ctx is not None and ctx.active else None


def set_session(pseudonym: str) -> None:
    """Tag the rest of the current request's lines with a session pseudonym
    (``Pseudonymiser.session``); a no-op outside a request."""
    ctx = current_request()
    if ctx is not None:
        ctx.session = pseudonym


def request_level(status: int, *, quiet: bool) -> int:
    """The level of a request's log line: error when the service failed, warning when
    it refused for lack of capacity (429, 503), info for other refusals and for state
    changes, debug for routine successes of ``quiet`` endpoints (batches, probes,
    scrapes)."""
    if status >= 500 and status != 503:
        return logging.ERROR
    if status in (429, 503):
        return logging.WARNING
    if status >= 400 or not quiet:
        return logging.INFO
    return logging.DEBUG


def log_request(logger: logging.Logger, level: int, *, method: str, endpoint: str,
                status: int, seconds: float, code: str | None, client: str | None) -> None:
    """The one ``request`` line of an answered request; a refusal's line carries the
    client's truncated address, never the raw one."""
    if not logger.isEnabledFor(level):
        return
    fields: dict[str, Any] = {"method": method, "endpoint": endpoint, "status": status,
                              "duration_ms": round(seconds * 1000, 2)}
    if code:
        fields["code"] = code
    if status >= 400:
        fields["client"] = truncate_ip(client)
    logger.log(level, "request", extra=fields)


class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` and ``session`` of the active request to each record.
    Fields the caller set explicitly (``extra={"session": ...}``) win."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current_request()
        if ctx is not None:
            if not hasattr(record, "request_id"):
                record.request_id = ctx.request_id
            if ctx.session is not None and not hasattr(record, "session"):
                record.session = ctx.session
        return True


# Bounds like the traceback module's, so a runaway chain or group stays one sane line.
_MAX_GROUP_WIDTH = 15
_MAX_GROUP_DEPTH = 10


def format_exception(exc: BaseException) -> str:
    """A traceback of ``exc`` that no identifier can reach: the chain (causes and
    contexts), exception groups, and each frame as file, line and function, but
    every message through :func:`~domain.privacy.exception_text` and no source
    lines."""
    out: list[str] = []
    _render(exc, out, "", set(), 0)
    return "\n".join(out)


def _render(exc: BaseException, out: list[str], margin: str, seen: set[int],
            depth: int) -> None:
    seen.add(id(exc))
    cause, context = exc.__cause__, exc.__context__
    if cause is not None and id(cause) not in seen:
        _render(cause, out, margin, seen, depth)
        out += [margin, margin + "The above exception was the direct cause of the "
                "following exception:", margin]
    elif context is not None and not exc.__suppress_context__ and id(context) not in seen:
        _render(context, out, margin, seen, depth)
        out += [margin, margin + "During handling of the above exception, another "
                "exception occurred:", margin]
    if exc.__traceback__ is not None:
        out.append(margin + "Traceback (most recent call last):")
        for frame, line in traceback.walk_tb(exc.__traceback__):
            code = frame.f_code
            out.append(f'{margin}  File "{code.co_filename}", line {line}, in {code.co_name}')
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" \
        else f"{kind.__module__}.{kind.__qualname__}"
    text = exception_text(exc)
    out.append(f"{margin}{name}: {text}" if text else margin + name)
    for note in getattr(exc, "__notes__", None) or ():
        out.append(margin + redact(str(note)))
    if isinstance(exc, BaseExceptionGroup):
        if depth >= _MAX_GROUP_DEPTH:
            out.append(f"{margin}... (exception groups nested too deep)")
            return
        subs = exc.exceptions
        for i, sub in enumerate(subs[:_MAX_GROUP_WIDTH], 1):
            out.append(f"{margin}+---------------- {i} ----------------")
            _render(sub, out, margin + "| ", seen, depth + 1)
        if len(subs) > _MAX_GROUP_WIDTH:
            out.append(f"{margin}+---- and {len(subs) - _MAX_GROUP_WIDTH} more exceptions")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; its exception by :func:`format_exception`."""

    def formatException(self, ei: Any) -> str:
        return format_exception(ei[1]) if ei and ei[1] is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def log_uncaught(kind: type[BaseException], exc: BaseException,
                 tb: TracebackType | None) -> None:
    """``sys.excepthook``: the exception that ends the process, as a ``critical``
    JSON line like any other (Python's own printout would show its raw messages)."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("telemetry").critical("uncaught exception; exiting",
                                            exc_info=(kind, exc, tb))


def fatal(message: str, **fields: Any) -> None:
    """A failure that stops the process before it runs (a bad setting): one
    ``critical`` JSON line like any other, logging set up first if it is not yet."""
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        configure()
    logging.getLogger("telemetry").critical(message, extra=fields)


# Libraries whose DEBUG and INFO lines print what the service's own lines never do, raw
# and unredacted: botocore and s3transfer the S3 keys (``{org_id}/{session_id}.bin.gz``)
# and request URLs, urllib3, httpx and httpcore the URLs they call (session ids in the
# path), hpack every decoded HTTP/2 header (the Authorization token too), psycopg its
# failed connection attempts (host and user) and a line per pooled connection; nats logs
# only errors today and is held in case that changes. They are held at WARNING (or the
# service's level if higher) whatever TELEMETRY_LOG_LEVEL says, so that DEBUG debugs our
# code without leaking ids. hypercorn.error is not here: it logs its start-up lines and
# exceptions (formatted by format_exception, which redacts ids), never a request.
THIRD_PARTY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpcore",
                       "hpack", "psycopg", "nats")


def configure(level: str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as one JSON object per line,
    with the request context added, and an uncaught exception that ends the
    process too (:func:`log_uncaught`); returns the handler installed on the root.
    ``level`` applies to the project's loggers; :data:`THIRD_PARTY_LOGGERS` stay at
    WARNING or above."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # hypercorn's access log would print full client IPs; ours logs truncated ones.
    logging.getLogger("hypercorn.access").disabled = True
    sys.excepthook = log_uncaught
    return handler
