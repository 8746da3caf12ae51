"""Version 2 of the pose batch body: quantised values, deltas along time, Rice codes.

Specified in ``docs/pose-batch-format.md`` ("Version 2"). The 20-byte header is
version 1's with version 2; :mod:`domain.pose_batch` parses it and calls
:func:`decode_body` for the rest. After the header::

    u32        t0: the first frame's timestamp (ms)
    ceil(N/8)  no-pose bitmap, bit i (least significant first) set: frame i is all-NaN
    69 bytes   Rice parameters k (0..15), one nibble per group, low nibble first
    R bytes    remainder stream: each value's low k bits, LSB first, values in order
    rest       unary stream: each value's high part h as h zero bits then a one bit

Values, in this order (the same order in both streams): the N - 1 timestamp deltas
minus 1 (unsigned, group 0); the first pose frame's 132 grid values q, landmark-major
(value s = landmark * 4 + channel in group 1 + channel); then, for each later frame
with a pose, its 132 differences of q from the previous pose frame (value s in group
5 + s). Grid values and differences are zig-zag coded (0, -1, 1, -2 ... -> 0, 1, 2, 3
...). M frames with a pose give N - 1 + 132 * M values.

``q = rint(x / STEPS[c])`` in float64, the grid of the replay codec's ``q16delta`` with
its default bounds (``storage/replay_codec.py``), and a value decodes to
``float32(q * STEPS[c])``. The live metrics are computed on exactly that reconstruction
(:meth:`storage.replay.ReplayWriter.append`), so a batch's metrics are the same sent as
v1 or v2. Decoding is vectorised: remainder offsets are a prefix sum of the k's; the
unary parts are the gaps between the one bits. Any fault raises
:class:`~domain.errors.BatchError`; a body is checked to hold at least one bit per
value its header and bitmap declare before any per-value array is made, so the
arrays are bounded by the body's own size.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from domain.errors import BatchError

VERSION_2: Final = 2
LANDMARKS: Final = 33
CHANNELS: Final = 4
SERIES: Final = LANDMARKS * CHANNELS
HEADER_BYTES: Final = 20  # parsed by domain.pose_batch
# The replay codec's q16delta grid with its default bounds: step = 2 * max_error * margin.
MAX_ERROR: Final = (5e-4, 5e-4, 5e-4, 5e-3)
STEP_MARGIN: Final = 1.0 - 2.0**-10
STEPS: Final = tuple(2.0 * e * STEP_MARGIN for e in MAX_ERROR)
# |q| below this: float32(q * step) re-quantises to q exactly (float32 keeps 24 bits).
COORD_Q_LIMIT: Final = 2**23
VIS_Q_MAX: Final = 100  # visibility q in [0, 100]: q * step within [0, 1]
K_MAX: Final = 15
GROUPS: Final = 1 + CHANNELS + SERIES  # 137
K_BYTES: Final = (GROUPS + 1) // 2  # 69
_STEP_S = np.tile(np.array(STEPS, dtype=np.float64), LANDMARKS)  # (132,) landmark-major
_IS_VIS = np.tile(np.array([False, False, False, True]), LANDMARKS)
_T_MAX = 0xFFFFFFFF
_Q_LO = np.where(_IS_VIS, 0, 1 - COORD_Q_LIMIT)  # per series, the grid values accepted
_Q_HI = np.where(_IS_VIS, VIS_Q_MAX, COORD_Q_LIMIT - 1)
_MASKS = (1 << np.arange(K_MAX + 1, dtype=np.int64)) - 1
_FIRST_GROUP = 1 + np.arange(SERIES) % CHANNELS  # the first frame's value s: group 1 + c


def quantise(frames: np.ndarray) -> np.ndarray:
    """``rint(x / step)`` of (n, 33, 4) float32 frames as (n, 132) float64 (NaN stays)."""
    x = np.asarray(frames, dtype=np.float32).reshape(len(frames), SERIES).astype(np.float64)
    with np.errstate(invalid="ignore"):
        return np.rint(x / _STEP_S)


def dequantise(q: np.ndarray) -> np.ndarray:
    """(m, 132) integer grid values -> float32 values, as the decoder returns them."""
    return np.multiply(q, _STEP_S, dtype=np.float64).astype(np.float32)


def _zigzag(v: np.ndarray) -> np.ndarray:
    return (v << 1) ^ (v >> 63)


def _best_k(v: np.ndarray) -> np.ndarray:
    """Per row of ``v`` (g, c) non-negative int64: the k in 0..15 with the fewest bits,
    the smallest such k on a tie (the browser's encoder uses the same rule)."""
    if v.shape[1] == 0:
        return np.zeros(v.shape[0], dtype=np.int64)
    ks = np.arange(K_MAX + 1)
    cost = (v[:, None, :] >> ks[None, :, None]).sum(axis=2) + v.shape[1] * (1 + ks)[None, :]
    return np.argmin(cost, axis=1).astype(np.int64)


def encode_body(t_ms: np.ndarray, frames: np.ndarray) -> bytes:
    """The v2 body after the header, for ``t_ms`` (n,) and ``frames`` (n, 33, 4).

    Raises ``ValueError`` if the batch is not representable in v2 (send it as v1):
    timestamps not strictly increasing whole ms in [0, 2**32), a frame partly NaN, a
    coordinate with ``|q| >= 2**23`` (about 8,380 units) or a visibility outside
    [0, 1] after rounding to the grid."""
    t = np.asarray(t_ms)
    n = len(t)
    if n == 0 or n > 0xFFFF:
        raise ValueError("1..65535 frames per batch")
    if t.min() < 0 or t.max() > _T_MAX or not np.array_equal(t, np.rint(t)):
        raise ValueError("timestamps must be whole ms in [0, 2**32)")
    t64 = t.astype(np.int64)
    if n > 1 and not (t64[1:] > t64[:-1]).all():
        raise ValueError("timestamps must strictly increase")
    q = quantise(frames)
    nan = np.isnan(q)
    nopose = nan.all(axis=1)
    if (nan.any(axis=1) & ~nopose).any():
        raise ValueError("a frame is partly NaN")
    qi = q[~nopose]
    if not np.isfinite(qi).all():
        raise ValueError("a value is infinite")
    qi = qi.astype(np.int64)
    if (np.abs(qi[:, ~_IS_VIS]) >= COORD_Q_LIMIT).any():
        raise ValueError("a coordinate is beyond v2's range")
    vis = qi[:, _IS_VIS]
    if vis.size and (vis.min() < 0 or vis.max() > VIS_Q_MAX):
        raise ValueError("a visibility is outside [0, 1]")
    m = len(qi)
    ks = np.zeros(2 * K_BYTES, dtype=np.int64)
    tz = np.diff(t64) - 1
    ks[0] = _best_k(tz[None, :])[0]
    if m:
        first = _zigzag(qi[0])
        ks[1:1 + CHANNELS] = _best_k(first.reshape(LANDMARKS, CHANNELS).T)
        deltas = _zigzag(np.diff(qi, axis=0))  # (m - 1, 132)
        ks[1 + CHANNELS:GROUPS] = _best_k(deltas.T)
        values = np.concatenate([tz, first, deltas.ravel()])
    else:
        values = tz
    kv = _per_value_k(ks, n, m)
    nib = ks.astype(np.uint8)
    k_table = (nib[0::2] | (nib[1::2] << 4)).tobytes()
    # remainder stream: k low bits of each value, LSB first
    bit = np.arange(K_MAX)
    rbits = ((values[:, None] >> bit) & 1)[bit[None, :] < kv[:, None]]
    remainders = np.packbits(rbits.astype(np.uint8), bitorder="little").tobytes()
    # unary stream: h zeros then a one
    ends = np.cumsum((values >> kv) + 1) - 1
    unary_bits = np.zeros(int(ends[-1]) + 1 if len(ends) else 0, dtype=np.uint8)
    unary_bits[ends] = 1
    unary = np.packbits(unary_bits, bitorder="little").tobytes()
    bitmap = np.packbits(nopose, bitorder="little").tobytes()
    return b"".join([int(t64[0]).to_bytes(4, "little"), bitmap, k_table, remainders, unary])


def decode_body(data: bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(t_ms uint32 (n,), frames float32 (n, 33, 4))`` from a v2 body whose header
    (``data[:20]``) was checked and says ``n`` >= 1 frames.

    Raises :class:`BatchError`: ``truncated`` (the body ends inside a section),
    ``bad_padding`` (a padding bit is set), ``count_mismatch`` (the unary stream holds
    more values than the header and bitmap declare), ``trailing_bytes`` (bytes after
    the last value), ``timestamp_out_of_range`` (past 2**32 - 1 ms),
    ``coordinate_out_of_range`` (``|q| >= 2**23``), ``visibility_out_of_range``
    (q outside [0, 100])."""
    buf = np.frombuffer(data, dtype=np.uint8)
    pos = HEADER_BYTES
    nb = (n + 7) // 8
    fixed = pos + 4 + nb + K_BYTES
    if len(data) < fixed:
        raise BatchError("truncated", f"a v2 body of {n} frames needs at least {fixed} "
                         f"bytes before its streams, got {len(data)}")
    t0 = int.from_bytes(data[pos:pos + 4], "little")
    pos += 4
    bitmap = int.from_bytes(data[pos:pos + nb], "little")
    if bitmap >> n:
        raise BatchError("bad_padding", "no-pose bitmap has bits set past the frame count")
    m = n - bitmap.bit_count()
    pos += nb
    if data[pos + K_BYTES - 1] >> 4:
        raise BatchError("bad_padding", "the Rice parameter table's last nibble is not 0")
    kb = buf[pos:pos + K_BYTES]
    ks = np.empty(2 * K_BYTES, dtype=np.int64)
    ks[0::2] = kb & 15
    ks[1::2] = kb >> 4
    pos += K_BYTES
    total = n - 1 + SERIES * m
    if (len(data) - pos) * 8 < total:  # each value takes at least its one bit
        raise BatchError("truncated", f"{n} frames, {m} with a pose, need {total} values: "
                         f"at least {(total + 7) // 8} more bytes, {len(data) - pos} are left")
    kv = _per_value_k(ks, n, m)
    ends = np.add.accumulate(kv)
    rbits = int(ends[-1]) if total else 0  # < 2**31: at most 15 bits * 65535 * 133
    rlen = (rbits + 7) // 8
    if len(data) < pos + rlen:
        raise BatchError("truncated", f"the remainder stream needs {rlen} bytes, "
                         f"{len(data) - pos} are left")
    rb = np.zeros(rlen + 3, dtype=np.int64)
    rb[:rlen] = buf[pos:pos + rlen]
    if rbits % 8 and rb[rlen - 1] >> (rbits % 8):
        raise BatchError("bad_padding", "the remainder stream's padding bits are not 0")
    # 24-bit little-endian windows at every byte: a value (k <= 15) plus its bit offset
    # (<= 7) fits in one, so each remainder is one gather, a shift and a mask.
    win = rb[:-2] | (rb[1:-1] << 8) | (rb[2:] << 16)
    off = ends - kv
    rem = win[off >> 3]
    rem >>= off & 7
    rem &= _MASKS[kv]
    pos += rlen
    ones = np.unpackbits(buf[pos:], bitorder="little").view(bool).nonzero()[0]
    if len(ones) < total:
        raise BatchError("truncated", f"the unary stream holds {len(ones)} of the {total} "
                         "values the header and bitmap declare")
    if len(ones) > total:
        raise BatchError("count_mismatch", f"the unary stream holds {len(ones)} values, "
                         f"the header and bitmap declare {total}")
    used = (int(ones[-1]) + 8) // 8 if total else 0
    if len(data) - pos > used:
        raise BatchError("trailing_bytes", f"{len(data) - pos - used} bytes after the last "
                         "value")
    values = np.empty(total, dtype=np.int64)  # the unary parts: gaps between one bits
    if total:
        values[0] = ones[0]
        np.subtract(ones[1:], ones[:-1], out=values[1:])
        values[1:] -= 1
        values <<= kv
        values |= rem
    t_ms = _timestamps(t0, values[: n - 1])
    if not m:
        return t_ms, np.full((n, LANDMARKS, CHANNELS), np.nan, dtype=np.float32)
    q = _grid(values[n - 1:], m)
    if m == n:
        return t_ms, dequantise(q).reshape(n, LANDMARKS, CHANNELS)
    nopose = np.unpackbits(buf[HEADER_BYTES + 4:HEADER_BYTES + 4 + nb], count=n,
                           bitorder="little").view(bool)
    frames = np.full((n, SERIES), np.nan, dtype=np.float32)
    frames[~nopose] = dequantise(q)
    return t_ms, frames.reshape(n, LANDMARKS, CHANNELS)


def _timestamps(t0: int, deltas_minus_1: np.ndarray) -> np.ndarray:
    t = np.empty(len(deltas_minus_1) + 1, dtype=np.int64)
    t[0] = t0
    np.add.accumulate(deltas_minus_1 + 1, out=t[1:])
    t[1:] += t0
    if t[-1] > _T_MAX:
        raise BatchError("timestamp_out_of_range", f"timestamps run to {int(t[-1])} ms, "
                         f"past 2**32 - 1")
    return t.astype(np.uint32)


def _grid(values: np.ndarray, m: int) -> np.ndarray:
    """(m, 132) int64 grid values from the first frame's values and the differences
    (zig-zag); ``coordinate_out_of_range`` or ``visibility_out_of_range`` if one is off."""
    g = values.reshape(m, SERIES)
    sign = g & 1
    g >>= 1
    np.negative(sign, out=sign)
    g ^= sign
    np.add.accumulate(g, axis=0, out=g)
    lo, hi = np.minimum.reduce(g, axis=0), np.maximum.reduce(g, axis=0)
    if (lo < _Q_LO).any() or (hi > _Q_HI).any():
        bad = (lo < _Q_LO) | (hi > _Q_HI)
        if (bad & ~_IS_VIS).any():
            raise BatchError("coordinate_out_of_range", f"a coordinate's grid value reaches "
                             f"2**23 (about {COORD_Q_LIMIT * STEPS[0]:.0f} units)")
        raise BatchError("visibility_out_of_range", "visibility must be within [0, 1]")
    return g


def _per_value_k(ks: np.ndarray, n: int, m: int) -> np.ndarray:
    """The Rice parameter of each value, in stream order, for N frames, M with a pose."""
    kv = np.empty(n - 1 + SERIES * m, dtype=np.int64)
    kv[:n - 1] = ks[0]
    if m:
        kv[n - 1:n - 1 + SERIES] = ks[_FIRST_GROUP]
        kv[n - 1 + SERIES:].reshape(m - 1, SERIES)[:] = ks[1 + CHANNELS:GROUPS]
    return kv
