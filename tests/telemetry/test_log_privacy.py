"""Logs carry no personal data: full sessions over real HTTP, then every line scanned.

The service logs JSON lines (``telemetry.logs``) at DEBUG into a buffer while
several complete sessions run (pose batches, media events, end, the embedded sink
writing Postgres) next to refused requests (bad tokens, wrong session, no
consent). Then every line must be JSON and free of raw patient ids, raw session
ids and the full client IP. Patient and session ids here are distinctive
strings, and the client connects from its own loopback address ``127.0.0.9`` (the
server's bind address, 127.0.0.1, is not a client's and may be logged), so a hit
cannot be a coincidence; the scan also asserts it saw the
pseudonymised lines (``s_...``, ``p_...``) and truncated IPs (``127.0.0.0``), so it
cannot pass by capturing nothing.

Lines from ``httpx``/``httpcore`` are the *test client's* own request log (it runs in
the same process and logs the URLs it calls); the service never logs through them
except in the HTTP bus, which posts to the Core API's fixed URL.

The error paths get their own run: the disk fills up under live sessions, and every
error line, its traceback included, is scanned the same way. Those lines are where
ids hide: in exception messages (a key ``org/session``) and in an OSError's file
name (a spool path built from the ids).
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
import trio

from domain.pose_batch import CONTENT_TYPE
from domain.privacy import Pseudonymiser
from telemetry import logs
from telemetry.config import Settings
from tests.support.payloads import batch_body, session_token
from tests.support.ready import poll
from tests.support.service import running_service

CLIENT_LOGGERS = ("httpx", "httpcore")
PATIENTS = ["pt-QX7K2M-ana", "pt-QX7K2M-bob", "pt-QX7K2M-cyd"]
SESSIONS = ["sx-ZP4R8W-001", "sx-ZP4R8W-002", "sx-ZP4R8W-003"]
ORGS = ["org-north", "org-south", "org-north"]
JSON = "application/json"
CLIENT_IP = "127.0.0.9"


@pytest.fixture
def log_buffer() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    access = logging.getLogger("hypercorn.access")
    saved = (root.handlers[:], root.level, access.disabled, sys.excepthook)
    buf = io.StringIO()
    logs.configure("DEBUG", buf)
    try:
        yield buf
    finally:
        root.handlers[:], root.level, access.disabled, sys.excepthook = saved


def media(view: str, events: list[dict[str, Any]]) -> bytes:
    return json.dumps({"media_id": "ex-squat-01", "view_id": view, "media_duration_s": 120,
                       "events": events}).encode()


MEDIA_EVENTS = [
    {"id": "e1", "type": "session_start", "t_ms": 1000, "ttfb_ms": 120, "connection_type": "wifi"},
    {"id": "e2", "type": "play", "t_ms": 1500, "position_seconds": 0},
    {"id": "e3", "type": "buffering_start", "t_ms": 2000, "position_seconds": 0.5},
    {"id": "e4", "type": "buffering_end", "t_ms": 3500, "position_seconds": 0.5},
    {"id": "e5", "type": "error", "t_ms": 3600, "code": "net_err",
     "message": "GET https://cdn.example/v.m3u8?patient=pt-QX7K2M-ana failed"},
    {"id": "e6", "type": "session_end", "t_ms": 5900, "reason": "completed"},
]


async def test_no_personal_data_in_any_log_line(
    settings: Settings, pg_url: str, log_buffer: io.StringIO
) -> None:
    s = dataclasses.replace(settings, sink="embedded", database_url=pg_url, gap_timeout_s=0.2)
    transport = httpx.AsyncHTTPTransport(local_address=CLIENT_IP)
    async with running_service(s) as svc, httpx.AsyncClient(
            base_url=svc.url, transport=transport, timeout=20) as client:
        post = client.post

        def hdr(tok: str, ctype: str = CONTENT_TYPE) -> dict[str, str]:
            return {"Authorization": f"Bearer {tok}", "Content-Type": ctype}

        for patient, sid, org in zip(PATIENTS, SESSIONS, ORGS, strict=True):
            tok = session_token(s, org_id=org, session_id=sid, patient_id=patient)
            for seq in (0, 1, 3):  # batch 2 never arrives: the actor logs a skipped gap
                r = await post("/v1/pose/frames", content=batch_body(seq), headers=hdr(tok))
                assert r.status_code == 202, r.text
            r = await post("/v1/media/events", content=media("v-1", MEDIA_EVENTS),
                           headers=hdr(tok, JSON))
            assert r.status_code == 202, r.text
            await trio.sleep(0.4)  # past the gap timeout
            # refused requests naming this patient and session, each a log path
            expired = session_token(s, org_id=org, session_id=sid, patient_id=patient,
                                    now=time.time() - 7200)
            other = session_token(s, org_id=org, session_id=sid + "-x", patient_id=patient)
            forged = jwt.encode({"sub": patient, "sid": sid, "org_id": org}, "f" * 40,
                                algorithm="HS256", headers={"kid": "dev-1"})
            no_consent = session_token(s, org_id=org, session_id=sid, patient_id=patient,
                                       biometric=False)
            for path, tk in ((f"/v1/sessions/{sid}/end", expired),
                             (f"/v1/sessions/{sid}/end", other),
                             (f"/v1/sessions/{sid}/end", forged),
                             ("/v1/pose/frames", no_consent),
                             (f"/v1/sessions/{sid}/end", "garbage")):
                r = await post(path, content=batch_body(4), headers=hdr(tk))
                assert r.status_code in (401, 403), r.text
            r = await post(f"/v1/sessions/{sid}/end", headers=hdr(tok))
            assert r.status_code == 200, r.text
            summary = r.json()
            assert summary["pose"]["batches_skipped"] == 1 and summary["published"] is True
        # admin lookups by id, one of them for a session that is not live
        adm = {"Authorization": "Bearer " + _admin(s)}
        assert (await client.get(f"/v1/admin/sessions/{SESSIONS[0]}",
                                 headers=adm)).status_code == 404
        # The end call's 200 promises the event is in the outbox, not yet in the sink:
        # wait for its delivery (the outbox delivers in the background).
        sink = svc.storage.sink
        assert sink is not None

        async def both_rows() -> set[str] | None:
            ids = {r["session_id"] for r in await sink.session_rows("org-north")}
            return ids if ids >= {SESSIONS[0], SESSIONS[2]} else None

        assert await poll(both_rows, 20) == {SESSIONS[0], SESSIONS[2]}

    lines = [line for line in log_buffer.getvalue().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    service = [(line, rec) for line, rec in zip(lines, records, strict=True)
               if not rec["logger"].startswith(CLIENT_LOGGERS)]
    assert len(service) >= 10
    forbidden = [*PATIENTS, *SESSIONS, "QX7K2M", "ZP4R8W", CLIENT_IP]
    leaks = [f"{rec['logger']}: {line}" for line, rec in service
             for word in forbidden if word in line]
    assert not leaks, "personal data in log lines:\n" + "\n".join(leaks)

    # the scan saw the lines that matter, in their pseudonymised form
    p = Pseudonymiser(s.pseudonym_key)
    text = "\n".join(line for line, _ in service)
    for patient, sid, org in zip(PATIENTS, SESSIONS, ORGS, strict=True):
        assert p.session(org, sid) in text
        assert p.patient(patient) in text
    auth_failures = [rec for _, rec in service if rec["msg"] == "auth failed"]
    assert len(auth_failures) >= 9
    assert {rec["client"] for rec in auth_failures} == {"127.0.0.0"}
    assert any("never arrived" in rec["msg"] for _, rec in service)


def _admin(s: Settings) -> str:
    from telemetry.auth import mint_service_token

    return mint_service_token(s)


# ------------------------------------------------------------------ error paths
# Ids of their own, so a hit in this test's lines cannot come from the test above.
ERR_ORG, ERR_PATIENT = "org-VB3N6T-east", "pt-VB3N6T-dee"
ERR_SESSIONS = ["sx-VB3N6T-010", "sx-VB3N6T-011", "sx-VB3N6T-012"]


class _FullDisk:
    """``storage.spool_files``'s view of :mod:`os` with the disk filling up on demand: the
    spool's real code runs, only its system calls fail, the way they do on a full
    disk (failure injection only). Creating a file fails with ENOSPC naming the path
    (``os.open`` does), a write fails without one; with ``no_truncate`` the rollback
    fails too, so the log is marked broken."""

    def __init__(self) -> None:
        self.full = False
        self.no_truncate = False

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        if self.full and flags & os.O_CREAT and not os.path.exists(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        return os.open(path, flags, mode)

    def write(self, fd: int, data: Any) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    def ftruncate(self, fd: int, size: int) -> None:
        if self.no_truncate:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.ftruncate(fd, size)


async def test_no_ids_in_error_lines_or_tracebacks(
    settings: Settings, log_buffer: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up under live sessions: refused batches (``storage failed while
    admitting data``), a log the spool cannot roll back (broken), and an end whose
    finalisation cannot write its state (``finalisation failed``). Every one of those
    lines carries a traceback whose exceptions were raised about these very ids (the
    old spool put the key in its message, and an OSError names the file); none may
    show them."""
    import actors.session
    import storage.spool_files
    from actors.durable import session_key

    disk = _FullDisk()
    monkeypatch.setattr(storage.spool_files, "os", disk)
    live, broken, fresh = ERR_SESSIONS
    real_finalise = actors.session.finalise

    async def finalise(actor: Any) -> dict[str, Any]:
        # The disk fills up as the session finalises: its state write fails for real.
        # Done here rather than left to finalise(), whose policy for storage failures
        # (give up, or retry until the disk has room) is not what this test is about.
        if actor.session_id == live and actor.journal is not None:
            disk.full = True
            try:
                await actor.journal.set_state(session_key(actor.org_id, actor.session_id),
                                            {"step": "upload", "end_reason": actor.end_reason})
            finally:
                disk.full = False
        return await real_finalise(actor)

    monkeypatch.setattr(actors.session, "finalise", finalise)
    async with running_service(settings) as svc:
        toks = {sid: session_token(settings, org_id=ERR_ORG, session_id=sid,
                                   patient_id=ERR_PATIENT) for sid in ERR_SESSIONS}

        async def send(sid: str, seq: int) -> int:
            r = await svc.client.post("/v1/pose/frames", content=batch_body(seq), headers={
                "Authorization": f"Bearer {toks[sid]}", "Content-Type": CONTENT_TYPE})
            return r.status_code

        for sid in (live, broken):
            assert await send(sid, 0) == 202
        disk.full = True
        assert await send(live, 1) == 503  # a write fails: rolled back, refused
        assert await send(fresh, 0) == 503  # a new log cannot be created
        disk.no_truncate = True
        assert await send(broken, 1) == 503  # the rollback fails too: log broken
        disk.no_truncate = False
        assert await send(broken, 2) == 503  # refused at once: the log is broken
        disk.full = False
        with trio.fail_after(10):
            await svc.client.post(f"/v1/sessions/{live}/end",
                                  headers={"Authorization": f"Bearer {toks[live]}"})

    lines = [line for line in log_buffer.getvalue().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    service = [(line, rec) for line, rec in zip(lines, records, strict=True)
               if not rec["logger"].startswith(CLIENT_LOGGERS)]
    forbidden = [ERR_ORG, ERR_PATIENT, *ERR_SESSIONS, "VB3N6T"]
    leaks = sorted({f"{rec['logger']}: {line}" for line, rec in service
                    for word in forbidden if word in line})
    assert not leaks, "ids in error lines or tracebacks:\n" + "\n".join(leaks)

    # The scan saw the failures, with their pseudonyms, tracebacks and causes.
    p = Pseudonymiser(settings.pseudonym_key)
    admit = [rec for _, rec in service if rec["msg"] == "storage failed while admitting data"]
    assert len(admit) == 4
    assert {rec["session"] for rec in admit} == {p.session(ERR_ORG, sid) for sid in ERR_SESSIONS}
    assert all(rec["exc_type"] == "SpoolError" for rec in admit)
    excs = "\n".join(rec["exc"] for rec in admit)
    assert "[Errno 28] No space left on device" in excs and "broken" in excs
    assert 'spool.py", line' in excs  # the frames are still there
    (final,) = [rec for _, rec in service if rec["msg"] == "finalisation failed"]
    assert final["session"] == p.session(ERR_ORG, live)
    assert "SpoolError" in final["exc"] and "No space left on device" in final["exc"]
