"""Python allocations held per live session, by allocation site (tracemalloc).

Run from the repository root::

    .venv/bin/python -m bench.bench_session_memory              # 200 sessions x 12 batches
    .venv/bin/python -m bench.bench_session_memory --sessions 500 --batches 30 --top 20

The app is built as ``bench/bench_ingest_path.py`` builds it (the supervisor, the
spool and the lean app, driven through ASGI in process: no sockets, no hypercorn),
and ``--sessions`` sessions each POST ``--batches`` realistic 1-second batches and
stay live (no end call). One session is run first and its memory left out (first
imports, caches). The figure is what tracemalloc traces after the sessions have
sent their batches and every pending chunk has been applied, less what it traced
before they started, divided by the sessions: numpy's buffers and zlib's state
included, allocator overhead and fragmentation not (``bench.load``'s RSS per
session counts those). The top allocation sites say where it goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import tempfile
import tracemalloc
from pathlib import Path

if __package__ in (None, ""):  # allow `python bench/bench_session_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def _run(data_dir: Path, sessions: int, batches: int, top: int) -> None:
    import trio

    from actors.chunks import CHUNK_DELAY_S
    from actors.supervisor import Supervisor
    from bench import bench_ingest_path as path
    from bench.loadgen import make_pool
    from domain.pose_batch import CONTENT_TYPE
    from domain.privacy import Pseudonymiser
    from telemetry.app import AppState, create_app
    from telemetry.auth import TokenVerifier
    from telemetry.config import Settings
    from telemetry.connection_close import close_on_connection_close
    from telemetry.cors import cors
    from telemetry.wiring import actor_limits, open_storage

    pool = make_pool(sessions=8, reps=12)
    settings = dataclasses.replace(
        Settings(), data_dir=data_dir, sink="none", pseudonym_key=b"k" * 32,
        max_batches_per_s=1e6, idle_timeout_s=600.0, gap_timeout_s=60.0)
    go = trio.Event()
    go.set()
    warm = trio.Semaphore(0)  # http_session's warm-up signal: nobody waits on it here

    async with open_storage(settings) as storage, trio.open_nursery() as nursery:
        pseudonyms = Pseudonymiser(settings.pseudonym_key)
        sup = Supervisor(actor_limits(settings), store=storage.store, bus=storage.bus,
                         pseudonyms=pseudonyms, journal=storage.spool)
        state = AppState(settings, sup, TokenVerifier(settings), pseudonyms, storage=storage)
        app = close_on_connection_close(cors(create_app(state), settings.cors_origins))
        if storage.spool is not None:
            await nursery.start(storage.spool.run)
        await nursery.start(sup.run)

        async def session(i: int) -> None:
            token, bodies = path.session_requests(settings, pool, i, batches)
            await path.http_session(app, token, bodies, warm, go, CONTENT_TYPE)

        async def wave(ids: range) -> None:
            async with trio.open_nursery() as clients:
                for i in ids:
                    clients.start_soon(session, i)
            # pending chunks are applied at most chunk_delay_s after their first batch
            await trio.sleep(CHUNK_DELAY_S + 1.0)
            gc.collect()

        await wave(range(sessions, sessions + 1))
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
        await wave(range(sessions))
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        nursery.cancel_scope.cancel()
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"{sessions} live sessions x {batches} batches (POST, in process): "
          f"{total / sessions / 1024:.1f} KB traced per session")
    for s in stats[:top]:
        frame = s.traceback[0]
        print(f"  {s.size_diff / sessions / 1024:7.1f} KB  {s.count_diff / sessions:6.1f} blocks"
              f"  {frame.filename.removeprefix(str(Path.cwd()) + '/')}:{frame.lineno}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--top", type=int, default=12, help="allocation sites listed")
    args = ap.parse_args(argv)
    import trio

    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        trio.run(_run, Path(tmp), args.sessions, args.batches, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
