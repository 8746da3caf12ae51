"""The cost of durability, end to end: the real service with the spool on and off.

Run from the repository root (about a minute)::

    .venv/bin/python -m bench.bench_durability
    .venv/bin/python -m bench.bench_durability --sessions 200 --batches 10 --concurrency 64 \\
        --rounds 3 --dir /mnt/data

Each round starts ``telemetry serve`` twice as a child process, ``TELEMETRY_SPOOL=on``
then ``off`` (the order alternates between rounds so drift on a shared machine does
not favour one), each on a fresh data directory under ``--dir``. A closed-loop load
of ``--sessions`` simulated patients, each sending ``--batches`` realistic one-second
pose batches (``telemetry.dev.synthetic`` + ``telemetry.dev.demo.batches_of``, ~30 frames, ~16 KB)
in order and as fast as they are answered, runs through ``--concurrency`` workers
(httpx ``AsyncClient`` under Trio, one pooled connection per worker; ``--client raw``:
a hand-written HTTP/1.1 client, one connection per worker). The rate and
session limits are lifted; anything but a 202 is counted and retried.

Reported per mode: acknowledged batches per second, ack latency (request sent to
202 read) p50 / p99, and the service's CPU time per acknowledged batch (from
``/proc``); then the medians over rounds and the median of the per-round ratios
on/off (each round's pair ran in the same minute). Ending the sessions is not
measured. With ``on`` every 202 waits for the fsync of its batch (group commit,
``TELEMETRY_SPOOL_FSYNC_MS``, default 5 ms); ``off`` acknowledges from memory.
The client runs on the same machine and takes CPU from the service, so absolute
figures are a floor; the ratio is what this measures.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

if __package__ in (None, ""):  # allow `python bench/bench_durability.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.pose_batch import CONTENT_TYPE  # noqa: E402
from telemetry.auth import mint_session_token  # noqa: E402
from telemetry.config import Settings  # noqa: E402
from telemetry.dev.demo import batches_of  # noqa: E402
from telemetry.dev.synthetic import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class RawClient:
    """``--client raw``: one keep-alive HTTP/1.1 connection, requests written by hand.
    It spends a fraction of httpx's CPU per request, so on a small machine more of
    the CPU goes to the service. Needs Content-Length on every answer (the service
    always sends it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.buf = bytearray()

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        await self.stream.send_all(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   f"Content-Length: {len(body)}\r\n{head}\r\n".encode() + body)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            await self._fill()
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[: end + 4]
        length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                      if k.strip().lower() == "content-length")
        while len(self.buf) < length:
            await self._fill()
        del self.buf[:length]
        return int(lines[0].split(" ", 2)[1])

    async def _fill(self) -> None:
        assert self.stream is not None
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("the service closed the connection")
        self.buf += chunk

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


@dataclass
class Result:
    mode: str
    acked: int
    seconds: float
    latencies: list[float]
    refused: int
    cpu_s: float
    client_cpu_s: float

    @property
    def rate(self) -> float:
        return self.acked / self.seconds

    def pct(self, q: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bodies(n: int) -> list[bytes]:
    session = generate("squat", reps=max(2, n // 2), seed=1, aspect=16 / 9)
    bodies = list(batches_of(session.t_ms, session.frames, random.Random(1)))
    if len(bodies) < n:
        raise SystemExit(f"the synthetic session has only {len(bodies)} batches")
    return bodies[:n]


async def _run_mode(mode: str, args: argparse.Namespace, bodies: list[bytes],
                    settings: Settings) -> Result:
    data = Path(tempfile.mkdtemp(prefix=f"bench-durability-{mode}-", dir=args.dir))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_")}
    env.update({
        "TELEMETRY_HOST": "127.0.0.1", "TELEMETRY_PORT": str(port),
        "TELEMETRY_DATA_DIR": str(data), "TELEMETRY_SPOOL": mode, "TELEMETRY_SINK": "none",
        "TELEMETRY_LOG_LEVEL": "WARNING", "TELEMETRY_MAX_BATCHES_PER_S": "100000",
        "TELEMETRY_MAX_LIVE_SESSIONS": str(args.sessions + 10),
        "TELEMETRY_MAX_SESSIONS_PER_ORG": str(args.sessions + 10),
        "TELEMETRY_MAILBOX_SIZE": "64", "TELEMETRY_SHUTDOWN_DEADLINE_S": "30",
    })
    url = f"http://127.0.0.1:{port}"
    run = f"r{random.randrange(1 << 30):x}"
    tokens = [mint_session_token(settings, org_id="bench", session_id=f"{run}-{i}",
                                 exercise={"kind": "squat"}) for i in range(args.sessions)]
    log = open(data / "service.log", "wb")  # noqa: ASYNC230, SIM115 - before the loop's work
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "telemetry.cli", "serve"], env=env, cwd=str(ROOT),
        stdout=log, stderr=log)
    log.close()
    try:
        limits = httpx.Limits(max_connections=args.concurrency,
                              max_keepalive_connections=args.concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            with trio.fail_after(60):
                while True:
                    try:
                        if (await client.get("/v1/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if proc.poll() is not None:
                        raise SystemExit(f"service ({mode}) exited: see {data}/service.log")
                    await trio.sleep(0.05)
            latencies: list[float] = []
            refused = 0
            send, receive = trio.open_memory_channel[int](args.sessions)
            for i in range(args.sessions):
                send.send_nowait(i)
            send.close()

            async def worker() -> None:
                nonlocal refused
                raw = RawClient(port) if args.client == "raw" else None
                try:
                    async for i in receive:
                        headers = {"Authorization": f"Bearer {tokens[i]}",
                                   "Content-Type": CONTENT_TYPE}
                        for body in bodies:
                            while True:
                                t0 = time.perf_counter()
                                if raw is not None:
                                    status = await raw.post("/v1/pose/frames", body, headers)
                                else:
                                    status = (await client.post(
                                        "/v1/pose/frames", content=body, headers=headers
                                    )).status_code
                                if status == 202:
                                    latencies.append(time.perf_counter() - t0)
                                    break
                                refused += 1
                                await trio.sleep(0.01)
                finally:
                    if raw is not None:
                        await raw.aclose()

            # Warm-up: the first requests pay for imports and connection set-up.
            warm = {"Authorization": "Bearer " + mint_session_token(
                settings, org_id="bench", session_id=f"{run}-warm"),
                "Content-Type": CONTENT_TYPE}
            for body in bodies[:3]:
                await client.post("/v1/pose/frames", content=body, headers=warm)

            cpu0, client0, t0 = _cpu_seconds(proc.pid), time.process_time(), time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(args.concurrency):
                    nursery.start_soon(worker)
            seconds = time.perf_counter() - t0
            cpu, client = _cpu_seconds(proc.pid) - cpu0, time.process_time() - client0
        return Result(mode, len(latencies), seconds, latencies, refused, cpu, client)
    finally:
        # SIGKILL: shutting down (finalising 200 sessions without a spool) is not measured.
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        with trio.move_on_after(10) as scope:
            scope.shield = True
            await proc.wait()
        shutil.rmtree(data, ignore_errors=True)


def _line(r: Result) -> str:
    return (f"spool={r.mode:<3}  {r.acked:>6} acked in {r.seconds:6.2f} s  {r.rate:8.0f} batches/s"
            f"   p50 {r.pct(0.50):7.1f} ms   p99 {r.pct(0.99):7.1f} ms"
            f"   CPU/batch service {1000 * r.cpu_s / r.acked:4.2f} ms,"
            f" client {1000 * r.client_cpu_s / r.acked:4.2f} ms   refused {r.refused}")


async def main(args: argparse.Namespace) -> None:
    settings = Settings()  # the service's development keys sign the tokens
    bodies = _bodies(args.batches)
    where = args.dir or tempfile.gettempdir()
    print(f"{args.client} client, {args.sessions} sessions x {args.batches} batches "
          f"({statistics.mean(map(len, bodies)) / 1024:.1f} KB each), concurrency "
          f"{args.concurrency}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, data under {where}")
    results: dict[str, list[Result]] = {"on": [], "off": []}
    for rnd in range(args.rounds):
        for mode in (("on", "off") if rnd % 2 == 0 else ("off", "on")):
            r = await _run_mode(mode, args, bodies, settings)
            results[mode].append(r)
            print(f"round {rnd + 1}  {_line(r)}", flush=True)

    def value(r: Result, f: str) -> float:
        return {"rate": r.rate, "p50": r.pct(0.50), "p99": r.pct(0.99),
                "cpu": 1000 * r.cpu_s / r.acked}[f]

    # Each round's two runs are a pair (same minute, same machine load): the ratio is
    # taken within a pair, then the median over rounds.
    print(f"\nmedian over {args.rounds} round(s)   spool=on    spool=off    on/off (paired)")
    for f, label, unit in (("rate", "throughput", "batches/s"), ("p50", "ack p50", "ms"),
                           ("p99", "ack p99", "ms"), ("cpu", "CPU per batch", "ms")):
        on = statistics.median(value(r, f) for r in results["on"])
        off = statistics.median(value(r, f) for r in results["off"])
        ratio = statistics.median(value(a, f) / value(b, f)
                                  for a, b in zip(results["on"], results["off"], strict=True))
        print(f"{label + ' (' + unit + ')':<26}{on:8.1f}{off:13.1f}{ratio:12.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=200)
    p.add_argument("--batches", type=int, default=10, help="batches per session")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="on/off pairs (order alternates)")
    p.add_argument("--dir", default=None, help="parent of the data directories")
    p.add_argument("--client", choices=("httpx", "raw"), default="httpx",
                   help="raw: a hand-written HTTP/1.1 client that leaves more CPU to the "
                        "service")
    return p.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_args())
