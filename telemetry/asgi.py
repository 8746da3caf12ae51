"""ASGI types and the small scope helpers the raw-ASGI parts of the app share
(CORS, TLS, the lean pose paths)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def headers_of(scope: Scope) -> dict[str, str]:
    """The request headers by lower-case name; the first of repeated names wins (as
    Quart's ``headers.get``)."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers") or ():
        key = name.decode("latin-1").lower()
        if key not in out:
            out[key] = value.decode("latin-1")
    return out


def client_of(scope: Scope) -> str | None:
    """The peer's address, if the server gave one."""
    client = scope.get("client")
    return client[0] if client else None


class HeaderMap:
    """``headers_of`` output read by the canonical name, as
    :func:`telemetry.auth.bearer_token` does (``get("Authorization")``)."""

    def __init__(self, headers: dict[str, str]) -> None:
        self._h = headers

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._h.get(name.lower(), default)
