"""Load generator process for ``bench/load.py``: simulated patients, HTTP/1.1 or WebSocket.

One process drives a slice of the sessions over TCP connections to 127.0.0.1 (one
connection per session, as a browser tab would). ``--transport http``: a minimal
hand-written HTTP/1.1 keep-alive client on Trio sockets: a request is one
``send_all`` of bytes prepared ahead, a response is read up to its
``Content-Length``. ``--transport ws``: one WebSocket per session
(``bench/loadws.py``: ``wsproto`` on Trio sockets, token in ``Authorization``, no
compression), one binary message per batch (the same bytes as the POST body), one
text ack per batch, read cheaply (the ``"status"`` and ``"seq"`` integers are
picked out of the text; only a refusal is parsed as JSON); at most ``--window``
batches in flight, acks matched to batches in order; ack latency is from the
message's send to its ack. When done, a normal close (1000), then the session is
ended over HTTP as with the other transport. Either way that costs a fraction of
what httpx or a full client library would per batch, so the generator is not what
limits the figures (``bench/load.py`` measures its CPU to show it).

Batches are realistic: a pool of synthetic sessions (:func:`telemetry.dev.synthetic.generate`,
split into 1-second batches by :func:`telemetry.dev.demo.batches_of`, so about 2% of the
frames are dropped in transit and some frames are all-NaN) is made once; each
simulated session streams one pool session's batches in order, wrapping around,
with the sequence number and the timestamps rewritten in place (one ``pack_into``
and one strided numpy store per batch: a few microseconds). ``--wire v2`` (default:
``$BENCH_WIRE``, else ``v1``) re-encodes the pool as wire format version 2, which
carries the first timestamp absolute and the rest as differences, so there the
rewrite is one ``pack_into`` of that first timestamp.

Modes:

* ``paced``: session ``i`` of ``total`` starts at ``ramp * i/total`` seconds after
  the common start, sends one batch a second at real pace, and ends (``POST
  /v1/sessions/{id}/end``) at ``ramp + seconds + end_spread * i/total``. So every
  session is live during ``[ramp, ramp + seconds]``, and starts and ends are spread
  out rather than all in one instant.
* ``closed``: every session sends its next batch as soon as the previous one is
  answered (closed loop), for ``duration`` seconds or ``batches`` batches, then
  optionally ends its session.

A 429 or 503 is counted as an error and the same batch is sent again (as a client
would) up to ``RETRIES`` times, ``RETRY_PAUSE_S`` apart; so is a transport error,
after a reconnect. Over ws the same holds for a refused batch, a refused
handshake (counted as ``handshake STATUS CODE``) and the batches in flight on a
broken connection; a server close ``1012`` (service restart) reconnects and resends
the unacknowledged batches without counting an error; any other close from the
server (``4401``, ``4409``, ``1003``, ``1008``...) fails the batches in flight and
stops the session's streaming (the rest counted as ``not sent``); every
handshake's latency is recorded too (kind 2). Protocol with the parent: print
``ready``, read ``go EPOCH`` (wall-clock start, shared by all generators) on
stdin, run, write the records to ``--out`` (npz), print ``done``. Every loop is
bounded by count and by time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import struct
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trio

if __package__ in (None, ""):  # allow `python bench/loadgen.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadws import TRANSPORT_ERRORS, Event, WsConn, WsRefused, int_after  # noqa: E402
from domain.pose_batch import (  # noqa: E402
    CONTENT_TYPE,
    FRAME_BYTES,
    HEADER,
    VERSION_2,
    decode_batch,
    encode_batch_v2,
)
from telemetry.auth import mint_session_token  # noqa: E402
from telemetry.config import Settings  # noqa: E402
from telemetry.dev.demo import EXERCISES, batches_of  # noqa: E402
from telemetry.dev.synthetic import generate  # noqa: E402

HOST = "127.0.0.1"
RETRIES = 3
RETRY_PAUSE_S = 0.1
KIND_BATCH, KIND_END, KIND_CONNECT = 0, 1, 2
_SEQ = struct.Struct("<I")
_TS_DTYPE = np.dtype("<u4")
WIRES = ("v1", "v2")


# -- realistic batches ------------------------------------------------------------------


@dataclass(frozen=True)
class PoolBatch:
    template: bytes  # the encoded batch as batches_of made it
    rel_ms: np.ndarray  # frame timestamps within its second (uint32)
    n: int


@dataclass(frozen=True)
class PoolSession:
    kind: str
    batches: list[PoolBatch]


def make_pool(sessions: int = 8, reps: int = 20, seed: int = 11, wire: str = "v1"
              ) -> list[PoolSession]:
    """``sessions`` synthetic exercise sessions (about a minute each) in 1-s batches, in
    wire format ``wire`` (``v2``: a batch v2 cannot carry stays v1, as in the browser)."""
    rng = random.Random(seed)
    pool = []
    for j in range(sessions):
        kind = EXERCISES[j % len(EXERCISES)]
        s = generate(kind, reps=reps, seed=seed * 1000 + j, aspect=1280 / 720)
        out = []
        for body in batches_of(s.t_ms, s.frames, rng):
            n = struct.unpack_from("<H", body, 12)[0]
            ts = np.ndarray((n,), _TS_DTYPE, body, HEADER.size, (FRAME_BYTES,)).copy()
            base = (int(ts[0]) // 1000) * 1000
            if wire == "v2":
                body = _as_v2(body)
            out.append(PoolBatch(body, (ts - base).astype(np.uint32), n))
        pool.append(PoolSession(kind, out))
    return pool


def _as_v2(body: bytes) -> bytes:
    b = decode_batch(body, max_frames=0xFFFF)
    try:
        return encode_batch_v2(b.seq, b.t_ms, b.frames, space=b.space,
                               image_width=b.image_width, image_height=b.image_height)
    except ValueError:
        return body


def batch_body(pb: PoolBatch, seq: int) -> bytearray:
    """The pool batch as batch ``seq`` of a session: second ``seq`` of its clock."""
    buf = bytearray(pb.template)
    _SEQ.pack_into(buf, 8, seq)
    if buf[4] == VERSION_2:  # timestamps after the first are differences
        _SEQ.pack_into(buf, HEADER.size, int(pb.rel_ms[0]) + 1000 * seq)
        return buf
    np.ndarray((pb.n,), _TS_DTYPE, buf, HEADER.size, (FRAME_BYTES,))[:] = pb.rel_ms + 1000 * seq
    return buf


# -- a minimal HTTP/1.1 keep-alive client -------------------------------------------------


class HttpError(Exception):
    pass


class Conn:
    """One keep-alive connection; requests strictly one at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.buf = bytearray()

    async def connect(self) -> None:
        await self.close()
        self.stream = await trio.open_tcp_stream(HOST, self.port)
        self.buf = bytearray()

    async def close(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()

    async def _more(self) -> None:
        assert self.stream is not None
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise HttpError("connection closed by server")
        self.buf += chunk

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.stream is None:
            await self.connect()
        assert self.stream is not None
        await self.stream.send_all(data)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > 65536:
                raise HttpError("response head too long")
            await self._more()
        head = bytes(self.buf[:end]).lower()
        del self.buf[:end + 4]
        status = int(head[9:12])
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            raise HttpError("response without content-length")
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17:stop if stop >= 0 else len(head)])
        while len(self.buf) < length:
            await self._more()
        body = bytes(self.buf[:length])
        del self.buf[:length]
        if b"\r\nconnection: close" in head:
            await self.close()
        return status, body


# -- sessions -----------------------------------------------------------------------------


@dataclass
class Records:
    """One row per request (and per retry): when sent (s since the common start),
    how long to the full answer, how late against its schedule, status (0 =
    transport error or timeout), kind (batch / end)."""

    t: array[float] = field(default_factory=lambda: array("d"))
    lat: array[float] = field(default_factory=lambda: array("d"))
    lag: array[float] = field(default_factory=lambda: array("d"))
    status: array[int] = field(default_factory=lambda: array("h"))
    kind: array[int] = field(default_factory=lambda: array("b"))
    codes: dict[str, int] = field(default_factory=dict)
    end_checks: dict[str, int] = field(default_factory=dict)
    blob_sizes: list[int] = field(default_factory=list)

    def add(self, t: float, lat: float, lag: float, status: int, kind: int) -> None:
        self.t.append(t)
        self.lat.append(lat)
        self.lag.append(lag)
        self.status.append(status)
        self.kind.append(kind)

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


@dataclass
class Session:
    index: int
    session_id: str
    token: str
    pool: PoolSession
    offset: int

    def head(self, port: int, length: int) -> bytes:
        return (f"POST /v1/pose/frames HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                f"Authorization: Bearer {self.token}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()

    def end_request(self, port: int) -> bytes:
        return (f"POST /v1/sessions/{self.session_id}/end HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                f"Authorization: Bearer {self.token}\r\nContent-Length: 0\r\n\r\n").encode()

    def body(self, seq: int) -> bytearray:
        return batch_body(self.pool.batches[(self.offset + seq) % len(self.pool.batches)], seq)

    def batch(self, port: int, seq: int) -> bytes:
        body = self.body(seq)
        return self.head(port, len(body)) + body


def make_sessions(settings: Settings, run_id: str, indices: range,
                  pool: list[PoolSession], orgs: int) -> list[Session]:
    out = []
    for i in indices:
        ps = pool[i % len(pool)]
        sid = f"bench-{run_id}-{i}"
        token = mint_session_token(
            settings, org_id=f"bench-org-{i % orgs}", session_id=sid,
            patient_id=f"patient-{i}", exercise={"kind": ps.kind, "target_reps": 10},
            ttl_s=4 * 3600,
        )
        out.append(Session(i, sid, token, ps, (i * 7) % len(ps.batches)))
    return out


class Runner:
    def __init__(self, port: int, t0: float, timeout_s: float, check_summary: bool,
                 transport: str = "http", window: int = 1) -> None:
        self.port = port
        self.t0 = t0  # trio clock of the common start
        self.timeout_s = timeout_s
        self.check_summary = check_summary
        self.transport = transport
        self.window = window
        self.rec = Records()

    async def send(self, conn: Conn, data: bytes, due: float, kind: int) -> tuple[int, bytes]:
        """One request with the retry policy; records every attempt."""
        status, body = 0, b""
        for attempt in range(RETRIES + 1):
            sent = trio.current_time()
            try:
                with trio.fail_after(self.timeout_s):
                    status, body = await conn.request(data)
            except (OSError, HttpError, trio.BrokenResourceError, trio.ClosedResourceError,
                    trio.TooSlowError, ValueError) as exc:
                status, body = 0, b""
                self.rec.count(self.rec.codes, f"transport: {type(exc).__name__}")
                await conn.close()
            now = trio.current_time()
            self.rec.add(sent - self.t0, now - sent, sent - due, status, kind)
            if status in (200, 202):
                return status, body
            if status:
                self.rec.count(self.rec.codes, f"{status} {_error_code(body)}")
            if status not in (0, 429, 503) or attempt == RETRIES:
                break
            await trio.sleep(RETRY_PAUSE_S)
        return status, body

    async def end(self, conn: Conn, s: Session, due: float) -> None:
        status, body = await self.send(conn, s.end_request(self.port), due, KIND_END)
        if status != 200:
            self.rec.count(self.rec.end_checks, "end_failed")
            return
        if not self.check_summary:
            self.rec.count(self.rec.end_checks, "ended")
            return
        try:
            summary = json.loads(body)
        except ValueError:
            self.rec.count(self.rec.end_checks, "bad_summary")
            return
        blob = summary.get("blob") or {}
        ok = summary.get("published") is True and bool(blob.get("key"))
        if ok:
            self.rec.blob_sizes.append(int(blob.get("size") or 0))
        self.rec.count(self.rec.end_checks, "blob_and_published" if ok else "not_durable")

    async def paced(self, s: Session, start: float, end: float) -> None:
        """One batch a second from ``start`` until ``end`` (s since t0), then end."""
        if self.transport == "ws":
            last = 0  # the batches are those with start + seq < end, as over HTTP
            while start + last < end:
                last += 1

            def due_of(seq: int, now: float) -> float | None:
                return self.t0 + start + seq if seq < last else None

            await self.ws_session(s, start=start, due_of=due_of,
                                  left=lambda seq: max(0, last - seq),
                                  behind_at=self.t0 + end, end_at=end, barrier=None)
            return
        conn = Conn(self.port)
        try:
            await trio.sleep_until(self.t0 + start)
            seq = 0
            while start + seq < end:
                due = self.t0 + start + seq
                if trio.current_time() >= self.t0 + end:
                    # Behind by the whole rest of the session (an overloaded server):
                    # what was not sent by the session's end is counted, not sent.
                    self.rec.count(self.rec.codes, "not sent: session behind schedule")
                    seq += 1
                    continue
                await trio.sleep_until(due)
                await self.send(conn, s.batch(self.port, seq), due, KIND_BATCH)
                seq += 1
            await trio.sleep_until(self.t0 + end)
            await self.end(conn, s, self.t0 + end)
        finally:
            await conn.close()

    async def closed(self, s: Session, stop: float, batches: int, end: bool,
                     barrier: Barrier | None) -> None:
        if self.transport == "ws":
            def due_of(seq: int, now: float) -> float | None:
                return now if seq < batches and now < self.t0 + stop else None

            await self.ws_session(s, start=0.0, due_of=due_of,
                                  left=lambda seq: int(seq < batches), behind_at=None,
                                  end_at=None if end else -1.0, barrier=barrier)
            return
        conn = Conn(self.port)
        try:
            await trio.sleep_until(self.t0)
            seq = 0
            while seq < batches and trio.current_time() < self.t0 + stop:
                now = trio.current_time()
                await self.send(conn, s.batch(self.port, seq), now, KIND_BATCH)
                seq += 1
            if barrier is not None:
                await barrier.wait()
            if end:
                await self.end(conn, s, trio.current_time())
        finally:
            await conn.close()


    async def ws_session(self, s: Session, *, start: float,
                         due_of: Callable[[int, float], float | None],
                         left: Callable[[int], int], behind_at: float | None,
                         end_at: float | None, barrier: Barrier | None) -> None:
        """Stream over a WebSocket, then close it and end the session over HTTP:
        at ``end_at`` (s since t0), now (None), or not at all (negative)."""
        http = Conn(self.port)
        ws = WsStream(self, s)
        try:
            await trio.sleep_until(self.t0 + start)
            await ws.stream(due_of, left, behind_at)
            if barrier is not None:
                await barrier.wait()
            if end_at is not None and end_at >= 0:
                await trio.sleep_until(self.t0 + end_at)
            due = trio.current_time() if end_at is None else self.t0 + end_at
            await ws.conn.close()
            if end_at is None or end_at >= 0:
                await self.end(http, s, due)
        finally:
            await ws.conn.abort()
            await http.close()


@dataclass
class Flight:
    """A batch on its way: sent at ``sent`` (trio clock), not acknowledged yet."""

    seq: int
    data: bytearray
    due: float
    attempt: int = 0
    sent: float = 0.0
    not_before: float = 0.0


class WsStream:
    """One session's batches over its WebSocket, at most ``runner.window`` in flight.

    One loop (the session's task) sends when a batch is due and the window has room,
    and otherwise reads: acks come in order, each matched to the oldest batch in
    flight. With nothing in flight it just sleeps until the next batch is due (a
    close from the server is then read after the next send)."""

    def __init__(self, runner: Runner, s: Session) -> None:
        self.r = runner
        self.rec = runner.rec
        self.s = s
        self.conn = WsConn(runner.port, s.token)
        self.inflight: deque[Flight] = deque()
        self.retry: deque[Flight] = deque()
        self.stopped = ""  # the server closed the session's WebSocket for good

    def record(self, f: Flight, sent: float, done: float, status: int) -> None:
        self.rec.add(sent - self.r.t0, done - sent, sent - f.due, status, KIND_BATCH)

    def again(self, f: Flight, status: int) -> None:
        """Retry a refused or lost batch as the HTTP client would, or give it up."""
        if status in (0, 429, 503) and f.attempt < RETRIES:
            f.attempt += 1
            f.not_before = trio.current_time() + RETRY_PAUSE_S
            self.retry.append(f)

    async def stream(self, due_of: Callable[[int, float], float | None],
                     left: Callable[[int], int], behind_at: float | None) -> None:
        timeout = self.r.timeout_s
        seq = 0
        while True:
            if self.stopped:
                n = left(seq) + len(self.retry)
                if n:
                    key = f"not sent: {self.stopped}"
                    self.rec.codes[key] = self.rec.codes.get(key, 0) + n
                return
            now = trio.current_time()
            due = None if self.retry else due_of(seq, now)
            when = self.retry[0].not_before if self.retry else due
            if when is None and not self.inflight:
                return
            room = when is not None and len(self.inflight) < self.r.window
            if room and now >= when:
                if self.retry:
                    f = self.retry.popleft()
                elif behind_at is not None and now >= behind_at:
                    # A whole session behind (see paced over HTTP): not sent.
                    self.rec.count(self.rec.codes, "not sent: session behind schedule")
                    seq += 1
                    continue
                else:
                    assert due is not None
                    f = Flight(seq, self.s.body(seq), due)
                    seq += 1
                await self.send(f)
                continue
            if not self.inflight:
                assert when is not None
                await trio.sleep_until(when)
                continue
            deadline = self.inflight[0].sent + timeout
            events = None
            with trio.move_on_at(min(deadline, when) if room and when is not None
                                 else deadline):
                events = await self.conn.receive()
            if events is None:
                if trio.current_time() >= deadline:
                    await self.lost("transport: TooSlowError (no ack)")
                continue
            t = trio.current_time()
            for ev in events:
                await self.handle(ev, t)
                if not self.conn.is_open:
                    break

    async def send(self, f: Flight) -> None:
        if not self.conn.is_open and not await self.connect(f):
            return
        f.sent = trio.current_time()
        self.inflight.append(f)
        try:
            with trio.fail_after(self.r.timeout_s):
                await self.conn.send(f.data)
        except TRANSPORT_ERRORS as exc:
            await self.lost(f"transport: {type(exc).__name__} (send)")

    async def connect(self, f: Flight) -> bool:
        t = trio.current_time()
        try:
            with trio.fail_after(self.r.timeout_s):
                await self.conn.connect()
        except WsRefused as exc:
            self.rec.count(self.rec.codes, f"handshake {exc.status} {_error_code(exc.body)}")
            self.record(f, t, trio.current_time(), exc.status)
            self.again(f, exc.status)
            return False
        except TRANSPORT_ERRORS as exc:
            self.rec.count(self.rec.codes, f"transport: {type(exc).__name__} (handshake)")
            self.record(f, t, trio.current_time(), 0)
            self.again(f, 0)
            await self.conn.abort()
            return False
        self.rec.add(t - self.r.t0, trio.current_time() - t, 0.0, 101, KIND_CONNECT)
        return True

    async def lost(self, why: str) -> None:
        """The connection broke: the batches in flight failed (retried on a new one)."""
        self.rec.count(self.rec.codes, why)
        now = trio.current_time()
        for f in self.inflight:
            self.record(f, f.sent, now, 0)
            self.again(f, 0)
        self.inflight.clear()
        await self.conn.abort()

    async def handle(self, ev: Event, t: float) -> None:
        kind, payload = ev
        if kind == "text":
            if not self.inflight:
                self.rec.count(self.rec.codes, "ws: ack with no batch in flight")
                return
            f = self.inflight.popleft()
            status = int_after(payload, '"status"') or -1
            self.record(f, f.sent, t, status)
            if status == 202:
                if int_after(payload, '"seq"') != f.seq:
                    self.rec.count(self.rec.codes, "ws: ack for another seq (202)")
                return
            self.rec.count(self.rec.codes, f"{status} {_error_code(payload.encode())}")
            self.again(f, status)
        elif kind == "close":
            code, reason = int(payload[0]), payload[1]  # wsproto: an IntEnum if known
            if code == 1012:  # service restart: reconnect, resend what is unacknowledged
                self.rec.count(self.rec.codes, "ws close 1012 (reconnected; not an error)")
                for f in self.inflight:
                    f.not_before = t
                    if f.attempt < RETRIES:
                        f.attempt += 1
                        self.retry.append(f)
                    else:
                        self.record(f, f.sent, t, 0)
                self.inflight.clear()
                await self.conn.abort()
                return
            self.rec.count(self.rec.codes, f"ws close {code} {reason[:60]}".rstrip())
            for f in self.inflight:
                self.record(f, f.sent, t, 0)
            self.inflight.clear()
            await self.conn.abort()
            self.stopped = f"ws closed {code}"
        elif kind == "eof":
            await self.lost(f"transport: {payload}")
        else:
            self.rec.count(self.rec.codes, f"ws: {payload}")


class Barrier:
    """Every session's streaming done: say ``streamed`` to the parent (which looks at
    the server now), wait ``pause_s``, then let all of them end together."""

    def __init__(self, parties: int, pause_s: float) -> None:
        self.left = parties
        self.pause_s = pause_s
        self.open = trio.Event()

    async def wait(self) -> None:
        self.left -= 1
        if self.left == 0:
            print("streamed", flush=True)
            await trio.sleep(self.pause_s)
            self.open.set()
        await self.open.wait()


def _error_code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "-"


async def prime(port: int, settings: Settings, pool: list[PoolSession], transport: str
                ) -> None:
    """A few batches and an end on a throw-away session over the run's transport, so
    lazy imports and first-use allocations happen before the idle RSS is taken. A
    target that acknowledges none of them stops the run here, with what it said."""
    (s,) = make_sessions(settings, f"prime{random.randrange(1 << 30)}", range(1), pool, 1)
    runner = Runner(port, trio.current_time(), 10.0, False, transport)
    with trio.fail_after(60):
        await runner.closed(s, 30.0, 3, True, None)
    r = runner.rec
    if not any(st == 202 for st in r.status) or r.end_checks.get("ended") != 1:
        raise SystemExit(f"priming over {transport} failed: statuses {sorted(set(r.status))}, "
                         f"errors {r.codes}, end {r.end_checks}")


async def main(a: argparse.Namespace) -> None:
    settings = Settings.from_env()
    pool = make_pool(wire=a.wire)
    sessions = make_sessions(settings, a.run_id, range(a.index_from, a.index_to), pool, a.orgs)
    if a.prime:
        await prime(a.port, settings, pool, a.transport)
    print("ready", flush=True)
    line = await trio.to_thread.run_sync(sys.stdin.readline)
    if not line.startswith("go "):
        raise SystemExit(f"expected 'go EPOCH', got {line!r}")
    go_epoch = float(line.split()[1])
    t0 = trio.current_time() + (go_epoch - time.time())
    runner = Runner(a.port, t0, a.timeout, a.check_summary, a.transport, a.window)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    if a.mode == "paced":
        limit = a.ramp + a.seconds + a.end_spread + a.timeout * (RETRIES + 2) + 30
    else:
        limit = a.duration + a.pause_before_end + a.timeout * (RETRIES + 2) + 30
    barrier = Barrier(len(sessions), a.pause_before_end) if a.pause_before_end > 0 else None
    with trio.move_on_after(max(0.0, go_epoch - time.time()) + limit) as overall:
        async with trio.open_nursery() as nursery:
            for s in sessions:
                u = s.index / a.total
                if a.mode == "paced":
                    nursery.start_soon(runner.paced, s, a.ramp * u,
                                       a.ramp + a.seconds + a.end_spread * u)
                else:
                    nursery.start_soon(runner.closed, s, a.duration, a.batches, a.end,
                                       barrier)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    r = runner.rec
    if overall.cancelled_caught:
        # Whatever was in flight is counted as an error; the records so far stand.
        r.count(r.codes, "transport: run time limit")
    meta = {"codes": r.codes, "end_checks": r.end_checks, "blob_sizes": r.blob_sizes,
            "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)}
    np.savez(a.out, t=np.frombuffer(r.t, dtype=np.float64),
             lat=np.frombuffer(r.lat, dtype=np.float64),
             lag=np.frombuffer(r.lag, dtype=np.float64),
             status=np.frombuffer(r.status, dtype=np.int16).astype(np.int32),
             kind=np.frombuffer(r.kind, dtype=np.int8), meta=np.array(json.dumps(meta)))
    print("done", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("paced", "closed"), required=True)
    p.add_argument("--transport", choices=("http", "ws"), default="http")
    p.add_argument("--wire", choices=WIRES, default=os.environ.get("BENCH_WIRE", "v1"),
                   help="pose batch wire format (default: $BENCH_WIRE, else v1)")
    p.add_argument("--window", type=int, default=1,
                   help="ws: batches in flight per session (acks pending)")
    p.add_argument("--run-id", required=True)
    p.add_argument("--index-from", type=int, required=True)
    p.add_argument("--index-to", type=int, required=True)
    p.add_argument("--total", type=int, required=True, help="sessions over all generators")
    p.add_argument("--orgs", type=int, default=8)
    p.add_argument("--ramp", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--end-spread", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--batches", type=int, default=10**9)
    p.add_argument("--end", action="store_true", help="closed mode: end every session")
    p.add_argument("--pause-before-end", type=float, default=0.0,
                   help="closed mode: once all sessions streamed, print 'streamed', wait "
                        "this long, then end them all")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--check-summary", action="store_true")
    p.add_argument("--prime", action="store_true")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_args())
