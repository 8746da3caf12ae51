"""Profiles registry and the angle geometry under the engine."""

from __future__ import annotations

import numpy as np
import pytest

from actors.reps import PROFILES, Profile, profile_for
from actors.reps.angles import JOINTS, batch_features, gather_index, triplet_angles
from actors.reps.profiles import fallback_profiles

REQUIRED = {
    "squat": "knee", "lunge": "knee", "sit_to_stand": "knee", "hip_abduction": "hip",
    "lateral_raise": "shoulder", "shoulder_flexion": "shoulder", "bicep_curl": "elbow",
    "shoulder_press": "elbow", "push_up": "elbow",
}


def test_every_required_exercise_has_a_profile_on_the_right_joint():
    for kind, joint in REQUIRED.items():
        prof = PROFILES[kind]
        assert prof.joint == joint
        assert prof.direction in (-1, 1)
        assert 0 < prof.min_rep_ms < prof.max_rep_ms
        assert prof.rom_prior_deg > 0


def test_directions_match_the_movement():
    # flexion-defined exercises close the angle, raises and extensions open it
    for kind in ("squat", "lunge", "bicep_curl", "push_up", "hip_abduction"):
        assert PROFILES[kind].direction == -1, kind
    for kind in ("sit_to_stand", "lateral_raise", "shoulder_flexion", "shoulder_press"):
        assert PROFILES[kind].direction == 1, kind


@pytest.mark.parametrize("alias,kind", [
    ("push-up", "push_up"), ("Push Ups", "push_up"), ("SQUATS", "squat"),
    ("sit-to-stand", "sit_to_stand"), ("biceps curl", "bicep_curl"), ("front raise",
                                                                      "shoulder_flexion"),
])
def test_profile_for_accepts_aliases(alias, kind):
    assert profile_for(alias) is PROFILES[kind]


@pytest.mark.parametrize("kind", [None, "", "   ", "zumba", 42])
def test_profile_for_unknown_or_missing_is_none(kind):
    assert profile_for(kind) is None


def test_profile_rejects_bad_definitions():
    with pytest.raises(ValueError):
        Profile("x", "wrist", -1, 50.0, 500.0, 9000.0, True, "", "")
    with pytest.raises(ValueError):
        Profile("x", "knee", 0, 50.0, 500.0, 9000.0, True, "", "")
    with pytest.raises(ValueError):
        Profile("x", "knee", 1, 50.0, 900.0, 500.0, True, "", "")


def test_fallback_candidates_cover_every_joint_both_ways():
    cands = fallback_profiles()
    assert {(p.joint, p.direction) for p in cands} == {
        (j, d) for j in JOINTS for d in (-1, 1)}


def _frame(points: dict[int, tuple[float, float, float]], vis: float = 0.99) -> np.ndarray:
    f = np.zeros((1, 33, 4), dtype=np.float32)
    f[..., 3] = vis
    for i, p in points.items():
        f[0, i, :3] = p
    return f


def test_image_angle_uses_the_aspect_ratio():
    # knee at the centre, hip straight above, ankle to the side: a right angle only
    # once x is scaled to square pixels (16:9 frame)
    aspect = 16 / 9
    f = _frame({23: (0.5, 0.3, 0), 25: (0.5, 0.5, 0), 27: (0.5 + 0.2 / aspect, 0.5, 0)})
    tri = np.array([JOINTS["knee"][0]])
    ang, vis = triplet_angles(f, tri, "image", aspect)
    assert ang[0, 0] == pytest.approx(90.0, abs=1e-9)
    assert vis[0, 0] == pytest.approx(0.99, abs=1e-6)
    ang_raw, _ = triplet_angles(f, tri, "image", 1.0)
    assert ang_raw[0, 0] == pytest.approx(90.0, abs=1e-9)  # perpendicular either way
    f2 = _frame({23: (0.4, 0.3, 0), 25: (0.5, 0.5, 0), 27: (0.7, 0.5, 0)})
    a1, _ = triplet_angles(f2, tri, "image", 1.0)
    a2, _ = triplet_angles(f2, tri, "image", aspect)
    assert a1[0, 0] != pytest.approx(a2[0, 0], abs=1.0)
    u = np.array([-0.1 * aspect, -0.2])
    v = np.array([0.2 * aspect, 0.0])
    expect = np.degrees(np.arccos(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
    assert a2[0, 0] == pytest.approx(expect, abs=1e-9)


def test_world_angle_is_three_dimensional_and_ignores_z_in_image_space():
    f = _frame({11: (0.0, -0.3, 0.0), 13: (0.0, 0.0, 0.0), 15: (0.0, 0.0, 0.25)})
    tri = np.array([JOINTS["elbow"][0]])
    ang, _ = triplet_angles(f, tri, "world", 1.0)
    assert ang[0, 0] == pytest.approx(90.0, abs=1e-9)
    ang2d, _ = triplet_angles(f, tri, "image", 1.0)  # forearm along z: degenerate in 2-D
    assert ang2d[0, 0] == pytest.approx(0.0, abs=1e-9)


def test_missing_landmarks_give_nan_not_errors():
    f = np.full((3, 33, 4), np.nan, dtype=np.float32)
    ang, vis = triplet_angles(f, np.array(JOINTS["knee"]), "image", 1.0)
    assert np.isnan(ang).all() and np.isnan(vis).all()


def test_trunk_inclination_upright_lying_and_upside_down():
    up = _frame({11: (0.45, 0.3, 0), 12: (0.55, 0.3, 0), 23: (0.47, 0.6, 0), 24: (0.53, 0.6, 0)})
    lying = _frame({11: (0.3, 0.5, 0), 12: (0.3, 0.5, 0), 23: (0.7, 0.52, 0), 24: (0.7, 0.52, 0)})
    inverted = _frame({11: (0.5, 0.6, 0), 12: (0.5, 0.6, 0), 23: (0.5, 0.4, 0), 24: (0.5, 0.4, 0)})
    idx = gather_index(np.empty((0, 3)))
    res = [batch_features(f, idx, 0, "image", 1.0)[2][0] for f in (up, lying, inverted)]
    assert res[0] == pytest.approx(0.0, abs=1e-4)  # float32 landmarks
    assert 85.0 < res[1] < 95.0
    assert res[2] == pytest.approx(180.0, abs=1e-4)


def test_batch_features_do_not_depend_on_batching():
    rng = np.random.default_rng(0)
    frames = rng.random((97, 33, 4)).astype(np.float32)
    frames[10] = np.nan
    tri = np.array([JOINTS[j][s] for j in JOINTS for s in (0, 1)])
    idx = gather_index(tri)
    for space in ("image", "world"):
        whole = batch_features(frames, idx, len(tri), space, 1.3)
        parts = [batch_features(frames[i:i + 7], idx, len(tri), space, 1.3)
                 for i in range(0, 97, 7)]
        for k in range(3):
            joined = np.concatenate([p[k] for p in parts])
            assert np.array_equal(whole[k], joined, equal_nan=True)
