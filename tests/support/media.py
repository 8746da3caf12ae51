"""Test media for the browser tests: a WebM video made by Debian's ``ffmpeg``, and the
real pose recordings kept in ``tests/data/pose/pushup``."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.data import PUSHUP

RECORDINGS = PUSHUP


def make_video(path: Path, *, seconds: float, width: int = 320, height: int = 240) -> Path:
    """A real VP8/WebM video made by ffmpeg: a moving test pattern, no audio."""
    cmd = [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
        "-i", f"testsrc2=size={width}x{height}:rate=30:duration={seconds}",
        "-c:v", "libvpx", "-b:v", "300k", "-g", "30", "-deadline", "realtime", "-cpu-used", "8",
        "-an", "-f", "webm", str(path),
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    if done.returncode != 0 or not path.is_file():
        raise AssertionError(f"ffmpeg could not make the test video: {done.stderr.decode()[-800:]}")
    return path


@dataclass(frozen=True)
class Recording:
    """Real MediaPipe Pose recordings played back to back: ``frames`` float32 (N, 33, 4)
    in normalised image space, all-NaN rows where no pose was found."""

    names: tuple[str, ...]
    frames: np.ndarray
    reps: int

    @property
    def no_pose(self) -> int:
        return int(np.isnan(self.frames).all(axis=(1, 2)).sum())

    def json(self) -> str:
        """The page's frames file. ``float(np.float32)`` is exact in a double and JSON
        round-trips doubles, so the page gets the very float32 values back."""
        rows: list[list[float] | None] = []
        for f in self.frames:
            rows.append(None if np.isnan(f).all() else [float(v) for v in f.reshape(-1)])
        return json.dumps({"fps": 30, "names": list(self.names), "frames": rows})

    def cycled(self, n: int) -> np.ndarray:
        """The first ``n`` frames of the recording played in a loop."""
        return self.frames[np.arange(n) % len(self.frames)]


def load_recording(names: Sequence[str]) -> Recording:
    labels = json.loads((RECORDINGS / "labels.json").read_text())
    parts = [np.load(RECORDINGS / f"{n}.npz")["landmarks"].astype(np.float32) for n in names]
    return Recording(tuple(names), np.concatenate(parts), sum(labels[n]["reps"] for n in names))
