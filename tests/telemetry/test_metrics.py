"""``GET /metrics`` on the running service: what each request adds, what a scrape reads.

Scrapes go over real HTTP and are parsed with prometheus-client's own parser, so the
exposition is checked as Prometheus would read it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import generate_latest

from domain.pose_batch import CONTENT_TYPE
from telemetry import metrics
from telemetry.config import Settings
from tests.support.metrics import Scrape, scrape
from tests.support.payloads import admin_token, batch_body, session_token
from tests.support.payloads import hdr as pose_hdr
from tests.support.service import Running, running_service


async def test_requests_batches_and_auth_failures_are_counted(settings: Settings) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings)
        post = svc.client.post
        for seq in (0, 1):
            assert (await post("/v1/pose/frames", content=batch_body(seq),
                               headers=pose_hdr(tok))).status_code == 202
        assert (await post("/v1/pose/frames", content=batch_body(1),
                           headers=pose_hdr(tok))).json()["duplicate"] is True
        assert (await post("/v1/pose/frames", content=b"XXXX" + batch_body(2)[4:],
                           headers=pose_hdr(tok))).status_code == 400
        assert (await post("/v1/pose/frames", content=batch_body(50),
                           headers=pose_hdr(tok))).status_code == 503
        assert (await post("/v1/pose/frames", content=batch_body(2),
                           headers={"Content-Type": CONTENT_TYPE})).status_code == 401
        no_consent = session_token(settings, biometric=False)
        assert (await post("/v1/pose/frames", content=batch_body(2),
                           headers=pose_hdr(no_consent))).status_code == 403
        media = {"media_id": "m-1", "view_id": "v-1", "events": [
            {"id": "a", "type": "session_start", "t_ms": 0},
            {"id": "b", "type": "play", "t_ms": 5, "position_seconds": 0}]}
        jhdr = pose_hdr(tok, "application/json")
        assert (await post("/v1/media/events", content=json.dumps(media),
                           headers=jhdr)).json()["applied"] == 2
        assert (await post("/v1/media/events", content=json.dumps(media),
                           headers=jhdr)).json()["duplicates"] == 2
        assert (await post("/v1/media/events", content=b"{",
                           headers=jhdr)).status_code == 400
        r = await svc.client.get("/v1/admin/sessions",
                                 headers={"Authorization": f"Bearer {tok}"})
        assert r.status_code == 403
        assert (await svc.client.get("/v1/healthz")).status_code == 200
        m = await scrape(svc)

    pose_ep = "/v1/pose/frames"
    assert m.value("telemetry_http_requests_total", method="POST", endpoint=pose_ep,
                   status="202") == 3
    assert m.value("telemetry_http_requests_total", method="POST", endpoint=pose_ep,
                   status="400") == 1
    assert m.value("telemetry_http_requests_total", method="POST", endpoint=pose_ep,
                   status="503") == 1
    assert m.value("telemetry_http_requests_total", method="GET", endpoint="/v1/healthz",
                   status="200") == 1
    assert m.value("telemetry_http_request_duration_seconds_count", endpoint=pose_ep) == 7
    assert m.value("telemetry_batches_total", endpoint="pose", outcome="accepted") == 2
    assert m.value("telemetry_batches_total", endpoint="pose", outcome="duplicate") == 1
    # 400 + 503 + 403 (the 401 never authenticated: it is an auth failure, not a batch)
    assert m.value("telemetry_batches_total", endpoint="pose", outcome="rejected") == 3
    for reason in ("bad_magic", "sequence_ahead_of_window", "consent_required"):
        assert m.value("telemetry_batches_rejected_total", endpoint="pose", reason=reason) == 1
    assert m.value("telemetry_batches_total", endpoint="media", outcome="accepted") == 2
    assert m.value("telemetry_batches_rejected_total", endpoint="media", reason="bad_json") == 1
    assert m.value("telemetry_media_events_total", outcome="applied") == 2
    assert m.value("telemetry_media_events_total", outcome="not_applied") == 2
    assert m.value("telemetry_auth_failures_total", kind="session", reason="missing_token") == 1
    assert m.value("telemetry_auth_failures_total", kind="service", reason="wrong_audience") == 1
    assert m.types["telemetry_http_requests"] == "counter"
    assert m.types["telemetry_finalise_duration_seconds"] == "histogram"


async def test_state_is_read_at_scrape_time(settings: Settings) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings)
        empty = await scrape(svc)
        assert empty.value("telemetry_live_sessions") == 0
        assert empty.value("telemetry_ready") == 1
        assert empty.value("telemetry_spool_max_bytes") == settings.spool_max_bytes
        for seq in (0, 2):  # 2 is held until 1 arrives
            r = await svc.client.post("/v1/pose/frames", content=batch_body(seq),
                                      headers=pose_hdr(tok))
            assert r.status_code == 202
        live = await scrape(svc)
        assert live.value("telemetry_live_sessions") == 1
        assert live.value("telemetry_held_batches") == 1
        assert live.value("telemetry_mailbox_depth") >= 0
        assert live.value("telemetry_mailbox_depth_max") <= settings.mailbox_size
        assert live.value("telemetry_spool_bytes") > 0
        assert live.value("telemetry_spool_sessions") == 1
        # the START record and two batches
        assert live.value("telemetry_spool_records_total") == 3
        assert live.value("telemetry_spool_torn_tails_total") == 0
        assert live.value("telemetry_outbox_depth") == 0

        r = await svc.client.post("/v1/sessions/sess-1/end", headers=pose_hdr(tok))
        assert r.status_code == 200
        blob_size = r.json()["blob"]["size"]
        for _ in range(500):  # the outbox delivers the summary event in the background
            ended = await scrape(svc)
            if ended.value("telemetry_outbox_delivered_total") == 1:
                break
            await trio.sleep(0.02)
    assert ended.value("telemetry_outbox_delivered_total") == 1
    assert ended.value("telemetry_live_sessions") == 0
    assert ended.value("telemetry_held_batches") == 0
    assert ended.value("telemetry_outbox_depth") == 0
    assert ended.value("telemetry_outbox_delivery_failures_total") == 0
    assert ended.value("telemetry_outbox_dead_total") == 0
    assert ended.value("telemetry_outbox_rejected_total") == 0
    assert ended.value("telemetry_finalise_duration_seconds_count", reason="client_end") == 1
    assert ended.value("telemetry_blob_size_bytes_count") == 1
    assert ended.value("telemetry_blob_size_bytes_sum") == blob_size


async def test_finalisation_is_timed_once_per_session(settings: Settings) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings)
        await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=pose_hdr(tok))
        first, again = await svc.client.post("/v1/sessions/sess-1/end", headers=pose_hdr(tok)), \
            await svc.client.post("/v1/sessions/sess-1/end", headers=pose_hdr(tok))
        assert first.json() == again.json()
        # a session ended by an operator, and one that never sent a batch
        other = session_token(settings, session_id="sess-2")
        await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=pose_hdr(other))
        adm = {"Authorization": f"Bearer {admin_token(settings)}"}
        assert (await svc.client.post("/v1/admin/sessions/sess-2/end",
                                      headers=adm)).status_code == 200
        never = session_token(settings, session_id="sess-3")
        r = await svc.client.post("/v1/sessions/sess-3/end", headers=pose_hdr(never))
        assert r.status_code == 200 and r.json()["blob"] is None
        m = await scrape(svc)
    assert m.value("telemetry_finalise_duration_seconds_count", reason="client_end") == 2
    assert m.value("telemetry_finalise_duration_seconds_count", reason="admin") == 1
    assert m.value("telemetry_blob_size_bytes_count") == 2  # the empty session has no blob


async def test_storage_failures_and_spool_full_are_counted(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings)
        assert svc.storage.spool is not None

        async def broken_disk(*args: Any, **kw: Any) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(svc.storage.spool, "append", broken_disk)
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0),
                                  headers=pose_hdr(tok))
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable"
        monkeypatch.undo()
        m = await scrape(svc)
    assert m.value("telemetry_storage_unavailable_total", endpoint="pose") == 1
    assert m.value("telemetry_batches_rejected_total", endpoint="pose",
                   reason="storage_unavailable") == 1

    small = dataclasses.replace(settings, spool_max_bytes=20_000,
                                data_dir=Path(settings.data_dir) / "small")
    async with running_service(small) as svc:
        tok = session_token(small)
        codes = []
        for seq in range(3):
            r = await svc.client.post("/v1/pose/frames", content=batch_body(seq),
                                      headers=pose_hdr(tok))
            codes.append(r.status_code)
        assert codes[0] == 202 and 503 in codes
        m = await scrape(svc)
    assert m.value("telemetry_spool_max_bytes") == 20_000
    assert m.value("telemetry_batches_rejected_total", endpoint="pose", reason="spool_full") >= 1


async def test_without_a_spool_the_spool_metrics_are_absent(settings: Settings) -> None:
    async with running_service(dataclasses.replace(settings, spool_enabled=False)) as svc:
        tok = session_token(settings)
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=pose_hdr(tok))
        assert r.status_code == 202
        m = await scrape(svc)
    assert m.value("telemetry_live_sessions") == 1
    assert not {n for n in m.names() if n.startswith("telemetry_spool_")}


async def test_no_ids_or_raw_paths_in_labels(settings: Settings) -> None:
    async with running_service(settings) as svc:
        tok = session_token(settings, org_id="org-secret", session_id="sess-secret",
                            patient_id="patient-secret")
        await svc.client.post("/v1/pose/frames", content=batch_body(0), headers=pose_hdr(tok))
        await svc.client.get("/v1/admin/sessions/sess-secret",
                             headers={"Authorization": f"Bearer {admin_token(settings)}"})
        await svc.client.post("/v1/sessions/sess-secret/end", headers=pose_hdr(tok))
        r = await svc.client.get("/v1/nothing/sess-secret")
        assert r.status_code == 404
        r = await svc.client.request("FROB", "/v1/healthz")
        assert r.status_code == 405
        m = await scrape(svc)
    assert "secret" not in m.text
    assert m.value("telemetry_http_requests_total", method="GET", endpoint="unmatched",
                   status="404") == 1
    # a method no route has fails routing, like an unknown path
    assert m.value("telemetry_http_requests_total", method="other", endpoint="unmatched",
                   status="405") == 1
    endpoints = {lab["endpoint"] for n, lab, _ in m.samples
                 if n == "telemetry_http_requests_total"}
    assert endpoints == {"/v1/pose/frames", "/v1/admin/sessions/<session_id>",
                         "/v1/sessions/<session_id>/end", "unmatched"}


async def test_metrics_need_no_auth_and_speak_openmetrics(settings: Settings) -> None:
    async with running_service(settings) as svc:
        r = await svc.client.get("/metrics", headers={
            "Accept": "application/openmetrics-text; version=1.0.0"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.text.rstrip().endswith("# EOF")
        assert r.headers["x-request-id"]


async def test_two_services_in_one_process_have_their_own_registries(
    settings: Settings, tmp_path: Path
) -> None:
    other = dataclasses.replace(settings, data_dir=tmp_path / "b")
    async with running_service(settings) as a, running_service(other) as b:
        tok = session_token(settings)
        r = await a.client.post("/v1/pose/frames", content=batch_body(0), headers=pose_hdr(tok))
        assert r.status_code == 202
        ma, mb = await scrape(a), await scrape(b)
    assert ma.value("telemetry_batches_total", endpoint="pose", outcome="accepted") == 1
    assert mb.value("telemetry_batches_total", endpoint="pose", outcome="accepted") == 0
    assert ma.value("telemetry_live_sessions") == 1 and mb.value("telemetry_live_sessions") == 0


async def test_sessions_are_summed_in_chunks_or_in_one_go(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "SESSIONS_PER_CHECKPOINT", 2)
    async with running_service(settings) as svc:
        for i in range(5):
            tok = session_token(settings, session_id=f"sess-{i}")
            r = await svc.client.post("/v1/pose/frames", content=batch_body(0),
                                      headers=pose_hdr(tok))
            assert r.status_code == 202
        m = await scrape(svc)  # the handler's chunked sum
        assert svc.state is not None
        direct = Scrape(generate_latest(svc.state.metrics.registry).decode())  # in one go
    assert m.value("telemetry_live_sessions") == direct.value("telemetry_live_sessions") == 5



async def scrape_until(svc: Running, name: str, value: float, **labels: str) -> Scrape:
    """Scrape until ``name{labels}`` reaches ``value`` (what a background task -- an
    actor's gap or idle timer -- brings about); the last scrape either way."""
    for _ in range(500):  # 10 s at most
        m = await scrape(svc)
        if m.value(name, **labels) >= value:
            break
        await trio.sleep(0.02)
    return m


async def test_sessions_frames_bytes_and_skips_are_counted(settings: Settings) -> None:
    cfg = dataclasses.replace(settings, gap_timeout_s=0.2, mailbox_size=7)
    async with running_service(cfg) as svc:
        tok = session_token(cfg)
        bodies = [batch_body(0, n=30), batch_body(2, n=20)]
        for body in bodies:
            r = await svc.client.post("/v1/pose/frames", content=body, headers=pose_hdr(tok))
            assert r.status_code == 202
        # a retry of seq 0 is a duplicate: neither its frames nor its bytes count again
        r = await svc.client.post("/v1/pose/frames", content=bodies[0], headers=pose_hdr(tok))
        assert r.json()["duplicate"] is True
        # seq 1 never comes: the live session skips it after the gap timeout
        live = await scrape_until(svc, "telemetry_batches_skipped_total", 1)
        assert live.value("telemetry_batches_skipped_total") == 1
        assert live.value("telemetry_live_sessions") == 1
        media = json.dumps({"media_id": "m-1", "view_id": "v-1", "events": [
            {"id": "a", "type": "session_start", "t_ms": 0}]}).encode()
        r = await svc.client.post("/v1/media/events", content=media,
                                  headers=pose_hdr(tok, "application/json"))
        assert r.status_code == 202
        assert (await svc.client.post("/v1/sessions/sess-1/end",
                                      headers=pose_hdr(tok))).status_code == 200

        other = session_token(cfg, session_id="sess-2")
        b2 = batch_body(0, n=10)
        r = await svc.client.post("/v1/pose/frames", content=b2, headers=pose_hdr(other))
        assert r.status_code == 202
        adm = {"Authorization": f"Bearer {admin_token(cfg)}"}
        assert (await svc.client.post("/v1/admin/sessions/sess-2/end",
                                      headers=adm)).status_code == 200
        m = await scrape_until(svc, "telemetry_sessions_ended_total", 1, reason="admin")

    assert m.value("telemetry_sessions_ended_total", reason="client_end") == 1
    assert m.value("telemetry_sessions_ended_total", reason="admin") == 1
    assert m.types["telemetry_sessions_ended"] == "counter"
    # the ended session's skip moved from the live sum to the ended total, once
    assert m.value("telemetry_batches_skipped_total") == 1
    assert m.value("telemetry_frames_received_total") == 30 + 20 + 10
    assert m.value("telemetry_received_bytes_total", endpoint="pose") == \
        len(bodies[0]) + len(bodies[1]) + len(b2)
    assert m.value("telemetry_received_bytes_total", endpoint="media") == len(media)
    assert m.value("telemetry_media_events_total", outcome="applied") == 1
    assert m.value("telemetry_mailbox_capacity") == 7


async def test_idle_sessions_are_counted_by_their_end_reason(settings: Settings) -> None:
    cfg = dataclasses.replace(settings, idle_timeout_s=0.3)
    async with running_service(cfg) as svc:
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0),
                                  headers=pose_hdr(session_token(cfg)))
        assert r.status_code == 202
        m = await scrape_until(svc, "telemetry_sessions_ended_total", 1, reason="idle_timeout")
    assert m.value("telemetry_sessions_ended_total", reason="idle_timeout") == 1
    assert m.value("telemetry_live_sessions") == 0


async def test_standard_collectors_and_build_info(settings: Settings) -> None:
    async with running_service(settings) as svc:
        m = await scrape(svc)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_start_time_seconds"):
        assert m.value(name) > 0, name
    assert {n for n in m.names() if n.startswith("python_gc_collections")}
    assert any(n == "python_info" for n in m.names())
    (build,) = [lab for n, lab, v in m.samples if n == "telemetry_build_info" and v == 1]
    assert build["version"] == importlib.metadata.version("restartix-telemetry")
    assert build["commit"] == metrics.build_info()[1]


def test_build_commit_from_the_environment_then_git(monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(metrics.__file__).resolve().parent.parent
    try:
        monkeypatch.setenv(metrics.COMMIT_ENV, "0a1b2c3d")
        metrics.build_info.cache_clear()
        assert metrics.build_info()[1] == "0a1b2c3d"
        # not a token: it could be anything, and it becomes a label value
        monkeypatch.setenv(metrics.COMMIT_ENV, 'x"} 1\nfake_metric{')
        metrics.build_info.cache_clear()
        assert metrics.build_info()[1] == "unknown"
        monkeypatch.delenv(metrics.COMMIT_ENV)
        metrics.build_info.cache_clear()
        try:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                  capture_output=True, text=True, check=False).stdout.strip()
        except OSError:  # no git on this machine: the service reports unknown too
            head = ""
        expected = head if (root / ".git").exists() and head else "unknown"
        assert metrics.build_info()[1] == expected
    finally:
        metrics.build_info.cache_clear()


OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


async def test_every_metric_is_documented_and_every_documented_one_exists(
    settings: Settings,
) -> None:
    async with running_service(dataclasses.replace(settings, cors_origins=(
            "https://portal.example",))) as svc:
        m = await scrape(svc)
    doc = OPERATIONS.read_text(encoding="utf-8")
    named = set(re.findall(r"`([a-z_]+)`", doc))
    # `_created` of an unlabelled counter or histogram reads as a family of its own
    families = {f for f in m.types
                if not (f.endswith("_created") and f.removesuffix("_created") in m.types)}
    missing = {f for f in families if f not in named and f"{f}_total" not in named}
    assert not missing, f"not in docs/operations.md: {sorted(missing)}"
    # the first column of the metric tables, against what a scrape has
    rows = re.findall(r"^\| `((?:telemetry|process|python)_[a-z_]+)`", doc, re.M)
    # Fleet mode's own rows are checked against a fleet-mode scrape, in
    # tests/actors/test_fleet.py::test_fleet_metrics_are_the_documented_ones.
    rows = [r for r in rows if not r.startswith("telemetry_fleet_")]
    exposed = set(m.types) | {f"{f}_total" for f, t in m.types.items() if t == "counter"}
    assert rows and not set(rows) - exposed, sorted(set(rows) - exposed)
