"""The proof of issue 14: a fleet keeps every session through deploys and lost parts.

Real processes only, all on 127.0.0.1: a 3-node NATS JetStream cluster (R3 journal),
3 ``telemetry serve`` instances with ``TELEMETRY_JOURNAL=jetstream``, one S3 server
(moto, a bucket with versioning, so a second write of a blob would show), the sink's
HTTP receiver recording every event delivered, and real HAProxy running the shipped
router config (``deploy/haproxy/haproxy.cfg``, static servers on loopback).

:data:`SESSIONS` simulated patients, half over HTTP POST and half over the
WebSocket, each send one 1-second pose batch a second at real pace and behave as the
browser does: on 503 they wait ``Retry-After`` and resend the same batch; on a dropped
stream they reconnect (through the router) and resend what was not acknowledged.
Meanwhile, in order (:func:`chaos`): a rolling restart of every instance (SIGTERM,
then a new process with an empty data directory on the same port); SIGKILL of one
instance and its data directory deleted, and a new one; SIGKILL of one NATS node
(restarted later); scale-out from 3 instances to 4 (the 4th enabled in HAProxy).
Then every session is ended (``POST /v1/sessions/{id}/end``).

Asserted: every acknowledged batch is in exactly one blob, bit for bit; exactly one
event per session, with the metrics a single process computes from the same batches;
no 409 before a session's end call, no 5xx; every 503 carried ``Retry-After`` and its
retry succeeded. The same again without the router: every request and every
WebSocket connect goes to a random live instance.

For debugging only, the environment can change the scenario: ``FLEET_CHAOS=off`` (the
same load without the chaos steps, to tell a load problem from a fleet one),
``FLEET_SESSIONS`` and ``FLEET_STREAM_S`` (fewer, shorter sessions); ``FLEET_KEEP=DIR``
keeps the processes' logs there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import resource
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from bench.loadgen import PoolSession, make_pool
from domain.pose_batch import decode_batch
from storage.blobs import blob_key
from storage.replay_reader import read_replay
from telemetry.config import Settings
from tests.support.fleet import (
    Fleet,
    Router,
    SessionRun,
    Targets,
    comparable,
    differences,
    event_recorder,
    reference_summaries,
    running_router,
)
from tests.support.nats import NatsCluster, temporary_cluster
from tests.support.payloads import session_token
from tests.support.ready import poll
from tests.support.s3 import S3Server

SESSIONS = int(os.environ.get("FLEET_SESSIONS", "300"))
INSTANCES = 3
# Sessions start over RAMP_S seconds; each streams at least STREAM_MIN_S, and for
# TAIL_S after the last chaos step.
RAMP_S = 10.0
STREAM_MIN_S = float(os.environ.get("FLEET_STREAM_S", "60"))
TAIL_S = 8.0
CHAOS_START_S = 12.0  # after the first session's start
STEP_PAUSE_S = 4.0
ORG = "org-fleet"
CHAOS = os.environ.get("FLEET_CHAOS", "on") != "off"
KEEP = os.environ.get("FLEET_KEEP")  # a directory to copy the processes' logs to
ROUTER_STATE = re.compile(r"Server telemetry/(tel\d+) is (DOWN|UP)")


@pytest.fixture
def fleet_nats() -> Iterator[NatsCluster]:
    """A cluster of its own: one node is killed, and the journal uses the production
    stream names."""
    with temporary_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def pool() -> list[PoolSession]:
    return make_pool(sessions=6, reps=20, seed=14)


def haproxy_binary() -> str:
    binary = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if binary is None:
        pytest.fail("haproxy is not installed; install it (Debian/Ubuntu: "
                    "`apt-get install -y haproxy`) and run again")
    return binary


def versioned_bucket(s3: S3Server) -> str:
    bucket = f"fleet-{uuid.uuid4().hex[:10]}"
    client = s3.client()
    try:
        client.create_bucket(Bucket=bucket)
        client.put_bucket_versioning(Bucket=bucket,
                                     VersioningConfiguration={"Status": "Enabled"})
    finally:
        client.close()
    return bucket


def blob_versions(s3: S3Server, bucket: str) -> dict[str, list[str]]:
    """Key -> the ETags of its versions, oldest first (a blob written twice has two).
    One listing: moto copies every object's bytes for each ``ListObjectVersions``."""
    client = s3.client()
    out: dict[str, list[tuple[Any, str]]] = {}
    try:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for v in page.get("Versions", []):
                out.setdefault(v["Key"], []).append((v["LastModified"], v["ETag"]))
    finally:
        client.close()
    return {k: [etag for _, etag in sorted(vs, key=lambda x: x[0])] for k, vs in out.items()}


def get_blob(s3: S3Server, bucket: str, key: str) -> bytes:
    client = s3.client()
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
        with obj["Body"] as body:
            return bytes(body.read())
    finally:
        client.close()


async def chaos(fleet: Fleet, router: Router | None, nats: NatsCluster) -> None:
    """The four steps of issue 14, one after another."""

    async def until_routed(name: str, up: bool = True) -> None:
        if router is not None:
            await poll(lambda: _state_is(router, name, up), 60, 0.5)

    # 1. a rolling restart: each instance in turn, the next once the router has the
    # new process in its ring again (as a deploy waits for the target's health)
    for inst in fleet.instances[:INSTANCES]:
        await fleet.stop(inst)
        await fleet.start(inst)
        await until_routed(inst.name)
        await trio.sleep(STEP_PAUSE_S)
    # 2. SIGKILL of one instance, its data directory deleted; a new one in its place
    victim = fleet.instances[1]
    await fleet.kill(victim, delete_data=True)
    await trio.sleep(STEP_PAUSE_S)
    await fleet.start(victim)
    await until_routed(victim.name)
    await trio.sleep(STEP_PAUSE_S)
    # 3. SIGKILL of one NATS node (restarted after the scale-out)
    nats.kill(2)
    fleet.note("NATS node n2 SIGKILLed")
    await trio.sleep(STEP_PAUSE_S)
    # 4. scale-out: a 4th instance, enabled in the router
    new = fleet.instances[INSTANCES]
    await fleet.start(new)
    if router is not None:
        await router.enable(new.name)
        fleet.note(f"{new.name} enabled in the router")
        await until_routed(new.name)
    await trio.sleep(STEP_PAUSE_S)
    await nats.restart(2)
    fleet.note("NATS node n2 back")


async def _state_is(router: Router, name: str, up: bool) -> bool:
    states = await router.server_states()
    return (states.get(name) == "2") == up


@pytest.mark.parametrize("routed", [True, False], ids=["router", "no-router"])
async def test_fleet_keeps_every_session(routed: bool, fleet_nats: NatsCluster,
                                         s3_server: S3Server, settings: Settings,
                                         pool: list[PoolSession], private_tmp: Path) -> None:
    tmp_path = private_tmp
    bucket = await trio.to_thread.run_sync(versioned_bucket, s3_server)
    haproxy = haproxy_binary() if routed else ""
    runs: list[SessionRun] = []
    router_lines: list[str] = []
    t_start = time.monotonic()
    with trio.fail_after(900):
        async with event_recorder(settings) as (events_url, sink):
            fleet = Fleet(tmp_path / "fleet", {
                "JOURNAL": "jetstream", "NATS_URLS": ",".join(fleet_nats.urls),
                "JOURNAL_REPLICAS": "3",
                "BLOB_STORE": "s3", "S3_BUCKET": bucket,
                "S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_REGION": s3_server.region,
                # exact floats in the blob: the frames are compared bit for bit
                "BLOB_ENCODING": "f32",
                "BUS": "http", "BUS_URL": events_url,
                "TRUSTED_PROXIES": "127.0.0.0/8",
                # take-overs, passivations and session ends are logged at INFO
                "LOG_LEVEL": "INFO",
            })
            try:
                for _ in range(INSTANCES + 1):
                    fleet.add_slot()
                async with trio.open_nursery() as nursery:
                    for inst in fleet.instances[:INSTANCES]:
                        nursery.start_soon(fleet.start, inst)
                servers = [(i.name, i.port, n < INSTANCES)
                           for n, i in enumerate(fleet.instances)]
                async with _maybe_router(routed, haproxy, tmp_path, servers) as router:
                    if router is not None:
                        router_lines = router.lines
                    if router is not None:
                        for inst in fleet.instances[:INSTANCES]:
                            await poll(lambda i=inst: _state_is(router, i.name, True), 30)
                    targets = Targets(fleet, router)
                    setup_s = time.monotonic() - t_start
                    await _run_load(fleet, router, fleet_nats, targets, pool, runs,
                                    settings)
                    cpu = fleet.cpu_s()
                    await fleet.scrape_all()
                    router_notes = Counter(
                        m.group(1, 2) for x in (router.lines if router else [])
                        if not x.startswith("[") and (m := ROUTER_STATE.search(x)))
                # the outbox delivers each event after its end call's answer
                await poll(lambda: len({e["session_id"] for e in sink.deliveries})
                           >= SESSIONS, 60, 0.5)
                await trio.sleep(1.0)  # a second delivery would arrive now
            finally:
                await fleet.aclose()
                if KEEP:
                    keep = Path(KEEP) / f"fleet-{'router' if routed else 'no-router'}"
                    shutil.rmtree(keep, ignore_errors=True)
                    shutil.copytree(tmp_path / "fleet" / "logs", keep)
                    (keep / "router.log").write_text(
                        "\n".join(router_lines), encoding="utf-8")
                    (keep / "sessions.json").write_text(json.dumps({
                        r.rec.sid: {"transport": r.rec.transport,
                                    "acked": len(r.rec.acked), "timeline": r.rec.timeline,
                                    "end_reason": (r.rec.summary or {}).get("end_reason")}
                        for r in runs}, indent=1), encoding="utf-8")
                    (keep / "events.json").write_text(
                        json.dumps(sink.deliveries, indent=1), encoding="utf-8")
                    (keep / "ports.txt").write_text("\n".join(
                        f"{i.name} {i.port}" for i in fleet.instances), encoding="utf-8")
    load_s = time.monotonic() - t_start - setup_s

    # -- what the clients saw
    records = [r.rec for r in runs]
    acked = sum(len(r.acked) for r in records)
    statuses: Counter[str] = Counter()
    for r in records:
        statuses.update(r.statuses)
    refusals = [f for r in records for f in r.refusals]
    figures = (f"[fleet {'router' if routed else 'no-router'}{'' if CHAOS else ' no chaos'}]"
               f" {SESSIONS} sessions, {acked} acknowledged batches, "
               f"{len(refusals)} 503/429 ({Counter(f.code for f in refusals)}), "
               f"{sum(r.transport_errors for r in records)} transport errors, "
               f"{sum(r.reconnects for r in records)} stream reconnects, "
               f"fleet counters {dict(fleet.counters)}; statuses {dict(statuses)};"
               f" instance CPU s {cpu};"
               f" set-up {setup_s:.0f} s, load+chaos+end {load_s:.0f} s\n"
               + "\n".join(f"  +{t - t_start:6.1f} s {what}" for t, what in fleet.events)
               + (f"\n  router: servers marked down/up {dict(router_notes)}"
                  if routed else ""))
    print("\n" + figures)

    # Every check runs and every failure is reported together: one run of this
    # test is expensive, and the failures explain each other.
    problems: list[str] = []

    def check(ok: object, what: str, items: list[Any] | dict[str, Any]) -> None:
        if not ok:
            shown = list(items.items())[:4] if isinstance(items, dict) else items[:4]
            problems.append(f"{what}: {len(items)}, e.g. {shown}")

    cut = {r.sid: r.conflicts_before_end for r in records if r.conflicts_before_end}
    check(not cut, "sessions cut (409 before their end call)", cut)
    errors = {r.sid: r.server_errors for r in records if r.server_errors}
    check(not errors, "sessions that saw a 5xx other than 503", errors)
    other = {r.sid: r.other for r in records if r.other}
    check(not other, "sessions with other unexpected answers", other)
    no_ra = [f for f in refusals if f.retry_after is None]
    check(not no_ra, "503/429 without Retry-After", no_ra)
    failed = [f for f in refusals if not f.succeeded]
    check(not failed, "503/429 whose retry never succeeded", failed)
    unended = [r.sid for r in records if r.summary is None]
    check(not unended, "sessions without an end summary", unended)
    holes = {r.sid: sorted(set(range(r.sent_batches)) - r.acked)[:5] for r in records
             if r.acked != set(range(r.sent_batches))}
    check(not holes, "sessions with batches never acknowledged", holes)

    # -- one blob per session, written once
    _phase("blobs")
    versions = await trio.to_thread.run_sync(blob_versions, s3_server, bucket)
    missing = [r.sid for r in records if blob_key(ORG, r.sid) not in versions]
    check(not missing, "sessions without a blob", missing)
    stray = sorted(set(versions) - {blob_key(ORG, r.sid) for r in records})
    check(not stray, "blobs of no session", stray)
    twice = {k: ("same bytes" if len(set(v)) == 1 else "different bytes") + f" x{len(v)}"
             for k, v in versions.items() if len(v) != 1}
    check(not twice, "blobs written more than once (S3 versions)", twice)

    # -- one event per session (redeliveries of the same event allowed)
    by_session: dict[str, set[str]] = {}
    for e in sink.deliveries:
        by_session.setdefault(e["session_id"], set()).add(json.dumps(e, sort_keys=True))
    no_event = [r.sid for r in records if r.sid not in by_session]
    check(not no_event, "sessions without an event", no_event)
    several = {s: len(v) for s, v in by_session.items() if len(v) != 1}
    check(not several, "sessions with more than one event", several)
    events = {s: json.loads(sorted(v)[0]) for s, v in by_session.items()}

    # -- each blob holds exactly the acknowledged batches; the metrics are those one
    # process computes from them (the same settings where they shape the metrics)
    _phase("references")
    references = await reference_summaries(dataclasses.replace(settings, blob_encoding="f32"), [
        (run.token, [run.body(s) for s in sorted(run.rec.acked)]) for run in runs])
    wrong_blob: dict[str, str] = {}
    mismatched: dict[str, list[str]] = {}
    for run in runs:
        sid, rec = run.rec.sid, run.rec
        event = events.get(sid)
        if event is None or blob_key(ORG, sid) not in versions:
            continue
        if event["end_reason"] != "client_end":
            wrong_blob[sid] = f"end_reason {event['end_reason']}"
        blob = await trio.to_thread.run_sync(get_blob, s3_server, bucket, blob_key(ORG, sid))
        if (event.get("blob") or {}).get("sha256") != hashlib.sha256(blob).hexdigest():
            wrong_blob[sid] = "the event names another blob"
        replay = read_replay(blob)
        sent = [decode_batch(run.body(s), max_frames=1000) for s in sorted(rec.acked)]
        t_ms = np.concatenate([b.t_ms for b in sent])
        frames = np.concatenate([b.frames for b in sent])
        if not (np.array_equal(replay.t_ms, t_ms)
                and np.array_equal(replay.frames, frames, equal_nan=True)):
            wrong_blob[sid] = (f"blob has {len(replay.t_ms)} frames, the acknowledged "
                               f"batches {len(t_ms)}")
        ref = comparable(references[sid])
        diff = differences(comparable(event), ref)
        if rec.summary is not None:
            diff += differences(comparable(rec.summary), ref)
        if diff:
            mismatched[sid] = diff[:6]
    _phase("compared")
    check(not wrong_blob, "blobs that are not exactly the acknowledged batches", wrong_blob)
    check(not mismatched, "metrics that differ from a single-process replay", mismatched)
    assert not problems, "\n".join(problems)


def _phase(name: str) -> None:
    if KEEP:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        print(f"[fleet] {name}: peak RSS {peak} MB", flush=True)


class _NoRouter:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _maybe_router(routed: bool, binary: str, tmp: Path,
                  servers: list[tuple[str, int, bool]]) -> Any:
    return running_router(binary, tmp, servers) if routed else _NoRouter()


async def _run_load(fleet: Fleet, router: Router | None, nats: NatsCluster, targets: Targets,
                    pool: list[PoolSession], runs: list[SessionRun],
                    settings: Settings) -> None:
    t0 = trio.current_time() + 1.0
    tag = uuid.uuid4().hex[:6]
    for i in range(SESSIONS):
        p = pool[i % len(pool)]
        sid = f"fleet-{tag}-{i:03d}"
        token = session_token(settings, org_id=ORG, session_id=sid,
                              exercise={"kind": p.kind, "target_reps": 10}, ttl_s=3600)
        runs.append(SessionRun(sid, ORG, token, p, "http" if i % 2 == 0 else "ws", targets,
                               t0 + RAMP_S * i / SESSIONS))
    stop = trio.Event()

    async def conductor() -> None:
        await trio.sleep_until(t0 + CHAOS_START_S)
        if CHAOS:
            await chaos(fleet, router, nats)
        await trio.sleep_until(max(trio.current_time() + TAIL_S, t0 + STREAM_MIN_S))
        fleet.note("streaming stops; every session ends")
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(conductor)
        for run in runs:
            nursery.start_soon(run.run_http if run.rec.transport == "http" else run.run_ws, stop)


# -- a finding of this test, reduced -------------------------------------------------
