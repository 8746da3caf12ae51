"""CPU per pose batch of the session actor's synchronous work, stage by stage.

Run from the repository root::

    .venv/bin/python -m bench.bench_actor_cpu            # the writer's defaults, all stages
    .venv/bin/python -m bench.bench_actor_cpu --zlib rle --zlib 6 --zlib 1 --repeat 9

``--zlib`` (repeatable) is the body's zlib setting: a strategy name from
``storage.replay.STRATEGIES`` (at the writer's default level) or a level 0-9
(with the default strategy, i.e. zlib's usual level-driven matching).

What the actor does per acknowledged batch (``actors/session.py`` ``_apply``)::

    frames = replay.append(batch.t_ms, batch.frames)   # encode + zlib, decoded frames back
    stats.add(batch.t_ms, frames)
    reps.feed(batch.t_ms.astype("float64"), frames)

Batches are realistic, as in ``bench/loadgen.py``: synthetic sessions
(:func:`telemetry.dev.synthetic.generate`, one per exercise of the demo) split into
1-second batches by :func:`telemetry.dev.demo.batches_of` (about 2% of frames
dropped in transit, some all-NaN frames) and decoded by
:func:`domain.pose_batch.decode_batch`, so every array has the dtype and layout
the actor receives. All of that happens before timing starts.

Stages (each figure is CPU microseconds of this process per batch, so time
spent descheduled on a busy machine does not count; stages run interleaved,
``--repeat`` rounds, and per session the best round, the one least disturbed
by other processes, is summed over sessions; in brackets the median of the
whole-pool totals):

* ``replay.append``: the whole call with the given zlib setting;
* ``  codec (no zlib)``: the same with zlib replaced by a no-op, i.e. validation,
  quantisation, payload building and the decoded frames (the same for every
  ``--zlib``; run with the first);
* ``  zlib alone``: the same record bytes through a compressor with the writer's
  settings, alone;
* ``stats.add``, ``reps.feed``: the rest of ``_apply`` (reps with the session's
  profile, image space, 1280x720);
* ``actor _apply total``: all three together, one batch at a time, as the actor
  ran them before chunked application;
* ``actor chunks of N``: the actor's code as it runs now (``actors/chunks.py``):
  ``replay.append`` per batch, then ``stats.add`` and ``reps.feed`` once per N
  consecutive batches (``--chunk``, repeatable; default 1 and the actor's
  ``CHUNK_BATCHES``). A session's last chunk may be shorter, as at the end of a
  live session.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # allow `python bench/bench_actor_cpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.chunks import CHUNK_BATCHES, ChunkedApply  # noqa: E402
from actors.pose_stats import PoseStats  # noqa: E402
from actors.reps import RepEngine  # noqa: E402
from domain.pose_batch import PoseBatch, decode_batch  # noqa: E402
from storage import replay as replay_mod  # noqa: E402
from storage.replay import ReplayWriter  # noqa: E402
from telemetry.dev.demo import EXERCISES, batches_of  # noqa: E402
from telemetry.dev.synthetic import generate  # noqa: E402

ASPECT = 1280 / 720


class _NullZ:
    """Stands in for the writer's zlib compressor: keeps nothing, costs nothing."""

    def compress(self, data: bytes) -> bytes:
        return b""

    def flush(self) -> bytes:
        return b""


class _RecordingZ:
    """Wraps a compressor and keeps what it was fed (to time zlib on its own)."""

    def __init__(self, z: Any, sink: list[bytes]) -> None:
        self._z, self._sink = z, sink

    def compress(self, data: bytes) -> bytes:
        self._sink.append(bytes(data))
        return self._z.compress(data)

    def flush(self) -> bytes:
        return self._z.flush()


def make_sessions(per_kind: int, reps: int, seed: int) -> list[tuple[str, list[PoseBatch]]]:
    rng = random.Random(seed)
    out = []
    for j in range(per_kind * len(EXERCISES)):
        kind = EXERCISES[j % len(EXERCISES)]
        s = generate(kind, reps=reps, seed=seed * 1000 + j, aspect=ASPECT)
        batches = [decode_batch(b, max_frames=1024) for b in batches_of(s.t_ms, s.frames, rng)]
        out.append((kind, batches))
    return out


ZlibSetting = tuple[int, int]  # (level, strategy)


def zlib_setting(arg: str) -> ZlibSetting:
    """``--zlib`` value -> (level, strategy)."""
    defaults = ReplayWriter.__init__.__kwdefaults__
    if arg.isdigit():
        return int(arg), zlib.Z_DEFAULT_STRATEGY
    return defaults["level"], replay_mod.STRATEGIES[arg]


def zlib_label(zs: ZlibSetting) -> str:
    level, strategy = zs
    if strategy == zlib.Z_DEFAULT_STRATEGY:
        return f"level {level}"
    name = next(k for k, v in replay_mod.STRATEGIES.items() if v == strategy)
    return name


def _writer(zs: ZlibSetting, sid: str) -> ReplayWriter:
    return ReplayWriter(org_id="bench", session_id=sid, space="image", level=zs[0],
                        strategy=zs[1], meta={"image_width": 1280, "image_height": 720})


def run_replay(level: ZlibSetting, null_z: bool = False) -> Callable[[int, Any], None]:
    def run(i: int, sess: Any) -> None:
        w = _writer(level, f"s{i}")
        if null_z:
            w._z = _NullZ()
        for b in sess[1]:
            w.append(b.t_ms, b.frames)
    return run


def run_stats(decoded: list) -> Callable[[int, Any], None]:
    def run(i: int, sess: Any) -> None:
        st = PoseStats()
        for b, f in zip(sess[1], decoded[i], strict=True):
            st.add(b.t_ms, f)
    return run


def run_reps(decoded: list) -> Callable[[int, Any], None]:
    def run(i: int, sess: Any) -> None:
        eng = RepEngine(sess[0], space="image", aspect=ASPECT)
        for b, f in zip(sess[1], decoded[i], strict=True):
            eng.feed(b.t_ms.astype("float64"), f)
    return run


def run_apply(level: ZlibSetting) -> Callable[[int, Any], None]:
    def run(i: int, sess: Any) -> None:
        w = _writer(level, f"s{i}")
        st = PoseStats()
        eng = RepEngine(sess[0], space="image", aspect=ASPECT)
        for b in sess[1]:
            f = w.append(b.t_ms, b.frames)
            st.add(b.t_ms, f)
            eng.feed(b.t_ms.astype("float64"), f)
    return run


class _Applier(ChunkedApply):
    """The actor's chunk state and code, without the actor (no Trio needed: the
    bench calls ``_apply_chunk`` itself every N batches)."""

    def __init__(self, kind: str, replay: ReplayWriter) -> None:
        self.stats = PoseStats()
        self.reps = RepEngine(kind, space="image", aspect=ASPECT)
        self.replay = replay
        self.log_id, self.error, self.end_reason = "bench", None, None
        self._pending, self._pending_since = [], None


def run_chunks(level: ZlibSetting, n: int) -> Callable[[int, Any], None]:
    def run(i: int, sess: Any) -> None:
        a = _Applier(sess[0], _writer(level, f"s{i}"))
        assert a.replay is not None
        for b in sess[1]:
            a._pending.append((b.t_ms, a.replay.append(b.t_ms, b.frames)))
            if len(a._pending) >= n:
                a._apply_chunk()
        a._apply_chunk()
    return run


def run_zlib(streams: list[list[bytes]], level: ZlibSetting) -> Callable[[int, Any], None]:
    def run(i: int, sess: Any) -> None:
        z = zlib.compressobj(level[0], zlib.DEFLATED, 16 + replay_mod.ZLIB_WBITS,
                             replay_mod.ZLIB_MEMLEVEL, level[1])
        for r in streams[i]:
            z.compress(r)
    return run


def timed_all(stages: list[tuple[str, Callable[[int, Any], None]]], sessions: list,
              repeat: int, n_batches: int) -> list[tuple[str, float, float]]:
    """Per stage: (sum over sessions of the best run, median of the whole-pool totals),
    us per batch.

    Stages are interleaved (round r runs every stage once) and the best is taken per
    session (each a few tens of ms) rather than per whole pool, so a slow spell of
    the shared machine hits every stage alike and mostly drops out."""
    per = {name: [[0.0] * repeat for _ in sessions] for name, _ in stages}
    for r in range(repeat):
        for name, fn in stages:
            for i, sess in enumerate(sessions):
                t0 = time.process_time()
                fn(i, sess)
                per[name][i][r] = time.process_time() - t0
    out = []
    for name, _ in stages:
        p = per[name]
        best = sum(min(x) for x in p)
        med = statistics.median(sum(x[r] for x in p) for r in range(repeat))
        out.append((name, best / n_batches * 1e6, med / n_batches * 1e6))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zlib", type=zlib_setting, action="append",
                    help="strategy name or zlib level; repeatable (default: the writer's)")
    ap.add_argument("--sessions", type=int, default=1, help="sessions per exercise kind")
    ap.add_argument("--reps", type=int, default=12, help="repetitions per session")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--chunk", type=int, action="append",
                    help=f"batches per chunk; repeatable (default 1 and {CHUNK_BATCHES})")
    ap.add_argument("--only", default="", help="comma-separated stage names to run "
                    "(replay,codec,zlib,stats,reps,apply,chunks); default all")
    args = ap.parse_args(argv)
    defaults = ReplayWriter.__init__.__kwdefaults__
    levels = args.zlib or [(defaults["level"], defaults["strategy"])]
    only = set(filter(None, args.only.split(",")))
    sessions = make_sessions(args.sessions, args.reps, args.seed)
    n = sum(len(b) for _, b in sessions)
    frames = sum(bt.n for _, b in sessions for bt in b)
    # the decoded frames the actor feeds onwards, and the raw record stream zlib sees
    decoded, streams = [], []
    for i, (_kind, batches) in enumerate(sessions):
        w = _writer(levels[0], f"s{i}")
        recs: list[bytes] = []
        w._z = _RecordingZ(w._z, recs)
        decoded.append([w.append(b.t_ms, b.frames) for b in batches])
        streams.append(recs)
    raw = sum(len(r) for s in streams for r in s)
    print(f"{len(sessions)} sessions, {n} batches, {frames} frames "
          f"({frames / n:.1f} per batch), {raw / n:.0f} record bytes per batch into zlib; "
          f"best of {args.repeat} (median), us per batch")
    stages: list[tuple[str, Callable[[int, Any], None]]] = []

    def want(name: str) -> bool:
        return not only or name in only

    for level in levels:
        if want("replay"):
            stages.append((f"replay.append ({zlib_label(level)})", run_replay(level)))
        if want("zlib"):
            stages.append((f"  zlib alone ({zlib_label(level)})", run_zlib(streams, level)))
    if want("codec"):
        stages.append(("  codec (no zlib)", run_replay(levels[0], null_z=True)))
    if want("stats"):
        stages.append(("stats.add", run_stats(decoded)))
    if want("reps"):
        stages.append(("reps.feed", run_reps(decoded)))
    if want("apply"):
        for level in levels:
            stages.append((f"actor _apply total ({zlib_label(level)})", run_apply(level)))
    if want("chunks"):
        for c in args.chunk or [1, CHUNK_BATCHES]:
            stages.append((f"actor chunks of {c} ({zlib_label(levels[0])})",
                           run_chunks(levels[0], c)))
    for name, best, med in timed_all(stages, sessions, args.repeat, n):
        print(f"{name:<34}{best:9.1f} ({med:7.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
