"""CPU per ingested pose batch: the two fixed costs on the ingest path (the
session-token check, ``TokenVerifier.verify_session``, and the batch decoder,
``domain.pose_batch.decode_batch``) and the whole in-process ingest path.

Run from the repository root (about 10 s; ``path`` about 30 s)::

    .venv/bin/python -m bench.bench_ingest_cpu
    .venv/bin/python -m bench.bench_ingest_cpu --rounds 21 --only decode --against HEAD~1
    .venv/bin/python -m bench.bench_ingest_cpu --only path --tree /tmp/old-worktree

* **verify_session**: one minted session token (HS256, the dev key), *cold* (the
  full signature and claims check: the verified-token cache is emptied before every
  call) and *cached* (the same token again, as a session sending one batch a second
  does).
* **decode_batch**: realistic 1-second batches (``telemetry.dev.synthetic.generate`` split
  by ``telemetry.dev.demo.batches_of``, as ``bench/loadgen.make_pool`` builds them: about
  30 frames, 2% dropped in transit, some all-NaN frames), each decoded and validated.

  With ``--against REV``, ``domain/pose_batch.py`` as of git revision ``REV`` is timed
  too, in alternating rounds on the same batches (its ``decode_batch`` only: the
  module is loaded from ``git show``, nothing is checked out).

* **path**: the whole ingest path of the service in one process, without sockets:
  the app ``telemetry serve`` runs (CORS and connection-close wrappers, the lean
  ASGI app), its supervisor and actors, and the spool (fsync included) in a
  temporary directory, driven through the ASGI interface by ``--sessions``
  concurrent closed-loop sessions (:mod:`bench.bench_ingest_path`). The figure is
  process CPU (all threads) per acknowledged batch: the handler, the actor's
  computation and the spool, but not hypercorn, h11/wsproto or the kernel's
  sockets. With ``--tree DIR`` (a worktree of another commit) that tree is timed
  too, in alternating child processes.

Each figure is per call, in microseconds: the best and the median of ``--rounds``
timed rounds (the machine is shared; the best is the least disturbed). Rerun to
see the spread.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # allow `python bench/bench_ingest_cpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import make_pool  # noqa: E402
from domain.pose_batch import decode_batch  # noqa: E402
from telemetry.auth import TokenVerifier, mint_session_token  # noqa: E402
from telemetry.config import Settings  # noqa: E402


def rounds_us(fn: Callable[[], object], calls: int, rounds: int) -> tuple[float, float]:
    """(best, median) microseconds per call of ``fn`` over ``rounds`` rounds of
    ``calls`` calls."""
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter_ns() - t0) / calls / 1000)
    return min(per), statistics.median(per)


def bench_verify(rounds: int) -> None:
    settings = Settings()
    verifier = TokenVerifier(settings)
    token = mint_session_token(settings, org_id="org-bench", session_id="sess-bench")
    cache = getattr(verifier, "_cache", None)

    def cold() -> None:
        if cache is not None:
            cache.clear()
        verifier.verify_session(token)

    def cached() -> None:
        verifier.verify_session(token)

    verifier.verify_session(token)
    for name, fn, calls in (("cold", cold, 2000), ("cached", cached, 20000)):
        best, med = rounds_us(fn, calls, rounds)
        print(f"verify_session {name:>6}: best {best:8.2f} us  median {med:8.2f} us")
    if cache is None:
        print("  (this TokenVerifier has no cache: both figures are the full check)")


def wire_at(rev: str) -> types.ModuleType:
    """``domain/pose_batch.py`` as of git revision ``rev``, as a module of its own."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:domain/pose_batch.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType(f"wire_at_{rev}")
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:domain/pose_batch.py", "exec"), mod.__dict__)
    return mod


def bench_decode(rounds: int, against: str | None) -> None:
    pool = make_pool(sessions=4, reps=12)
    bodies = [bytes(pb.template) for s in pool for pb in s.batches]
    frames = sum(pb.n for s in pool for pb in s.batches)
    print(f"decode_batch over {len(bodies)} batches, {frames / len(bodies):.1f} frames "
          f"and {sum(map(len, bodies)) / len(bodies) / 1024:.1f} KiB each")
    decoders = {"current": decode_batch}
    if against is not None:
        decoders[against] = wire_at(against).decode_batch

    def one_pass(decode: Callable[..., object]) -> Callable[[], None]:
        def run() -> None:
            for body in bodies:
                decode(body, max_frames=120)
        return run

    per: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(rounds):  # alternate, so both see the same machine load
        for name, decode in decoders.items():
            per[name].append(rounds_us(one_pass(decode), 5, 1)[0] / len(bodies))
    for name, us in per.items():
        print(f"decode_batch {name:>8}: best {min(us):8.2f} us  "
              f"median {statistics.median(us):8.2f} us per batch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--only", choices=["verify", "decode", "path"])
    ap.add_argument("--against", metavar="REV",
                    help="also time decode_batch of domain/pose_batch.py at this git revision")
    ap.add_argument("--tree", metavar="DIR",
                    help="path: also time the service of this worktree (another commit)")
    ap.add_argument("--sessions", type=int, default=16, help="path: concurrent sessions")
    ap.add_argument("--batches", type=int, default=60, help="path: batches per session")
    args = ap.parse_args()
    if args.only == "path":
        from bench.bench_ingest_path import compare_trees

        compare_trees(args.tree, rounds=args.rounds, sessions=args.sessions,
                      batches=args.batches)
        return
    if args.only in (None, "verify"):
        bench_verify(args.rounds)
    if args.only in (None, "decode"):
        bench_decode(args.rounds, args.against)


if __name__ == "__main__":
    main()
