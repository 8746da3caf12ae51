"""`POST /v1/media/events` end to end over a real socket."""

from __future__ import annotations

import json
from typing import Any

from telemetry.config import Settings
from tests.support.payloads import admin_token, batch_body, hdr, session_token
from tests.support.service import running_service

JSON = "application/json"


def view_batch(events: list[dict[str, Any]], view: str = "v1") -> bytes:
    return json.dumps({"media_id": "ex-squat-01", "view_id": view, "media_duration_s": 120,
                       "events": events}).encode()


START = [
    {"id": "e1", "type": "session_start", "t_ms": 1000, "ttfb_ms": 120,
     "connection_type": "wifi"},
    {"id": "e2", "type": "play", "t_ms": 1500, "position_seconds": 0},
]
STALL = [
    {"id": "e3", "type": "buffering_start", "t_ms": 2000, "position_seconds": 0.5,
     "bitrate_before": 2_500_000},
    {"id": "e4", "type": "buffering_end", "t_ms": 4500, "position_seconds": 0.5},
    {"id": "e5", "type": "play", "t_ms": 4500, "position_seconds": 0.5},
]


async def test_media_events_accepted_deduplicated_and_summarised(settings: Settings) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings)
        post = svc.client.post
        r = await post("/v1/media/events", content=view_batch(START), headers=hdr(tok, JSON))
        assert r.status_code == 202, r.text
        assert r.json() == {"view_id": "v1", "applied": 2, "duplicates": 0}
        r = await post("/v1/media/events", content=view_batch(START), headers=hdr(tok, JSON))
        assert r.json() == {"view_id": "v1", "applied": 0, "duplicates": 2}
        for seq in range(6):  # pose frames 0..5.97 s; the stall is 2.0-4.5 s
            r = await post("/v1/pose/frames", content=batch_body(seq), headers=hdr(tok))
            assert r.status_code == 202
        r = await post("/v1/media/events", content=view_batch(STALL), headers=hdr(tok, JSON))
        assert r.status_code == 202 and r.json()["applied"] == 3
        summary = (await post("/v1/sessions/sess-1/end", headers=hdr(tok))).json()
        (view,) = summary["media"]
        assert view["view_id"] == "v1" and view["startup_time_ms"] == 500
        assert view["ttfb_ms"] == 120 and view["rebuffer_count"] == 1
        assert view["rebuffer_ms"] == 2500
        assert view["buffering"][0]["duration_ms"] == 2500
        assert summary["media_pose"]["stall_count"] == 1
        assert summary["media_pose"]["stall_ms"] == 2500
        late = await post("/v1/media/events", content=view_batch(STALL), headers=hdr(tok, JSON))
        assert late.status_code == 409 and late.json()["error"]["code"] == "session_ended"


async def test_media_refusals(settings: Settings) -> None:
    async with running_service(settings) as svc:
        post = svc.client.post
        no_consent = session_token(settings, analytics=False)
        r = await post("/v1/media/events", content=view_batch(START),
                       headers=hdr(no_consent, JSON))
        assert r.status_code == 403 and r.json()["error"]["code"] == "consent_required"
        adm = {"Authorization": f"Bearer {admin_token(settings)}"}
        assert (await svc.client.get("/v1/admin/sessions", headers=adm)).json()["count"] == 0

        tok = session_token(settings)
        r = await post("/v1/media/events", content=view_batch(START), headers=hdr(tok))
        assert r.status_code == 415
        bad = [{"id": "x", "type": "playing", "t_ms": 1}]
        r = await post("/v1/media/events", content=view_batch(bad), headers=hdr(tok, JSON))
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "unknown_event_type"
        assert "events[0].type" in r.json()["error"]["message"]
        r = await post("/v1/media/events", content=b"{", headers=hdr(tok, JSON))
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"
        r = await post("/v1/media/events", content=view_batch(START),
                       headers={"Content-Type": JSON})
        assert r.status_code == 401


async def test_media_only_session_without_biometric_consent(settings: Settings) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings, biometric=False)
        r = await svc.client.post("/v1/media/events", content=view_batch(START),
                                  headers=hdr(tok, JSON))
        assert r.status_code == 202
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=hdr(tok))
        assert r.status_code == 403
        s = (await svc.client.post("/v1/sessions/sess-1/end", headers=hdr(tok))).json()
        assert s["pose"]["frames"] == 0 and s["blob"] is None and len(s["media"]) == 1


async def test_unstorable_text_is_refused_with_400_naming_the_field(settings: Settings) -> None:
    """Red-team finding 2: an error message Postgres cannot store ("\\u0000", a lone
    surrogate) used to be accepted and then stall the outbox at the sink. It is refused
    at ingest, nothing of the batch is applied, and the session carries on."""
    async with running_service(settings) as svc:
        tok = session_token(settings)
        post = svc.client.post
        for escape in (r"\u0000", r"\ud800"):
            bad = {"id": "e9", "type": "error", "t_ms": 1600, "code": "MEDIA_ERR_NETWORK",
                   "message": "PLACEHOLDER"}
            raw = view_batch([*START, bad]).replace(b"PLACEHOLDER", escape.encode())
            assert escape.encode() in raw
            r = await post("/v1/media/events", content=raw, headers=hdr(tok, JSON))
            assert r.status_code == 400, r.text
            assert r.json() == {"error": {
                "code": "bad_text",
                "message": "events[2].message: must not contain NUL or unpaired surrogate "
                           "characters"}}
        r = await post("/v1/media/events", content=view_batch(START), headers=hdr(tok, JSON))
        assert r.json() == {"view_id": "v1", "applied": 2, "duplicates": 0}  # none applied before
        summary = (await post("/v1/sessions/sess-1/end", headers=hdr(tok))).json()
        assert summary["media"][0]["error_message"] is None
