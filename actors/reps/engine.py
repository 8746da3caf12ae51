"""Incremental repetition engine: batches of pose frames in, completed repetitions out."""

from __future__ import annotations

import math
import numbers
from itertools import compress

import numpy as np

from .angles import JOINTS, N_LANDMARKS, SPACES, batch_features, gather_index
from .clinical import CONVENTION, angle_for
from .detector import VIS_MIN
from .hipdrop import FrontView, front_features
from .motion import WalkGate
from .profiles import Profile, fallback_profiles, profile_for
from .rep import Rep, RepLog, build_rep
from .summary import SessionStats
from .tracker import JointTracker

SIDE_CHOICES = {None: (0, 1), "both": (0, 1), "left": (0,), "right": (1,)}

# Fallback selection: lock onto the leading candidate once it has this many
# repetitions and FALLBACK_MARGIN times the summed range of motion of any other
# joint, or once this much stream time has passed and it has at least
# FALLBACK_MIN_REPS. Buffers are capped by FALLBACK_MAX_BUFFER repetitions per
# candidate, so state stays bounded even if no candidate stands out.
FALLBACK_LOCK_REPS = 4
FALLBACK_LOCK_MS = 15000.0
FALLBACK_MIN_REPS = 2
FALLBACK_MAX_BUFFER = 8
FALLBACK_MARGIN = 1.5


class RepEngine:
    """Counts and measures repetitions of one exercise from a live pose stream.

    ``kind`` selects a profile (see ``PROFILES``; aliases such as "push-up" are
    accepted). An unknown or missing kind switches to fallback mode: every
    joint is followed in both directions and the one with the largest periodic
    motion is chosen; its first repetitions are then released together, so in
    that mode repetitions arrive with a delay of a few repetitions (or
    ``FALLBACK_LOCK_MS``). ``summary()["fallback"]`` says so.

    Raises ValueError for an unknown ``side`` or ``space``, a non-positive or
    non-finite ``aspect`` or a negative ``target_reps``.
    """

    def __init__(self, kind: str | None, *, side: str | None = None, space: str = "image",
                 aspect: float = 1.0, target_reps: int | None = None) -> None:
        if side not in SIDE_CHOICES:
            raise ValueError(f"side must be 'left', 'right', 'both' or None, not {side!r}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, not {space!r}")
        if not (isinstance(aspect, numbers.Real) and math.isfinite(aspect) and aspect > 0):
            raise ValueError(f"aspect must be a positive finite number, not {aspect!r}")
        if target_reps is not None and (isinstance(target_reps, bool)
                                        or not isinstance(target_reps, numbers.Integral)
                                        or target_reps < 0):
            raise ValueError(f"target_reps must be a non-negative int or None, not {target_reps!r}")
        self.kind = kind
        self.side = side
        self.space = space
        self.aspect = float(aspect)
        self.target_reps = None if target_reps is None else int(target_reps)
        sides = SIDE_CHOICES[side]
        profile = profile_for(kind)
        self._fallback_reason: str | None = None
        if profile is None:
            self._fallback_reason = ("no exercise kind given" if not kind
                                     else f"unknown exercise kind {kind!r}")
            cands = fallback_profiles()
        else:
            cands = [profile]
        self._trackers = [JointTracker(p, sides, candidate=profile is None) for p in cands]
        self._profile: Profile | None = profile
        self._gate = (WalkGate() if profile is not None and profile.hips_still
                      and space == "image" else None)
        # filmed from the front the knee angle hardly moves (and seated, is degenerate):
        # count on the hip's drop instead
        self._view = (FrontView() if profile is not None and profile.hip_drop
                      and space == "image" else None)
        # one angle column per (joint, side); candidates of the same joint share columns
        joints = list(dict.fromkeys(p.joint for p in cands))
        self._set_columns([(j, s) for j in joints for s in sides])
        self._usable = {j: 0 for j in joints}
        self._buffers: list[list] = [[] for _ in cands]
        self._scores = [0.0] * len(cands)
        self._t0: float | None = None
        self._t_last = -math.inf
        self._frames = 0
        self._stats = SessionStats()
        self._reps = RepLog()
        self._finished = False

    # -- public API -----------------------------------------------------------------------

    @property
    def rep_count(self) -> int:
        """Repetitions emitted so far."""
        return len(self._reps)

    @property
    def fallback(self) -> bool:
        return self._fallback_reason is not None

    def feed(self, t_ms: np.ndarray, frames: np.ndarray) -> list[Rep]:
        """Process a batch; return the repetitions completed by it (possibly none).

        ``t_ms`` (n,) must be finite and strictly increasing, also across calls;
        ``frames`` must be (n, 33, 4). Raises ValueError otherwise (and after
        ``finish``); NaN rows and low-visibility landmarks are not errors, they
        are counted as untracked frames.
        """
        if self._finished:
            raise ValueError("feed() after finish()")
        t = np.asarray(t_ms, dtype=np.float64)
        f = np.asarray(frames)
        if t.ndim != 1 or f.shape != (t.shape[0], N_LANDMARKS, 4):
            raise ValueError(f"expected t_ms (n,) and frames (n, 33, 4), got {t.shape} and "
                             f"{f.shape}")
        n = t.shape[0]
        if n == 0:
            return []
        t_end = float(t[-1])
        # increasing with finite ends implies finite throughout; NaN fails the comparisons
        if not (t[0] > self._t_last and math.isfinite(t_end) and math.isfinite(t[0])
                and (n == 1 or np.count_nonzero(t[1:] > t[:-1]) == n - 1)):
            raise ValueError("t_ms must be finite and strictly increasing across batches")
        if self._t0 is None:
            self._t0 = float(t[0])
        self._t_last = t_end
        self._frames += n
        ang, vis, trunk, hip_x, trunk_len = batch_features(
            f, self._index, len(self._cols), self.space, self.aspect)
        valid = (vis >= VIS_MIN) & (ang == ang)  # NaN angle: landmarks missing
        if self._gate is not None:
            valid &= ~self._gate.moving(t, hip_x, trunk_len)[:, None]
        if len(self._joint_cols) == 1:
            self._usable[self._cols[0][0]] += int(np.count_nonzero(valid.any(axis=1)))
        else:
            for j, cols in self._joint_cols.items():
                self._usable[j] += int(np.count_nonzero(valid[:, cols].any(axis=1)))
        tl, trl = t.tolist(), trunk.tolist()
        # detectors see direction * angle, so that every rep is "rise, then fall back"
        pos = neg = None
        if self._need_pos:
            pos = ang.T.tolist()
        if self._need_neg:
            neg = (-ang).T.tolist()
        viss = vis.T.tolist()
        front = None
        if self._view is not None:  # hip-drop angle per side (direction-adjusted), its weight
            height, seg, hip_w, trunk_len2 = front_features(f, self.aspect, VIS_MIN)
            left, right, w = self._view.update(tl, height.tolist(), seg.tolist(),
                                               hip_w.tolist(), trunk_len2.tolist())
            sign = self._profile.direction
            front = ([sign * d for d in left], [sign * d for d in right]), w
        all_ok = valid.all(axis=0).tolist()
        oks = None if all(all_ok) else valid.T.tolist()
        produced = []
        for tr in self._trackers:
            xs_all = pos if tr.profile.direction > 0 else neg
            per_side = []
            for s in tr.sides:
                k = self._col_of[(tr.profile.joint, s)]
                seqs = (tl, xs_all[k], viss[k], trl)
                if front is not None:
                    seqs += (front[0][s], front[1])
                if all_ok[k]:
                    per_side.append(seqs)
                else:
                    ok = oks[k]
                    per_side.append(tuple(list(compress(seq, ok)) for seq in seqs))
            produced.append(tr.feed(per_side, t_end))
        return self._route(produced, t_end, final=False)

    def finish(self) -> list[Rep]:
        """End of session: flush pending repetitions. Idempotent; later feeds raise."""
        if self._finished:
            return []
        self._finished = True
        t_end = self._t_last if self._t0 is not None else 0.0
        produced = [tr.flush(t_end) for tr in self._trackers]
        return self._route(produced, t_end, final=True)

    def summary(self) -> dict:
        """Per-session metrics as a JSON-serialisable dict (see docs/rep-engine.md)."""
        prof = self._trackers[0].profile if len(self._trackers) == 1 else None
        joint = prof.joint if prof else None
        usable = self._usable.get(joint, 0) if joint else max(self._usable.values(), default=0)
        angle = angle_for(prof) if prof else None
        out = {
            "profile": prof.kind if prof else "auto",
            "kind_requested": self.kind if self.kind is None else str(self.kind),
            "fallback": self.fallback,
            "fallback_reason": self._fallback_reason,
            "joint": joint,
            # the reported angle (rep records, angle_*_deg): clinical.py
            "angle": angle.name if angle else None,
            "angle_label": angle.label if angle else None,
            "angle_convention": CONVENTION,
            "direction": ("flexion" if prof.direction < 0 else "extension") if prof else None,
            "side": self.side or "both",
            "space": self.space,
            "target_reps": self.target_reps,
            "rep_count": self.rep_count,
            "target_completion": (round(self.rep_count / self.target_reps, 3)
                                  if self.target_reps else None),
            "frames": self._frames,
            "tracked_fraction": round(usable / self._frames, 3) if self._frames else 0.0,
        }
        span = self._t_last - self._t0 if self._t0 is not None else 0.0
        out.update(self._stats.as_dict(span))
        out["reps"] = self._reps.dicts()
        return out

    # -- internals ------------------------------------------------------------------------

    def _set_columns(self, cols: list[tuple[str, int]]) -> None:
        """Angle columns computed per batch: one per (joint, side) followed."""
        self._cols = cols
        self._col_of = {c: k for k, c in enumerate(cols)}
        self._index = gather_index(np.array([JOINTS[j][s] for j, s in cols], dtype=np.intp))
        self._joint_cols = {j: [k for k, c in enumerate(cols) if c[0] == j]
                            for j in dict.fromkeys(c[0] for c in cols)}
        self._need_pos = any(tr.profile.direction > 0 for tr in self._trackers)
        self._need_neg = any(tr.profile.direction < 0 for tr in self._trackers)

    def _emit(self, profile: Profile, sides: list) -> Rep:
        rep = build_rep(len(self._reps) + 1, profile, sides)
        self._reps.append(rep)
        self._stats.add(rep)
        return rep

    def _route(self, produced: list[list], t_end: float, final: bool) -> list[Rep]:
        if len(self._trackers) == 1:
            prof = self._trackers[0].profile
            return [self._emit(prof, sides) for _, sides in produced[0]]
        # fallback, not locked yet: replay candidate repetitions in stream-time order, so
        # the choice depends on stream time only, never on where batches were cut
        items = sorted(((t, ci, k, sides) for ci, reps in enumerate(produced)
                        for k, (t, sides) in enumerate(reps)), key=lambda x: x[:3])
        deadline = (self._t0 or 0.0) + FALLBACK_LOCK_MS
        out: list[Rep] = []
        chosen: int | None = None
        for t, ci, _k, sides in items:
            if chosen is None and t > deadline and self._leader_ready(timed=True):
                chosen = self._leader()
                out.extend(self._lock(chosen))
            if chosen is not None:
                if ci == chosen:
                    out.append(self._emit(self._trackers[0].profile, sides))
                continue
            self._buffers[ci].append(sides)
            self._scores[ci] += sum(s.rom_deg for s in sides) / len(sides)
            if self._leader_ready(timed=t >= deadline):
                chosen = self._leader()
                out.extend(self._lock(chosen))
        if chosen is None:
            timed_out = t_end >= deadline and self._leader_ready(timed=True)
            if timed_out or (final and any(self._buffers)):
                out.extend(self._lock(self._leader()))
        return out

    def _leader_ready(self, timed: bool) -> bool:
        lead = self._leader()
        n = len(self._buffers[lead])
        joint = self._trackers[lead].profile.joint
        runner_up = max((sc for i, sc in enumerate(self._scores)
                         if self._trackers[i].profile.joint != joint), default=0.0)
        if n >= FALLBACK_LOCK_REPS and self._scores[lead] >= FALLBACK_MARGIN * runner_up:
            return True
        if timed and n >= FALLBACK_MIN_REPS:
            return True
        return max(len(b) for b in self._buffers) >= FALLBACK_MAX_BUFFER

    def _leader(self) -> int:
        """Candidate with the largest periodic motion so far.

        Per joint, the two directions see nearly the same movements half a cycle
        apart; the right one has the rest position between its repetitions, so
        its repetitions are the shorter ones (the other's span the pauses),
        unless it clearly has fewer. Across joints, the largest summed range of
        motion wins; ties go to list order.
        """
        best: list[int] = []
        for i in range(0, len(self._trackers), 2):
            pair = [j for j in (i, i + 1) if j < len(self._trackers)]
            if len(pair) == 2 and all(self._buffers[j] for j in pair):
                a, b = pair
                na, nb = len(self._buffers[a]), len(self._buffers[b])
                if abs(na - nb) >= 2:
                    best.append(a if na > nb else b)
                else:
                    best.append(a if self._mean_dur(a) <= self._mean_dur(b) else b)
            else:
                best.append(max(pair, key=lambda j: (len(self._buffers[j]), -j)))
        return max(best, key=lambda i: (self._scores[i], len(self._buffers[i]), -i))

    def _mean_dur(self, i: int) -> float:
        durs = [sum(s.end_ms - s.start_ms for s in sides) / len(sides)
                for sides in self._buffers[i]]
        return sum(durs) / len(durs)

    def _lock(self, lead: int) -> list[Rep]:
        tracker = self._trackers[lead]
        buffered = self._buffers[lead]
        self._trackers = [tracker]
        self._buffers, self._scores = [[]], [0.0]
        self._set_columns([c for c in self._cols if c[0] == tracker.profile.joint])
        return [self._emit(tracker.profile, sides) for sides in buffered]
