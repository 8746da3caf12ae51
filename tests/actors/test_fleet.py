"""Fleet mode in the real service (two or three instances in this process, one real
3-node R3 JetStream cluster): a session's requests may reach any instance and the
session carries on (take-over, never a 409 or a fresh start); a former owner stops
without finalising; SIGTERM passivates; a session nobody resumes is claimed by
another instance and ended by idle timeout; one blob and one event per session.
See actors/fleet.py and storage/ownership.py; the multi-process proof with the
router and failures is tests/system/test_fleet.py."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from domain.pose_batch import decode_batch
from storage.blobs import blob_key
from storage.jetstream import open_jetstream_journal
from storage.replay import read_replay
from telemetry.config import Settings
from tests.support.metrics import scrape
from tests.support.nats import NatsCluster
from tests.support.payloads import admin_token, auth, batch_body, hdr, session_token
from tests.support.ready import poll
from tests.support.service import Running, running_service

ORG = "org-a"


@pytest.fixture
async def fleet_settings(settings: Settings, nats_cluster: NatsCluster,
                         tmp_path: Path) -> AsyncIterator[Settings]:
    """Fleet-mode settings; the production stream and buckets are emptied before and
    after (only the tests of the service in fleet mode use those names)."""
    async with open_jetstream_journal(nats_cluster.urls) as journal:
        await journal.delete_everything()
    # One blob store for the fleet (S3 in production): a shared directory here.
    blobs = tmp_path / "fleet-blobs"
    yield dataclasses.replace(
        settings, journal="jetstream", nats_urls=tuple(nats_cluster.urls),
        journal_replicas=3, shutdown_mode="flush", shutdown_deadline_s=5.0,
        blob_encoding="f32", data_dir=blobs)
    async with open_jetstream_journal(nats_cluster.urls) as journal:
        await journal.delete_everything()


def instance(base: Settings, name: str, **kw: Any) -> Settings:
    return dataclasses.replace(base, instance_id=name, **kw)


async def post(svc: Running, token: str, seq: int) -> httpx.Response:
    return await svc.client.post("/v1/pose/frames", content=batch_body(seq),
                                 headers=hdr(token))


async def post_until_accepted(svc: Running, token: str, seq: int,
                              seen: list[int]) -> None:
    """What the browser client does: on 503 wait Retry-After and send it again."""
    for _ in range(100):
        r = await post(svc, token, seq)
        seen.append(r.status_code)
        if r.status_code == 202:
            return
        assert r.status_code == 503, r.text
        assert r.headers.get("Retry-After"), r.headers
        await trio.sleep(0.05)
    raise AssertionError(f"batch {seq} never accepted: {seen}")


def blob_frames(data_dir: Path, session_id: str) -> Any:
    return read_replay((data_dir / "blobs" / blob_key(ORG, session_id)).read_bytes())


def assert_blob_holds(data_dir: Path, session_id: str, seqs: list[int]) -> None:
    replay = blob_frames(data_dir, session_id)
    sent = [decode_batch(batch_body(s), max_frames=1000) for s in seqs]
    np.testing.assert_array_equal(replay.t_ms, np.concatenate([b.t_ms for b in sent]))
    np.testing.assert_array_equal(replay.frames, np.concatenate([b.frames for b in sent]))


async def test_requests_on_any_instance_carry_the_session_on(
        fleet_settings: Settings) -> None:
    """Batches alternate between two instances; each switch is a take-over (A's
    stale actor is fenced out: its write gets 503 + Retry-After, then A takes the
    session back). No 409, no restart; one blob with every acknowledged batch, one
    event, the metrics of an uninterrupted session."""
    sid = "sess-moving"
    with trio.fail_after(90):
        async with running_service(instance(fleet_settings, "inst-a")) as a, \
                running_service(instance(fleet_settings, "inst-b")) as b:
            token = session_token(a.settings, org_id=ORG, session_id=sid)
            seen: list[int] = []
            plan = [a] * 4 + [b] * 3 + [a] * 2 + [b] * 2 + [a]
            for seq, svc in enumerate(plan):
                await post_until_accepted(svc, token, seq, seen)
            assert 409 not in seen and not any(s >= 500 and s != 503 for s in seen)
            # A owns it now; the end call reaches B, which takes it over and ends it.
            r = await b.client.post(f"/v1/sessions/{sid}/end", headers=hdr(token))
            assert r.status_code == 200, r.text
            summary = r.json()
            # The end call again, on A (whose actor B fenced out): the same summary.
            r2 = await a.client.post(f"/v1/sessions/{sid}/end", headers=hdr(token))
            assert r2.status_code == 200, r2.text
            assert r2.json()["pose"] == summary["pose"]
            # A late batch on either instance: 409, the session is over.
            assert (await post(a, token, len(plan))).status_code == 409
            events = [e for svc in (a, b) for e in svc.events if e["session_id"] == sid]
            takes = (a.supervisor.fleet.take_overs, b.supervisor.fleet.take_overs)  # type: ignore[union-attr]

    assert len(events) == 1
    assert summary["pose"]["frames"] == 30 * len(plan)
    assert_blob_holds(fleet_settings.data_dir, sid, list(range(len(plan))))
    assert min(takes) >= 2, takes  # each instance took it over at least twice


async def test_sigterm_passivates_and_another_instance_carries_on(
        fleet_settings: Settings, nats_cluster: NatsCluster) -> None:
    sid = "sess-passivated"
    with trio.fail_after(90):
        async with running_service(instance(fleet_settings, "inst-b")) as b:
            async with running_service(instance(fleet_settings, "inst-a")) as a:
                token = session_token(a.settings, org_id=ORG, session_id=sid)
                for seq in range(3):
                    await post_until_accepted(a, token, seq, [])
            # A stopped (flush = passivate): nothing finalised, its record released.
            assert not [e for e in a.events if e["session_id"] == sid]
            owner = await b.supervisor.fleet._ownership.owner(f"{ORG}/{sid}")  # type: ignore[union-attr]
            assert owner is not None and owner.instance == ""
            for seq in range(3, 6):
                await post_until_accepted(b, token, seq, [])
            r = await b.client.post(f"/v1/sessions/{sid}/end", headers=hdr(token))
            assert r.status_code == 200, r.text
            assert len([e for e in b.events if e["session_id"] == sid]) == 1
    assert_blob_holds(fleet_settings.data_dir, sid, list(range(6)))


async def test_a_session_nobody_resumes_is_ended_by_another_instance(
        fleet_settings: Settings) -> None:
    """Its owner passivated and the client never came back: after the orphan grace
    another instance claims it, and its idle timeout ends it there, once."""
    sid = "sess-orphan"
    survivor = instance(fleet_settings, "inst-b", lease_s=1.0, orphan_grace_s=0.5,
                        idle_timeout_s=1.5)
    with trio.fail_after(90):
        async with running_service(survivor) as b:
            async with running_service(instance(fleet_settings, "inst-a")) as a:
                token = session_token(a.settings, org_id=ORG, session_id=sid)
                for seq in range(4):
                    await post_until_accepted(a, token, seq, [])
            events = await poll(lambda: [e for e in b.events if e["session_id"] == sid], 60)
            assert b.supervisor.fleet.orphans_claimed >= 1  # type: ignore[union-attr]
    assert len(events) == 1 and events[0]["end_reason"] == "idle_timeout"
    assert_blob_holds(fleet_settings.data_dir, sid, list(range(4)))


async def test_the_admin_list_and_end_work_fleet_wide(fleet_settings: Settings) -> None:
    sid = "sess-admin"
    with trio.fail_after(90):
        async with running_service(instance(fleet_settings, "inst-a")) as a, \
                running_service(instance(fleet_settings, "inst-b")) as b:
            token = session_token(a.settings, org_id=ORG, session_id=sid)
            for seq in range(3):
                await post_until_accepted(a, token, seq, [])
            admin = auth(admin_token(b.settings))
            r = await b.client.get("/v1/admin/sessions", headers=admin)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["count"] == 0 and body["scope"] == "instance"  # none live on B
            assert {"org_id": ORG, "session_id": sid, "owner": "inst-a",
                    "owner_alive": True} in body["fleet"]["sessions"]
            assert set(body["fleet"]["instances"]) >= {"inst-a", "inst-b"}
            # The admin end call reaches B: B takes the session over and ends it.
            r = await b.client.post(f"/v1/admin/sessions/{sid}/end", headers=admin)
            assert r.status_code == 200, r.text
            assert r.json()["end_reason"] == "admin" and r.json()["pose"]["frames"] == 90

            async def gone() -> bool:
                r = await b.client.get("/v1/admin/sessions", headers=admin)
                return sid not in [s["session_id"] for s in r.json()["fleet"]["sessions"]]

            await poll(gone, 10)  # the record goes right after the summary is stored


def documented_fleet_metrics() -> set[str]:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    return set(re.findall(r"^\| `(telemetry_fleet_[a-z_]+)`", doc, re.M))


async def test_fleet_metrics_are_the_documented_ones(fleet_settings: Settings) -> None:
    """docs/operations.md's telemetry_fleet_* rows against a fleet-mode scrape, both
    ways (the other metrics: tests/telemetry/test_metrics.py)."""
    rows = documented_fleet_metrics()
    async with running_service(instance(fleet_settings, "inst-a")) as a:
        m = await scrape(a)
    fleet = {f"{f}_total" if t == "counter" else f
             for f, t in m.types.items() if f.startswith("telemetry_fleet_")}
    assert rows and rows == fleet, (sorted(rows), sorted(fleet))
