"""The last repetition: a session that ends as (or just after) its last repetition does.

``finish()`` decides the excursion in progress with the mid-stream rules applied
to the last pose seen, as if the patient had stopped there: back at the top (or
past the way-back threshold) counts, stopped at the bottom does not. These
sessions are cut from clean synthetic ones, so that what decides the count is
where the stream ends, not tracking trouble.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from actors.reps import PROFILES, RepEngine
from actors.reps.angles import JOINTS, triplet_angles
from bench.eval_reps import estimate_aspect
from telemetry.dev.synthetic import generate
from tests.data import PUSHUP

# tracking without drop-outs, glitches or lost frames; jitter as usual
CLEAN = {"lead_out": False, "vis_drops": 0.0, "glitches": 0.0, "missing": 0.0, "dropped": 0.0}
KINDS = ("squat", "lunge", "sit_to_stand", "push_up", "bicep_curl", "lateral_raise",
         "shoulder_press")
SEEDS = range(6)


def _count(kind: str, space: str, aspect: float, t: np.ndarray, frames: np.ndarray,
           batch: int = 30) -> list[dict]:
    eng = RepEngine(kind, space=space, aspect=aspect)
    reps = []
    for i in range(0, len(t), batch):
        reps += eng.feed(t[i:i + batch], frames[i:i + batch])
    reps += eng.finish()
    # nothing is dated after the stream (two sides' times are averaged: float rounding)
    assert all(r.end_ms <= t[-1] + 1e-6 for r in reps)
    return [r.to_dict() for r in reps]


def _last_rep(s, kind: str) -> tuple[np.ndarray, int, int, int]:
    """The profile angle (direction-adjusted, mean of both sides) and the last rep's
    start, deepest and end frames."""
    prof = PROFILES[kind]
    ang, _ = triplet_angles(s.frames, np.array(JOINTS[prof.joint]), s.space, s.aspect)
    x = prof.direction * ang.mean(axis=1)
    a, b = s.rep_spans_ms[-1]
    i0, i1 = int(np.searchsorted(s.t_ms, a)), int(np.searchsorted(s.t_ms, b))
    return x, i0, i0 + int(np.argmax(x[i0:i1 + 1])), i1


def _back(s, kind: str, q: float) -> int:
    """First frame of the last rep's return that is ``q`` of the way back to its start."""
    x, i0, ip, i1 = _last_rep(s, kind)
    hit = x[ip:i1 + 1] <= x[ip] - q * (x[ip] - x[i0])
    return ip + int(np.argmax(hit)) if hit.any() else i1


def _session(kind: str, space: str, seed: int):
    s = generate(kind, reps=3, seed=seed, space=space, mode="both", **CLEAN)
    whole = _count(kind, space, s.aspect, s.t_ms, s.frames)
    assert len(whole) == s.true_reps == 3, (kind, space, seed)  # the reference is right
    return s


def _snapped(s, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Back up the last 40% in one frame (a quick stand-up), and the stream stops there."""
    j = _back(s, kind, 0.6)
    _, _, _, i1 = _last_rep(s, kind)
    dt = float(np.median(np.diff(s.t_ms)))
    return (np.append(s.t_ms[:j], s.t_ms[j - 1] + dt),
            np.concatenate([s.frames[:j], s.frames[i1:i1 + 1]]))


@pytest.mark.parametrize("space", ["image", "world"])
@pytest.mark.parametrize("kind", KINDS)
def test_stopping_at_the_top_right_after_the_last_rep_counts_it(kind, space):
    for seed in SEEDS:
        s = _session(kind, space, seed)
        t, f = _snapped(s, kind)
        assert len(_count(kind, space, s.aspect, t, f)) == 3, seed
        # the end call right as the natural return arrives: no frame at rest to spare
        j = _back(s, kind, 1.0) + 1
        assert len(_count(kind, space, s.aspect, s.t_ms[:j], s.frames[:j])) == 3, seed


@pytest.mark.parametrize("space", ["image", "world"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_session_ending_mid_return_is_decided_like_mid_stream(kind, space):
    for seed in SEEDS:
        s = _session(kind, space, seed)
        # most of the way back: past the point where mid-stream it is on its way home
        j = _back(s, kind, 0.8) + 1
        assert len(_count(kind, space, s.aspect, s.t_ms[:j], s.frames[:j])) == 3, seed
        # still near the bottom: never a repetition, mid-stream or at the end
        j = _back(s, kind, 0.25) + 1
        assert len(_count(kind, space, s.aspect, s.t_ms[:j], s.frames[:j])) == 2, seed


@pytest.mark.parametrize("space", ["image", "world"])
def test_the_last_rep_does_not_depend_on_batching(space):
    for kind in ("squat", "push_up", "sit_to_stand"):
        s = _session(kind, space, 2)
        j = _back(s, kind, 0.8) + 1
        for t, f in (_snapped(s, kind), (s.t_ms[:j], s.frames[:j])):
            ref = _count(kind, space, s.aspect, t, f, batch=10 ** 9)
            assert len(ref) == 3
            for batch in (1, 2, 7, 29, 30, 31):
                assert _count(kind, space, s.aspect, t, f, batch=batch) == ref, (kind, batch)


@pytest.mark.parametrize("space", ["image", "world"])
def test_real_clips_cut_as_the_last_push_up_lands_keep_it(space):
    """Real clips cut just before the engine's own end of the last rep (it is taken
    on the smoothed angle, so the raw angle is already back by then)."""
    labels = json.loads((PUSHUP / "labels.json").read_text())
    lost = []
    for name in sorted(labels):
        d = np.load(PUSHUP / f"{name}.npz")
        frames = d["world"] if space == "world" else d["landmarks"]
        aspect = estimate_aspect(d["landmarks"], d["world"]) if space == "image" else 1.0
        t = d["t_ms"].astype(np.float64)
        whole = _count("push_up", space, aspect, t, frames)
        if not whole:
            continue
        keep = t <= whole[-1]["end_ms"] - 50.0
        if len(_count("push_up", space, aspect, t[keep], frames[keep])) != len(whole):
            lost.append(name)
    assert not lost
