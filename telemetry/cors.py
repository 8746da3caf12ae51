"""CORS for the browser client: an ASGI wrapper, allowed origins only.

The Patient Portal's pages are served from another origin than this service, so a
browser sends a *preflight* (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) before each pose or media POST (its
``Authorization`` header and non-form ``Content-Type`` make them non-simple), and
reads the real answer only if it carries ``Access-Control-Allow-Origin``.

``cors(app, allowed_origins)``:

* answers a preflight itself, without calling the app: ``204`` with
  ``Access-Control-Allow-Origin`` (the request's origin, echoed), ``-Allow-Methods``,
  ``-Allow-Headers`` and ``-Max-Age`` when the origin is allowed and the requested
  method and headers are ones the API uses; ``403`` with the API's JSON error shape
  and **no** CORS header otherwise, so the browser refuses the real request;
* adds ``Access-Control-Allow-Origin`` and ``Access-Control-Expose-Headers:
  Retry-After, X-Request-Id`` (the client must see Retry-After on 429/503, and the
  request id to quote it in a report) to every other answer to an allowed origin,
  errors included, so the page can read the status and the error code;
* lets the page send its own ``X-Request-Id`` (allowed in preflights), so one id
  follows a request from the browser through the router into the service's logs;
* logs every preflight refusal (``info``, the origin's host only) and reports its
  error code to ``on_refused`` (the app counts it:
  ``telemetry_cors_preflight_refused_total``);
* adds ``Vary: Origin`` to every answer that depends on the origin;
* passes requests without ``Origin`` (curl, the Core API, load balancers) and from
  other origins through untouched apart from ``Vary``: CORS is a browser's read
  permission, not access control; tokens are.

Credentials (cookies) are never allowed: the API authenticates with a bearer token,
so ``Access-Control-Allow-Credentials`` is not sent and ``*`` is refused as an origin
(an explicit list is the point). Origins are compared after normalising case and
default ports, exactly (no wildcards, no suffix matching).

Wiring (in ``telemetry/server.py``): ``app = close_on_connection_close(cors(create_app(state),
settings.cors_origins, on_refused=...))``, with ``TELEMETRY_CORS_ORIGINS`` a
comma-separated list parsed by :func:`parse_origins`. An empty list makes the wrapper a
pass-through (no preflight is answered, refused or counted).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from domain.errors import OriginNotAllowed
from telemetry.asgi import ASGIApp, Message, Receive, Scope, Send
from telemetry.http.pipeline import error_json

#: Methods a browser may use on this API.
ALLOWED_METHODS: tuple[str, ...] = ("GET", "POST")
#: Request headers the browser client sends beyond the CORS-safelisted ones.
ALLOWED_HEADERS: tuple[str, ...] = ("authorization", "content-type", "x-request-id")
#: Response headers the page may read beyond the safelisted ones.
EXPOSED_HEADERS: tuple[str, ...] = ("retry-after", "x-request-id")
#: How long a browser may cache a preflight answer (Chromium caps it at 2 h). A long
#: cache also means the page-hide ``keepalive`` requests normally need no preflight.
MAX_AGE_S = 7200

_DEFAULT_PORTS = {"http": 80, "https": 443}
# What of an Origin a log line may show: its host, if it looks like one.
_HOST = re.compile(r"[a-z0-9.-]{1,253}|\[[0-9a-f:.]{2,45}\]")

log = logging.getLogger("telemetry.cors")


class CorsConfigError(ValueError):
    """An allowed origin is not of the form ``scheme://host[:port]``."""


def normalise_origin(origin: str) -> str:
    """``Scheme://Host:443`` -> ``scheme://host``; :class:`CorsConfigError` if ``origin``
    is not an ``http``/``https`` origin (no path, query, fragment, user info or ``*``)."""
    raw = origin.strip()
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise CorsConfigError(f"{origin!r} is not an origin like https://portal.example")\
            from None
    scheme = parts.scheme.lower()
    if (scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None
            or parts.password is not None or parts.path not in ("",) or parts.query
            or parts.fragment or "*" in raw):
        raise CorsConfigError(
            f"{origin!r} is not an origin like https://portal.example "
            "(scheme and host, optional port; no path, no trailing slash, no wildcard)")
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def parse_origins(value: str) -> tuple[str, ...]:
    """``TELEMETRY_CORS_ORIGINS``: comma-separated origins, blanks ignored, normalised
    and deduplicated in order. Raises :class:`CorsConfigError` naming a bad one."""
    out: list[str] = []
    for item in value.split(","):
        if item.strip():
            origin = normalise_origin(item)
            if origin not in out:
                out.append(origin)
    return tuple(out)


def _header(scope: Scope, name: bytes) -> str | None:
    values = [v for k, v in scope.get("headers", []) if k.lower() == name]
    if len(values) != 1:  # absent, or repeated (ambiguous: treat as absent)
        return None
    try:
        return values[0].decode("latin-1")
    except (AttributeError, UnicodeDecodeError):
        return None


def _with_vary(headers: list[tuple[bytes, bytes]], *names: bytes) -> list[tuple[bytes, bytes]]:
    """``headers`` with ``names`` merged into its (single) ``Vary`` header."""
    existing: list[bytes] = []
    rest: list[tuple[bytes, bytes]] = []
    for k, v in headers:
        if k.lower() == b"vary":
            existing.extend(p.strip() for p in v.split(b",") if p.strip())
        else:
            rest.append((k, v))
    if b"*" in existing:
        return [*rest, (b"vary", b"*")]
    lower = {e.lower() for e in existing}
    merged = existing + [n for n in names if n.lower() not in lower]
    return [*rest, (b"vary", b", ".join(merged))]


def origin_host(origin: str | None) -> str | None:
    """The host of an ``Origin`` header for a log line (no scheme, port or anything
    else a client could put there); ``None`` when absent, ``invalid`` when it is not
    a host."""
    if origin is None:
        return None
    try:
        host = urlsplit(origin.strip()).hostname
    except ValueError:
        host = None
    if host and ":" in host:
        host = f"[{host}]"
    return host if host and _HOST.fullmatch(host) else "invalid"


def cors(app: ASGIApp, allowed_origins: Iterable[str], *,
         on_refused: Callable[[str], None] | None = None) -> ASGIApp:
    """Wrap ``app`` so browsers on ``allowed_origins`` may call it (see the module doc);
    ``on_refused(code)`` is called for each preflight refused.

    Raises :class:`CorsConfigError` for a malformed origin (``*`` included)."""
    allowed = frozenset(normalise_origin(o) for o in allowed_origins)
    if not allowed:
        return app
    allow_methods = ", ".join(ALLOWED_METHODS).encode()
    allow_headers = ", ".join(ALLOWED_HEADERS).encode()
    expose = ", ".join(EXPOSED_HEADERS).encode()

    def allowed_origin(scope: Scope) -> str | None:
        origin = _header(scope, b"origin")
        if origin is None or origin == "null":
            return None
        try:
            norm = normalise_origin(origin)
        except CorsConfigError:
            return None
        return origin if norm in allowed else None

    async def refuse(scope: Scope, send: Send, code: str, message: str) -> None:
        log.info("cors preflight refused", extra={
            "code": code, "origin_host": origin_host(_header(scope, b"origin"))})
        if on_refused is not None:
            on_refused(code)
        # Every cors_* refusal is the browser being refused: 403, whatever was asked.
        body = error_json(OriginNotAllowed(message, code=code))
        await send({"type": "http.response.start", "status": 403, "headers": _with_vary([
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ], b"Origin", b"Access-Control-Request-Method", b"Access-Control-Request-Headers")})
        await send({"type": "http.response.body", "body": body})

    async def preflight(scope: Scope, send: Send) -> None:
        origin = allowed_origin(scope)
        if origin is None:
            await refuse(scope, send, "cors_origin_not_allowed",
                         "this origin may not call the API from a browser")
            return
        method = (_header(scope, b"access-control-request-method") or "").strip()
        if method not in ALLOWED_METHODS:
            await refuse(scope, send, "cors_method_not_allowed",
                         f"method {method[:16]!r} is not allowed; allowed: "
                         f"{', '.join(ALLOWED_METHODS)}")
            return
        requested = _header(scope, b"access-control-request-headers") or ""
        names = [h.strip().lower() for h in requested.split(",") if h.strip()]
        extra = [n for n in names if n not in ALLOWED_HEADERS]
        if extra:
            # Names only (the charset of a header name is safe to echo), and few.
            shown = ", ".join(n[:40] for n in extra[:5])
            await refuse(scope, send, "cors_header_not_allowed",
                         f"request headers not allowed: {shown}; allowed: "
                         f"{', '.join(ALLOWED_HEADERS)}")
            return
        headers = _with_vary([
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", allow_methods),
            (b"access-control-allow-headers", allow_headers),
            (b"access-control-max-age", str(MAX_AGE_S).encode()),
            (b"content-length", b"0"),
        ], b"Origin", b"Access-Control-Request-Method", b"Access-Control-Request-Headers")
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if (scope.get("method") == "OPTIONS"
                and _header(scope, b"access-control-request-method") is not None):
            await preflight(scope, send)
            return
        origin = allowed_origin(scope)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if not k.lower().startswith(b"access-control-")]
                if origin is not None:
                    headers += [(b"access-control-allow-origin", origin.encode("latin-1")),
                                (b"access-control-expose-headers", expose)]
                message = {**message, "headers": _with_vary(headers, b"Origin")}
            await send(message)

        await app(scope, receive, send_with_cors)

    return wrapped
