"""Data the tests and benchmarks read, kept in the repository so a fresh clone needs
nothing beside it. Provenance of each set: the ``SOURCE.md`` next to it."""

from __future__ import annotations

from pathlib import Path

# Real MediaPipe Pose push-up clips (a labelled subset; see pose/pushup/SOURCE.md).
PUSHUP = Path(__file__).resolve().parent / "pose" / "pushup"

# Real MediaPipe Pose squats and lunges, front, side and rear views, hand-counted on
# angle plots (see pose/lower_body/SOURCE.md).
LOWER_BODY = Path(__file__).resolve().parent / "pose" / "lower_body"
