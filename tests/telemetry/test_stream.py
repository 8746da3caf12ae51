"""The pose stream (/v1/pose/stream) over a real WebSocket on a real socket."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import trio
from wsproto.extensions import PerMessageDeflate

from domain.pose_batch import CONTENT_TYPE
from telemetry.config import Settings
from telemetry.stream import (
    CLOSE_ENDED,
    CLOSE_IDLE,
    CLOSE_RESTART,
    CLOSE_TOKEN,
    CLOSE_UNSUPPORTED,
    SUBPROTOCOL,
)
from tests.support.payloads import batch_body, session_token
from tests.support.service import Running, running_service
from tests.support.wsclient import WsClient, WsClosed, WsRefused


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


async def open_stream(svc: Running, **kw: object) -> WsClient:
    return await WsClient.connect(svc.port, headers=bearer(session_token(svc.settings, **kw)))


def metric(svc: Running, name: str, **labels: str) -> float:
    assert svc.state is not None
    return svc.state.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_batches_are_acknowledged_in_order_and_land_in_the_session(
        settings: Settings) -> None:
    async with running_service(settings) as svc:
        ws = await open_stream(svc)
        assert ws.headers.get("x-request-id")
        for seq in range(3):
            await ws.send_bytes(batch_body(seq))
        acks = [await ws.recv_json() for _ in range(3)]
        assert acks == [{"seq": s, "status": 202, "duplicate": False} for s in range(3)]
        # A resend (after a reconnect, say) is a duplicate, acknowledged and not applied.
        await ws.send_bytes(batch_body(1))
        assert await ws.recv_json() == {"seq": 1, "status": 202, "duplicate": True}
        await ws.close()

        token = session_token(settings)
        r = await svc.client.post("/v1/sessions/sess-1/end",
                                  headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert r.json()["pose"]["frames"] == 90
        assert metric(svc, "telemetry_batches_total", endpoint="pose", outcome="accepted") == 3
        assert metric(svc, "telemetry_batches_total", endpoint="pose", outcome="duplicate") == 1
        assert metric(svc, "telemetry_pose_streams_closed_total", reason="closed") == 1


async def test_stream_and_post_share_one_session_sequence(settings: Settings) -> None:
    async with running_service(settings) as svc:
        token = session_token(settings)
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0), headers={
            "Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE})
        assert r.status_code == 202
        ws = await WsClient.connect(svc.port, headers=bearer(token))
        await ws.send_bytes(batch_body(0))
        await ws.send_bytes(batch_body(1))
        assert await ws.recv_json() == {"seq": 0, "status": 202, "duplicate": True}
        assert await ws.recv_json() == {"seq": 1, "status": 202, "duplicate": False}
        await ws.close()


async def test_browsers_authenticate_with_a_bearer_subprotocol(settings: Settings) -> None:
    async with running_service(settings) as svc:
        token = session_token(settings)
        ws = await WsClient.connect(svc.port, subprotocols=[SUBPROTOCOL, f"bearer.{token}"])
        assert ws.subprotocol == SUBPROTOCOL  # never the token
        await ws.send_bytes(batch_body(0))
        assert (await ws.recv_json())["status"] == 202
        await ws.close()


@pytest.mark.parametrize(("kind", "status", "code"), [
    ("none", 401, "missing_token"),
    ("garbage", 401, "malformed_token"),
    ("expired", 401, "expired"),
    ("no_consent", 403, "consent_required"),
    ("two_bearers", 401, "malformed_token"),
])
async def test_refused_handshakes_get_the_json_error(settings: Settings, kind: str,
                                                     status: int, code: str) -> None:
    async with running_service(settings) as svc:
        headers: list[tuple[str, str]] = []
        subprotocols: list[str] = []
        if kind == "garbage":
            headers = [("Authorization", "Basic abc")]
        elif kind == "expired":
            headers = bearer(session_token(settings, ttl_s=60, now=time.time() - 3600))
        elif kind == "no_consent":
            headers = bearer(session_token(settings, biometric=False))
        elif kind == "two_bearers":
            t = session_token(settings)
            subprotocols = [SUBPROTOCOL, f"bearer.{t}", f"bearer.{t}"]
        with pytest.raises(WsRefused) as refused:
            await WsClient.connect(svc.port, headers=headers, subprotocols=subprotocols)
        assert refused.value.status == status
        assert refused.value.json()["error"]["code"] == code
        assert refused.value.headers.get("x-request-id")
        assert svc.supervisor.live() == []


async def test_permessage_deflate_is_not_negotiated(settings: Settings) -> None:
    """A browser always offers compression; the server must decline it (inflation
    is unbounded in wsproto: a small message could become a huge one)."""
    async with running_service(settings) as svc:
        ws = await WsClient.connect(svc.port, headers=bearer(session_token(settings)),
                                    extensions=[PerMessageDeflate()])
        assert ws.extensions == []
        await ws.send_bytes(batch_body(0))
        assert (await ws.recv_json())["status"] == 202
        await ws.close()


async def test_streams_from_origins_outside_the_allowed_list_are_refused(
        settings: Settings) -> None:
    settings = dataclasses.replace(settings, cors_origins=("https://portal.example",))
    async with running_service(settings) as svc:
        headers = bearer(session_token(settings))
        with pytest.raises(WsRefused) as refused:
            await WsClient.connect(svc.port, headers=[*headers, ("Origin", "https://evil.example")])
        assert refused.value.status == 403
        assert refused.value.json()["error"]["code"] == "cors_origin_not_allowed"
        ws = await WsClient.connect(svc.port,
                                    headers=[*headers, ("Origin", "https://Portal.example:443")])
        await ws.close()
        ws = await WsClient.connect(svc.port, headers=headers)  # not a browser: no Origin
        await ws.close()


async def test_plain_http_on_the_stream_path_is_426(settings: Settings) -> None:
    async with running_service(settings) as svc:
        r = await svc.client.get("/v1/pose/stream")
        assert r.status_code == 426
        assert r.json()["error"]["code"] == "upgrade_required"
        assert r.headers["upgrade"] == "websocket"  # RFC 9110: a 426 names the protocol


@pytest.mark.parametrize("path", ["/v1/pose/stream/", "/v1/pose/frames", "/v1/healthz",
                                  "/nope"])
async def test_a_websocket_on_another_path_is_a_json_404(settings: Settings, path: str) -> None:
    """The stream is the only WebSocket endpoint; a handshake anywhere else gets the
    404 an unknown URL gets (it was a bare 500 from hypercorn, with an error
    traceback logged: Quart's error handlers need an HTTP request context)."""
    async with running_service(settings, websocket_ping_s=None) as svc:
        with pytest.raises(WsRefused) as refused:
            await WsClient.connect(svc.port, path, headers=[
                ("Authorization", f"Bearer {session_token(settings)}")])
        assert refused.value.status == 404
        assert refused.value.json()["error"]["code"] == "not_found"
        assert "/v1/pose/stream" in refused.value.json()["error"]["message"]


async def test_a_bad_batch_is_refused_and_the_stream_goes_on(settings: Settings) -> None:
    async with running_service(settings) as svc:
        ws = await open_stream(svc)
        await ws.send_bytes(b"RXPB" + b"\x00" * 4)
        nack = await ws.recv_json()
        assert nack["seq"] is None and nack["status"] == 400
        assert nack["error"]["code"] == "truncated"
        bad = bytearray(batch_body(0))
        bad[4] = 9  # version
        await ws.send_bytes(bytes(bad))
        nack = await ws.recv_json()
        assert (nack["seq"], nack["status"]) == (0, 400)
        assert nack["error"]["code"] == "unsupported_version"
        await ws.send_bytes(batch_body(0))
        assert (await ws.recv_json())["status"] == 202
        await ws.close()
        assert metric(svc, "telemetry_batches_rejected_total", endpoint="pose",
                      reason="truncated") == 1


async def test_text_messages_close_the_stream(settings: Settings) -> None:
    async with running_service(settings) as svc:
        ws = await open_stream(svc)
        await ws.send_text("hello")
        with pytest.raises(WsClosed) as closed:
            await ws.recv()
        assert closed.value.code == CLOSE_UNSUPPORTED


async def test_a_message_over_the_body_cap_closes_the_stream(settings: Settings) -> None:
    settings = dataclasses.replace(settings, max_body_bytes=20_000)
    async with running_service(settings) as svc:
        ws = await open_stream(svc)
        await ws.send_bytes(batch_body(0, n=60))  # 31,940 bytes
        with pytest.raises(WsClosed) as closed:
            await ws.recv()
        assert closed.value.code == 1009  # message too big
        assert svc.supervisor.live() == []


async def test_rate_limit_is_flow_control_not_refusal(settings: Settings) -> None:
    """POST answers a burst past the rate limit with 429; the stream answers every
    batch 202, later."""
    settings = dataclasses.replace(settings, max_batches_per_s=5.0)
    async with running_service(settings) as svc:
        token = session_token(settings, session_id="posted")
        statuses = []
        for seq in range(14):
            r = await svc.client.post("/v1/pose/frames", content=batch_body(seq), headers={
                "Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE})
            statuses.append(r.status_code)
        assert 429 in statuses

        ws = await open_stream(svc, session_id="streamed")
        for seq in range(14):
            await ws.send_bytes(batch_body(seq))
        acks = [await ws.recv_json() for _ in range(14)]
        assert [a["status"] for a in acks] == [202] * 14
        assert [a["seq"] for a in acks] == list(range(14))
        await ws.close()


async def test_session_end_closes_the_stream_on_its_next_batch(settings: Settings) -> None:
    async with running_service(settings) as svc:
        ws = await open_stream(svc)
        await ws.send_bytes(batch_body(0))
        assert (await ws.recv_json())["status"] == 202
        r = await svc.client.post("/v1/sessions/sess-1/end", headers={
            "Authorization": f"Bearer {session_token(settings)}"})
        assert r.status_code == 200
        await ws.send_bytes(batch_body(1))
        nack = await ws.recv_json()
        assert (nack["status"], nack["error"]["code"]) == (409, "session_ended")
        with pytest.raises(WsClosed) as closed:
            await ws.recv()
        assert closed.value.code == CLOSE_ENDED


async def test_the_stream_closes_when_its_token_expires(settings: Settings) -> None:
    settings = dataclasses.replace(settings, jwt_leeway_s=1.0)
    async with running_service(settings) as svc:
        ws = await WsClient.connect(svc.port, headers=bearer(session_token(settings, ttl_s=2)))
        await ws.send_bytes(batch_body(0))
        assert (await ws.recv_json())["status"] == 202
        with trio.fail_after(10):
            with pytest.raises(WsClosed) as closed:
                await ws.recv()
        assert closed.value.code == CLOSE_TOKEN


async def test_an_idle_stream_is_closed(settings: Settings) -> None:
    settings = dataclasses.replace(settings, idle_timeout_s=1.0)
    async with running_service(settings) as svc:
        ws = await open_stream(svc)
        with trio.fail_after(10):
            with pytest.raises(WsClosed) as closed:
                await ws.recv()
        assert closed.value.code == CLOSE_IDLE


async def test_shutdown_closes_streams_with_1012_and_keeps_what_was_acked(
        settings: Settings) -> None:
    async with running_service(settings) as svc:
        ws = await open_stream(svc)
        await ws.send_bytes(batch_body(0))
        assert (await ws.recv_json())["status"] == 202
        svc.stop.set()
        with trio.fail_after(10):
            with pytest.raises(WsClosed) as closed:
                await ws.recv()
        assert closed.value.code == CLOSE_RESTART
        # New streams are refused while the instance drains.
        with pytest.raises((WsRefused, OSError, trio.BrokenResourceError)):
            await open_stream(svc)
    # The acknowledged batch was spooled and is recovered by the next instance.
    async with running_service(settings) as svc:
        r = await svc.client.post("/v1/sessions/sess-1/end", headers={
            "Authorization": f"Bearer {session_token(settings)}"})
        assert r.status_code == 200
        assert r.json()["pose"]["frames"] == 30


async def test_streams_of_two_organisations_stay_apart(settings: Settings) -> None:
    async with running_service(settings) as svc:
        a = await open_stream(svc, org_id="org-a", session_id="same")
        b = await open_stream(svc, org_id="org-b", session_id="same")
        await a.send_bytes(batch_body(0))
        await b.send_bytes(batch_body(0))
        assert (await a.recv_json())["duplicate"] is False
        assert (await b.recv_json())["duplicate"] is False
        await a.close()
        await b.close()
        live = {(x.claims.org_id, x.claims.session_id) for x in svc.supervisor.live()}
        assert live == {("org-a", "same"), ("org-b", "same")}


async def test_metrics_count_open_streams(settings: Settings) -> None:
    async with running_service(settings) as svc:
        ws = await open_stream(svc)
        assert metric(svc, "telemetry_pose_streams_open") == 1
        assert metric(svc, "telemetry_http_requests_total", method="GET",
                      endpoint="/v1/pose/stream", status="101") == 1
        await ws.close()
        for _ in range(500):  # the server sees the close a moment after the client
            if metric(svc, "telemetry_pose_streams_open") == 0:
                break
            await trio.sleep(0.01)
        assert metric(svc, "telemetry_pose_streams_open") == 0
        r = await svc.client.get("/metrics")
        assert "telemetry_stream_ack_duration_seconds" in r.text




async def test_a_removed_signing_key_closes_its_open_streams(
        settings: Settings, tmp_path: Path) -> None:
    """A stream is authenticated at its handshake; once its token's key is removed
    from the keyset (revoked after a leak), the stream is closed 4401 at its next
    batch, not left open until the token expires. A stream whose key stays carries
    on through the same reload."""
    keyfile = tmp_path / "keys.json"
    a, b = "a-secret-" + "a" * 32, "b-secret-" + "b" * 32
    keyfile.write_text(json.dumps({"k-a": a, "k-b": b}))
    settings = dataclasses.replace(settings, jwt_keys_file=keyfile, jwt_keys={})
    async with running_service(settings) as svc:
        revoked = await open_stream(svc, session_id="sess-a")  # signed with k-a, the first
        keyfile.write_text(json.dumps({"k-b": b, "k-a": a}))
        kept = await open_stream(svc, session_id="sess-b")  # k-b, first now
        for ws in (revoked, kept):
            await ws.send_bytes(batch_body(0))
            assert (await ws.recv_json())["status"] == 202
        keyfile.write_text(json.dumps({"k-b": b}))
        assert svc.state is not None and svc.state.verifier.keystore.reload()
        await revoked.send_bytes(batch_body(1))
        with pytest.raises(WsClosed) as closed:
            await revoked.recv_json()
        assert closed.value.code == 4401
        await kept.send_bytes(batch_body(1))
        assert (await kept.recv_json())["status"] == 202
        await kept.close()
