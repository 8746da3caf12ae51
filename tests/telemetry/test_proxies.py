"""The client address behind proxies: ``X-Forwarded-For`` is believed only across the
hops ``TELEMETRY_TRUSTED_PROXIES`` names, on both the lean (pose) and the Quart side,
and the address is still logged truncated."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from typing import Any

import httpx
import pytest

from domain.pose_batch import CONTENT_TYPE
from telemetry.asgi import forwarded_client, parse_networks, trusted_client
from telemetry.config import ConfigError, Settings
from tests.support.payloads import batch_body
from tests.support.service import running_service

TRUSTED = parse_networks("127.0.0.0/8, 10.0.0.0/8, fd00::/8")
BROWSER, SPOOFED = "203.0.113.77", "198.51.100.66"


@pytest.mark.parametrize(("peer", "xff", "client"), [
    # an untrusted peer's header is not read at all
    ("203.0.113.5", [BROWSER], "203.0.113.5"),
    ("127.0.0.1", [], "127.0.0.1"),
    ("127.0.0.1", [BROWSER], BROWSER),
    # what the client wrote itself sits left of the first untrusted hop
    ("127.0.0.1", [f"{SPOOFED}, {BROWSER}, 10.0.0.9"], BROWSER),
    # a proxy that adds a line of its own (HAProxy's option forwardfor)
    ("127.0.0.1", [SPOOFED, f"{BROWSER}, 10.1.2.3"], BROWSER),
    # only proxies: the left-most is as far as the chain goes
    ("127.0.0.1", ["10.0.0.1, 10.0.0.2"], "10.0.0.1"),
    # a malformed entry ends the walk at the trusted hop that passed it on
    ("127.0.0.1", [f"{BROWSER}, unknown"], "127.0.0.1"),
    ("127.0.0.1", [f"{BROWSER}, 10.0.0.3, garbage, 10.0.0.4"], "10.0.0.4"),
    ("127.0.0.1", [""], "127.0.0.1"),
    ("127.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
    ("127.0.0.1", [f"{BROWSER}:5555"], BROWSER),
    ("127.0.0.1", [f"::ffff:{BROWSER}"], BROWSER),
    ("::ffff:127.0.0.1", [BROWSER], BROWSER),
    ("fd00::5", ["2001:db8::7"], "2001:db8::7"),
    ("not-an-address", [BROWSER], "not-an-address"),
])
def test_forwarded_client(peer: str, xff: list[str], client: str) -> None:
    assert forwarded_client(peer, xff, TRUSTED) == client


def test_trusted_proxies_setting() -> None:
    assert Settings.from_env({}).trusted_proxies == ()
    got = Settings.from_env({"TELEMETRY_TRUSTED_PROXIES": " 10.0.0.0/8, fd00::/8,,10.0.0.0/8,"
                                                         "192.0.2.1"}).trusted_proxies
    assert got == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"),
                   ipaddress.ip_network("192.0.2.1/32"))
    for bad in ("10.0.0.5/8", "10.0.0.0/33", "proxy.internal", "*"):
        with pytest.raises(ConfigError, match="TELEMETRY_TRUSTED_PROXIES"):
            Settings.from_env({"TELEMETRY_TRUSTED_PROXIES": bad})


async def test_middleware_rewrites_http_and_websocket_scopes_only() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)

    assert trusted_client(app, ()) is app
    wrapped = trusted_client(app, TRUSTED)
    xff = [(b"X-Forwarded-For", BROWSER.encode())]
    for kind in ("http", "websocket"):
        await wrapped({"type": kind, "client": ("127.0.0.1", 5000), "headers": xff},
                      None, None)
        assert seen[-1]["client"] == (BROWSER, 0)
    untouched = {"type": "http", "client": ("192.0.2.9", 5000), "headers": xff}
    await wrapped(untouched, None, None)
    assert seen[-1] is untouched
    await wrapped({"type": "lifespan"}, None, None)
    assert seen[-1] == {"type": "lifespan"}


async def refusals(svc: Any, headers: list[tuple[str, str]]) -> None:
    """A refused request on each side of the app: the lean pose path and Quart (a
    session route and an admin route), each logging the client address."""
    post = svc.client.post
    r = await post("/v1/pose/frames", content=batch_body(0),
                   headers=httpx.Headers([("Content-Type", CONTENT_TYPE), *headers]))
    assert r.status_code == 401
    r = await post("/v1/media/events", content=b"{}",
                   headers=httpx.Headers([("Content-Type", "application/json"), *headers]))
    assert r.status_code == 401
    r = await svc.client.get("/v1/admin/sessions", headers=httpx.Headers(
        [("Authorization", "Bearer nope"), *headers]))
    assert r.status_code == 401


def clients(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """``(message, client)`` of every line that names a client."""
    return [(r.getMessage(), r.client) for r in caplog.records  # type: ignore[attr-defined]
            if hasattr(r, "client")]


async def test_untrusted_hops_are_ignored(settings: Settings,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="telemetry")
    async with running_service(settings) as svc:  # the default: nothing trusted
        await refusals(svc, [("X-Forwarded-For", BROWSER)])
    got = clients(caplog)
    assert len(got) == 6  # an `auth failed` and a `request` line per refusal
    assert {c for _, c in got} == {"127.0.0.0"}


async def test_trusted_hops_give_the_browser_address_truncated(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="telemetry")
    cfg = dataclasses.replace(settings, trusted_proxies=TRUSTED)
    async with running_service(cfg) as svc:
        # as the ALB and then the router forward it: the browser's own (spoofed)
        # entry first, the ALB's line, then the router's own line
        await refusals(svc, [("X-Forwarded-For", f"{SPOOFED}, {BROWSER}"),
                             ("X-Forwarded-For", "10.0.4.4")])
    got = clients(caplog)
    assert len(got) == 6
    assert {m for m, _ in got} == {"auth failed", "request"}
    assert {c for _, c in got} == {"203.0.113.0"}
    text = " ".join(str(vars(r)) for r in caplog.records)
    assert BROWSER not in text and SPOOFED not in text
