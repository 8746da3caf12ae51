"""Abuse limits over real HTTP: each with its own status, JSON error and Retry-After."""

from __future__ import annotations

import dataclasses

from telemetry.config import Settings
from tests.conftest import batch_body, session_token
from tests.service import running_service
from tests.telemetry.test_http import hdr


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
