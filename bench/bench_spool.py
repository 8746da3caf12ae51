"""Cost of making every 202 durable: spool append throughput and latency.

Old against new, in the same run (``--compare``): each figure from a child process
importing the spool of one tree (``--old``: a worktree of the commit before the
shared segment log, e.g. ``git worktree add /tmp/segments-old edbaecf``; the new
one is this tree), alternating old and new per load, 64/256/1000 concurrent
sessions; fsyncs are every ``os.fsync`` call of the process (logs, segments,
directories), divided by the spool's commit rounds; CPU is the process's (every
thread) per append::

    .venv/bin/python bench/bench_spool.py --compare --old /tmp/segments-old --reps 2

Run from the repository root (about 30 s; files go to a temporary directory on
the filesystem of ``--dir``, removed afterwards)::

    .venv/bin/python -m bench.bench_spool
    .venv/bin/python -m bench.bench_spool --sessions 200 --records 8 --dir /mnt/spool

Two workloads, each on a fresh directory:

* **burst** (closed loop): every session appends ``--records`` records back to
  back, all sessions at once: the throughput ceiling and the latency under it.
* **paced**: every session appends one record per second (a pose batch is about
  one second of frames) at a random phase, ``--seconds`` times: production-like
  load; its rec/s is the offered load, the latencies are what matters.

Modes: the :class:`~storage.spool.Spool` (group commit into the shared segment
log; one thread call per round, so its limiter size, ``fsync_threads`` 4 or 1,
only matters to reads) against a baseline that writes and fsyncs each record, one
file per session, in its own worker-thread call (open, append, fsync, close; plus
a directory fsync for a new file) under a limiter of the same size; each without compression
(``append(..., compress=False)``) and with the spool's default zlib level 1.
Payloads are real pose batches (``domain.pose_batch``) from the synthetic
generator, so compression sees realistic data. Latency is from calling
``append`` to its return. Figures are from one run on a shared machine: rerun to
see the spread.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

if __package__ in (None, ""):  # allow `python bench/bench_spool.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--tree" in sys.argv:  # a --compare child: the spool of that tree
    sys.path.insert(0, sys.argv[sys.argv.index("--tree") + 1])

from domain.pose_batch import encode_batch  # noqa: E402
from storage.spool import Spool, encode_record, fsync_dir  # noqa: E402
from telemetry.dev.synthetic import generate  # noqa: E402

Append = Callable[[str, int, bytes], Awaitable[None]]


def pose_batches(n: int = 24) -> list[bytes]:
    """``n`` one-second batches (30 frames, 15,980 bytes) of a synthetic session."""
    s = generate("squat", reps=12, seed=7)
    out = []
    for i in range(n):
        t = s.t_ms[i * 30:(i + 1) * 30].astype("uint32")
        f = s.frames[i * 30:(i + 1) * 30].astype("float32")
        out.append(encode_batch(i, t, f, space="image", image_width=640, image_height=480))
    return out


class PerRecordFsync:
    """The baseline: each append is its own thread call that fsyncs its record."""

    def __init__(self, root: Path, threads: int, level: int) -> None:
        self.root, self.limiter = root, trio.CapacityLimiter(threads)
        self.level = level
        self.fsyncs = 0

    def _append_sync(self, key: str, kind: int, payload: bytes) -> None:
        path = self.root / f"{key}.log"
        new = not path.exists()
        if new:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            os.write(fd, encode_record(kind, payload, compress_level=self.level))
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(path.parent)
        self.fsyncs += 1 + new

    async def append(self, key: str, kind: int, payload: bytes) -> None:
        await trio.to_thread.run_sync(self._append_sync, key, kind, payload,
                                      limiter=self.limiter)


async def burst(append: Append, sessions: int, records: int, payloads: list[bytes]
                ) -> tuple[float, list[float]]:
    lat: list[float] = []

    async def session(i: int) -> None:
        for r in range(records):
            t0 = time.perf_counter()
            await append(f"org-{i % 16}/sess-{i}", 1, payloads[(i + r) % len(payloads)])
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(sessions):
            nursery.start_soon(session, i)
    return time.perf_counter() - t0, lat


async def paced(append: Append, sessions: int, seconds: float, payloads: list[bytes]
                ) -> tuple[float, list[float]]:
    lat: list[float] = []
    rng = random.Random(3)

    async def session(i: int, phase: float) -> None:
        await trio.sleep(phase)
        for r in range(int(seconds)):
            t0 = time.perf_counter()
            await append(f"org-{i % 16}/sess-{i}", 1, payloads[(i + r) % len(payloads)])
            lat.append(time.perf_counter() - t0)
            await trio.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(sessions):
            nursery.start_soon(session, i, rng.random())
    return time.perf_counter() - t0, lat


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 1 else values[0]


async def run_mode(name: str, workload: str, args: argparse.Namespace, payloads: list[bytes],
                   base: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=base))
    try:
        extra = ""
        compress = name.endswith("zlib-1")
        if name.startswith("per-record"):
            store = PerRecordFsync(root, args.threads, 1 if compress else 0)
            append: Append = store.append
            elapsed, lat = await _drive(workload, append, args, payloads)
            extra = f"fsyncs {store.fsyncs}"
        else:
            spool = Spool(root, fsync_interval_s=args.interval_ms / 1000,
                          fsync_threads=1 if "1 thread" in name else args.threads)

            async def append(key: str, kind: int, payload: bytes) -> None:
                await spool.append(key, kind, payload, compress=compress)

            async with trio.open_nursery() as nursery:
                await nursery.start(spool.run)
                elapsed, lat = await _drive(workload, append, args, payloads)
                nursery.cancel_scope.cancel()
            s = spool.stats()
            extra = (f"rounds {s['rounds']}, {s['records_per_round']:.1f} rec/round, "
                     f"fsyncs {s['fsyncs']}, on disk {s['bytes'] / s['records'] / 1000:.1f} KB/rec")
        n = len(lat)
        print(f"{workload:6} {name:18} {n:6d} rec {n / elapsed:8.0f} rec/s  "
              f"p50 {pct(lat, 50) * 1e3:7.1f} ms  p99 {pct(lat, 99) * 1e3:7.1f} ms  "
              f"max {max(lat) * 1e3:7.1f} ms  | {extra}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _drive(workload: str, append: Append, args: argparse.Namespace,
                 payloads: list[bytes]) -> tuple[float, list[float]]:
    if workload == "burst":
        return await burst(append, args.sessions, args.records, payloads)
    return await paced(append, args.sessions, args.seconds, payloads)


async def main(args: argparse.Namespace) -> None:
    payloads = pose_batches()
    base = args.dir
    print(f"{args.sessions} sessions, {len(payloads[0])}-byte pose batches, "
          f"fsync interval {args.interval_ms} ms, {args.threads} threads, dir {base}, "
          f"{os.cpu_count()} CPUs", flush=True)
    for mode in ("group commit", "group, 1 thread", "per-record fsync", "group, zlib-1",
                 "per-record, zlib-1"):
        await run_mode(mode, "burst", args, payloads, base)
    for mode in ("group commit", "per-record fsync", "group, zlib-1"):
        await run_mode(mode, "paced", args, payloads, base)


async def child(args: argparse.Namespace) -> None:
    """One --compare figure: group commit (no compression, as pose batches are
    spooled), every fsync of the process counted; one JSON line on stdout."""
    import json

    calls = [0]
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls[0] += 1
        real_fsync(fd)

    os.fsync = counting_fsync  # type: ignore[assignment]
    payloads = pose_batches()
    root = Path(tempfile.mkdtemp(prefix="spool-cmp-", dir=args.dir))
    try:
        spool = Spool(root, fsync_interval_s=args.interval_ms / 1000)

        async def append(key: str, kind: int, payload: bytes) -> None:
            await spool.append(key, kind, payload, compress=False)

        async with trio.open_nursery() as nursery:
            await nursery.start(spool.run)
            calls[0] = 0
            cpu0 = time.process_time()
            elapsed, lat = await _drive(args.workload, append, args, payloads)
            cpu = time.process_time() - cpu0
            nursery.cancel_scope.cancel()
        s = spool.stats()
        print(json.dumps(dict(n=len(lat), rate=len(lat) / elapsed, p50=pct(lat, 50) * 1e3,
                              p99=pct(lat, 99) * 1e3, rounds=s["rounds"], fsyncs=calls[0],
                              cpu_us=cpu / len(lat) * 1e6)))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def compare(args: argparse.Namespace) -> None:
    import json
    import subprocess

    new_tree = str(Path(__file__).resolve().parents[1])
    trees = {"old": str(Path(args.old).resolve()), "new": new_tree}
    print(f"old {trees['old']} vs new {new_tree}; fsync interval {args.interval_ms} ms, "
          f"{args.reps} reps, {os.cpu_count()} CPUs, dir {args.dir}", flush=True)
    print(f"{'workload':8} {'sessions':>8} {'tree':4} {'rec/s':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'rounds':>7} {'fsyncs/round':>12} {'CPU us/rec':>10}", flush=True)
    for workload in ("burst", "paced"):
        for n in args.loads:
            for rep in range(args.reps):
                for name in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                    cmd = [sys.executable, __file__, "--child", "--tree", trees[name],
                           "--workload", workload, "--sessions", str(n),
                           "--records", str(args.records), "--seconds", str(args.seconds),
                           "--interval-ms", str(args.interval_ms), "--dir", str(args.dir)]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                         cwd=trees[name]).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    print(f"{workload:8} {n:8d} {name:4} {r['rate']:8.0f} {r['p50']:8.1f} "
                          f"{r['p99']:8.1f} {r['rounds']:7d} "
                          f"{r['fsyncs'] / max(1, r['rounds']):12.1f} "
                          f"{r.get('cpu_us', 0):10.0f}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--records", type=int, default=2, help="records per session (burst)")
    p.add_argument("--seconds", type=int, default=3, help="records per session (paced)")
    p.add_argument("--interval-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=4, help="fsync threads / baseline limiter")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the temp dirs go")
    p.add_argument("--compare", action="store_true", help="old against new (see above)")
    p.add_argument("--old", default="/tmp/segments-old", help="the old tree (--compare)")
    p.add_argument("--loads", type=lambda v: [int(x) for x in v.split(",")],
                   default=[64, 256, 1000], help="sessions per --compare figure")
    p.add_argument("--reps", type=int, default=1, help="--compare repetitions")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", help=argparse.SUPPRESS)
    p.add_argument("--workload", default="burst", help=argparse.SUPPRESS)
    parsed = p.parse_args()
    parsed.dir = Path(parsed.dir).absolute()
    if parsed.child:
        trio.run(child, parsed)
    elif parsed.compare:
        compare(parsed)
    else:
        trio.run(main, parsed)
