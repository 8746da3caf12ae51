"""The end call's promise under storage failures, over real HTTP to the real service.

``docs/durability.md``: a 200 from the end call means the replay blob is stored and
the summary event is in the outbox; until then the end call answers 503 with
``Retry-After`` (within a bounded wait), finalisation carries on retrying, and a
repeated end call gets the 200 once it is stored. A session whose end was recorded
refuses batches (409) across a restart too; one whose end could not be recorded
carries on after a restart, as its disk says.

Failures are injected into the real spool and blob store (``tests/faultutil.py``):
a spool whose commits fail with ENOSPC (a full data disk), a blob store whose puts
fail. Everything else is real: sockets, spool files, blobs, outbox.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
import trio

from actors.durable import session_key
from storage.blobs import blob_key
from telemetry.config import Settings
from tests.support import faults as fu
from tests.support.payloads import batch_body, hdr, session_token
from tests.support.service import Running, running_service

ORG = "org-a"
# Short, so a test sees the 503 quickly; the default (END_WAIT_S) is what clients get.
WAIT_S = 1.0
# For an end call that must get its 200 once storage is back: a whole finalisation
# (blob, fsyncs, outbox) within it even on a loaded CI machine.
SETTLE_S = 30.0


def _settings(settings: Settings) -> Settings:
    # A quick stop for the restarts: an actor still retrying is cancelled after this,
    # and resumes from the spool at the next start.
    return dataclasses.replace(settings, shutdown_deadline_s=1.0)


async def _start(svc: Running, sid: str, n: int) -> str:
    svc.supervisor.end_wait_s = WAIT_S
    tok = session_token(svc.settings, org_id=ORG, session_id=sid)
    for seq in range(n):
        r = await svc.client.post("/v1/pose/frames", content=batch_body(seq), headers=hdr(tok))
        assert r.status_code == 202, r.text
    return tok


async def _end(svc: Running, sid: str, tok: str) -> httpx.Response:
    return await svc.client.post(f"/v1/sessions/{sid}/end", headers=hdr(tok))


async def _batch(svc: Running, tok: str, seq: int) -> httpx.Response:
    return await svc.client.post("/v1/pose/frames", content=batch_body(seq), headers=hdr(tok))


def _assert_503(r: httpx.Response, code: str) -> None:
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == code, r.text
    assert int(r.headers["Retry-After"]) >= 1


def _assert_stored(data_dir: Path, summary: dict[str, Any], sid: str, frames: int) -> None:
    """The 200's promise: the blob is there with the summary's hash, every
    acknowledged frame is counted, and the event is published."""
    assert summary["published"] is True and summary["error"] is None, summary
    assert summary["pose"]["frames"] == frames
    blob = (data_dir / "blobs" / blob_key(ORG, sid)).read_bytes()
    assert summary["blob"]["sha256"] == hashlib.sha256(blob).hexdigest()


async def _ok(answer: Awaitable[httpx.Response]) -> httpx.Response | None:
    """The answer if it is a 200; None for a 503 (ask again), failing on anything else."""
    r = await answer
    if r.status_code == 503:
        return None
    assert r.status_code == 200, r.text
    return r


def _state(data_dir: Path, sid: str) -> dict[str, Any] | None:
    path = data_dir / "spool" / f"{session_key(ORG, sid)}.state.json"
    try:
        return dict(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None


def _events(svc: Running, sid: str) -> list[dict[str, Any]]:
    return [e for e in svc.events if e["session_id"] == sid]


async def test_disk_full_at_end_is_503_then_200_once_stored(settings: Settings) -> None:
    """(a) The spool cannot record the end: 503 + Retry-After, not a 200 with no
    blob; batches meanwhile are told to retry; once the disk takes writes again the
    retried end call returns 200 with the blob stored and the event published."""
    sid = "full-1"
    async with running_service(_settings(settings)) as svc:
        tok = await _start(svc, sid, 3)
        disk = fu.DiskFull(svc.storage.spool)
        with trio.fail_after(WAIT_S + 5):
            r = await _end(svc, sid, tok)
        _assert_503(r, "storage_unavailable")
        # Its end is not durable: a batch is neither taken nor told "ended".
        _assert_503(await _batch(svc, tok, 3), "session_ending")
        _assert_503(await _end(svc, sid, tok), "storage_unavailable")
        assert disk.failed >= 2  # retried in the background meanwhile
        assert _events(svc, sid) == []

        disk.full = False
        # A whole finalisation must now fit in the wait: not 1 s on a busy machine.
        svc.supervisor.end_wait_s = SETTLE_S
        with trio.fail_after(SETTLE_S + 5):
            r = await _end(svc, sid, tok)
        assert r.status_code == 200, r.text
        summary = r.json()
        _assert_stored(svc.settings.data_dir, summary, sid, 90)
        assert summary["end_reason"] == "client_end"
        await fu.poll(lambda: _events(svc, sid), 10, 0.02)
        assert (await _end(svc, sid, tok)).json() == summary
        assert (await _batch(svc, tok, 3)).status_code == 409
        assert len(_events(svc, sid)) == 1


async def test_blob_store_down_at_end_answers_503_in_bounded_time(settings: Settings) -> None:
    """(b) The blob store fails: the end call answers 503 + Retry-After within its
    bound instead of hanging; the end is recorded (batches get 409); finalisation
    completes in the background once the store is back, and the end call then
    returns 200 with the blob stored and the event published."""
    sid = "blob-down-1"
    async with running_service(_settings(settings)) as svc:
        tok = await _start(svc, sid, 3)
        store = fu.BlobStoreDown(svc.storage.store)
        t0 = trio.current_time()
        with trio.fail_after(WAIT_S + 5):
            r = await _end(svc, sid, tok)
        assert trio.current_time() - t0 < WAIT_S + 2
        _assert_503(r, "finalising")
        assert (await _batch(svc, tok, 3)).status_code == 409
        assert store.attempts >= 1
        assert _state(svc.settings.data_dir, sid) == {"step": "upload",
                                                      "end_reason": "client_end"}

        store.down = False
        # No further end call: the background retry finishes the job on its own.
        await fu.poll(lambda: _events(svc, sid), 30, 0.05)
        svc.supervisor.end_wait_s = SETTLE_S  # the summary is kept just after the event
        with trio.fail_after(SETTLE_S + 5):
            r = await _end(svc, sid, tok)
        assert r.status_code == 200, r.text
        _assert_stored(svc.settings.data_dir, r.json(), sid, 90)
        assert _events(svc, sid)[0]["event_id"] == r.json()["event_id"]
        assert fu.spool_keys(svc.settings.data_dir) == []


async def test_a_recorded_end_survives_a_restart(settings: Settings) -> None:
    """(c) An end call whose finalisation could not complete (disk full, then the
    blob store down): once the end is recorded, a restart does not bring the
    session back live; the next start finalises it, and every acknowledged frame
    is in the blob."""
    sid = "restart-1"
    s = _settings(settings)
    async with running_service(s) as svc:
        tok = await _start(svc, sid, 3)
        disk = fu.DiskFull(svc.storage.spool)
        store = fu.BlobStoreDown(svc.storage.store)
        answers = [await _end(svc, sid, tok)]
        disk.full = False
        # The end is recorded by the background retry, without another call.
        with trio.move_on_after(30):
            await fu.poll(lambda: _state(s.data_dir, sid), 30, 0.05)
        answers += [await _end(svc, sid, tok), await _batch(svc, tok, 3)]
        attempts, events = store.attempts, _events(svc, sid)

    # Restarted on the same data dir, storage healthy: not live again.
    async with running_service(s) as svc:
        svc.supervisor.end_wait_s = WAIT_S
        assert (await _batch(svc, tok, 3)).status_code == 409
        # What was answered before the restart: never a 200, and 409 once recorded.
        _assert_503(answers[0], "storage_unavailable")
        _assert_503(answers[1], "finalising")
        assert answers[2].status_code == 409
        assert attempts >= 1 and events == []
        # Recovery finalises it at once; an end call meanwhile may still get a 503.
        r = await fu.poll(lambda: _ok(_end(svc, sid, tok)), WAIT_S + 10)
        _assert_stored(s.data_dir, r.json(), sid, 90)
        await fu.poll(lambda: _events(svc, sid), 10, 0.02)
        assert fu.spool_keys(s.data_dir) == []


async def test_an_unrecorded_end_leaves_the_session_live_after_a_restart(
        settings: Settings) -> None:
    """The other side of (c): the disk never took the end (the end call got 503, a
    batch got 503, nothing was promised), so after a restart the session carries
    on, consistently with its disk: it takes the batch, and the end call then
    returns 200 with every acknowledged frame."""
    sid = "restart-2"
    s = _settings(settings)
    async with running_service(s) as svc:
        tok = await _start(svc, sid, 3)
        fu.DiskFull(svc.storage.spool)
        _assert_503(await _end(svc, sid, tok), "storage_unavailable")
        _assert_503(await _batch(svc, tok, 3), "session_ending")

    async with running_service(s) as svc:
        svc.supervisor.end_wait_s = SETTLE_S  # this end call must see the 200
        assert (await _batch(svc, tok, 3)).status_code == 202
        r = await _end(svc, sid, tok)
        assert r.status_code == 200, r.text
        _assert_stored(s.data_dir, r.json(), sid, 120)


async def test_admin_end_answers_503_then_the_summary(settings: Settings) -> None:
    """The admin end call keeps the same promise, and a repeated admin call finds
    the session after it has left the live registry."""
    from tests.support.payloads import admin_token

    sid = "admin-1"
    async with running_service(_settings(settings)) as svc:
        await _start(svc, sid, 2)
        adm = {"Authorization": f"Bearer {admin_token(settings)}"}
        store = fu.BlobStoreDown(svc.storage.store)
        r = await svc.client.post(f"/v1/admin/sessions/{sid}/end", headers=adm)
        _assert_503(r, "finalising")
        store.down = False
        # Finished in the background (event out, log removed): no longer live.
        await fu.poll(lambda: _events(svc, sid) and not svc.supervisor.find(sid), 30, 0.05)
        r = await svc.client.post(f"/v1/admin/sessions/{sid}/end", headers=adm)
        assert r.status_code == 200, r.text
        assert r.json()["end_reason"] == "admin"
        _assert_stored(svc.settings.data_dir, r.json(), sid, 60)
