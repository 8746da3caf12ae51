"""Red-team finding 2 over HTTP: the sink refuses an event for good with a 400, the
HttpBus says so (EventRejected), and the outbox sets it aside at once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import trio

from storage.bus import BusError, EventRejected
from storage.http_bus import HttpBus
from storage.outbox import Outbox
from storage.pg import Database
from telemetry.config import Settings
from tests.pg_fixtures import *  # noqa: F403  (until tests/conftest.py registers the plugin)
from tests.pg_fixtures import make_event
from tests.storage.test_http_bus import FlakySink, bus, serving


@pytest.mark.parametrize(("status", "final"), [(400, True), (413, True), (422, True),
                                               (401, False), (403, False), (404, False),
                                               (409, False)])
async def test_refusals_of_the_event_are_final_other_4xx_are_not(
        status: int, final: bool, autojump_clock: trio.abc.Clock) -> None:
    """400/413/422 judge the event: EventRejected, which the outbox never retries.
    401/403/404... are this sender's configuration (token, URL): a plain BusError the
    outbox retries with backoff, so fixing the configuration delivers everything."""
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status, json={"error": {"code": "x", "message": "no"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        b = HttpBus(url="http://sink/x", token_provider=lambda: "t", client=client)
        with pytest.raises(BusError, match=f"HTTP {status}") as info:
            await b.publish(make_event())
    assert isinstance(info.value, EventRejected) is final
    assert calls == 1


@pytest.mark.parametrize(("path", "text", "field"), [
    (("media", 0, "error_message"), "\x00", "media[0].error_message"),
    (("media", 0, "error_message"), "\ud800", "media[0].error_message"),
    (("patient_id",), "p\ud800", "patient_id"),
])
async def test_unstorable_text_is_refused_once_by_the_sink(
        settings: Settings, pg_db: Database, path: tuple, text: str, field: str) -> None:
    """Before the fix: NUL in JSONB was a 400 the outbox retried 50 times; a lone
    surrogate in a text column was a UnicodeEncodeError, a 500 retried 6 times per
    attempt. Now both are one 400 naming the field, final for the sender."""
    sink = FlakySink(pg_db)
    event = make_event()
    target = event
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = text
    async with serving(settings, sink) as url:
        b = bus(settings, url)
        try:
            expected = rf"HTTP 400: .*{re.escape(field)}: contains NUL"
            with pytest.raises(EventRejected, match=expected):
                await b.publish(event)
        finally:
            await b.aclose()
    assert (sink.calls, b.retries) == (1, 0)
    assert await sink.session_rows("org-a") == []


async def test_outbox_sets_a_refused_event_aside_and_delivers_the_rest(
        settings: Settings, pg_db: Database, tmp_path: Path) -> None:
    """The red team's measurement, reversed: the poisoned summary goes to dead/ at its
    first 400, and the three other organisations' summaries behind it are stored at
    once (before: depth stayed 4 for 60 s and more)."""
    sink = FlakySink(pg_db)
    poisoned = make_event("org-x", "s-bad")
    poisoned["media"][0]["error_message"] = "\x00"
    async with serving(settings, sink) as url:
        outbox = Outbox(tmp_path / "outbox", bus(settings, url))
        await outbox.publish(poisoned)
        for org in ("org-a", "org-b", "org-c"):
            await outbox.publish(make_event(org, "s-1"))
        async with trio.open_nursery() as nursery:
            await nursery.start(outbox.run)
            with trio.fail_after(10):
                while outbox.depth:  # noqa: ASYNC110 - polling a test's condition
                    await trio.sleep(0.01)
            await outbox.aclose()
    assert outbox.stats() == {"delivered": 3, "failures": 1, "rejected": 1, "dead": 1,
                              "corrupt": 0, "depth": 0}
    (dead,) = (tmp_path / "outbox" / "dead").iterdir()
    doc = json.loads(dead.read_bytes())
    assert doc["attempts"] == 1 and "media[0].error_message" in doc["last_error"]
    assert sink.calls == 4
    for org in ("org-a", "org-b", "org-c"):
        assert [r["session_id"] for r in await sink.session_rows(org)] == ["s-1"]
