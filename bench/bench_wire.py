"""Pose batch wire formats v1 and v2 on the real clips: bytes per batch and decode CPU.

Every 30-frame batch of every clip in ``tests/data/pose`` (normalised image landmarks and
world landmarks) is encoded as v1 and v2; then each list of bodies is decoded
``--rounds`` times with :func:`domain.pose_batch.decode_batch`, v1 and v2 interleaved in
the same run, timed with ``time.process_time`` (CPU, not wall: resists a busy host).

    PYTHONPATH=$PWD .venv/bin/python -m bench.bench_wire [--rounds 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.pose_batch import decode_batch, encode_batch, encode_batch_v2  # noqa: E402
from tests.data import LOWER_BODY, PUSHUP  # noqa: E402

BATCH = 30


def bodies(key: str) -> tuple[list[bytes], list[bytes]]:
    """v1 and v2 bodies of every full 30-frame batch of every clip."""
    one, two = [], []
    space = "world" if key == "world" else "image"
    for path in sorted(PUSHUP.glob("*.npz")) + sorted(LOWER_BODY.glob("*.npz")):
        d = np.load(path)
        t = np.rint(d["t_ms"]).astype(np.int64)
        for s in range(0, len(t) - BATCH + 1, BATCH):
            args = (len(one), t[s:s + BATCH], d[key][s:s + BATCH])
            one.append(encode_batch(*args, space=space, image_width=640, image_height=480))
            two.append(encode_batch_v2(*args, space=space, image_width=640, image_height=480))
    return one, two


def decode_us(batch_bodies: list[bytes]) -> float:
    t0 = time.process_time()
    for b in batch_bodies:
        decode_batch(b, max_frames=120)
    return (time.process_time() - t0) / len(batch_bodies) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    print(f"{'space':6} {'batches':>7} {'v1 B':>7} {'v2 B mean':>9} {'p50':>6} {'max':>6} "
          f"{'ratio':>6} {'v1 dec µs':>9} {'v2 dec µs':>9}")
    for key in ("landmarks", "world"):
        one, two = bodies(key)
        s1, s2 = np.array([len(b) for b in one]), np.array([len(b) for b in two])
        t1, t2 = [], []
        for _ in range(args.rounds):  # interleaved, the minimum of each
            t1.append(decode_us(one))
            t2.append(decode_us(two))
        print(f"{key[:6]:6} {len(one):7d} {s1.mean():7.0f} {s2.mean():9.0f} "
              f"{np.median(s2):6.0f} {s2.max():6d} {s1.mean() / s2.mean():6.2f} "
              f"{min(t1):9.1f} {min(t2):9.1f}")
        hour = 3600 * 1000 / 1000  # one batch a second
        print(f"       per session-hour: v1 {s1.mean() * hour / 1e6:.1f} MB, "
              f"v2 {s2.mean() * hour / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
