"""The CORS wrapper: preflights answered for allowed origins only, CORS headers on every
answer to an allowed origin (errors, Retry-After and X-Request-Id included), nothing for
others; refused preflights logged (origin host only) and counted."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pytest

from domain.pose_batch import CONTENT_TYPE
from telemetry.config import Settings
from telemetry.cors import (
    MAX_AGE_S,
    CorsConfigError,
    cors,
    normalise_origin,
    origin_host,
    parse_origins,
)
from tests.support.metrics import scrape
from tests.support.payloads import batch_body, session_token
from tests.support.service import running_cors_service, running_service

PORTAL = "https://portal.example"


class Response:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.raw_headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = [v.decode() for k, v in self.raw_headers if k.decode().lower() == name]
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    def cors_headers(self) -> dict[str, str]:
        return {k.decode().lower(): v.decode() for k, v in self.raw_headers
                if k.lower().startswith(b"access-control-")}


class App:
    """A stand-in app: records calls, answers 200 with an optional Vary/CORS header."""

    def __init__(self, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.extra = extra_headers or []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append(scope)
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), *self.extra]})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app: Any, method: str, headers: dict[str, str], path: str = "/v1/pose/frames",
               scope_type: str = "http") -> Response | None:
    scope = {"type": scope_type, "method": method, "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if not sent:
        return None
    start, *bodies = sent
    return Response(start["status"], list(start["headers"]),
                    b"".join(m.get("body", b"") for m in bodies))


def preflight(origin: str, method: str = "POST",
              request_headers: str = "authorization,content-type") -> dict[str, str]:
    h = {"Origin": origin, "Access-Control-Request-Method": method}
    if request_headers:
        h["Access-Control-Request-Headers"] = request_headers
    return h


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(("given", "normal"), [
    ("https://portal.example", "https://portal.example"),
    ("HTTPS://Portal.Example:443", "https://portal.example"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("http://localhost:80", "http://localhost"),
    (" https://portal.example ", "https://portal.example"),
    ("http://[::1]:3000", "http://[::1]:3000"),
])
def test_origins_are_normalised(given: str, normal: str) -> None:
    assert normalise_origin(given) == normal


@pytest.mark.parametrize("bad", [
    "*", "https://*.example", "https://portal.example/", "https://portal.example/app",
    "portal.example", "ftp://portal.example", "https://user@portal.example",
    "https://portal.example?x=1", "https://portal.example:99999", "null", "",
])
def test_malformed_origins_are_refused(bad: str) -> None:
    with pytest.raises(CorsConfigError):
        normalise_origin(bad)
    with pytest.raises(CorsConfigError):
        cors(App(), [bad])


def test_parse_origins_reads_the_environment_form() -> None:
    assert parse_origins("") == ()
    assert parse_origins(" https://a.example, ,https://A.example:443,http://b.example:8000 ") \
        == ("https://a.example", "http://b.example:8000")
    with pytest.raises(CorsConfigError, match="no trailing slash"):
        parse_origins("https://a.example,https://b.example/")


def test_no_origins_means_no_wrapper() -> None:
    app = App()
    assert cors(app, []) is app


# -- preflight --------------------------------------------------------------------------


async def test_preflight_from_an_allowed_origin() -> None:
    app = App()
    r = await call(cors(app, [PORTAL]), "OPTIONS", preflight(PORTAL))
    assert r is not None and r.status == 204 and r.body == b""
    assert r.cors_headers() == {
        "access-control-allow-origin": PORTAL,
        "access-control-allow-methods": "GET, POST",
        "access-control-allow-headers": "authorization, content-type, x-request-id",
        "access-control-max-age": str(MAX_AGE_S),
    }
    assert "Origin" in (r.header("vary") or "")
    assert app.calls == []  # answered by the wrapper, not the app


async def test_preflight_header_names_are_case_insensitive_and_optional() -> None:
    app = cors(App(), [PORTAL])
    r = await call(app, "OPTIONS", preflight(PORTAL, request_headers="Content-Type, Authorization"))
    assert r is not None and r.status == 204
    r = await call(app, "OPTIONS", preflight(PORTAL, request_headers=""))
    assert r is not None and r.status == 204
    # the page may send its own request id, to follow one request through the logs
    r = await call(app, "OPTIONS", preflight(
        PORTAL, request_headers="authorization,content-type,X-Request-Id"))
    assert r is not None and r.status == 204


@pytest.mark.parametrize(("headers", "code"), [
    (preflight("https://evil.example"), "cors_origin_not_allowed"),
    (preflight("https://portal.example.evil.example"), "cors_origin_not_allowed"),
    (preflight("http://portal.example"), "cors_origin_not_allowed"),  # scheme matters
    (preflight("null"), "cors_origin_not_allowed"),
    (preflight(PORTAL, method="PUT"), "cors_method_not_allowed"),
    (preflight(PORTAL, method="DELETE"), "cors_method_not_allowed"),
    (preflight(PORTAL, request_headers="authorization,x-debug"), "cors_header_not_allowed"),
    (preflight(PORTAL, request_headers="cookie"), "cors_header_not_allowed"),
])
async def test_refused_preflights_carry_no_cors_header(
    headers: dict[str, str], code: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App()
    refused: list[str] = []
    caplog.set_level(logging.INFO, logger="telemetry.cors")
    r = await call(cors(app, [PORTAL], on_refused=refused.append), "OPTIONS", headers)
    assert r is not None and r.status == 403
    assert r.cors_headers() == {}
    assert json.loads(r.body)["error"]["code"] == code
    assert app.calls == []
    assert refused == [code]
    (rec,) = [x for x in caplog.records if x.name == "telemetry.cors"]
    assert rec.levelno == logging.INFO and rec.getMessage() == "cors preflight refused"
    assert rec.code == code  # type: ignore[attr-defined]
    expected_host = "invalid" if headers["Origin"] == "null" \
        else headers["Origin"].split("://", 1)[1]
    assert rec.origin_host == expected_host  # type: ignore[attr-defined]


@pytest.mark.parametrize(("origin", "host"), [
    ("https://Portal.Example:8443", "portal.example"),
    ("http://[::1]:3000", "[::1]"),
    ("https://portal.example/p/sess-1?id=patient-7", "portal.example"),
    ("null", "invalid"), ("https://user:pw@x.example", "x.example"),
    ("https://\u00e9vil.example", "invalid"), ("https://a b", "invalid"),
    (None, None),
])
def test_only_the_origin_host_is_logged(origin: str | None, host: str | None) -> None:
    assert origin_host(origin) == host


async def test_options_without_a_request_method_is_not_a_preflight() -> None:
    app = App()
    r = await call(cors(app, [PORTAL]), "OPTIONS", {"Origin": PORTAL})
    assert r is not None and r.status == 200 and len(app.calls) == 1


# -- actual requests --------------------------------------------------------------------


async def test_allowed_origin_gets_allow_origin_and_exposed_retry_after() -> None:
    app = App(extra_headers=[(b"vary", b"Accept-Encoding")])
    r = await call(cors(app, [PORTAL, "http://127.0.0.1:9000"]), "POST", {"Origin": PORTAL})
    assert r is not None and r.status == 200 and r.body == b"ok"
    assert r.cors_headers() == {"access-control-allow-origin": PORTAL,
                                "access-control-expose-headers": "retry-after, x-request-id"}
    assert r.header("vary") == "Accept-Encoding, Origin"
    assert "access-control-allow-credentials" not in r.cors_headers()


async def test_other_origins_and_non_browsers_get_no_cors_headers() -> None:
    app = App()
    wrapped = cors(app, [PORTAL])
    for headers in ({"Origin": "https://evil.example"}, {}, {"Origin": "null"}):
        r = await call(wrapped, "POST", headers)
        assert r is not None and r.status == 200  # CORS is not access control
        assert r.cors_headers() == {}
        assert r.header("vary") == "Origin"
    assert len(app.calls) == 3


async def test_app_cors_headers_are_replaced_not_doubled() -> None:
    app = App(extra_headers=[(b"access-control-allow-origin", b"*"), (b"vary", b"*")])
    r = await call(cors(app, [PORTAL]), "GET", {"Origin": "https://evil.example"})
    assert r is not None and r.cors_headers() == {} and r.header("vary") == "*"


async def test_repeated_origin_headers_are_ambiguous_and_ignored() -> None:
    app = App()
    scope_headers = {"Origin": PORTAL}
    wrapped = cors(app, [PORTAL])
    r = await call(wrapped, "POST", scope_headers)
    assert r is not None and r.header("access-control-allow-origin") == PORTAL

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await wrapped({"type": "http", "method": "POST", "path": "/",
                   "headers": [(b"origin", PORTAL.encode()), (b"origin", b"https://x.example")]},
                  receive, send)
    assert not any(k == b"access-control-allow-origin" for k, _ in sent[0]["headers"])


async def test_lifespan_passes_through() -> None:
    app = App()
    assert await call(cors(app, [PORTAL]), "", {}, scope_type="lifespan") is None
    assert app.calls[0]["type"] == "lifespan"


# -- through the real service -----------------------------------------------------------


async def test_real_service_answers_a_browser_origin(settings: Settings) -> None:
    """Preflight, a 202, an error a page must read, and a 429 whose Retry-After it must
    see: all through the service's own app inside the wrapper."""
    import dataclasses

    cfg = dataclasses.replace(settings, max_batches_per_s=1.0)
    async with running_cors_service(cfg, [PORTAL]) as svc:
        r = await svc.client.options("/v1/pose/frames", headers=preflight(PORTAL))
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == PORTAL

        tok = session_token(cfg, session_id="cors-1")
        headers = {"Authorization": f"Bearer {tok}", "Content-Type": CONTENT_TYPE,
                   "Origin": PORTAL}
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=headers)
        assert r.status_code == 202 and r.headers["access-control-allow-origin"] == PORTAL

        r = await svc.client.post("/v1/pose/frames", content=b"junk", headers=headers)
        assert r.status_code == 400 and r.headers["access-control-allow-origin"] == PORTAL

        statuses = []
        for seq in range(1, 5):  # rate 1/s, burst 2: the bucket runs dry
            r = await svc.client.post("/v1/pose/frames", content=batch_body(seq),
                                      headers=headers)
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
        assert statuses[-1] == 429, statuses
        assert r.headers["access-control-allow-origin"] == PORTAL
        assert r.headers["access-control-expose-headers"] == "retry-after, x-request-id"
        assert int(r.headers["retry-after"]) >= 1

        r = await svc.client.post("/v1/pose/frames", content=batch_body(9),
                                  headers={**headers, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers

        r = await svc.client.get("/v1/healthz")  # no Origin: as before
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


async def test_real_service_correlates_and_counts_refusals(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Wired as ``telemetry serve`` wires it (``TELEMETRY_CORS_ORIGINS``): a page's own
    X-Request-Id passes the preflight and comes back readable; refused preflights are
    counted by reason and logged with the origin's host only."""
    caplog.set_level(logging.INFO, logger="telemetry.cors")
    cfg = dataclasses.replace(settings, cors_origins=(PORTAL,))
    async with running_service(cfg) as svc:
        r = await svc.client.options("/v1/pose/frames", headers=preflight(
            PORTAL, request_headers="authorization,content-type,x-request-id"))
        assert r.status_code == 204
        assert "x-request-id" in r.headers["access-control-allow-headers"].split(", ")

        tok = session_token(cfg, session_id="cors-2")
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0), headers={
            "Authorization": f"Bearer {tok}", "Content-Type": CONTENT_TYPE, "Origin": PORTAL,
            "X-Request-Id": "page-req-42"})
        assert r.status_code == 202
        assert r.headers["x-request-id"] == "page-req-42"
        exposed = r.headers["access-control-expose-headers"].split(", ")
        assert "x-request-id" in exposed and "retry-after" in exposed

        for headers in (preflight("https://evil.example/x"), preflight("https://evil.example"),
                        preflight(PORTAL, method="PUT"),
                        preflight(PORTAL, request_headers="x-debug")):
            r = await svc.client.options("/v1/sessions/cors-2/end", headers=headers)
            assert r.status_code == 403
        m = await scrape(svc)
    name = "telemetry_cors_preflight_refused_total"
    assert m.value(name, reason="cors_origin_not_allowed") == 2
    assert m.value(name, reason="cors_method_not_allowed") == 1
    assert m.value(name, reason="cors_header_not_allowed") == 1
    refused = [x for x in caplog.records if x.getMessage() == "cors preflight refused"]
    assert [x.origin_host for x in refused] == [  # type: ignore[attr-defined]
        "evil.example", "evil.example", "portal.example", "portal.example"]
    assert not any("cors-2" in str(vars(x)) for x in refused)
