"""Per-side repetition detector: a bounded-state filter and hysteresis state machine.

One ``SideDetector`` follows one joint angle on one side of the body. It works on
``x = direction * angle`` so that a repetition is always "x rises away from
rest, peaks, and comes back". Its working state is a fixed set of floats: no
history is kept, so memory does not grow with the session.

Per valid frame (landmarks visible and finite):

1. median of the last three raw samples (removes single-frame tracking spikes),
2. first-order low-pass with time constant ``TAU_MS`` that uses the actual frame
   interval (dropped frames lengthen it); after a gap longer than
   ``MAX_GAP_MS`` both filters restart from the new sample,
3. a jitter estimate (running mean of the raw second difference, which smooth
   movement barely touches),
4. the state machine, with thresholds relative to the rest baseline ``b``
   (lowest x since the previous repetition) and the patient's typical range
   ``R``::

     IDLE      -> ACTIVE     x >= b + ENTER_FRAC * R
     ACTIVE    -> RETURNING  x <= b + EXIT_FRAC * (peak - b)
     RETURNING -> IDLE       back within BAND_FRAC * R of b and no longer sinking
                             for STILL_MS; or rising again; or RETURN_TIMEOUT_MS

``R`` starts at the profile's prior and then follows the ranges of counted
repetitions, so thresholds adapt to the patient rather than being fixed angles.
A finished excursion counts only if it is clear of the jitter, deep enough
(FIRST_DEPTH_FRAC of the prior for the first one, DEPTH_FRAC of ``R`` after;
or, before anything was counted, the second of two clean excursions of the same
size), lasted between the profile's minimum and maximum duration, was tracked
for at least MIN_COVERAGE of its frames, kept the trunk posture (getting into
position changes it; a repetition does not) and came back to the rest it left
rather than well past it (sitting down after walking in is not a repetition).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .profiles import Profile

TAU_MS = 70.0  # smoothing; short against a repetition (>= 400 ms)
MAX_GAP_MS = 1000.0  # longer tracking gaps restart the filters
ENTER_FRAC = 0.35  # of R above rest: an excursion starts
EXIT_FRAC = 0.45  # of the excursion's own depth: it is on its way back (lenient on lockout)
BAND_FRAC = 0.1  # of R: "at rest"; also where start and end times are taken
NEAR_PEAK_FRAC = 0.04  # of R: progress smaller than this is a hold, not movement
RERISE_FRAC = 0.08  # of R: rising again by this much ends the return early
DEPTH_FRAC = 0.55  # of R: shallower is a partial repetition
FIRST_DEPTH_FRAC = 0.6  # of the profile prior, before the patient's range is known
CONSISTENT_FRAC = 0.25  # two shallow excursions this close in size: the patient's range
MIN_ROM_DEG = 10.0
R_GAIN_UP, R_GAIN_DOWN = 0.5, 0.2  # R follows deeper reps faster than shallower ones
MIN_COVERAGE = 0.3  # share of the repetition's frames that must be tracked
RETURN_TIMEOUT_MS = 1500.0
STILL_MS = 250.0
STALE_MS = 3000.0  # before the first count: no progress this long means a new rest
# Untracked this long while out (landmarks hidden or unreliable at the top): the
# depth seen is not the depth reached, so a later repetition is not judged shallow
HIDDEN_MS = 300.0
# ... if it lasted this share of the typical duration at least: a partial repetition
# (a hidden top or not) is a short one
HIDDEN_DUR_FRAC = 0.8
OVERSHOOT_FRAC = 0.5  # landing this far (of the depth) below the start rest
NOISE_GAIN = 0.02
NOISE_K = 3.0  # an excursion must exceed NOISE_K x the mean |second difference|
MAX_POSTURE_CHANGE_DEG = 40.0  # trunk inclination change between way out and way back
VIS_FULL = 0.9  # visibility counted as fully reliable in the confidence
VIS_MIN = 0.5  # below this a landmark's frame is ignored

IDLE, ACTIVE, RETURNING = 0, 1, 2

ENTER, DONE = 0, 1


@dataclass(slots=True)
class SideRep:
    """One finished excursion on one side, counted or not (``reason`` says why not)."""

    side: str
    start_ms: float
    end_ms: float
    done_ms: float
    peak_first_ms: float
    peak_last_ms: float
    peak_x: float
    base_x: float
    rom_deg: float
    mean_vis: float
    coverage: float
    confidence: float
    counted: bool
    reason: str
    noise: float
    depth: float  # how far it went on the counted channel (``P - b``; see ``process``)
    # counted although shallower than the patient's range because its top went
    # untracked: ``rom_deg`` is then only a lower bound (``rep.build_rep``)
    hidden: bool = False


def _clip01(v: float) -> float:
    return 0.0 if v < 0.0 else (1.0 if v > 1.0 else v)


class SideDetector:
    """Repetition detector for one joint angle on one side.

    ``process`` takes plain Python lists of the side's *valid* frames (time ms,
    direction-adjusted angle, visibility, trunk inclination) and returns events
    ``(t_ms, ENTER, start_ms)`` and ``(t_ms, DONE, SideRep)`` in time order.
    Feeding the same frames in any split gives the same events, since every
    piece of state is carried between calls and nothing depends on call
    boundaries.
    """

    __slots__ = (
        "side", "min_ms", "max_ms", "R", "n_counted", "dur_typ",
        "t_last", "r1", "r2", "y", "dt_nom", "noise", "n_filt", "n_noise",
        "state", "b", "t_low", "n_acc", "v_acc", "shallow_amp",
        "start", "tr_enter", "P", "p_ref", "t_pf", "t_pl",
        "m", "m_ref", "tm", "t_exit", "tr_exit", "t_cross", "tr_last",
        "q1", "q2", "z", "zb", "zP", "zm", "sync",
        "lo", "t_lo", "n_lo", "v_lo", "refined", "hidden", "first_depth",
    )

    def __init__(self, profile: Profile, side: str, *, refined: bool = True) -> None:
        """``refined``: start an excursion where its rise began when it hovered
        above the rest first, and do not judge one whose top went untracked by the
        depth seen (see ``process`` and ``_rep``). Off for the fallback's
        candidates, whose choice of direction reads the excursions' durations."""
        self.side = side
        self.refined = refined
        self.min_ms = profile.min_rep_ms
        self.max_ms = profile.max_rep_ms
        self.R = profile.rom_prior_deg
        self.n_counted = 0
        self.dur_typ = 0.0
        self.t_last = -math.inf
        self.r1 = self.r2 = self.y = self.dt_nom = self.noise = 0.0
        self.n_filt = self.n_noise = 0
        self.state = IDLE
        self.b = math.inf
        self.t_low = 0.0
        self.shallow_amp = 0.0
        self.n_acc = 0
        self.v_acc = 0.0
        self.start = self.P = self.p_ref = self.t_pf = self.t_pl = 0.0
        self.tr_enter = self.tr_exit = self.tr_last = math.nan
        self.m = self.m_ref = self.tm = self.t_exit = 0.0
        self.t_cross = -1.0
        # the reported channel (the joint angle) when counting follows another one:
        # its filter (q1, q2, z) and its rest, peak and return low (zb, zP, zm)
        self.q1 = self.q2 = self.z = self.zP = self.zm = 0.0
        self.zb = math.inf
        self.sync = True  # the two channels have been the same so far
        # lowest x since x last touched the rest band, and when: where a rise that
        # did not start from the rest band began (see process)
        self.lo = math.inf
        self.t_lo = 0.0
        self.n_lo, self.v_lo = 0, 0.0  # n_acc, v_acc just before that lowest point
        self.first_depth = 0.0  # the first counted excursion's depth (see _rep)
        self.hidden = False  # tracking was lost for HIDDEN_MS while out (see _rep)

    def process(
        self, ts: list[float], xs: list[float], vs: list[float], trs: list[float],
        ds: list[float] | None = None, ws: list[float] | None = None,
    ) -> list[tuple]:
        """Run the filter and state machine over a batch of valid frames.

        With ``ds`` (the hip-drop angle, direction-adjusted like ``xs``) and ``ws``
        (its weight, ``hipdrop.ViewEstimate``: 1 in front and rear views),
        excursions are found on ``xs + w * (ds - xs)``, while the range of motion
        reported stays that of ``xs``. As long as every weight is 0 (side and
        oblique views) the result is exactly that without them.
        """
        if ds is None or ws is None:
            return self._process(ts, xs, vs, trs, None)
        cs = []
        mixed = False
        for x, d, w in zip(xs, ds, ws, strict=True):
            if w > 0.0 and d == d:
                cs.append(x + w * (d - x))
                mixed = True
            else:
                cs.append(x)
        if not mixed and self.sync:
            # never blended so far: both channels are the same, nothing to keep apart
            return self._process(ts, xs, vs, trs, None)
        self.sync = False
        return self._process(ts, cs, vs, trs, xs)

    def _process(self, ts: list[float], xs: list[float], vs: list[float], trs: list[float],
                 zs: list[float] | None) -> list[tuple]:
        """The filter and state machine on ``xs``; ``zs``, when given, is the channel
        whose range is reported, filtered alike and read at the same moments."""
        ev: list[tuple] = []
        t_last, r1, r2, y, dt_nom = self.t_last, self.r1, self.r2, self.y, self.dt_nom
        noise, n_filt, n_noise = self.noise, self.n_filt, self.n_noise
        state, b, t_low = self.state, self.b, self.t_low
        n_acc, v_acc = self.n_acc, self.v_acc
        P, p_ref, t_pf, t_pl = self.P, self.p_ref, self.t_pf, self.t_pl
        m, m_ref, tm, t_exit, t_cross = self.m, self.m_ref, self.tm, self.t_exit, self.t_cross
        R = self.R
        band, enter = BAND_FRAC * R, ENTER_FRAC * R
        tol, rerise = NEAR_PEAK_FRAC * R, RERISE_FRAC * R
        tau, max_gap = TAU_MS, MAX_GAP_MS
        sep = zs is not None
        q1, q2, z, zb, zP, zm = self.q1, self.q2, self.z, self.zb, self.zP, self.zm
        lo, t_lo, n_lo, v_lo = self.lo, self.t_lo, self.n_lo, self.v_lo
        refined = self.refined
        for t, r, v, tr, q in zip(ts, xs, vs, trs, zs if sep else xs, strict=True):
            dt = t - t_last
            t_last = t
            if dt > max_gap:  # too long a gap: the filters restart from this sample
                r1 = r2 = y = r
                q1 = q2 = z = q
                n_filt = 0
            else:
                if sep:  # the reported channel: the same median and low-pass
                    if q1 <= q2:
                        qm = q1 if q < q1 else (q2 if q > q2 else q)
                    else:
                        qm = q2 if q < q2 else (q1 if q > q1 else q)
                    q2 = q1
                    q1 = q
                    z += dt * (qm - z) / (tau + dt)
                if r1 <= r2:
                    med = r1 if r < r1 else (r2 if r > r2 else r)
                else:
                    med = r2 if r < r2 else (r1 if r > r1 else r)
                if dt > 2.5 * dt_nom > 0.0:  # frames missing in between: no jitter sample
                    n_filt = 1
                else:
                    dt_nom = dt if dt_nom == 0.0 else dt_nom + 0.05 * (dt - dt_nom)
                    if n_filt >= 2:
                        # second difference: blind to smooth movement, sees tracking jitter
                        d2 = r - 2.0 * r1 + r2
                        n_noise += 1
                        noise += ((d2 if d2 > 0.0 else -d2) - noise) * (
                            NOISE_GAIN if n_noise > 50 else 1.0 / n_noise)
                n_filt += 1
                r2 = r1
                r1 = r
                # first-order low-pass, exact for any frame interval dt
                y += dt * (med - y) / (tau + dt)
            x = y
            n_acc += 1
            v_acc += v
            if state == IDLE:
                if x < b:
                    b = x
                if sep and z < zb:
                    zb = z
                if x <= b + band:
                    t_low = t
                    n_acc, v_acc = 1, v
                    lo = math.inf
                elif x >= b + enter:
                    state = ACTIVE
                    if refined and lo < math.inf and t_lo - t_low > STILL_MS:
                        # it hovered above the rest band before rising: the rise began at
                        # the lowest point of the hover, not when the rest was last seen;
                        # coverage and visibility count from there too
                        t_low = t_lo
                        n_acc -= n_lo
                        v_acc -= v_lo
                    self.start, self.tr_enter = t_low, tr
                    P, p_ref, t_pf, t_pl = x, x, t, t
                    zP = z
                    lo = math.inf
                    self.hidden = False
                    ev.append((t, ENTER, t_low))
                else:
                    if x <= lo:
                        lo, t_lo = x, t
                        n_lo, v_lo = n_acc - 1, v_acc - v
            elif state == ACTIVE:
                if dt > HIDDEN_MS and refined:
                    self.hidden = True
                if sep and z > zP:
                    zP = z
                if x > P:
                    P = x
                    if x > p_ref + tol:  # clearly further out: the peak is not reached yet
                        t_pf, p_ref = t, x
                if x >= P - tol:
                    t_pl = t
                if x <= b + EXIT_FRAC * (P - b):
                    state = RETURNING
                    m, m_ref, tm, t_exit, t_cross = x, x, t, t, -1.0
                    zm = z
                    self.tr_exit = tr
                elif ((stalled := self.n_counted == 0 and t - t_pf > STALE_MS)
                      or t - self.start > self.max_ms):
                    # Stalled: no progress for a while before anything was counted, so the
                    # "rest" we started from was a passing dip and this plateau is the real
                    # rest. Too long: stuck away from rest, e.g. the patient changed
                    # position. Either way, start over from here.
                    ev.append((t, DONE, self._rep(t, t, P, b, x, n_acc, v_acc, t_pf, t_pl,
                                                  dt_nom, noise,
                                                  "stalled" if stalled else "too long",
                                                  zP if sep else P, zb if sep else b)))
                    state, b, t_low = IDLE, x, t
                    zb = z
                    n_acc, v_acc = 1, v
            else:
                if sep and z < zm:
                    zm = z
                if x < m:
                    m = x
                    if x < m_ref - tol:  # still clearly sinking back
                        tm, m_ref = t, x
                if t_cross < 0.0 and x <= b + band:
                    t_cross = t
                done = False
                if t_cross >= 0.0 and t - tm >= STILL_MS:
                    # back at rest and no longer sinking: we can see where it landed
                    done = True
                elif x >= m + rerise or t - t_exit >= RETURN_TIMEOUT_MS:
                    done = True
                if done:
                    end = t_cross if t_cross >= 0.0 else tm
                    rep = self._rep(end, t, P, b, m, n_acc, v_acc, t_pf, t_pl, dt_nom, noise, "",
                                    zP if sep else P, zb if sep else b)
                    ev.append((t, DONE, rep))
                    if rep.counted:
                        R = self.R
                        band, enter = BAND_FRAC * R, ENTER_FRAC * R
                        tol, rerise = NEAR_PEAK_FRAC * R, RERISE_FRAC * R
                    state, b, t_low = IDLE, m, tm
                    zb = zm
                    if x <= b + band:
                        t_low = t
                    n_acc, v_acc = 1, v
        self.t_last, self.r1, self.r2, self.y, self.dt_nom = t_last, r1, r2, y, dt_nom
        self.noise, self.n_filt, self.n_noise = noise, n_filt, n_noise
        self.state, self.b, self.t_low = state, b, t_low
        self.n_acc, self.v_acc = n_acc, v_acc
        self.P, self.p_ref, self.t_pf, self.t_pl = P, p_ref, t_pf, t_pl
        self.m, self.m_ref, self.tm, self.t_exit, self.t_cross = m, m_ref, tm, t_exit, t_cross
        if not sep:  # one channel: the reported one is the same
            q1, q2, z, zb, zP, zm = r1, r2, y, b, P, m
        self.q1, self.q2, self.z, self.zb, self.zP, self.zm = q1, q2, z, zb, zP, zm
        self.lo, self.t_lo, self.n_lo, self.v_lo = lo, t_lo, n_lo, v_lo
        if trs:
            self.tr_last = trs[-1]
        return ev

    def flush(self) -> list[tuple]:
        """End of stream: decide the excursion in progress as if the patient had stopped.

        The stream ending is taken as the patient holding the last pose seen, and
        the mid-stream rules are applied to that pose without waiting for the
        low-pass filter to catch up with it: out past the exit threshold it is
        on its way back (RETURNING), inside the rest band it has landed, and a
        rise again ends the return where it turned. So a repetition finished
        by the last frames counts even if the filter still lags behind them
        (a quick last return, or the end call right after it), while one
        stopped short of the way back (at the bottom of a squat) does not. The
        judgement is the usual one (``_rep``); times are capped at the last
        frame. The pose held is the last raw sample: that is what the median
        filter settles on when a sample repeats, and a real last return is often
        a single frame at 25-30 fps.
        """
        state = self.state
        if state == IDLE:
            return []
        self.state = IDLE
        t = self.t_last
        P, b, R = self.P, self.b, self.R
        s = self.r1  # where the patient stopped
        m, m_ref, tm, t_cross = self.m, self.m_ref, self.tm, self.t_cross
        if state == ACTIVE:
            if s > b + EXIT_FRAC * (P - b):  # not on the way back: mid-stream, never counts
                return []
            m, tm, t_cross = s, t, -1.0
            self.tr_exit = self.tr_last
        elif s < m + RERISE_FRAC * R:  # still returning (else: rising again, ended at tm)
            if s < m:
                m = s
                if s < m_ref - NEAR_PEAK_FRAC * R:
                    tm = t
        if t_cross < 0.0 and m <= b + BAND_FRAC * R:
            t_cross = t
        end = t_cross if t_cross >= 0.0 else tm
        rep = self._rep(end, t, P, b, m, self.n_acc, self.v_acc, self.t_pf, self.t_pl,
                        self.dt_nom, self.noise, "", self.zP, self.zb)
        return [(t, DONE, rep)]

    def _rep(self, end: float, t_done: float, P: float, b: float, m: float, n: int,
             v_sum: float, t_pf: float, t_pl: float, dt_nom: float, noise: float,
             reason: str, zP: float, zb: float) -> SideRep:
        """Judge a finished excursion, score its confidence and adapt the typical range.

        The judgement is on the counted channel (``P``, ``b``, ``m``); the range
        reported is the reported channel's, ``zP - zb`` (the same unless counting
        follows the hip's drop, see ``process``).
        """
        start = self.start
        amp = P - b
        dur = end - start
        R = self.R
        first = self.n_counted == 0
        hidden = False
        depth = (FIRST_DEPTH_FRAC if first else DEPTH_FRAC) * R
        n = max(n, 1)
        mean_vis = v_sum / n
        coverage = _clip01(n * dt_nom / dur) if dur > 0 and dt_nom > 0 else 0.0
        if not reason:
            if amp < max(MIN_ROM_DEG, NOISE_K * noise):
                reason = "shallow"
            elif dur < self.min_ms:
                reason = "too fast"
            elif dur > self.max_ms:
                reason = "too long"
            elif coverage < MIN_COVERAGE:
                reason = "poorly tracked"
            elif abs(self.tr_exit - self.tr_enter) > MAX_POSTURE_CHANGE_DEG:
                reason = "posture change"
            elif b - m > OVERSHOOT_FRAC * amp:
                # came back to a clearly different rest: it was a change of position
                # (e.g. sitting down after walking in), not a repetition
                reason = "rest changed"
            elif (amp < depth and self.hidden and not first
                  and dur >= HIDDEN_DUR_FRAC * self.dur_typ):
                # its top went untracked: the depth seen is a lower bound, the range
                # it gives is not the patient's (so R does not follow it below)
                hidden = True
            elif amp < depth:
                reason = "shallow"
                if first:
                    # two clean movements in a row of the same size below the prior:
                    # this is the patient's range, not a half-hearted repetition
                    prev = self.shallow_amp
                    if (prev > 0 and abs(amp - prev) <= CONSISTENT_FRAC * max(amp, prev)
                            and amp >= 2.0 * NOISE_K * noise):
                        reason = ""
                    self.shallow_amp = amp
        c_track = math.sqrt(_clip01((mean_vis - VIS_MIN) / (VIS_FULL - VIS_MIN)) * coverage)
        c_depth = _clip01((amp / R - DEPTH_FRAC) / (0.85 - DEPTH_FRAC))
        c_noise = _clip01(1.0 - 4.0 * noise / amp) if amp > 0 else 0.0
        c_tempo = 1.0
        if self.dur_typ > 0 and dur > 0:
            c_tempo = _clip01(1.0 - abs(math.log(dur / self.dur_typ)) / math.log(3.0))
        confidence = c_track * (c_depth + c_noise + c_tempo) / 3.0
        counted = not reason
        if counted:
            if first:
                self.R, self.dur_typ = amp, dur
                self.first_depth = amp
            elif (self.n_counted == 1 and self.refined and not hidden
                  and self.first_depth < DEPTH_FRAC * amp):
                # The first was a partial one by the rule every later one meets (the
                # tracker drops it, tracker._confirm): this one sets the range, as if
                # it were the first. Decided here, in stream time, so that the frames
                # after it are judged alike however the stream was batched.
                self.R, self.dur_typ = amp, dur
            elif not hidden:
                # a deep repetition is strong evidence of the patient's range; shallow
                # counted ones may be half-hearted, so the range follows them slowly
                self.R += (R_GAIN_UP if amp > R else R_GAIN_DOWN) * (amp - R)
                self.dur_typ += R_GAIN_DOWN * (dur - self.dur_typ)
            self.n_counted += 1
        return SideRep(self.side, start, end, t_done, t_pf, t_pl, zP, zb, zP - zb, mean_vis,
                       coverage, confidence, counted, reason, noise, amp, hidden)
