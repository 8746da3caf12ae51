"""Replay blob size, error and speed per encoding on real MediaPipe output.

    .venv/bin/python -m bench.blob_sizes [--minutes 30] [--level 6] [--json]

Builds a session of ``minutes * 60 * 30`` frames (54,000 for 30 minutes) from
the real push-up recordings in ../shared/data/pose/pushup (MediaPipe Pose
0.10.14 output, image and world space; see that folder's README):

* all clips are concatenated in file-name order (one *pass*, ~8,500
  frames) and passes alternate forward and exactly reversed (ping-pong over
  the whole list), so the turns between passes are seamless.  Every change of
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
* frames are appended in 1-second batches of 30, as the session actor does.

Sizes are 10^6 bytes.  ``max err`` is the largest absolute difference from
the input over finite values, for coordinates (x, y, z) and visibility.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from storage.replay import ReplayWriter, read_replay

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pose" / "pushup"
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


def build_session(key: str, frames: int) -> tuple[np.ndarray, int, int]:
    """(frames, 33, 4) float32 ping-ponged over all clips; also returns the number
    of clip-to-clip seams (jumps between different videos) and one pass' length."""
    files = sorted(DATA.glob("*.npz"))
    if not files:
        raise SystemExit(f"no recordings in {DATA}")
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


def jitter(key: str) -> list[float]:
    """Median |value - centred 5-frame moving average| per channel over every clip:
    a rough scale of MediaPipe's own frame-to-frame noise (plus some real motion),
    to compare quantisation error against."""
    res: list[list[np.ndarray]] = [[] for _ in range(4)]
    kernel = np.ones(5) / 5
    for f in sorted(DATA.glob("*.npz")):
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
    space: str, encoding: str, max_error: Any, t: np.ndarray, frames: np.ndarray, level: int
) -> tuple[bytes, float]:
    w = ReplayWriter(
        org_id="bench-org", session_id="bench-session", space=space, encoding=encoding,
        max_error=max_error, level=level,
    )  # fmt: skip
    start = time.perf_counter()
    for s in range(0, len(t), BATCH):
        w.append(t[s : s + BATCH], frames[s : s + BATCH])
    blob = w.finish()
    return blob, time.perf_counter() - start


def measure(space: str, frames: np.ndarray, unique: int, level: int) -> list[dict[str, Any]]:
    n = len(frames)
    t = session_timestamps(n)
    fin = np.isfinite(frames)
    rows = []
    for label, encoding, max_error in CONFIGS:
        blob, enc_s = encode(space, encoding, max_error, t, frames, level)
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
        ublob, _ = encode(space, encoding, max_error, t[:unique], frames[:unique], level)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--level", type=int, default=6, help="zlib level")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    n = int(args.minutes * 60 * FPS)
    rows: list[dict[str, Any]] = []
    info = {}
    for space, key in (("image", "landmarks"), ("world", "world")):
        frames, seams, one_pass = build_session(key, n)
        nan_rows = int(np.isnan(frames).all(axis=(1, 2)).sum())
        info[space] = {
            "frames": n,
            "seams": seams,
            "pass": one_pass,
            "nan_rows": nan_rows,
            "jitter_median": jitter(key),
        }
        rows += measure(space, frames, min(one_pass, n), args.level)
    if args.json:
        json.dump({"session": info, "level": args.level, "rows": rows}, sys.stdout, indent=2)
        print()
        return 0
    i = info["image"]
    print(
        f"{args.minutes:g} min @ {FPS} fps = {n} frames; one pass = {i['pass']} frames; "
        f"{i['seams']} clip seams, "
        f"{i['nan_rows']} no-pose frames; raw float32 landmarks {n * 528 / 1e6:.1f} MB; "
        f"zlib level {args.level}; 1-s batches"
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
