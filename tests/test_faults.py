"""Fault injection against the real service in a child process (``telemetry serve``).

Each test starts the service (and, where needed, ``telemetry sink`` on Postgres or
a moto S3 server) as separate processes, breaks something for real -- SIGKILL,
a kill at a finalisation step (``actors/faults.py``), the sink or S3 down, SIGTERM
under load, a flood -- and checks what ``docs/durability.md`` promises:

1. SIGKILL mid-session, restart, carry on, end: every acknowledged batch is in the
   blob bit for bit, and blob and metrics equal an uninterrupted run's;
2. SIGKILL at each finalisation step: exactly one blob and one row per session;
3. the sink down for a while (and the service restarted meanwhile), then up: every
   event delivered once, the outbox empties;
4. S3 down at session end, then up: the blob arrives, nothing is lost; a new
   session meanwhile is refused with 503 + Retry-After, not a 500;
5. SIGTERM with many live sessions under load: no 5xx, every request the service
   took is answered, exit within the stop budget, every session recovered with
   every acknowledged batch;
6. a flood over capacity: only 202/429/503 (with Retry-After), no crash, memory
   bounded.
"""

from __future__ import annotations

import gc
import hashlib
import json
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from actors.faults import STEPS
from actors.replay_metrics import recompute
from domain.pose_batch import decode_batch, encode_batch
from storage.pg import Database
from storage.replay import Replay, read_replay
from storage.sink import AggregateSink
from telemetry.auth import mint_service_token
from telemetry.config import Settings
from telemetry.dev.demo import batches_of
from telemetry.dev.synthetic import generate
from telemetry.server import GRACEFUL_TIMEOUT_S, OUTBOX_FLUSH_S
from tests.support import faults as fu
from tests.support.payloads import batch_body, pose_frames, session_token
from tests.support.s3 import MotoServer, use_aws_env

ORG = "org-f"



def client_cut_uploads(test: Any) -> Any:
    """For tests that cut connections on purpose: httpx (the tests' client, not the
    service) leaves its request-body async generator unclosed when a connection
    breaks mid-upload, and trio warns when the generator is collected. The warning
    is ignored for these tests only, and garbage is collected in their teardown so
    it cannot surface in a later test."""
    test = pytest.mark.usefixtures("collect_garbage")(test)
    return pytest.mark.filterwarnings(
        "ignore:Async generator 'httpx._content.ByteStream.__aiter__' was garbage "
        "collected:ResourceWarning")(test)


@pytest.fixture
async def collect_garbage() -> AsyncIterator[None]:
    yield
    gc.collect()


def _frames_of(bodies: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    batches = [decode_batch(b, max_frames=1 << 16) for b in bodies]
    return (np.concatenate([b.t_ms for b in batches]).astype(np.float64),
            np.concatenate([b.frames for b in batches]))


def _realistic(kind: str, reps: int, seed: int) -> list[bytes]:
    session = generate(kind, reps=reps, seed=seed, aspect=16 / 9)
    return list(batches_of(session.t_ms, session.frames, random.Random(1)))


async def _post(client: httpx.AsyncClient, url: str, token: str, body: bytes) -> httpx.Response:
    return await client.post(url + "/v1/pose/frames", content=body, headers=fu.auth(token))


async def _end(client: httpx.AsyncClient, url: str, token: str, session_id: str
               ) -> httpx.Response:
    return await client.post(f"{url}/v1/sessions/{session_id}/end",
                             headers=fu.auth(token, None))


async def _send_all(url: str, token: str, bodies: list[bytes]) -> None:
    async with httpx.AsyncClient(timeout=20) as client:
        for body in bodies:
            r = await _post(client, url, token, body)
            assert r.status_code == 202, r.text


def _blob(data_dir: Path, session_id: str) -> bytes:
    return (data_dir / "blobs" / ORG / f"{session_id}.bin.gz").read_bytes()


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        np.array_equal(a.view(np.uint8), b.view(np.uint8)))


def _check_replay(replay: Replay, bodies: list[bytes]) -> None:
    """The blob holds exactly the frames of ``bodies``: bit for bit with a lossless
    encoding, within the header's error bound (NaN rows bit for bit) with q16delta."""
    t, frames = _frames_of(bodies)
    assert np.array_equal(replay.t_ms, t)
    bound = replay.header.max_error
    if bound is None:
        assert _same_bits(replay.frames, frames)
    else:
        nan = np.isnan(frames)
        assert np.array_equal(np.isnan(replay.frames), nan)
        err = np.abs(np.where(nan, 0, replay.frames - frames)).max(axis=(0, 1))
        assert np.all(err <= np.asarray(bound) * (1 + 1e-6)), (err, bound)


# -- 1 -------------------------------------------------------------------------------


@client_cut_uploads
@pytest.mark.parametrize("encoding", ["f32", "q16delta"])
async def test_sigkill_mid_session_then_carry_on(settings: Settings, private_tmp: Path,
                                                 encoding: str) -> None:
    bodies = _realistic("squat", reps=6, seed=3)
    n = len(bodies)
    assert n >= 15
    token = session_token(settings, org_id=ORG, session_id="kill-1",
                          exercise={"kind": "squat", "target_reps": 6})
    interrupted = fu.service(private_tmp / "a", BLOB_ENCODING=encoding)
    reference = fu.service(private_tmp / "b", BLOB_ENCODING=encoding)
    with trio.fail_after(90):
        async with fu.child(interrupted), fu.child(reference):
            # The uninterrupted run.
            await _send_all(reference.url, token, bodies)
            async with httpx.AsyncClient(timeout=30) as client:
                r = await _end(client, reference.url, token, "kill-1")
            assert r.status_code == 200, r.text
            ref_summary = r.json()

            # The interrupted run: a sender streams as fast as it is answered and the
            # process is SIGKILLed while a request is in flight.
            acked: set[int] = set()
            in_flight: list[int] = []

            async def sender() -> None:
                async with httpx.AsyncClient(timeout=20) as client:
                    for seq, body in enumerate(bodies):
                        in_flight.append(seq)
                        try:
                            r = await _post(client, interrupted.url, token, body)
                        except httpx.TransportError:
                            return
                        assert r.status_code == 202, r.text
                        assert r.json() == {"seq": seq, "duplicate": False}
                        acked.add(seq)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await fu.poll(lambda: len(acked) >= n // 2, 20, 0.001)
                assert await interrupted.kill() == -signal.SIGKILL
            assert acked == set(range(len(acked)))  # in order, no holes
            last_acked = max(acked)
            assert last_acked < n - 1

            await interrupted.start()
            async with httpx.AsyncClient(timeout=20) as client:
                # A batch acknowledged before the crash is known after it.
                r = await _post(client, interrupted.url, token, bodies[last_acked])
                assert r.status_code == 202, r.text
                assert r.json() == {"seq": last_acked, "duplicate": True}
                # The client retries what was not acknowledged, then carries on. The
                # batch in flight at the kill may have been made durable without its
                # answer getting out: its retry is then a duplicate (never another).
                resent_duplicates = 0
                for seq in range(last_acked + 1, n):
                    r = await _post(client, interrupted.url, token, bodies[seq])
                    assert r.status_code == 202, r.text
                    assert r.json()["seq"] == seq
                    if r.json()["duplicate"]:
                        assert seq == last_acked + 1 and in_flight[-1] == seq
                        resent_duplicates += 1
                r = await _end(client, interrupted.url, token, "kill-1")
                assert r.status_code == 200, r.text
                summary = r.json()
                r = await _end(client, interrupted.url, token, "kill-1")
                assert r.status_code == 200 and r.json() == summary

    blob, ref_blob = _blob(private_tmp / "a", "kill-1"), _blob(private_tmp / "b", "kill-1")
    # every acknowledged batch is in the blob, bit for bit; and the blob is the one an
    # uninterrupted run writes, byte for byte
    replay = read_replay(blob)
    assert replay.header.encoding == encoding
    _check_replay(replay, bodies)
    assert blob == ref_blob
    assert summary["blob"]["sha256"] == hashlib.sha256(blob).hexdigest()
    # the metrics equal those of the uninterrupted run (the pose stats too, except
    # for the duplicate the client sent on purpose)
    assert summary["reps"] == ref_summary["reps"]
    assert summary["reps"]["rep_count"] >= 5
    pose, ref_pose = dict(summary["pose"]), dict(ref_summary["pose"])
    assert pose.pop("batches_duplicate") == (1 + resent_duplicates
                                             + ref_pose.pop("batches_duplicate"))
    assert pose == ref_pose
    assert pose["batches"] == n and pose["frames"] == replay.frames.shape[0]
    # support staff's replay recomputes exactly those metrics
    assert json.loads(json.dumps(recompute(replay)["reps"])) == summary["reps"]
    assert fu.spool_keys(private_tmp / "a") == []
    cut = in_flight[-1] not in acked
    print(f"\n[sigkill/{encoding}] killed after {len(acked)}/{n} acknowledged batches, "
          f"{'with' if cut else 'without'} a request in flight; blob {len(blob)} bytes "
          f"identical to the uninterrupted run's; {summary['reps']['rep_count']} reps")


# -- 2 -------------------------------------------------------------------------------


async def test_sigkill_at_each_finalisation_step(settings: Settings, private_tmp: Path,
                                                 pg_url: str, pg_db: Database) -> None:
    bodies = [batch_body(seq) for seq in range(4)]
    data = private_tmp / "svc"
    sink = fu.sink(private_tmp / "sink", pg_url)
    rows = AggregateSink(pg_db)
    done: list[str] = []
    with trio.fail_after(120):
        async with fu.child(sink):
            bus = {"BUS": "http", "BUS_URL": sink.url + "/internal/v1/events"}
            port = fu.free_port()
            for step in STEPS:
                sid = f"fin-{step.replace('_', '-')}"
                token = session_token(settings, org_id=ORG, session_id=sid)
                async with fu.child(fu.service(data, port, FAULT_KILL_AT=step, **bus)) as svc:
                    await _send_all(svc.url, token, bodies)
                    async with httpx.AsyncClient(timeout=20) as client:
                        with pytest.raises(httpx.TransportError):
                            await _end(client, svc.url, token, sid)
                    assert await svc.wait(10) == 137
                    assert f"fault injection: killed at {step}" in svc.log_text()

                async with fu.child(fu.service(data, port, **bus)) as svc:
                    async with httpx.AsyncClient(timeout=30) as client:
                        r = await _end(client, svc.url, token, sid)
                    assert r.status_code == 200, (step, r.text)
                    summary = r.json()
                    done.append(sid)
                    # exactly one blob per session, no temp file, and it is complete
                    assert fu.files_under(data / "blobs") == sorted(
                        f"{ORG}/{s}.bin.gz" for s in done), step
                    blob = _blob(data, sid)
                    assert summary["blob"]["sha256"] == hashlib.sha256(blob).hexdigest()
                    _check_replay(read_replay(blob), bodies)
                    # exactly one row per session, and the outbox drains
                    got = await fu.poll(lambda: _row_ids(rows, len(done)), 30)
                    assert got == sorted(done), step
                    await fu.poll(lambda: not fu.outbox_pending(data), 30)
                    assert fu.spool_keys(data) == []
                    assert (await _row(rows, sid))["frames"] == summary["pose"]["frames"]
            await trio.sleep(0.5)  # nothing arrives late
            assert sorted(r["session_id"] for r in await rows.session_rows(ORG)) == sorted(done)


async def _row_ids(rows: AggregateSink, want: int) -> list[str] | None:
    ids = sorted(r["session_id"] for r in await rows.session_rows(ORG))
    return ids if len(ids) >= want else None


async def _row(rows: AggregateSink, sid: str) -> dict[str, Any]:
    (row,) = [r for r in await rows.session_rows(ORG) if r["session_id"] == sid]
    return row


# -- 3 -------------------------------------------------------------------------------


async def test_sink_down_then_up(settings: Settings, private_tmp: Path, pg_url: str,
                                 pg_db: Database) -> None:
    data = private_tmp / "svc"
    sink_port = fu.free_port()  # nothing listens there until the sink starts
    bus = {"BUS": "http", "BUS_URL": f"http://127.0.0.1:{sink_port}/internal/v1/events"}
    svc = fu.service(data, **bus)
    sids = [f"down-{i}" for i in range(5)]
    rows = AggregateSink(pg_db)

    async def session(sid: str) -> None:
        token = session_token(settings, org_id=ORG, session_id=sid)
        await _send_all(svc.url, token, [batch_body(s) for s in range(3)])
        async with httpx.AsyncClient(timeout=30) as client:
            r = await _end(client, svc.url, token, sid)
        assert r.status_code == 200, r.text
        assert r.json()["published"] is True  # durably in the outbox

    with trio.fail_after(90):
        async with fu.child(svc):
            for sid in sids[:3]:
                await session(sid)
            assert len(fu.outbox_pending(data)) == 3
            # The events wait on disk across a crash too.
            await svc.kill()
            await svc.start()
            for sid in sids[3:]:
                await session(sid)
            assert len(fu.outbox_pending(data)) == 5
            await trio.sleep(2)  # the outbox keeps failing and backing off
            assert len(fu.outbox_pending(data)) == 5
            assert await rows.session_rows(ORG) == []

            async with fu.child(fu.sink(private_tmp / "sink", pg_url, sink_port)):
                t0 = time.monotonic()
                got = await fu.poll(lambda: _row_ids(rows, 5), 60, 0.2)
                delivered_s = time.monotonic() - t0
                await fu.poll(lambda: not fu.outbox_pending(data), 10)
                await trio.sleep(1)
                assert got == sids
                assert sorted(r["session_id"] for r in await rows.session_rows(ORG)) == sids
    print(f"\n[sink down/up] 5 events delivered {delivered_s:.1f} s after the sink came up")


# -- 4 -------------------------------------------------------------------------------


@asynccontextmanager
async def _service_on_moto(data: Path, monkeypatch: pytest.MonkeyPatch
                           ) -> AsyncIterator[tuple[fu.Child, MotoServer]]:
    use_aws_env(monkeypatch)
    moto = MotoServer(fu.free_port(), "faults-test")
    svc = fu.service(data, BLOB_STORE="s3", S3_BUCKET=moto.bucket, S3_PREFIX="f4",
                     S3_ENDPOINT_URL=moto.url, S3_REGION="us-east-1")
    try:
        await trio.to_thread.run_sync(moto.start)
        async with fu.child(svc):
            yield svc, moto
    finally:
        await trio.to_thread.run_sync(moto.stop)


async def test_s3_down_at_session_end_then_up(settings: Settings, private_tmp: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data = private_tmp / "svc"
    bodies = [batch_body(s) for s in range(6)]
    tok = {sid: session_token(settings, org_id=ORG, session_id=sid)
           for sid in ("s3-end", "s3-live")}
    ended: list[httpx.Response] = []
    answered: list[float] = []
    with trio.fail_after(90):
        async with _service_on_moto(data, monkeypatch) as (svc, moto), \
                httpx.AsyncClient(timeout=60) as client:
            await _send_all(svc.url, tok["s3-end"], bodies)
            await _send_all(svc.url, tok["s3-live"], bodies[:2])
            await trio.to_thread.run_sync(moto.stop)
            t_down = time.monotonic()

            async def end() -> None:
                ended.append(await _end(client, svc.url, tok["s3-end"], "s3-end"))
                answered.append(time.monotonic())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(end)
                # While S3 is down, ingest for a live session carries on.
                r = await _post(client, svc.url, tok["s3-live"], bodies[2])
                assert r.status_code == 202, r.text
                await trio.sleep_until(t_down + 3)
                assert not ended, "the end call cannot have succeeded while S3 is down"
                t_up = time.monotonic()
                await trio.to_thread.run_sync(moto.start)  # empty again: bucket re-made
            after_up_s = answered[0] - t_up
            (r,) = ended
            assert r.status_code == 200, r.text
            summary = r.json()
            assert summary["blob"]["key"] == f"{ORG}/s3-end.bin.gz"
            blob = await trio.to_thread.run_sync(moto.get, f"f4/{ORG}/s3-end.bin.gz")
            assert hashlib.sha256(blob).hexdigest() == summary["blob"]["sha256"]
            _check_replay(read_replay(blob), bodies)
            assert summary["pose"]["frames"] == 30 * len(bodies)
            assert summary["error"] is None and summary["published"] is True
            assert fu.spool_keys(data) == [f"{ORG}/s3-live"]
    print(f"\n[s3 down/up] end call answered {after_up_s:.1f} s after S3 came back "
          f"(outage 3 s)")


async def test_new_session_while_s3_down(settings: Settings, private_tmp: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A session's first batch while S3 is down: accepted (it goes to the spool), or
    refused with 503 + Retry-After so the client retries; never a bare 500."""
    token = session_token(settings, org_id=ORG, session_id="s3-new")
    with trio.fail_after(60):
        async with _service_on_moto(private_tmp / "svc", monkeypatch) as (svc, moto), \
                httpx.AsyncClient(timeout=60) as client:
            await trio.to_thread.run_sync(moto.stop)
            t0 = time.monotonic()
            r = await _post(client, svc.url, token, batch_body(0))
            took = time.monotonic() - t0
            assert r.status_code in (202, 503), (r.status_code, r.text, f"{took:.2f} s")
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1
            status = r.status_code
            await trio.to_thread.run_sync(moto.start)
            r = await _post(client, svc.url, token, batch_body(0))
            assert r.status_code == 202, r.text
    print(f"\n[s3 down, new session] first batch answered {status} after {took:.1f} s")


# -- 5 -------------------------------------------------------------------------------


@client_cut_uploads
async def test_sigterm_with_many_live_sessions(settings: Settings, private_tmp: Path) -> None:
    n_sessions, workers, deadline_s = 150, 48, 5.0
    data = private_tmp / "svc"
    svc = fu.service(data, SHUTDOWN_DEADLINE_S=str(deadline_s), MAX_BATCHES_PER_S="1000",
                     LOG_LEVEL="INFO")
    sids = [f"term-{i}" for i in range(n_sessions)]
    tokens = {sid: session_token(settings, org_id=ORG, session_id=sid) for sid in sids}
    body_cache = [batch_body(s) for s in range(66)]
    acked: dict[str, set[int]] = {sid: set() for sid in sids}
    unknown: dict[str, set[int]] = {sid: set() for sid in sids}  # sent, no answer
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    term_at: list[float] = []

    async def worker(w: int, client: httpx.AsyncClient) -> None:
        mine = sids[w::workers]
        seq = dict.fromkeys(mine, 0)
        while True:
            for sid in mine:
                s = seq[sid]
                try:
                    r = await _post(client, svc.url, tokens[sid], body_cache[s])
                except httpx.ConnectError:
                    return  # no longer accepting: the request was never sent
                except httpx.TransportError as exc:
                    at = time.monotonic() - term_at[0] if term_at else -1.0
                    errors[f"{type(exc).__name__} at +{at:.0f} s"] += 1
                    unknown[sid].add(s)
                    return
                statuses[r.status_code] += 1
                assert r.status_code == 202, r.text
                acked[sid].add(s)
                seq[sid] = s + 1
                if s + 1 >= 64:
                    return

    with trio.fail_after(120):
        async with fu.child(svc):
            limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
            async with httpx.AsyncClient(timeout=30, limits=limits) as client:
                async with trio.open_nursery() as nursery:
                    for w in range(workers):
                        nursery.start_soon(worker, w, client)
                    await fu.poll(lambda: all(acked.values()), 30, 0.01)
                    await trio.sleep(0.5)  # every session live; load in full swing
                    term_at.append(time.monotonic())
                    svc.signal(signal.SIGTERM)
                    code = await svc.wait(deadline_s + 20)
                exit_s = time.monotonic() - term_at[0]
            assert code == 0, svc.log_text()[-2000:]
            assert set(statuses) == {202}  # no 5xx (nor anything else) to anyone
            total = sum(len(a) for a in acked.values())
            # The service's stop budget: in-flight requests (hypercorn's graceful
            # timeout), then the sessions (the deadline), then the outbox.
            assert exit_s < GRACEFUL_TIMEOUT_S + deadline_s + OUTBOX_FLUSH_S, exit_s
            left = fu.spool_keys(data)
            assert left == sorted(f"{ORG}/{sid}" for sid in sids)

            # All sessions recoverable: a new process carries every one of them on.
            await svc.start()
            admin = {"Authorization": f"Bearer {mint_service_token(settings)}"}
            frames: list[int] = []
            taken_unanswered: list[bool] = []  # per resend: had the service taken it?
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.get(svc.url + "/v1/admin/sessions", headers=admin)
                assert r.status_code == 200 and r.json()["count"] == n_sessions

                async def carry_on(sid: str, limiter: trio.CapacityLimiter) -> None:
                    async with limiter:
                        nxt = max(acked[sid]) + 1
                        for s in sorted(unknown[sid]):  # resent, as a client does
                            r = await _post(client, svc.url, tokens[sid], body_cache[s])
                            assert r.status_code == 202, r.text
                            taken_unanswered.append(r.json()["duplicate"])
                            acked[sid].add(s)
                            nxt = max(nxt, s + 1)
                        r = await _post(client, svc.url, tokens[sid], body_cache[nxt])
                        assert r.status_code == 202 and not r.json()["duplicate"], r.text
                        acked[sid].add(nxt)
                        r = await _end(client, svc.url, tokens[sid], sid)
                        assert r.status_code == 200, r.text
                        pose = r.json()["pose"]
                        assert pose["frames"] == 30 * len(acked[sid]), sid
                        assert pose["batches_skipped"] == 0
                        frames.append(pose["frames"])

                async with trio.open_nursery() as nursery:
                    limiter = trio.CapacityLimiter(16)
                    for sid in sids:
                        nursery.start_soon(carry_on, sid, limiter)
            # A request cut without an answer (the server closing a keep-alive
            # connection as the client reused it) was never taken: every request
            # the service took was answered.
            assert not any(taken_unanswered)
            assert fu.spool_keys(data) == []
    print(f"\n[sigterm] {n_sessions} sessions, {total} batches acknowledged before exit; "
          f"exit {exit_s:.2f} s after SIGTERM (session deadline {deadline_s:g} s, stop "
          f"budget {GRACEFUL_TIMEOUT_S + deadline_s + OUTBOX_FLUSH_S:g} s); "
          f"requests cut without an answer: {dict(errors) or 0}, of which the service "
          f"had taken {sum(taken_unanswered)}; recovered {sum(frames)} frames")


# -- 6 -------------------------------------------------------------------------------


async def test_flood_over_capacity(settings: Settings, private_tmp: Path) -> None:
    max_live, rate, n_sessions, workers, flood_s = 20, 1, 400, 128, 8.0
    svc = fu.service(private_tmp / "svc", MAX_LIVE_SESSIONS=str(max_live),
                     MAX_BATCHES_PER_S=str(rate), MAILBOX_SIZE="4")
    sids = [f"flood-{i}" for i in range(n_sessions)]
    headers = {sid: fu.auth(session_token(settings, org_id=ORG, session_id=sid))
               for sid in sids}
    # The largest batches allowed (120 frames, 4 s apart): the most memory per request.
    bodies = []
    for seq in range(64):
        t, f = pose_frames(120, t0=seq * 4000, seed=seq)
        bodies.append(encode_batch(seq, t, f, space="image", image_width=640, image_height=480))
    statuses: Counter[tuple[int, str]] = Counter()
    missing_retry_after: list[tuple[int, str]] = []
    transport: Counter[str] = Counter()
    rng = random.Random(6)
    admitted: list[str] = []
    seq: dict[str, int] = {}

    async def worker(until: float) -> None:
        conn = fu.RawHttp(svc.port)
        try:
            while time.monotonic() < until:
                # Half new sessions (over the live-session cap), half admitted ones
                # (over their rate).
                sid = rng.choice(admitted if admitted and rng.random() < 0.5 else sids)
                s = seq.get(sid, 0)
                try:
                    status, fields, data = await conn.request(
                        "POST", "/v1/pose/frames", headers[sid], bodies[s % 64])
                except ConnectionError as exc:
                    transport[type(exc).__name__] += 1
                    continue
                answer = json.loads(data)
                code = ("duplicate" if answer["duplicate"] else "") if status == 202 \
                    else answer["error"]["code"]
                statuses[(status, code)] += 1
                if status in (429, 503) and int(fields.get("retry-after", "0")) < 1:
                    missing_retry_after.append((status, code))
                if status == 202 and not answer["duplicate"]:
                    seq[sid] = s + 1
                    if s == 0:
                        admitted.append(sid)
        finally:
            await conn.aclose()

    with trio.fail_after(60):
        async with fu.child(svc):
            before = svc.rss_kb()
            t0 = time.monotonic()
            async with trio.open_nursery() as nursery:
                for _ in range(workers):
                    nursery.start_soon(worker, t0 + flood_s)
            elapsed = time.monotonic() - t0
            assert svc.proc is not None and svc.proc.poll() is None  # alive
            after = svc.rss_kb()
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.get(svc.url + "/v1/readyz")
                assert r.status_code == 200
                admin = {"Authorization": f"Bearer {mint_service_token(settings)}"}
                r = await client.get(svc.url + "/v1/admin/sessions", headers=admin)
                live = r.json()["count"]
    total = sum(statuses.values())
    print(f"\n[flood] {total} requests in {elapsed:.1f} s ({total / elapsed:.0f}/s), "
          f"{n_sessions} sessions against max {max_live} live, {rate}/s per session: "
          f"{dict(statuses)}; transport errors {dict(transport) or 0}; live after {live}; "
          f"RSS before {before['VmRSS'] / 1024:.0f} MB, after {after['VmRSS'] / 1024:.0f} MB, "
          f"peak {after['VmHWM'] / 1024:.0f} MB")
    assert not transport
    assert {s for s, _ in statuses} <= {202, 429, 503}, statuses
    assert not missing_retry_after
    assert statuses[(429, "too_many_sessions")] > 0 and statuses[(429, "rate_limited")] > 0
    assert live == max_live
    # every admitted session is held to its rate: a burst of 2 s, then the rate
    # (a concurrent resend of the same batch is a free duplicate)
    assert statuses[(202, "")] <= max_live * rate * (2 + elapsed) * 1.1
    assert after["VmHWM"] < 300 * 1024
