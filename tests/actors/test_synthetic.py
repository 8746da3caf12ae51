"""The synthetic session generator used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from actors.reps.angles import JOINTS
from actors.reps.profiles import PROFILES
from telemetry.dev.synthetic import KINDS, generate

CLEAN = dict(noise=0.0, vis_drops=0.0, glitches=0.0, missing=0.0, dropped=0.0)


def _angle(frames: np.ndarray, tri: tuple[int, int, int], scale: np.ndarray) -> np.ndarray:
    p = frames[..., : scale.size].astype(np.float64) * scale
    u, v = p[:, tri[0]] - p[:, tri[1]], p[:, tri[2]] - p[:, tri[1]]
    cos = (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("space", ["image", "world"])
def test_shapes_types_and_ground_truth(kind, space):
    s = generate(kind, reps=5, seed=1, space=space)
    n = len(s.t_ms)
    assert s.kind == kind and s.space == space
    assert s.t_ms.dtype == np.float64 and s.t_ms.shape == (n,)
    assert s.frames.dtype == np.float32 and s.frames.shape == (n, 33, 4)
    assert np.all(np.diff(s.t_ms) > 0)
    assert s.true_reps == 5 == len(s.true_rom_deg) == len(s.rep_spans_ms) == len(s.rep_sides)
    assert all(a < b for a, b in s.rep_spans_ms)
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(s.rep_spans_ms, s.rep_spans_ms[1:],
                                                   strict=False))
    assert s.t_ms[0] <= s.rep_spans_ms[0][0] and s.rep_spans_ms[-1][1] <= s.t_ms[-1] + 100
    assert all(r > 5.0 for r in s.true_rom_deg)
    finite = np.isfinite(s.frames).all(axis=(1, 2))
    nan_rows = np.isnan(s.frames).all(axis=(1, 2))
    assert np.all(finite | nan_rows)  # a frame is either complete or NaN throughout
    vis = s.frames[finite][..., 3]
    assert vis.min() >= 0.0 and vis.max() <= 1.0
    if space == "world":
        hips = (s.frames[finite][:, 23, :3] + s.frames[finite][:, 24, :3]) / 2
        assert np.median(np.abs(hips)) < 0.02  # hip-centred like MediaPipe world landmarks
    assert s.aspect > 0


def test_seed_determinism():
    a = generate("squat", reps=4, seed=5)
    b = generate("squat", reps=4, seed=5)
    c = generate("squat", reps=4, seed=6)
    assert np.array_equal(a.t_ms, b.t_ms)
    assert np.array_equal(a.frames, b.frames, equal_nan=True)
    assert a.true_rom_deg == b.true_rom_deg
    assert len(a.t_ms) != len(c.t_ms) or not np.array_equal(a.frames, c.frames, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
def test_true_rom_matches_the_clean_landmarks(kind):
    s = generate(kind, reps=4, seed=2, space="world", **CLEAN)
    prof = PROFILES[kind]
    for (a, b), sides, true in zip(s.rep_spans_ms, s.true_rom_sides_deg, s.true_rom_deg,
                                   strict=True):
        sl = (s.t_ms >= a) & (s.t_ms <= b)
        measured = []
        for side, t_side in zip((0, 1), sides, strict=True):
            if t_side is None:
                continue
            ang = _angle(s.frames[sl], JOINTS[prof.joint][side], np.ones(3))
            measured.append(np.max(prof.direction * (ang - ang[0])))
            assert measured[-1] == pytest.approx(t_side, abs=0.05)
        assert np.mean(measured) == pytest.approx(true, abs=0.05)


def test_image_truth_uses_the_aspect_ratio():
    s = generate("lateral_raise", reps=3, seed=4, space="image", mode="both", **CLEAN)
    scale = np.array([s.aspect, 1.0])
    (a, b), sides = s.rep_spans_ms[0], s.true_rom_sides_deg[0]
    sl = (s.t_ms >= a) & (s.t_ms <= b)
    ang = _angle(s.frames[sl], JOINTS["shoulder"][0], scale)
    assert np.max(ang - ang[0]) == pytest.approx(sides[0], abs=0.05)


def test_degradations_are_present_by_default_and_can_be_switched_off():
    s = generate("bicep_curl", reps=12, seed=3)
    gaps = np.diff(s.t_ms)
    assert np.isnan(s.frames).all(axis=(1, 2)).any()  # frames without a pose
    assert gaps.max() > 1.5 * np.median(gaps)  # dropped frames
    assert (s.frames[..., 3] < 0.5).any()  # low visibility somewhere
    c = generate("bicep_curl", reps=12, seed=3, **CLEAN)
    assert not np.isnan(c.frames).any()
    assert np.diff(c.t_ms).max() < 1.5 * np.median(np.diff(c.t_ms))


def test_partial_reps_and_pauses_are_extra_to_the_count():
    s = generate("squat", reps=6, seed=1, partial_prob=1.0, pause_prob=1.0)
    assert s.true_reps == 6 and s.partial_reps == 6
    spans = np.array(s.rep_spans_ms)
    assert np.all(spans[1:, 0] - spans[:-1, 1] >= 3000.0)  # every rep after a pause


def test_modes_choose_the_working_side():
    s = generate("bicep_curl", reps=6, seed=2, mode="alternate")
    assert s.rep_sides == ["left", "right"] * 3
    s = generate("hip_abduction", reps=6, seed=2, mode="blocks")
    assert s.rep_sides == ["left"] * 3 + ["right"] * 3
    s = generate("shoulder_flexion", reps=2, seed=2, mode="right")
    assert s.yaw_deg <= 0  # the working side faces the camera


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate("jumping_jack", reps=3, seed=0)
    with pytest.raises(ValueError):
        generate("squat", reps=-1, seed=0)
    with pytest.raises(ValueError):
        generate("squat", reps=3, seed=0, space="pixels")
    with pytest.raises(ValueError):
        generate("squat", reps=3, seed=0, mode="sideways")


def test_a_minute_of_session_is_cheap():
    # the demo streams simulated patients; best of 5 to ride out a busy machine
    best = float("inf")
    for seed in range(5):
        t0 = time.perf_counter()
        s = generate("squat", reps=22, seed=seed)
        best = min(best, (time.perf_counter() - t0) / s.duration_s * 60.0)
    assert best < 0.1, f"{best * 1e3:.1f} ms per 60 s"
