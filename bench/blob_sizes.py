"""Replay blob size, error and speed per encoding on real MediaPipe output.

    .venv/bin/python -m bench.blob_sizes [--minutes 30] [--strategy rle] [--level 6] [--json]
    .venv/bin/python -m bench.blob_sizes --zlib-grid     # default encoding, zlib settings
    .venv/bin/python -m bench.blob_sizes --data DIR      # other recordings (*.npz)

Builds a session of ``minutes * 60 * 30`` frames (54,000 for 30 minutes) from
the real push-up recordings kept in tests/data/pose/pushup (MediaPipe Pose
0.10.14 output, image and world space; a 21-clip subset of 83, see that folder's
SOURCE.md; ``--data`` reads another folder, such as the full set):

* all clips are concatenated in file-name order (one *pass*, ~1,900 frames
  for the in-repo subset, ~8,500 for the full set) and passes alternate
  forward and exactly reversed (ping-pong over the whole list), so the turns
  between passes are seamless.  Every change of
  clip inside a pass is a jump to a different person and camera (counted and
  printed as ``seams``) -- far more jumps than one real continuous session
  has, so delta coding is judged pessimistically rather than flattered;
* a frame comes back only one pass later (except right at the few turns),
  far beyond gzip's 32 KB window, so the looping cannot be exploited by the
  compressor.  (Ping-ponging each clip on its own would let gzip copy whole
  528-byte frames of plain f32 from the forward half and make f32 look ~13%
  smaller than it is.)  As a check the script also prints the size of the
  first pass alone, which repeats nothing, scaled to the session length
  (column ``unique/MB``);
* timestamps are synthetic, shaped like the wire format's (docs/pose-batch-format.md):
  u32 ms since the session started, 30 fps with +-2 ms jitter (the clips' own
  timestamps restart per clip);
* frames are appended in 1-second batches of 30, as the session actor does;
* zlib runs with the writer's settings: its default strategy (``rle``) unless
  ``--strategy`` says otherwise (``default`` is zlib's usual level-driven
  matching, where ``--level`` matters).

``--zlib-grid`` measures the zlib settings instead, on the default encoding: the
session's record stream (what ``append`` hands to zlib) is captured once, then
compressed with each strategy/level and the writer's window and memLevel; it
prints the blob body size and zlib's CPU per 1-second batch (process CPU time,
best of 5 per slice of 60 batches, settings interleaved slice by slice, so other
processes on the machine mostly drop out).

Sizes are 10^6 bytes.  ``max err`` is the largest absolute difference from
the input over finite values, for coordinates (x, y, z) and visibility.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from storage import replay as replay_mod
from storage.replay import DEFAULT_STRATEGY, STRATEGIES, ReplayWriter, read_replay
from tests.data import PUSHUP

DATA = PUSHUP
FPS = 30
BATCH = 30

# (label, encoding, max_error) -- max_error None = the encoding's default
CONFIGS: list[tuple[str, str, Any]] = [
    ("f32", "f32", None),
    ("shuffle", "shuffle", None),
    ("f32delta", "f32delta", None),
    ("q16delta 1e-4", "q16delta", [1e-4, 1e-4, 1e-4, 1e-3]),
    ("q16delta (default)", "q16delta", None),
    ("q16delta 1e-3", "q16delta", [1e-3, 1e-3, 1e-3, 5e-3]),
]


def build_session(key: str, frames: int, data: Path = DATA) -> tuple[np.ndarray, int, int]:
    """(frames, 33, 4) float32 ping-ponged over all clips; also returns the number
    of clip-to-clip seams (jumps between different videos) and one pass' length."""
    files = sorted(data.glob("*.npz"))
    if not files:
        raise SystemExit(f"no recordings in {data}")
    forward = [np.load(f)[key] for f in files]
    one_pass = np.concatenate(forward)
    p = len(one_pass)
    reps = -(-frames // p)
    session = np.concatenate([one_pass if i % 2 == 0 else one_pass[::-1] for i in range(reps)])
    bounds = np.cumsum([len(c) for c in forward])[:-1]  # clip starts inside a pass
    seams = 0
    for i in range(reps):
        local = bounds if i % 2 == 0 else p - bounds[::-1]
        seams += int(np.sum(i * p + local < frames))
    return np.ascontiguousarray(session[:frames]), seams, p


def jitter(key: str, data: Path = DATA) -> list[float]:
    """Median |value - centred 5-frame moving average| per channel over every clip:
    a rough scale of MediaPipe's own frame-to-frame noise (plus some real motion),
    to compare quantisation error against."""
    res: list[list[np.ndarray]] = [[] for _ in range(4)]
    kernel = np.ones(5) / 5
    for f in sorted(data.glob("*.npz")):
        a = np.load(f)[key].astype(np.float64)
        if len(a) < 5:
            continue
        smooth = np.apply_along_axis(lambda s: np.convolve(s, kernel, "valid"), 0, a)
        r = np.abs(a[2:-2] - smooth)
        for c in range(4):
            v = r[..., c]
            res[c].append(v[np.isfinite(v)])
    return [float(np.median(np.concatenate(x))) for x in res]


def session_timestamps(n: int, seed: int = 0) -> np.ndarray:
    """u32 ms since session start, 30 fps, +-2 ms jitter (strictly increasing)."""
    rng = np.random.default_rng(seed)
    t = np.round(np.arange(n) * (1000.0 / FPS) + rng.uniform(-2.0, 2.0, n))
    return np.maximum(t, 0).astype(np.uint32)


def encode(
    space: str, encoding: str, max_error: Any, t: np.ndarray, frames: np.ndarray, level: int,
    strategy: int = DEFAULT_STRATEGY,
) -> tuple[bytes, float]:
    w = ReplayWriter(
        org_id="bench-org", session_id="bench-session", space=space, encoding=encoding,
        max_error=max_error, level=level, strategy=strategy,
    )  # fmt: skip
    start = time.perf_counter()
    for s in range(0, len(t), BATCH):
        w.append(t[s : s + BATCH], frames[s : s + BATCH])
    blob = w.finish()
    return blob, time.perf_counter() - start


def measure(
    space: str, frames: np.ndarray, unique: int, level: int, strategy: int = DEFAULT_STRATEGY
) -> list[dict[str, Any]]:
    n = len(frames)
    t = session_timestamps(n)
    fin = np.isfinite(frames)
    rows = []
    for label, encoding, max_error in CONFIGS:
        blob, enc_s = encode(space, encoding, max_error, t, frames, level, strategy)
        start = time.perf_counter()
        r = read_replay(blob)
        dec_s = time.perf_counter() - start
        if not np.array_equal(r.t_ms, t):
            raise AssertionError("timestamps did not round-trip")
        if not np.array_equal(np.isnan(r.frames), np.isnan(frames)):
            raise AssertionError("NaN positions changed")
        err = np.zeros(frames.shape)
        err[fin] = np.abs(r.frames[fin].astype(np.float64) - frames[fin])
        exact = np.array_equal(r.frames.view(np.uint32), frames.view(np.uint32))
        bound = r.header.max_error
        if bound is not None and (err.max(axis=(0, 1)) > np.asarray(bound)).any():
            raise AssertionError(f"{label}: error bound violated")
        ublob, _ = encode(
            space, encoding, max_error, t[:unique], frames[:unique], level, strategy
        )
        rows.append(
            {
                "space": space,
                "encoding": label,
                "max_error": bound,
                "bytes": len(blob),
                "mb": len(blob) / 1e6,
                "unique_mb": len(ublob) / 1e6 * n / unique,
                "ratio": n * (33 * 4 * 4) / len(blob),
                "bit_exact": exact,
                "max_err_xyz": float(err[..., :3].max()),
                "max_err_vis": float(err[..., 3].max()),
                "encode_s": enc_s,
                "encode_us_per_batch": enc_s / (n / BATCH) * 1e6,
                "decode_s": dec_s,
            }
        )
    return rows


# (label, level, strategy) for --zlib-grid
ZLIB_GRID: list[tuple[str, int, int]] = [
    ("level 1", 1, zlib.Z_DEFAULT_STRATEGY),
    ("level 2", 2, zlib.Z_DEFAULT_STRATEGY),
    ("level 3", 3, zlib.Z_DEFAULT_STRATEGY),
    ("level 4", 4, zlib.Z_DEFAULT_STRATEGY),
    ("level 6", 6, zlib.Z_DEFAULT_STRATEGY),
    ("level 9", 9, zlib.Z_DEFAULT_STRATEGY),
    ("rle", 6, zlib.Z_RLE),
    ("filtered, level 6", 6, zlib.Z_FILTERED),
]


class _Capture:
    """Stands in for the writer's compressor and keeps what it is fed."""

    def __init__(self) -> None:
        self.records: list[bytes] = []

    def compress(self, data: bytes) -> bytes:
        self.records.append(bytes(data))
        return b""

    def flush(self) -> bytes:
        return b""


def zlib_grid(space: str, frames: np.ndarray, repeat: int = 5) -> list[dict[str, Any]]:
    t = session_timestamps(len(frames))
    w = ReplayWriter(org_id="bench-org", session_id="bench-session", space=space)
    cap = _Capture()
    w._z = cap  # noqa: SLF001 -- the record stream, exactly as append() emits it
    for s in range(0, len(t), BATCH):
        w.append(t[s : s + BATCH], frames[s : s + BATCH])
    recs = cap.records
    slices = [recs[i : i + 60] for i in range(0, len(recs), 60)]
    best = {label: [float("inf")] * len(slices) for label, _, _ in ZLIB_GRID}
    size = {}
    for _ in range(repeat):
        zs = {label: zlib.compressobj(level, zlib.DEFLATED, 16 + replay_mod.ZLIB_WBITS,
                                      replay_mod.ZLIB_MEMLEVEL, strategy)
              for label, level, strategy in ZLIB_GRID}
        out = dict.fromkeys(zs, 0)
        # settings interleaved slice by slice, so a slow spell of a shared machine
        # hits them alike
        for k, sl in enumerate(slices):
            for label, z in zs.items():
                t0 = time.process_time()
                for r in sl:
                    out[label] += len(z.compress(r))
                best[label][k] = min(best[label][k], time.process_time() - t0)
        for label, z in zs.items():
            size[label] = out[label] + len(z.flush())
    ref = size["level 6"]
    return [
        {"space": space, "zlib": label, "bytes": size[label], "mb": size[label] / 1e6,
         "vs_level6": size[label] / ref - 1.0,
         "zlib_us_per_batch": sum(best[label]) / len(recs) * 1e6}
        for label, _, _ in ZLIB_GRID
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--level", type=int, default=6, help="zlib level")
    ap.add_argument("--strategy", choices=sorted(STRATEGIES), default=next(
        k for k, v in STRATEGIES.items() if v == DEFAULT_STRATEGY), help="zlib strategy")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--data", type=Path, default=DATA,
                    help="folder of recordings (*.npz); default: the in-repo subset")
    ap.add_argument("--zlib-grid", action="store_true",
                    help="compare zlib settings on the default encoding instead")
    args = ap.parse_args(argv)
    n = int(args.minutes * 60 * FPS)
    if args.zlib_grid:
        grid = [r for space, key in (("image", "landmarks"), ("world", "world"))
                for r in zlib_grid(space, build_session(key, n, args.data)[0])]
        if args.json:
            json.dump({"minutes": args.minutes, "rows": grid}, sys.stdout, indent=2)
            print()
            return 0
        print(f"{args.minutes:g} min, default encoding, zlib window 2**{replay_mod.ZLIB_WBITS}"
              f" memLevel {replay_mod.ZLIB_MEMLEVEL}; body bytes; zlib CPU per 1-s batch")
        print("| space | zlib | size/MB | vs level 6 | zlib us/batch |")
        print("|---|---|---:|---:|---:|")
        for r in grid:
            print(f"| {r['space']} | {r['zlib']} | {r['mb']:.3f} | {r['vs_level6']:+.1%} "
                  f"| {r['zlib_us_per_batch']:.0f} |")
        return 0
    rows: list[dict[str, Any]] = []
    info = {}
    for space, key in (("image", "landmarks"), ("world", "world")):
        frames, seams, one_pass = build_session(key, n, args.data)
        nan_rows = int(np.isnan(frames).all(axis=(1, 2)).sum())
        info[space] = {
            "frames": n,
            "seams": seams,
            "pass": one_pass,
            "nan_rows": nan_rows,
            "jitter_median": jitter(key, args.data),
        }
        rows += measure(space, frames, min(one_pass, n), args.level, STRATEGIES[args.strategy])
    if args.json:
        json.dump({"session": info, "level": args.level, "strategy": args.strategy,
                   "rows": rows}, sys.stdout, indent=2)
        print()
        return 0
    i = info["image"]
    print(
        f"{args.minutes:g} min @ {FPS} fps = {n} frames; one pass = {i['pass']} frames; "
        f"{i['seams']} clip seams, "
        f"{i['nan_rows']} no-pose frames; raw float32 landmarks {n * 528 / 1e6:.1f} MB; "
        f"zlib strategy {args.strategy}"
        f"{f' level {args.level}' if args.strategy == 'default' else ''}; 1-s batches"
    )
    for space in ("image", "world"):
        j = ", ".join(f"{v:.2g}" for v in info[space]["jitter_median"])
        print(f"{space}: median |x - 5-frame mean| per channel (x, y, z, vis) = {j}")
    print()
    print("| space | encoding | size/MB | unique/MB | x raw f32 | max err xyz | max err vis "
          "| encode s (us/batch) | decode s |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        err = (
            ("0 (bit-exact)", "0 (bit-exact)") if r["bit_exact"]
            else (f"{r['max_err_xyz']:.4g}", f"{r['max_err_vis']:.4g}")
        )  # fmt: skip
        print(
            f"| {r['space']} | {r['encoding']} | {r['mb']:.2f} | {r['unique_mb']:.2f} "
            f"| {r['ratio']:.1f} | {err[0]} | {err[1]} "
            f"| {r['encode_s']:.2f} ({r['encode_us_per_batch']:.0f}) | {r['decode_s']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
