"""A fleet on loopback for the system test (``tests/system/test_fleet.py``, issue 14):
several ``telemetry serve`` child processes on one NATS JetStream cluster and one S3
server, HAProxy in front (or not), an event recorder as the bus's receiver, and
clients that behave like the browser's.

* :class:`Fleet` - the instances: start, rolling restart (SIGTERM), SIGKILL with the
  data directory deleted, scale-out; each start gets a fresh, empty data directory,
  so nothing local survives a restart (the journal is in JetStream).
* :class:`Router` / :func:`router_config` - HAProxy running the shipped
  ``deploy/haproxy/haproxy.cfg`` with its DNS discovery replaced by static server
  lines on loopback (one of them ``disabled`` until scale-out enables it through the
  runtime API).
* :class:`EventRecorder` - the real sink's HTTP receiver (``telemetry.sink_app``:
  its token check, its idempotency-key check) in this process, with every delivery
  recorded in memory instead of written to Postgres, so a second event for a session
  (which the Postgres sink would drop as a duplicate) is seen.
* :class:`Targets` - where a client sends its next request: the router, or a random
  live instance ("no router": correctness must not depend on routing).
* :class:`SessionRun` - one simulated patient: one 1-s pose batch per second at real
  pace over HTTP POST or the WebSocket, resending on 503 after ``Retry-After`` and on
  a dropped connection, then the end call; it records what it saw
  (:class:`SessionRecord`).
* :func:`reference_summary` - the summary one process computes from the same
  acknowledged batches, through the recovery path (``actors.recovery.restore``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import random
import shutil
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import trio
from hypercorn.trio import serve as hypercorn_serve
from wsproto.utilities import ProtocolError

from actors.supervisor import Supervisor
from bench.loadgen import PoolSession
from bench.loadgen import batch_body as pool_batch_body
from domain.pose_batch import CONTENT_TYPE, decode_batch
from domain.privacy import Pseudonymiser
from storage.blobs import MemoryBlobStore
from storage.bus import InProcessBus
from telemetry.auth import TokenVerifier
from telemetry.config import Settings
from telemetry.server import hypercorn_config
from telemetry.sink_app import EVENTS_PATH, create_sink_app
from telemetry.wiring import actor_limits
from tests.support.metrics import Scrape
from tests.support.ports import free_port
from tests.support.processes import Child, running_process, service
from tests.support.rawhttp import RawHttp
from tests.support.wsclient import WsClient, WsClosed, WsRefused

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
SUBPROTOCOL = "restartix.pose.v1"
REQUEST_TIMEOUT_S = 30.0
# The browser client gives up on a WebSocket handshake after 10 s (connectTimeoutMs).
CONNECT_TIMEOUT_S = 10.0
_OPENED: contextvars.ContextVar[list[WsClient]] = contextvars.ContextVar("fleet_ws_opened")
# A browser keeps at most 4 batches in flight on its stream (docs/pose-stream.md).
WS_WINDOW = 4
FLEET_COUNTERS = ("telemetry_fleet_take_overs_total", "telemetry_fleet_take_over_seconds_total",
                  "telemetry_fleet_sessions_lost_total", "telemetry_fleet_orphans_claimed_total",
                  "telemetry_fleet_sweep_failures_total")
TRANSPORT_ERRORS = (ConnectionError, OSError, trio.BrokenResourceError,
                    trio.ClosedResourceError, trio.TooSlowError, EOFError, ProtocolError)


# -- the instances --------------------------------------------------------------------


@dataclass
class Instance:
    """One slot of the fleet: a port, and the child currently serving on it."""

    name: str
    port: int
    child: Child | None = None
    generation: int = 0
    live: bool = False  # started and not being stopped: a target for "no router"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Fleet:
    """``telemetry serve`` children sharing ``env`` (journal, blob store, bus). Each
    start has a fresh data directory under ``root``; logs of every generation stay
    (in ``root/logs``) so a test can read them after a data directory is deleted."""

    def __init__(self, root: Path, env: Mapping[str, str]) -> None:
        self.root = root
        self.env = dict(env)
        self.instances: list[Instance] = []
        self.events: list[tuple[float, str]] = []  # (monotonic, what happened)
        self.counters: Counter[str] = Counter()  # fleet counters of stopped instances

    def note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))

    def add_slot(self) -> Instance:
        inst = Instance(f"tel{len(self.instances) + 1}", free_port())
        self.instances.append(inst)
        return inst

    def data_dir(self, inst: Instance) -> Path:
        return self.root / f"{inst.name}-gen{inst.generation}"

    async def start(self, inst: Instance) -> float:
        inst.generation += 1
        data = self.data_dir(inst)
        data.mkdir(parents=True)
        child = service(data, inst.port, **self.env)
        child.log_path = self.root / "logs" / f"{inst.name}-gen{inst.generation}.log"
        inst.child = child
        took = await child.start(timeout_s=90)
        inst.live = True
        self.note(f"{inst.name} gen{inst.generation} up ({took:.1f} s to ready)")
        return took

    async def scrape(self, inst: Instance) -> None:
        """Add ``inst``'s fleet counters (take-overs...) to :attr:`counters`; a failed
        scrape is noted, not raised (the figures are for the report)."""
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.get(inst.url + "/metrics")
            scrape = Scrape(r.text)
        except (httpx.HTTPError, ValueError) as exc:
            self.note(f"{inst.name}: no /metrics ({type(exc).__name__})")
            return
        for name, _, value in scrape.samples:
            if name in FLEET_COUNTERS:
                self.counters[name.removeprefix("telemetry_fleet_")] += value

    async def stop(self, inst: Instance, timeout_s: float = 90) -> int:
        """SIGTERM and wait for the exit; the exit status."""
        assert inst.child is not None
        await self.scrape(inst)
        inst.live = False
        self.note(f"{inst.name} SIGTERM")
        inst.child.signal(signal.SIGTERM)
        code = await inst.child.wait(timeout_s)
        self.note(f"{inst.name} exited {code}")
        return code

    async def kill(self, inst: Instance, delete_data: bool = True) -> int:
        assert inst.child is not None
        inst.live = False
        code = await inst.child.kill()
        self.note(f"{inst.name} SIGKILLed")
        if delete_data:
            shutil.rmtree(self.data_dir(inst))
            self.note(f"{inst.name} data directory deleted")
        return code

    async def scrape_all(self) -> None:
        for inst in self.live():
            await self.scrape(inst)

    async def aclose(self) -> None:
        for inst in self.instances:
            inst.live = False
            if inst.child is not None and inst.child.proc is not None:
                await inst.child.kill()

    def live(self) -> list[Instance]:
        return [i for i in self.instances if i.live]

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system) of each running instance so far."""
        out = {}
        tick = os.sysconf("SC_CLK_TCK")
        for inst in self.instances:
            if inst.child is not None and inst.child.returncode is None:
                with contextlib.suppress(OSError):
                    fields = Path(f"/proc/{inst.child.pid}/stat").read_text().rsplit(")", 1)[1]
                    parts = fields.split()
                    out[f"{inst.name}-gen{inst.generation}"] = (
                        int(parts[11]) + int(parts[12])) / tick
        return out

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted((self.root / "logs").glob("*.log")))


# -- the router -----------------------------------------------------------------------


def router_config(listen: int, stats: int, servers: list[tuple[str, int, bool]]) -> str:
    """The shipped router config on loopback: listening on ``listen``, its runtime API
    on ``stats``, and static ``servers`` (name, port, enabled) in place of the DNS
    server template (a disabled one is enabled at scale-out). Everything else (the
    routing key from the token's ``sid``, consistent hashing, the stick table, retries,
    health checks, timeouts) is the shipped file's."""
    out: list[str] = []
    skipping = section = ""
    for raw in HAPROXY_CFG.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not raw.startswith((" ", "\t")) and line:
            section = line.split()[0]
        if section == "resolvers":
            continue
        if line.startswith(".if"):
            skipping = "yes"
            continue
        if line.startswith(".endif"):
            skipping = ""
            out.append("    default-server check inter 2s fall 2 rise 2")
            out += [f"    server {name} 127.0.0.1:{port}{'' if on else ' disabled'}"
                    for name, port, on in servers]
            continue
        if skipping or line.startswith("server-template"):
            continue
        if line.startswith("maxconn"):
            raw = "    maxconn 4000"  # the production limit needs more descriptors
        elif line.startswith("stats socket"):
            raw = f"    stats socket ipv4@127.0.0.1:{stats} level admin"
        elif line == "bind :8080":
            raw = f"    bind 127.0.0.1:{listen}"
        out.append(raw)
    text = "\n".join(out) + "\n"
    assert f"bind 127.0.0.1:{listen}" in text and "balance hdr(X-Session-Id)" in text
    return text


@dataclass
class Router:
    port: int
    stats_port: int
    lines: list[str]

    async def command(self, cmd: str) -> str:
        """One runtime API command; its answer."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.stats_port)
        async with stream:
            await stream.send_all(cmd.encode() + b"\n")
            out = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    out += chunk
        return out.decode(errors="replace")

    async def enable(self, server: str) -> None:
        answer = await self.command(f"enable server telemetry/{server}")
        assert answer.strip() == "", answer

    async def server_states(self) -> dict[str, str]:
        """Server name -> operational state (2 = up) from ``show servers state``."""
        answer = await self.command("show servers state telemetry")
        states = {}
        for line in answer.splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "telemetry":
                states[parts[3]] = parts[5]
        return states


@asynccontextmanager
async def running_router(binary: str, tmp: Path,
                         servers: list[tuple[str, int, bool]]) -> AsyncIterator[Router]:
    port, stats = free_port(), free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(router_config(port, stats, servers), encoding="utf-8")
    async with running_process([binary, "-db", "-f", str(cfg)], any_answer=True,
                               ready_url=f"http://127.0.0.1:{port}/router/healthz",
                               timeout_s=30) as lines:
        yield Router(port, stats, lines)


# -- the bus's receiver ---------------------------------------------------------------


class RecordingSink:
    """What ``create_sink_app`` hands events to: every delivery kept, in order."""

    def __init__(self) -> None:
        self.deliveries: list[dict[str, Any]] = []
        self._seen: set[str] = set()
        self.db = None  # /healthz is not used

    async def store(self, event: Mapping[str, Any]) -> Literal["stored", "duplicate"]:
        self.deliveries.append(dict(event))
        key = str(event.get("event_id"))
        if key in self._seen:
            return "duplicate"
        self._seen.add(key)
        return "stored"


@asynccontextmanager
async def event_recorder(settings: Settings) -> AsyncIterator[tuple[str, RecordingSink]]:
    """The sink's HTTP receiver on a loopback port; yields its events URL and the
    recording sink."""
    sink = RecordingSink()
    app = create_sink_app(settings, sink)  # type: ignore[arg-type]
    port = free_port()
    config = hypercorn_config(settings, bind=f"127.0.0.1:{port}", graceful_timeout_s=1)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: hypercorn_serve(
            app, config, shutdown_trigger=stop.wait, task_status=task_status))
        try:
            yield f"http://127.0.0.1:{port}{EVENTS_PATH}", sink
        finally:
            stop.set()


# -- where requests go ----------------------------------------------------------------


class Targets:
    """The router's port, or (``router is None``) a random live instance's per call."""

    def __init__(self, fleet: Fleet, router: Router | None, seed: int = 7) -> None:
        self.fleet, self.router = fleet, router
        self.rng = random.Random(seed)

    async def pick(self) -> int:
        if self.router is not None:
            return self.router.port
        while True:
            live = self.fleet.live()
            if live:
                return self.rng.choice(live).port
            await trio.sleep(0.2)


# -- the clients ----------------------------------------------------------------------


@dataclass
class Refusal:
    """One 503 (or 429) a session saw: for which batch (None: the end call or a
    stream's handshake), whether it carried Retry-After, and whether what was
    retried after it later succeeded."""

    what: str
    seq: int | None
    status: int
    code: str
    retry_after: float | None
    succeeded: bool = False


@dataclass
class SessionRecord:
    sid: str
    transport: str
    acked: set[int] = field(default_factory=set)
    statuses: Counter[str] = field(default_factory=Counter)  # "202", "ws 202", "end 200"
    refusals: list[Refusal] = field(default_factory=list)
    conflicts_before_end: list[str] = field(default_factory=list)  # 409s before the end
    server_errors: list[str] = field(default_factory=list)  # any 5xx but a 503 w/ RA
    other: list[str] = field(default_factory=list)  # any other unexpected answer
    transport_errors: int = 0
    reconnects: int = 0
    sent_batches: int = 0  # the highest seq created + 1
    summary: dict[str, Any] | None = None
    end_attempts: int = 0
    timeline: list[str] = field(default_factory=list)  # every answer but a 2xx, in order


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return body[:60].decode(errors="replace")


class SessionRun:
    """One simulated patient streaming pool session ``pool`` from ``t0`` on, one
    batch a second, until ``stop`` is set; then the end call. See the module doc."""

    def __init__(self, sid: str, org: str, token: str, pool: PoolSession, transport: str,
                 targets: Targets, t0: float) -> None:
        self.sid, self.org, self.token, self.pool = sid, org, token, pool
        self.targets, self.t0 = targets, t0
        self.rec = SessionRecord(sid, transport)
        self.cut = False  # a 409 came: the patient's stream stops here
        self._open503: dict[int | None, list[Refusal]] = {}

    def body(self, seq: int) -> bytes:
        return bytes(pool_batch_body(self.pool.batches[seq % len(self.pool.batches)], seq))

    # -- bookkeeping --

    def note(self, what: str) -> None:
        self.rec.timeline.append(f"{trio.current_time() - self.t0:7.1f} {what}")

    def _refused(self, what: str, seq: int | None, status: int, code: str,
                 retry_after: float | None) -> float:
        r = Refusal(what, seq, status, code, retry_after)
        self.rec.refusals.append(r)
        self._open503.setdefault(seq if what != "end" else -1, []).append(r)
        return retry_after if retry_after is not None else 1.0

    def _succeeded(self, key: int | None) -> None:
        for r in self._open503.pop(key, []):
            r.succeeded = True

    def _acked(self, seq: int) -> None:
        self.rec.acked.add(seq)
        self._succeeded(seq)

    def _unexpected(self, what: str, status: int, code: str, ended: bool) -> None:
        text = f"{what} {status} {code}"
        self.note(text)
        if status == 409 and not ended:
            self.rec.conflicts_before_end.append(text)
        elif status >= 500:
            self.rec.server_errors.append(text)
        else:
            self.rec.other.append(text)

    def _due(self, seq: int) -> float:
        return self.t0 + seq

    # -- HTTP POST --

    async def _post(self, conns: dict[int, RawHttp], path: str, body: bytes,
                    content_type: str | None) -> tuple[int, dict[str, str], bytes] | None:
        port = await self.targets.pick()
        conn = conns.get(port)
        if conn is None:
            conn = conns[port] = RawHttp(port)
        headers = {"Authorization": f"Bearer {self.token}"}
        if content_type:
            headers["Content-Type"] = content_type
        what = "end" if path.endswith("/end") else f"seq {int.from_bytes(body[8:12], 'little')}"
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                got = await conn.request("POST", path, headers, body)
        except TRANSPORT_ERRORS as exc:
            self.rec.transport_errors += 1
            self.note(f"{what} -> :{port} {type(exc).__name__}")
            with contextlib.suppress(*TRANSPORT_ERRORS):
                await conn.aclose()
            conns.pop(port, None)
            return None
        if got[0] >= 300 or what == "end":
            self.note(f"{what} -> :{port} {got[0]} {_code(got[2]) if got[0] >= 300 else ''}")
        return got

    async def run_http(self, stop: trio.Event) -> None:
        conns: dict[int, RawHttp] = {}
        try:
            seq = 0
            while not stop.is_set():
                await trio.sleep_until(self._due(seq))
                if stop.is_set():
                    break
                self.rec.sent_batches = seq + 1
                body = self.body(seq)
                while True:
                    got = await self._post(conns, "/v1/pose/frames", body, CONTENT_TYPE)
                    if got is None:
                        await trio.sleep(0.5)
                        continue
                    status, headers, data = got
                    self.rec.statuses[str(status)] += 1
                    if status == 202:
                        self._acked(seq)
                        break
                    if status in (429, 503):
                        await trio.sleep(self._refused(
                            "frames", seq, status, _code(data),
                            _retry_after(headers.get("retry-after"))))
                        continue
                    self._unexpected(f"frames seq {seq}", status, _code(data), False)
                    if status == 409:
                        self.cut = True  # the session was cut: a browser stops sending
                        break
                    await trio.sleep(1.0)
                if self.cut:
                    break
                seq += 1
            await self.end(conns)
        finally:
            for conn in conns.values():
                await conn.aclose()

    async def end(self, conns: dict[int, RawHttp] | None = None) -> None:
        conns = {} if conns is None else conns
        try:
            while True:
                self.rec.end_attempts += 1
                got = await self._post(conns, f"/v1/sessions/{self.sid}/end", b"", None)
                if got is None:
                    await trio.sleep(0.5)
                    continue
                status, headers, data = got
                self.rec.statuses[f"end {status}"] += 1
                if status == 200:
                    self._succeeded(-1)
                    self.rec.summary = json.loads(data)
                    return
                if status in (429, 503):
                    await trio.sleep(self._refused("end", None, status, _code(data),
                                                   _retry_after(headers.get("retry-after"))))
                    continue
                self._unexpected("end", status, _code(data), True)
                return
        finally:
            for conn in conns.values():
                await conn.aclose()

    # -- the WebSocket --

    async def run_ws(self, stop: trio.Event) -> None:
        next_seq = 0
        while True:
            unacked = [s for s in range(next_seq) if s not in self.rec.acked]
            if self.cut or (stop.is_set() and not unacked):
                break
            ws = await self._connect()
            if ws is None:
                continue
            try:
                next_seq = await self._stream(ws, stop, next_seq)
            finally:
                with contextlib.suppress(*TRANSPORT_ERRORS):
                    await ws.aclose()
        await self.end()

    async def _connect(self) -> WsClient | None:
        port = await self.targets.pick()
        opened: list[WsClient] = []
        _OPENED.set(opened)  # task-local: the client a timed-out handshake leaves open
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                ws = await SendLockedWs.connect(
                    port, subprotocols=[SUBPROTOCOL, f"bearer.{self.token}"])
        except WsRefused as exc:
            self.rec.statuses[f"handshake {exc.status}"] += 1
            code = _code(exc.body)
            self.note(f"handshake -> :{port} {exc.status} {code}")
            if exc.status in (429, 503):
                await trio.sleep(self._refused("handshake", None, exc.status, code,
                                               _retry_after(exc.headers.get("retry-after"))))
            else:
                self._unexpected("handshake", exc.status, code, False)
                await trio.sleep(1.0)
            return None
        except TRANSPORT_ERRORS as exc:
            for client in opened:
                with contextlib.suppress(*TRANSPORT_ERRORS):
                    await client.aclose()
            self.rec.transport_errors += 1
            self.note(f"handshake -> :{port} {type(exc).__name__}")
            await trio.sleep(0.5)
            return None
        self.rec.statuses["handshake 101"] += 1
        self.note(f"stream open -> :{port}")
        self._succeeded(None)
        return ws

    async def _stream(self, ws: WsClient, stop: trio.Event, next_seq: int) -> int:
        """Send on ``ws`` until it breaks or everything is acknowledged after ``stop``;
        the next sequence number to create. As the browser client does, a batch
        waiting to be resent after a 503 keeps its place in the window, so the
        stream is never more than :data:`WS_WINDOW` batches ahead of its oldest
        unacknowledged one."""
        state = {"next": next_seq}
        outstanding = {s for s in range(next_seq) if s not in self.rec.acked}
        resend = sorted(outstanding)
        wake = trio.Event()
        broken = False

        def poke() -> None:
            nonlocal wake
            wake.set()
            wake = trio.Event()

        async def receiver(cancel: trio.CancelScope) -> None:
            nonlocal broken
            try:
                while True:
                    ack = await ws.recv_json()
                    seq, status = ack.get("seq"), int(ack.get("status", 0))
                    self.rec.statuses[f"ws {status}"] += 1
                    if status == 202:
                        outstanding.discard(seq)
                        self._acked(seq)
                    elif status in (429, 503):
                        code = str((ack.get("error") or {}).get("code"))
                        self.note(f"stream seq {seq} {status} {code}")
                        pause = self._refused("stream", seq, status, code,
                                              _retry_after(ack.get("retry_after")))
                        nursery.start_soon(later, seq, pause)
                    else:
                        outstanding.discard(seq)
                        self._unexpected(f"stream seq {seq}", status,
                                         str((ack.get("error") or {}).get("code")), False)
                        if status == 409:
                            stop_all.set()
                    poke()
            except WsClosed as exc:
                self.rec.statuses[f"ws close {exc.code}"] += 1
                self.note(f"stream closed {exc.code}")
            except TRANSPORT_ERRORS as exc:
                self.rec.transport_errors += 1
                self.note(f"stream broken {type(exc).__name__}")
            broken = True
            cancel.cancel()

        async def later(seq: int, pause: float) -> None:
            await trio.sleep(pause)
            resend.append(seq)
            poke()

        stop_all = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver, nursery.cancel_scope)
            try:
                while not stop_all.is_set():
                    if resend:
                        seq = min(resend)
                        resend.remove(seq)
                        if seq in self.rec.acked:
                            continue
                    elif (not stop.is_set() and len(outstanding) < WS_WINDOW
                          and trio.current_time() >= self._due(state["next"])):
                        seq = state["next"]
                        state["next"] += 1
                        self.rec.sent_batches = state["next"]
                        outstanding.add(seq)
                    else:
                        if stop.is_set() and not outstanding:
                            break
                        w = wake
                        due = (self._due(state["next"])
                               if not stop.is_set() and len(outstanding) < WS_WINDOW
                               else float("inf"))
                        with trio.move_on_at(due):
                            await w.wait()
                        continue
                    with trio.fail_after(REQUEST_TIMEOUT_S):
                        await ws.send_bytes(self.body(seq))
            except TRANSPORT_ERRORS as exc:
                self.rec.transport_errors += 1
                self.note(f"stream send failed {type(exc).__name__}")
                broken = True
            nursery.cancel_scope.cancel()
        try:
            if broken or stop_all.is_set():
                self.rec.reconnects += 1
            else:
                with contextlib.suppress(*TRANSPORT_ERRORS, WsClosed):
                    await ws.close()
        finally:
            with contextlib.suppress(*TRANSPORT_ERRORS):
                await ws.aclose()  # also after a close that failed half-way
        if stop_all.is_set():
            self.cut = True
        return state["next"]


class SendLockedWs(WsClient):
    """:class:`WsClient` whose sends may come from two tasks (the sender, and the
    receiver answering pings)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._send_lock = trio.Lock()
        opened = _OPENED.get(None)
        if opened is not None:
            opened.append(self)

    async def _send(self, event: Any) -> None:
        async with self._send_lock:
            await super()._send(event)


# -- the reference --------------------------------------------------------------------


async def reference_summaries(settings: Settings,
                              sessions: list[tuple[str, list[bytes]]]) -> dict[str, Any]:
    """For each (token, acknowledged batch bodies in seq order): the summary one
    process computes from them, by the recovery path (``adopt`` + ``restore_pose``,
    as ``actors.hosting.ActorHost._rebuild`` does from a journal), then a client end.
    Keyed by session id."""
    sup = Supervisor(actor_limits(settings), store=MemoryBlobStore(), bus=InProcessBus(),
                     pseudonyms=Pseudonymiser(b"k" * 32))
    verifier = TokenVerifier(settings)
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for token, bodies in sessions:
            claims = verifier.verify_session(token)
            actor = sup.adopt(claims, time.time())
            for body in bodies:
                actor.restore_pose(decode_batch(body, max_frames=settings.max_frames_per_batch))
            sup.launch(actor)
            out[claims.session_id] = await sup.end(claims)
        nursery.cancel_scope.cancel()
    return out


def comparable(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics of a summary or event that must not depend on where or how often
    batches arrived: the rep engine's summary and the pose statistics, less the count
    of duplicate batches (a resend the client made is one more duplicate)."""
    pose = dict(summary["pose"])
    pose.pop("batches_duplicate", None)
    return json.loads(json.dumps({"pose": pose, "reps": summary["reps"],
                                  "exercise": summary.get("exercise")}))


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON values differ (paths and both values), for failure messages."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


__all__ = ["Fleet", "Instance", "RecordingSink", "Refusal", "Router", "SessionRecord",
           "SessionRun", "Targets", "comparable", "differences", "event_recorder",
           "reference_summaries", "router_config", "running_router"]
