"""Real MediaPipe Pose recordings of push-ups with hand-counted repetitions.

The clips are a labelled subset kept in the repository (``tests/data/pose/pushup``,
provenance in its ``SOURCE.md``). They are a check on realism, not a training set:
nothing in the engine is fitted to them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from actors.reps import RepEngine
from bench.eval_reps import estimate_aspect, eval_lower_body
from tests.data import LOWER_BODY, PUSHUP


def _clips() -> dict:
    if not (PUSHUP / "labels.json").is_file():
        pytest.fail(f"real pose data not found: expected {PUSHUP}/labels.json and the clips "
                    f"(*.npz) next to it; see {PUSHUP}/SOURCE.md")
    labels = json.loads((PUSHUP / "labels.json").read_text())
    missing = sorted(n for n in labels if not (PUSHUP / f"{n}.npz").is_file())
    assert not missing, f"labelled clips missing from {PUSHUP}: {missing}"
    return labels


def _count(name: str, space: str) -> tuple[int, list]:
    d = np.load(PUSHUP / f"{name}.npz")
    frames = d["world"] if space == "world" else d["landmarks"]
    aspect = estimate_aspect(d["landmarks"], d["world"]) if space == "image" else 1.0
    eng = RepEngine("push_up", space=space, aspect=aspect)
    t = d["t_ms"].astype(np.float64)
    reps = []
    for i in range(0, len(t), 30):
        reps += eng.feed(t[i:i + 30], frames[i:i + 30])
    reps += eng.finish()
    return len(reps), reps


@pytest.mark.parametrize("space", ["world", "image"])
def test_real_pushup_counts(space):
    labels = _clips()
    # the in-repo subset: 21 of the 83 clips, every one labelled (see SOURCE.md)
    assert len(labels) >= 20
    errors, truths, roms = [], [], []
    for name, lab in sorted(labels.items()):
        n, reps = _count(name, space)
        errors.append(n - lab["reps"])
        truths.append(lab["reps"])
        roms += [r.rom_deg for r in reps]
    err = np.abs(errors)
    exact, off1 = np.mean(err == 0), np.mean(err <= 1)
    nmae = np.mean(err / np.array(truths))
    detail = f"exact {exact:.3f}, off-by-one {off1:.3f}, nMAE {nmae:.3f}"
    assert exact >= 0.93, detail
    assert off1 >= 0.97, detail
    assert nmae <= 0.05, detail
    # push-up elbow excursions: the labels left out clips under 45 degrees
    assert 40.0 <= np.median(roms) <= 120.0, np.median(roms)


def test_real_multi_rep_clip_metrics():
    labels = _clips()
    name = max(labels, key=lambda k: labels[k]["reps"])  # the longest set
    n, reps = _count(name, "world")
    assert n == labels[name]["reps"]
    starts = [r.start_ms for r in reps]
    assert starts == sorted(starts)
    assert all(r.end_ms <= s for r, s in zip(reps, starts[1:], strict=False))
    assert all(0.0 <= r.confidence <= 1.0 for r in reps)
    assert np.mean([r.confidence for r in reps]) > 0.5


def test_aspect_estimate_is_a_real_frame_shape():
    labels = _clips()
    for name in sorted(labels)[:10]:
        d = np.load(PUSHUP / f"{name}.npz")
        assert 0.4 < estimate_aspect(d["landmarks"], d["world"]) < 2.5, name


# Floors for the real lower-body set (tests/data/pose/lower_body, see its SOURCE.md):
# the figures the engine reaches today, per exercise and space, so a regression
# fails. (exact, off-by-one, nMAE). Raise them as the engine improves.
LOWER_BODY_FLOOR = {
    ("squat", "image"): (1.0, 1.0, 0.0), ("squat", "world"): (1.0, 1.0, 0.0),
    ("lunge", "image"): (1.0, 1.0, 0.0), ("lunge", "world"): (1.0, 1.0, 0.0),
}


def test_lower_body_set_is_complete():
    labels = json.loads((LOWER_BODY / "labels.json").read_text())
    for name, lab in labels.items():
        d = np.load(LOWER_BODY / f"{name}.npz")
        assert d["landmarks"].shape == d["world"].shape == (lab["frames"], 33, 4), name
        assert d["t_ms"].shape == (lab["frames"],) and abs(float(d["fps"]) - lab["fps"]) < 1e-3
    # what the set is for: squats facing the camera, and both lower-body kinds
    assert {lab["view"] for lab in labels.values() if lab["exercise"] == "squat"} >= {"front"}
    assert {lab["exercise"] for lab in labels.values()} == {"squat", "lunge"}


@pytest.mark.parametrize("space", ["image", "world"])
def test_real_lower_body_counts(space):
    results = eval_lower_body(space, 30)
    assert set(results) == {kind for kind, sp in LOWER_BODY_FLOOR if sp == space}
    for kind, (tally, misses) in results.items():
        _, exact, off1, nmae, _, _ = tally.row()
        floor_exact, floor_off1, ceil_nmae = LOWER_BODY_FLOOR[(kind, space)]
        detail = f"{kind} {space}: exact {exact:.3f}, off-by-one {off1:.3f}, nMAE {nmae:.3f}; " \
                 f"miscounted {misses}"
        assert exact >= floor_exact, detail
        assert off1 >= floor_off1, detail
        assert nmae <= ceil_nmae + 1e-9, detail

