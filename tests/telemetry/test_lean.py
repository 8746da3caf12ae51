"""The lean (raw ASGI) pose POST path: what it must answer like the Quart routes do."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator

import pytest
import trio

from domain.pose_batch import CONTENT_TYPE
from telemetry.config import Settings
from tests.support.payloads import batch_body, session_token
from tests.support.service import Running, running_service


def pose_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {session_token(settings)}", "Content-Type": CONTENT_TYPE}


def metric(svc: Running, name: str, **labels: str) -> float:
    assert svc.state is not None
    return svc.state.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_other_methods_get_405_with_allow(settings: Settings) -> None:
    async with running_service(settings) as svc:
        r = await svc.client.get("/v1/pose/frames")
        assert r.status_code == 405
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert r.headers["allow"] == "OPTIONS, POST"
        r = await svc.client.options("/v1/pose/frames")
        assert r.status_code == 200 and r.headers["allow"] == "OPTIONS, POST"


async def test_request_ids_are_echoed_when_safe_and_replaced_otherwise(
        settings: Settings) -> None:
    async with running_service(settings) as svc:
        h = pose_headers(settings)
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0),
                                  headers={**h, "X-Request-Id": "abc-123"})
        assert r.status_code == 202 and r.headers["x-request-id"] == "abc-123"
        r = await svc.client.post("/v1/pose/frames", content=batch_body(1),
                                  headers={**h, "X-Request-Id": "bad id\twith tab"})
        assert r.status_code == 202
        assert r.headers["x-request-id"] != "bad id\twith tab"
        assert len(r.headers["x-request-id"]) == 16


async def test_a_chunked_body_over_the_cap_is_413_and_closes(settings: Settings) -> None:
    settings = dataclasses.replace(settings, max_body_bytes=20_000)
    async with running_service(settings) as svc:
        async def chunks() -> AsyncIterator[bytes]:
            body = batch_body(0, n=60)  # 31,940 bytes, no Content-Length
            for i in range(0, len(body), 4096):
                yield body[i:i + 4096]

        r = await svc.client.post("/v1/pose/frames", content=chunks(),
                                  headers=pose_headers(settings))
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "body_too_large"
        assert r.headers["connection"] == "close"
        assert svc.supervisor.live() == []


async def test_an_unexpected_failure_is_a_json_500_and_is_logged(
        settings: Settings, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    async with running_service(settings) as svc:
        async def broken(*args: object) -> None:
            raise RuntimeError("injected")

        monkeypatch.setattr(svc.supervisor, "submit", broken)
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0),
                                  headers=pose_headers(settings))
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "internal_error"
        assert "injected" not in r.text
        assert metric(svc, "telemetry_batches_rejected_total", endpoint="pose",
                      reason="internal_error") == 1
    assert any(rec.getMessage() == "unhandled exception" for rec in caplog.records)


async def test_a_client_gone_mid_body_leaves_nothing_behind(settings: Settings) -> None:
    async with running_service(settings) as svc:
        body = batch_body(0)
        head = (f"POST /v1/pose/frames HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {session_token(settings)}\r\n"
                f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n")
        with socket.create_connection(("127.0.0.1", svc.port)) as s:
            s.sendall(head.encode() + body[:1000])
        for _ in range(200):
            if metric(svc, "telemetry_http_requests_total", method="POST",
                      endpoint="/v1/pose/frames", status="499"):
                break
            await trio.sleep(0.01)
        assert metric(svc, "telemetry_http_requests_total", method="POST",
                      endpoint="/v1/pose/frames", status="499") == 1
        assert svc.supervisor.live() == []
        r = await svc.client.post("/v1/pose/frames", content=body,
                                  headers=pose_headers(settings))
        assert r.status_code == 202
