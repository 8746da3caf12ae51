"""Running tracking-quality statistics of a pose stream, in O(1) state.

Fed batches in timeline order, one or several consecutive ones per call (the same
result either way); never keeps frames. "Gap" means a hole
in the frame timeline longer than :data:`GAP_FACTOR` nominal frame intervals, whether
the frames were lost in transit (a skipped batch) or never sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NOMINAL_FPS = 30.0
GAP_FACTOR = 3.0


@dataclass
class PoseStats:
    """Counts of one session's pose stream so far (see the module docstring);
    :meth:`to_dict` is the form the session summary carries."""

    frames: int = 0
    frames_no_pose: int = 0
    batches: int = 0
    gaps: int = 0
    first_t: int | None = None
    last_t: int | None = None
    _vis_sum: float = 0.0
    _vis_n: int = 0

    def add(self, t_ms: np.ndarray, frames: np.ndarray,
            sizes: Sequence[int] | None = None) -> None:
        """Count one batch, or with ``sizes`` (frame counts summing to ``len(t_ms)``)
        several consecutive batches concatenated: the result is bit-for-bit what
        one call per batch gives (the session actor applies batches in chunks,
        ``docs/rep-engine.md``). Frames must come in timeline order across calls."""
        n = len(t_ms)
        if sizes is None:
            sizes = (n,)
        no_pose = np.isnan(frames[:, 0, 0])
        self.batches += len(sizes)
        self.frames += n
        n_no_pose = int(np.count_nonzero(no_pose))
        self.frames_no_pose += n_no_pose
        # (m, 33) C-contiguous either way, so the sums below add in the same order
        # as np.mean(axis=1) did, without its Python overhead. np.mean divides the
        # float32 sums in float64 and rounds to float32; dividing in float32 gives
        # the same bits (a correctly rounded float64 quotient rounded to float32 is
        # the correctly rounded float32 quotient: 53 >= 2 * 24 + 2).
        vis = frames[~no_pose, :, 3] if n_no_pose else np.ascontiguousarray(frames[:, :, 3])
        if vis.size:
            # row sums do not depend on how many rows there are; the sum over frames
            # is taken per batch, as it always was (pairwise summation over a longer
            # run would round differently)
            per_frame = np.add.reduce(vis, axis=1)
            np.true_divide(per_frame, vis.shape[1], out=per_frame)
            if len(sizes) == 1:
                self._vis_sum += float(np.add.reduce(per_frame))
            else:
                kept = np.cumsum(~no_pose) if n_no_pose else None
                start = end = 0
                for size in sizes:
                    end += size
                    a, b = (start, end) if kept is None else (
                        int(kept[start - 1]) if start else 0, int(kept[end - 1]))
                    if b > a:
                        self._vis_sum += float(np.add.reduce(per_frame[a:b]))
                    start = end
            self._vis_n += int(vis.shape[0])
        t = t_ms.astype(np.int64)
        limit = GAP_FACTOR * 1000.0 / NOMINAL_FPS
        self.gaps += int(np.count_nonzero(t[1:] - t[:-1] > limit))
        if self.last_t is not None and t[0] - self.last_t > limit:
            self.gaps += 1
        if self.first_t is None:
            self.first_t = int(t[0])
        self.last_t = int(t[-1])

    @property
    def duration_ms(self) -> int:
        if self.first_t is None or self.last_t is None:
            return 0
        return self.last_t - self.first_t

    def to_dict(self) -> dict[str, Any]:
        dur = self.duration_ms
        return {
            "frames": self.frames,
            "frames_no_pose": self.frames_no_pose,
            "batches": self.batches,
            "gaps": self.gaps,
            "duration_ms": dur,
            # n frames span n-1 intervals
            "effective_fps": round((self.frames - 1) * 1000.0 / dur, 2) if dur > 0 else None,
            "mean_visibility": round(self._vis_sum / self._vis_n, 4) if self._vis_n else None,
        }
