"""End-to-end over a real socket: every answer of the ingest, end, admin and health APIs."""

from __future__ import annotations

import dataclasses
import gzip

import pytest
import trio

from domain.pose_batch import CONTENT_TYPE
from storage.blobs import blob_key
from storage.replay import read_replay
from telemetry.config import Settings
from tests.support.payloads import admin_token, batch_body, hdr, session_token
from tests.support.service import running_service


async def test_ingest_end_and_blob(settings: Settings) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings, exercise={"kind": "squat", "target_reps": 5})
        for seq in range(3):
            r = await svc.client.post("/v1/pose/frames", content=batch_body(seq), headers=hdr(tok))
            assert r.status_code == 202, r.text
            assert r.json() == {"seq": seq, "duplicate": False}
        r = await svc.client.post("/v1/pose/frames", content=batch_body(1), headers=hdr(tok))
        assert r.status_code == 202 and r.json() == {"seq": 1, "duplicate": True}

        r = await svc.client.post("/v1/sessions/sess-1/end", headers=hdr(tok))
        assert r.status_code == 200, r.text
        summary = r.json()
        assert summary["end_reason"] == "client_end"
        assert summary["pose"]["frames"] == 90 and summary["pose"]["batches_duplicate"] == 1
        assert summary["exercise"]["kind"] == "squat"
        assert summary["reps"]["target_reps"] == 5
        again = await svc.client.post("/v1/sessions/sess-1/end", headers=hdr(tok))
        assert again.json() == summary
        late = await svc.client.post("/v1/pose/frames", content=batch_body(3), headers=hdr(tok))
        assert late.status_code == 409 and late.json()["error"]["code"] == "session_ended"

        data = await svc.storage.store.get(blob_key("org-a", "sess-1"))
        assert summary["blob"]["size"] == len(data) and gzip.decompress(data)
        replay = read_replay(data)
        assert replay.frames.shape == (90, 33, 4)
    assert [e["session_id"] for e in svc.events] == ["sess-1"]


# Over-cap bodies are answered 413 and the connection closed without reading them (by
# design); httpx then drops its unfinished upload generator, a client-side warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_every_refusal_is_precise_json(settings: Settings) -> None:
    settings = dataclasses.replace(settings, max_body_bytes=64 * 1024)
    async with running_service(settings) as svc:
        tok = session_token(settings)
        post = svc.client.post

        async def expect(status: int, code: str, **kw: object) -> None:
            r = await post(kw.pop("path", "/v1/pose/frames"), **kw)  # type: ignore[arg-type]
            assert r.status_code == status, r.text
            assert r.json()["error"]["code"] == code
            assert r.json()["error"]["message"]

        await expect(401, "missing_token", content=batch_body(0),
                     headers={"Content-Type": CONTENT_TYPE})
        await expect(401, "bad_signature", content=batch_body(0), headers=hdr(tok[:-4] + "AAAA"))
        expired = session_token(settings, ttl_s=-300)
        await expect(401, "expired", content=batch_body(0), headers=hdr(expired))
        no_consent = session_token(settings, biometric=False)
        await expect(403, "consent_required", content=batch_body(0), headers=hdr(no_consent))
        await expect(415, "unsupported_media_type", content=batch_body(0),
                     headers=hdr(tok, "application/json"))
        await expect(413, "body_too_large", content=b"\0" * (65 * 1024), headers=hdr(tok))
        await expect(400, "bad_magic", content=b"XXXX" + batch_body(0)[4:], headers=hdr(tok))
        await expect(400, "too_many_frames", content=batch_body(0, n=121), headers=hdr(tok))
        ok = await post("/v1/pose/frames", content=batch_body(0), headers=hdr(tok))
        assert ok.status_code == 202
        # batch 1 re-sends batch 0's timestamps
        body = bytearray(batch_body(0))
        body[8] = 1
        await expect(400, "timestamps_overlap", content=bytes(body), headers=hdr(tok))
        r = await post("/v1/pose/frames", content=batch_body(1, space="world"), headers=hdr(tok))
        assert r.status_code == 400 and r.json()["error"]["code"] == "space_changed"
        await expect(503, "sequence_ahead_of_window", content=batch_body(50), headers=hdr(tok))
        other = session_token(settings, session_id="sess-2")
        await expect(401, "scope_mismatch", path="/v1/sessions/sess-1/end", headers=hdr(other))
        # nothing from the refused requests reached the session
        r = await post("/v1/sessions/sess-1/end", headers=hdr(tok))
        assert r.json()["pose"]["frames"] == 30
        nc = await post("/v1/pose/frames", content=batch_body(0), headers=hdr(no_consent))
        assert nc.status_code == 403


async def test_no_consent_stores_nothing(settings: Settings) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings, biometric=False)
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=hdr(tok))
        assert r.status_code == 403
        r = await svc.client.get("/v1/admin/sessions",
                                 headers={"Authorization": f"Bearer {admin_token(settings)}"})
        assert r.json()["count"] == 0
        assert not await svc.storage.store.exists(blob_key("org-a", "sess-1"))


async def test_out_of_order_batches_are_put_in_order(settings: Settings) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings)
        for seq in (0, 2, 3, 1, 4):
            r = await svc.client.post("/v1/pose/frames", content=batch_body(seq), headers=hdr(tok))
            assert r.status_code == 202, r.text
        r = await svc.client.post("/v1/sessions/sess-1/end", headers=hdr(tok))
        s = r.json()
        assert s["pose"]["frames"] == 150 and s["pose"]["batches_skipped"] == 0
        replay = read_replay(await svc.storage.store.get(s["blob"]["key"]))
        assert (replay.t_ms[1:] > replay.t_ms[:-1]).all()


async def test_same_session_id_in_two_orgs_is_two_sessions(settings: Settings) -> None:
    async with running_service(settings) as svc:
        a = session_token(settings, org_id="org-a")
        b = session_token(settings, org_id="org-b")
        await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=hdr(a))
        for seq in range(2):
            await svc.client.post("/v1/pose/frames", content=batch_body(seq), headers=hdr(b))
        ra = (await svc.client.post("/v1/sessions/sess-1/end", headers=hdr(a))).json()
        rb = (await svc.client.post("/v1/sessions/sess-1/end", headers=hdr(b))).json()
        assert (ra["org_id"], ra["pose"]["frames"]) == ("org-a", 30)
        assert (rb["org_id"], rb["pose"]["frames"]) == ("org-b", 60)
        assert ra["blob"]["key"].startswith("org-a/") and rb["blob"]["key"].startswith("org-b/")


async def test_admin_and_health(settings: Settings) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings)
        adm = {"Authorization": f"Bearer {admin_token(settings)}"}
        assert (await svc.client.get("/v1/healthz")).json() == {"status": "ok"}
        assert (await svc.client.get("/v1/readyz")).status_code == 200
        await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=hdr(tok))
        await trio.sleep(0.05)
        r = await svc.client.get("/v1/admin/sessions", headers=adm)
        (row,) = r.json()["sessions"]
        assert row["session_id"] == "sess-1" and row["frames"] == 30 and row["bytes_held"] > 0
        assert "patient_id" not in row
        r = await svc.client.get("/v1/admin/sessions", headers={"Authorization": f"Bearer {tok}"})
        assert r.status_code == 403
        r = await svc.client.get("/v1/admin/sessions")
        assert r.status_code == 401
        r = await svc.client.get("/v1/admin/sessions/sess-1", headers=adm)
        assert r.json()["batches"] == 1
        assert (await svc.client.get("/v1/admin/sessions/nope", headers=adm)).status_code == 404
        r = await svc.client.post("/v1/admin/sessions/sess-1/end", headers=adm)
        assert r.status_code == 200 and r.json()["end_reason"] == "admin"
        assert (await svc.client.get("/v1/admin/sessions", headers=adm)).json()["count"] == 0


async def test_end_without_frames_publishes_empty_summary(settings: Settings) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings)
        r = await svc.client.post("/v1/sessions/sess-1/end", headers=hdr(tok))
        assert r.status_code == 200
        assert r.json()["pose"]["frames"] == 0 and r.json()["blob"] is None
    assert len(svc.events) == 1


async def test_mailbox_full_answers_503_with_retry_after(settings: Settings) -> None:
    settings = dataclasses.replace(settings, mailbox_size=1)
    async with running_service(settings) as svc:
        tok = session_token(settings)
        assert (await svc.client.post("/v1/pose/frames", content=batch_body(0),
                                      headers=hdr(tok))).status_code == 202
        (actor,) = svc.supervisor.live()
        # Failure injection: a mailbox with no room, as if the actor were stalled.
        actor._tx, _rx = trio.open_memory_channel(0)
        r = await svc.client.post("/v1/pose/frames", content=batch_body(1), headers=hdr(tok))
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "mailbox_full"
        _rx.close()
        actor._tx.close()


@pytest.mark.parametrize("path", ["/v1/nope"])
async def test_unknown_path_is_json_404(settings: Settings, path: str) -> None:
    async with running_service(settings) as svc:
        r = await svc.client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_refused_first_batch_leaves_no_session_behind(settings: Settings) -> None:
    """A session continuing from another instance (first batch here far past seq 0)
    must not leave an empty actor whose idle timeout publishes an empty summary."""
    async with running_service(settings) as svc:
        tok = session_token(settings)
        r = await svc.client.post("/v1/pose/frames", content=batch_body(50), headers=hdr(tok))
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "sequence_ahead_of_window"
        await trio.sleep(0.05)
        assert svc.supervisor.live() == []
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=hdr(tok))
        assert r.status_code == 202  # not mistaken for an ended session
        r = await svc.client.post("/v1/sessions/sess-1/end", headers=hdr(tok))
        assert r.json()["pose"]["frames"] == 30
    assert [e["pose"]["frames"] for e in svc.events] == [30]  # one event, the real one
