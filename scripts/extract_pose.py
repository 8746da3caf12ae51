#!/usr/bin/env python3
"""extract-pose: turn a video into a MediaPipe Pose landmark clip (``.npz``).

Writes the same format as the real push-up clips in ``tests/data/pose/pushup``
(see its ``SOURCE.md``), so every reader of those (``bench.eval_reps``,
``tests/actors/test_reps_real.py``) reads these too:

- ``landmarks``: float32 ``(T, 33, 4)``, normalised image x, y, z and visibility;
- ``world``: float32 ``(T, 33, 4)``, world x, y, z in metres (hip-centred) and
  visibility;
- ``t_ms``: float32 ``(T,)``, frame time in ms since the first kept frame;
- ``fps``: float32 scalar, the rate of the kept frames.

A frame where no pose was detected is NaN throughout.

The pose model is MediaPipe's legacy ``solutions.pose`` with ``model_complexity=1``
and ``smooth_landmarks=True`` -- the settings the push-up clips were made with.
That model ships inside the ``mediapipe`` wheel, so nothing is downloaded when
this runs (complexities 0 and 2 would fetch a model at run time; they are not
offered).

MediaPipe is not a dependency of the service, so this runs in a separate
virtualenv, never the project's ``.venv``::

    python3 -m venv /tmp/mpenv
    /tmp/mpenv/bin/pip install mediapipe==0.10.14 opencv-python-headless matplotlib
    /tmp/mpenv/bin/python scripts/extract_pose.py VIDEO OUT.npz \\
        [--start S] [--end S] [--stride N] [--half] [--plot OUT.png]

``--start``/``--end`` keep a time window of the video (seconds) and ``--stride``
keeps every N-th frame (for example 60 fps -> 30 fps); pose tracking then runs on
the kept frames only, as a slower camera would deliver them. ``--half`` rounds the
values to float16 precision, still stored as float32 so readers see the same
format, which halves the compressed file. ``--plot`` draws both knee angles and
the hip height over time -- what the repetitions in ``tests/data/pose/lower_body/labels.json`` were
counted on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# MediaPipe Pose landmark indices (hip, knee, ankle; left then right)
L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 23, 24, 25, 26, 27, 28


def extract(video: Path, start_s: float = 0.0, end_s: float | None = None,
            stride: int = 1) -> dict[str, np.ndarray]:
    """Run MediaPipe Pose over the kept frames of ``video`` and return the clip arrays."""
    import cv2  # only in the extraction env
    import mediapipe as mp

    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise SystemExit(f"cannot open {video}")
    fps = float(cap.get(cv2.CAP_PROP_FPS))
    first = int(round(start_s * fps))
    last = int(round(end_s * fps)) if end_s is not None else None
    image, world = [], []
    with mp.solutions.pose.Pose(static_image_mode=False, model_complexity=1,
                                smooth_landmarks=True, enable_segmentation=False,
                                min_detection_confidence=0.5,
                                min_tracking_confidence=0.5) as pose:
        i = -1
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            i += 1
            if i < first or (last is not None and i >= last) or (i - first) % stride:
                continue
            res = pose.process(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            if res.pose_landmarks is None or res.pose_world_landmarks is None:
                image.append(np.full((33, 4), np.nan, np.float32))
                world.append(np.full((33, 4), np.nan, np.float32))
                continue
            image.append(np.array([(p.x, p.y, p.z, p.visibility)
                                   for p in res.pose_landmarks.landmark], np.float32))
            world.append(np.array([(p.x, p.y, p.z, p.visibility)
                                   for p in res.pose_world_landmarks.landmark], np.float32))
    cap.release()
    if not image:
        raise SystemExit(f"no frames kept from {video} (window {start_s}-{end_s} s)")
    out_fps = fps / stride
    n = len(image)
    return {"landmarks": np.stack(image), "world": np.stack(world),
            "t_ms": (np.arange(n) * 1000.0 / out_fps).astype(np.float32),
            "fps": np.float32(round(out_fps, 3))}


def _angle(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Included angle at ``b`` in degrees, per frame (2-D image coordinates)."""
    u, v = a - b, c - b
    cos = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def plot(clip: dict[str, np.ndarray], out: Path, title: str) -> None:
    """Knee angles (both sides) and hip height over time: the labelling view.

    Hip height is the hip midpoint's rise above the ankles in units of the median
    thigh length, so a front view (where the knee angle barely moves) still shows
    each repetition as a dip.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = clip["landmarks"][..., :2].astype(float)
    t = clip["t_ms"] / 1000.0
    kl = _angle(lm[:, L_HIP], lm[:, L_KNEE], lm[:, L_ANKLE])
    kr = _angle(lm[:, R_HIP], lm[:, R_KNEE], lm[:, R_ANKLE])
    hip_y = (lm[:, L_HIP, 1] + lm[:, R_HIP, 1]) / 2
    ankle_y = (lm[:, L_ANKLE, 1] + lm[:, R_ANKLE, 1]) / 2
    thigh = np.nanmedian(np.linalg.norm(lm[:, L_HIP] - lm[:, L_KNEE], axis=-1))
    height = (ankle_y - hip_y) / thigh
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    a1.plot(t, kl, label="left knee")
    a1.plot(t, kr, label="right knee")
    a1.set_ylabel("included knee angle (deg)")
    a1.legend(loc="lower right")
    a1.grid(alpha=0.3)
    a2.plot(t, height, color="k")
    a2.set_ylabel("hip above ankles (thighs)")
    a2.set_xlabel("time (s)")
    a2.grid(alpha=0.3)
    a2.xaxis.set_major_locator(matplotlib.ticker.MultipleLocator(1.0))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("video", type=Path)
    ap.add_argument("out", type=Path, help="the .npz to write")
    ap.add_argument("--start", type=float, default=0.0, help="first second kept")
    ap.add_argument("--end", type=float, default=None, help="end of the kept window (s)")
    ap.add_argument("--stride", type=int, default=1, help="keep every N-th frame")
    ap.add_argument("--plot", type=Path, default=None, help="write the labelling plot here")
    ap.add_argument("--half", action="store_true",
                    help="round landmark values to float16 precision (still stored as float32)")
    args = ap.parse_args(argv)
    clip = extract(args.video, args.start, args.end, max(1, args.stride))
    if args.half:
        # Zeroed low mantissa bits let the compressed file shrink by half; the
        # rounding (under 5e-4 in normalised image units, under 0.5 mm in world
        # space) is far below MediaPipe's own frame-to-frame jitter.
        for key in ("landmarks", "world"):
            clip[key] = clip[key].astype(np.float16).astype(np.float32)
    # compressed: these clips live in the repository, and the format is read with
    # np.load either way
    np.savez_compressed(args.out, **clip)
    missing = int(np.isnan(clip["landmarks"]).all(axis=(1, 2)).sum())
    print(f"{args.out}: {len(clip['t_ms'])} frames at {float(clip['fps']):g} fps, "
          f"{missing} without a pose", file=sys.stderr)
    if args.plot is not None:
        plot(clip, args.plot, args.out.stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
