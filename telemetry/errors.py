"""Quart's side of the request pipeline: refusals answered as the JSON error.

Every 4xx/5xx body is ``{"error": {"code": "...", "message": "..."}}``; ``code``
is stable and machine-readable, ``message`` says what was wrong in words. A route
raises an error of the tree (:mod:`domain.errors`); its status and Retry-After come
from :mod:`telemetry.http.answers`, its body and the drain of an unread body from
:mod:`telemetry.http.pipeline`, as on the raw-ASGI routes.
"""

from __future__ import annotations

from typing import Any

from quart import Response, current_app, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from domain.errors import TelemetryError
from telemetry.http.answers import FRAMEWORK_CODES, http_status
from telemetry.http.pipeline import error_json, retry_after_value, settle


class ApiError(TelemetryError):
    """A refusal with an explicit status, for a service whose errors are not in the
    tree (the aggregate sink, :mod:`telemetry.sink_app`)."""

    def __init__(self, status: int, code: str, message: str, *,
                 retry_after: float | None = None) -> None:
        super().__init__(message, retry_after, code=code)
        self.status = status


def error_response(exc: TelemetryError, status: int | None = None) -> Response:
    """The JSON error answering ``exc`` (``status``: its table status unless given)."""
    response = Response(error_json(exc), status=status or http_status(exc),
                        content_type="application/json")
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(retry_after_value(exc.retry_after))
    return response


def mark_body_read() -> None:
    """Handlers call this once they have consumed the request body."""
    g.body_read = True


async def _settle_body(response: Response) -> Response:
    """Drop what is left of a refused POST's body (:func:`settle`), or close."""
    if request.method != "POST" or g.get("body_read"):
        return response

    async def consume() -> bool:
        try:
            await request.get_data(cache=False)
        except Exception:  # a broken or oversized body: just close
            return False
        return True

    if not await settle(request.content_length,
                        current_app.config.get("MAX_CONTENT_LENGTH"), consume):
        response.headers["Connection"] = "close"
    return response


def register(app: Any) -> None:
    @app.errorhandler(TelemetryError)
    async def _refused(exc: TelemetryError) -> Response:
        return await _settle_body(error_response(exc))

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = FRAMEWORK_CODES.get(status, "http_error")
        response = error_response(TelemetryError(exc.description or exc.name, code=code),
                                  status)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            # RFC 9110 requires Allow on a 405: the client learns what the route takes.
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        if status == 408:
            # Quart's BODY_TIMEOUT passed: the rest of the body is still unread.
            response.headers["Connection"] = "close"
            return response
        return await _settle_body(response)
