"""CPU per acknowledged pose batch over the service's whole in-process ingest path.

``python -m bench.bench_ingest_cpu --only path [--tree DIR]`` runs this (see its
doc). Each measurement is a child process, ``python bench/bench_ingest_path.py
--child TRANSPORT``, importing the service from ``BENCH_TREE`` (default: this
checkout), so another commit's worktree is timed by the same driver.

The app is built as ``telemetry.server.serve`` builds it (CORS and
connection-close wrappers around the lean app), with the supervisor and the spool
running, and driven through ASGI directly: no sockets, no hypercorn. ``sessions``
sessions each send ``batches`` realistic 1-second batches (``bench.loadgen``'s
pool), one at a time, each answered before the next (closed loop); the first
``WARMUP`` of each session are not timed (actor start, the replay writer's file).
The figures are ``time.process_time`` (every thread of the process, the spool's
fsync thread included) and Trio task steps (switches into a task: the handlers',
the actors', the spool committer's) per acknowledged batch. On a shared machine the
CPU figure is noisy (the actor's computation dominates it); for a difference of a
few microseconds count instructions instead, e.g. ``valgrind --tool=callgrind`` on
two runs of ``--child`` with different ``batches``, differenced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WARMUP = 5
TRANSPORTS = ("http", "ws")


def _child(transport: str, sessions: int, batches: int) -> dict[str, float]:
    """One measurement in this process (the service imported from ``sys.path``)."""
    import trio

    from actors.supervisor import Supervisor
    from bench.loadgen import make_pool
    from domain.pose_batch import CONTENT_TYPE
    from domain.privacy import Pseudonymiser
    from telemetry.app import AppState, create_app
    from telemetry.auth import TokenVerifier
    from telemetry.config import Settings
    from telemetry.connection_close import close_on_connection_close
    from telemetry.cors import cors
    from telemetry.wiring import actor_limits, open_storage

    pool = make_pool(sessions=min(sessions, 8), reps=12)
    timed = {"cpu": 0.0, "wall": 0.0, "acks": 0, "steps": 0}

    class Steps(trio.abc.Instrument):
        """Counts task steps (each a switch into a task) while ``on``."""

        on = False
        n = 0

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if self.on:
                self.n += 1

    steps = Steps()

    async def main(data_dir: Path) -> None:
        settings = dataclasses.replace(
            Settings(), data_dir=data_dir, sink="none", pseudonym_key=b"k" * 32,
            max_batches_per_s=1e6, idle_timeout_s=600.0, gap_timeout_s=60.0)
        async with open_storage(settings) as storage, trio.open_nursery() as nursery:
            pseudonyms = Pseudonymiser(settings.pseudonym_key)
            sup = Supervisor(actor_limits(settings), store=storage.store, bus=storage.bus,
                             pseudonyms=pseudonyms, journal=storage.spool)
            state = AppState(settings, sup, TokenVerifier(settings), pseudonyms,
                             storage=storage)
            app = close_on_connection_close(cors(create_app(state), settings.cors_origins))
            if storage.spool is not None:
                await nursery.start(storage.spool.run)
            await nursery.start(sup.run)
            warm = trio.Semaphore(0)
            go = trio.Event()

            async def session(i: int) -> None:
                token, bodies = session_requests(settings, pool, i, batches)
                if transport == "http":
                    await http_session(app, token, bodies, warm, go, CONTENT_TYPE)
                else:
                    await ws_session(app, token, bodies, warm, go)

            async with trio.open_nursery() as clients:
                for i in range(sessions):
                    clients.start_soon(session, i)
                for _ in range(sessions):
                    await warm.acquire()
                _callgrind("on")
                c0, w0 = time.process_time(), time.perf_counter()
                steps.on = True
                go.set()
            timed["cpu"] = time.process_time() - c0
            timed["wall"] = time.perf_counter() - w0
            _callgrind("off")
            steps.on = False
            timed["steps"] = steps.n
            timed["acks"] = sessions * (batches - WARMUP)
            nursery.cancel_scope.cancel()

    with tempfile.TemporaryDirectory(prefix="bench-path-") as tmp:
        trio.run(main, Path(tmp), instruments=[steps])
    return {"cpu_us": 1e6 * timed["cpu"] / timed["acks"],
            "wall_us": 1e6 * timed["wall"] / timed["acks"],
            "steps": timed["steps"] / timed["acks"]}


def session_requests(settings: Any, pool: list[Any], i: int, batches: int
                     ) -> tuple[bytes, list[bytes]]:
    """Bench session ``i``'s token and its ``batches`` batch bodies (pool session
    ``i`` modulo the pool, batches numbered from 0)."""
    from bench.loadgen import batch_body
    from telemetry.auth import mint_session_token

    token = mint_session_token(settings, org_id="org-bench", session_id=f"s-{i}").encode()
    p = pool[i % len(pool)]
    return token, [bytes(batch_body(p.batches[k % len(p.batches)], k)) for k in range(batches)]


def _callgrind(state: str) -> None:
    """Under ``valgrind --tool=callgrind --instr-atstart=no`` with ``BENCH_CALLGRIND=1``
    in the environment: instrument the timed window only (``callgrind_control -i``),
    so the instruction count is of the acknowledged batches alone."""
    if os.environ.get("BENCH_CALLGRIND"):
        subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True,
                       capture_output=True)


async def http_session(app: Any, token: bytes, bodies: list[bytes], warm: Any, go: Any,
                       ctype: str) -> None:
    for k, body in enumerate(bodies):
        if k == WARMUP:
            warm.release()
            await go.wait()
        sent: list[dict[str, Any]] = []
        delivered = False

        async def receive(body: bytes = body) -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                await _forever()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/pose/frames",
                 "raw_path": b"/v1/pose/frames", "query_string": b"", "root_path": "",
                 "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080),
                 "headers": [(b"host", b"127.0.0.1:8080"),
                             (b"authorization", b"Bearer " + token),
                             (b"content-type", ctype.encode()),
                             (b"content-length", str(len(body)).encode()),
                             (b"user-agent", b"bench")]}
        await app(scope, receive, send)
        status = sent[0]["status"]
        if status != 202:
            raise SystemExit(f"batch {k}: {status} {sent[1].get('body')!r}")


async def ws_session(app: Any, token: bytes, bodies: list[bytes], warm: Any,
                     go: Any) -> None:
    import trio

    inbox_tx, inbox_rx = trio.open_memory_channel[dict[str, Any]](1)
    acks_tx, acks_rx = trio.open_memory_channel[dict[str, Any]](1)

    async def receive() -> dict[str, Any]:
        return await inbox_rx.receive()

    async def send(message: dict[str, Any]) -> None:
        await acks_tx.send(message)

    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "scheme": "ws", "path": "/v1/pose/stream", "raw_path": b"/v1/pose/stream",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 40000),
             "server": ("127.0.0.1", 8080), "subprotocols": ["restartix.pose.v1"],
             "extensions": {"websocket.http.response": {}},
             "headers": [(b"host", b"127.0.0.1:8080"), (b"authorization", b"Bearer " + token),
                         (b"user-agent", b"bench")]}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app, scope, receive, send)
        await inbox_tx.send({"type": "websocket.connect"})
        accepted = await acks_rx.receive()
        if accepted["type"] != "websocket.accept":
            raise SystemExit(f"handshake refused: {accepted}")
        for k, body in enumerate(bodies):
            if k == WARMUP:
                warm.release()
                await go.wait()
            await inbox_tx.send({"type": "websocket.receive", "bytes": body})
            ack = await acks_rx.receive()
            if '"status":202' not in ack.get("text", ""):
                raise SystemExit(f"batch {k}: {ack}")
        await inbox_tx.send({"type": "websocket.disconnect", "code": 1000})


async def _forever() -> None:
    import trio

    await trio.sleep_forever()


def measure(tree: Path, transport: str, sessions: int, batches: int) -> dict[str, float]:
    """One child-process measurement of ``tree``'s service."""
    env = {**os.environ, "BENCH_TREE": str(tree), "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, __file__, "--child", transport, str(sessions),
                          str(batches)], cwd=tree, env=env, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_trees(other: str | None, *, rounds: int, sessions: int, batches: int) -> None:
    """Print CPU per batch, best and median of ``rounds``, for this checkout (and
    ``other``, alternating) over both transports."""
    here = Path(__file__).resolve().parents[1]
    trees = {"current": here}
    if other is not None:
        trees[other] = Path(other).resolve()
    print(f"ingest path, in process: {sessions} sessions x {batches} batches "
          f"({WARMUP} untimed each), process CPU per acknowledged batch")
    for transport in TRANSPORTS:
        per: dict[str, list[float]] = {name: [] for name in trees}
        steps: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(rounds):
            for name, tree in trees.items():
                m = measure(tree, transport, sessions, batches)
                per[name].append(m["cpu_us"])
                steps[name].append(m["steps"])
        for name, us in per.items():
            print(f"  {transport:>4} {name:>24}: best {min(us):7.1f} us  "
                  f"median {statistics.median(us):7.1f} us per batch; "
                  f"{statistics.median(steps[name]):.2f} task steps per batch", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        sys.path.insert(0, os.environ.get("BENCH_TREE") or str(Path(__file__).parents[1]))
        print(json.dumps(_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        raise SystemExit("run it as: python -m bench.bench_ingest_cpu --only path")
