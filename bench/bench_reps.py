"""Cost per frame of the repetition engine, amortised over feed() batches.

Run from the repository root::

    .venv/bin/python -m bench.bench_reps                 # 30-frame batches, all profiles
    .venv/bin/python -m bench.bench_reps --batch 1 --batch 30 --batch 300

Sessions come from the synthetic generator (generated before timing starts).
Times are CPU time of this process (time spent descheduled on a busy machine does
not count). Each figure is, per session, the best of ``--repeat`` runs of feeding
it, summed over the sessions and divided by the number of frames fed: the best run
is the one least disturbed by other processes on the machine. The median of the
whole-pool totals is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # allow `python bench/bench_reps.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.reps import RepEngine  # noqa: E402
from telemetry.dev.synthetic import KINDS, generate  # noqa: E402


def time_sessions(sessions: list, kind: str | None, space: str, batch: int) -> list[float]:
    """CPU seconds to run the engine over each session (construction and finish
    included)."""
    out = []
    for s in sessions:
        t0 = time.process_time()
        eng = RepEngine(kind if kind != "auto" else None, space=space, aspect=s.aspect)
        t, f = s.t_ms, s.frames
        for i in range(0, len(t), batch):
            eng.feed(t[i:i + batch], f[i:i + batch])
        eng.finish()
        out.append(time.process_time() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, action="append", help="frames per feed(); repeatable")
    ap.add_argument("--sessions", type=int, default=3, help="sessions per profile")
    ap.add_argument("--reps", type=int, default=12, help="complete reps per session")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--space", default="image", choices=("image", "world"))
    ap.add_argument("--kinds", default=",".join(KINDS) + ",auto",
                    help="profiles to time; 'auto' = unknown kind (fallback mode)")
    args = ap.parse_args(argv)
    batches = args.batch or [30]
    kinds = [k for k in args.kinds.split(",") if k]
    print(f"RepEngine cost per frame ({args.space} space, {args.sessions} sessions x "
          f"{args.reps} reps per profile, best of {args.repeat}; median in brackets)")
    header = f"{'profile':<18}{'frames':>8}" + "".join(f"{f'batch {b}':>22}" for b in batches)
    print(header)
    overall = {b: [0.0, 0] for b in batches}
    gen_t, gen_s = 0.0, 0.0
    for kind in kinds:
        gen_kind = "squat" if kind == "auto" else kind
        t0 = time.perf_counter()
        sessions = [generate(gen_kind, reps=args.reps, seed=100 + i, space=args.space)
                    for i in range(args.sessions)]
        gen_t += time.perf_counter() - t0
        gen_s += sum(s.duration_s for s in sessions)
        n = sum(len(s.t_ms) for s in sessions)
        cells = []
        for b in batches:
            runs = [time_sessions(sessions, kind, args.space, b) for _ in range(args.repeat)]
            best_s = sum(min(r[i] for r in runs) for i in range(len(sessions)))
            best, med = best_s / n * 1e6, statistics.median(sum(r) for r in runs) / n * 1e6
            cells.append(f"{best:8.2f} us ({med:6.2f})")
            if kind != "auto":
                overall[b][0] += best_s
                overall[b][1] += n
        label = "auto (fallback)" if kind == "auto" else kind
        print(f"{label:<18}{n:>8}" + "".join(f"{c:>22}" for c in cells))
    known = [f"{overall[b][0] / overall[b][1] * 1e6:8.2f} us" for b in batches if overall[b][1]]
    if known:
        print(f"{'known profiles':<18}{'':>8}" + "".join(f"{c:>22}" for c in known))
    print(f"\nsynthetic generator: {gen_t / max(gen_s, 1e-9) * 60 * 1e3:.1f} ms per 60 s of "
          f"session at 30 fps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
