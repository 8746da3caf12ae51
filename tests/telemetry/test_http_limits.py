"""Abuse limits over real HTTP: each with its own status, JSON error and Retry-After."""

from __future__ import annotations

import dataclasses
import json

import pytest
import trio

from telemetry.config import Settings
from tests.support.payloads import batch_body, hdr, session_token
from tests.support.service import running_service


async def test_batches_per_second_per_session(settings: Settings) -> None:
    settings = dataclasses.replace(settings, max_batches_per_s=2.0)
    async with running_service(settings) as svc:
        tok = session_token(settings)
        codes = []
        for seq in range(6):
            r = await svc.client.post("/v1/pose/frames", content=batch_body(seq),
                                      headers=hdr(tok))
            codes.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limited"
                assert int(r.headers["Retry-After"]) >= 1
                break
        assert codes == [202, 202, 202, 202, 429]  # burst of 2 s x 2/s, then limited


async def test_live_session_limits(settings: Settings) -> None:
    settings = dataclasses.replace(settings, max_sessions_per_org=2, max_live_sessions=3)
    async with running_service(settings) as svc:
        async def start(org: str, sid: str) -> int:
            tok = session_token(settings, org_id=org, session_id=sid)
            r = await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=hdr(tok))
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "too_many_sessions"
                assert r.headers["Retry-After"] == "5"
            return r.status_code

        assert [await start("org-a", "a1"), await start("org-a", "a2")] == [202, 202]
        assert await start("org-a", "a3") == 429  # per organisation
        assert await start("org-b", "b1") == 202
        assert await start("org-c", "c1") == 429  # per process
        # ending a session frees its place
        tok = session_token(settings, org_id="org-a", session_id="a1")
        assert (await svc.client.post("/v1/sessions/a1/end", headers=hdr(tok))).status_code == 200
        assert await start("org-a", "a3") == 202


async def test_compressed_bodies_are_refused(settings: Settings) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings)
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0),
                                  headers={**hdr(tok), "Content-Encoding": "gzip"})
        assert r.status_code == 415
        assert r.json()["error"]["code"] == "unsupported_content_encoding"


@pytest.mark.parametrize(("path", "ctype"), [
    ("/v1/pose/frames", "application/x-restartix-pose"),   # the lean path
    ("/v1/media/events", "application/json"),              # through Quart
])
async def test_a_body_trickled_slowly_is_answered_408_and_closed(
        settings: Settings, path: str, ctype: str) -> None:
    # Red-team finding 7: a body at 1 byte/s was still open after 95 s.
    settings = dataclasses.replace(settings, body_timeout_s=1.0)
    async with running_service(settings) as svc:
        stream = await trio.open_tcp_stream("127.0.0.1", svc.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {session_token(settings)}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: 1000\r\n\r\n")
        await stream.send_all(head.encode())
        answer = b""
        started = trio.current_time()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                async def trickle() -> None:
                    try:
                        while True:
                            await stream.send_all(b"x")
                            await trio.sleep(0.2)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

                nursery.start_soon(trickle)
                while chunk := await stream.receive_some(65536):
                    answer += chunk
                nursery.cancel_scope.cancel()
        took = trio.current_time() - started
        await stream.aclose()
        head_part, _, body = answer.partition(b"\r\n\r\n")
        assert head_part.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"connection: close" in head_part.lower()
        assert json.loads(body)["error"]["code"] == "body_timeout"
        assert 1.0 <= took < 5
        assert (await svc.client.get("/v1/healthz")).status_code == 200
