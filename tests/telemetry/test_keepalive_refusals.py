"""A refusal sent before the body was read must leave the connection usable: the
service reads the rest of a body within the size cap (or closes the connection), so a
client's next request on the same keep-alive connection never meets a closing socket."""

from __future__ import annotations

import dataclasses

import pytest

from domain.pose_batch import CONTENT_TYPE
from telemetry.config import Settings
from tests.support.payloads import batch_body
from tests.support.service import running_service


# Over-cap bodies are answered 413 and the connection closed without reading them (by
# design); httpx then drops its unfinished upload generator, a client-side warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_refused_bodies_do_not_break_keep_alive(settings: Settings) -> None:
    settings = dataclasses.replace(settings, max_body_bytes=64 * 1024)
    async with running_service(settings) as svc:
        body = batch_body(0)
        bad = {"Content-Type": CONTENT_TYPE, "Authorization": "Bearer x.y.z"}
        for _ in range(300):
            r = await svc.client.post("/v1/pose/frames", content=body, headers=bad)
            assert r.status_code == 401 and r.headers.get("connection") != "close"
            assert (await svc.client.get("/v1/healthz")).status_code == 200
        # a body over the cap is not read: that connection is closed instead
        r = await svc.client.post("/v1/pose/frames", content=b"\0" * (65 * 1024), headers=bad)
        assert r.status_code in (401, 413) and r.headers.get("connection") == "close"
        assert (await svc.client.get("/v1/healthz")).status_code == 200
