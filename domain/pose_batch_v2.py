"""Version 2 of the pose batch body: quantised values, deltas along time, Rice codes.

Specified in ``docs/pose-batch-format.md`` ("Version 2"). The 20-byte header is
version 1's with version 2; :mod:`domain.pose_batch` parses it and calls
:func:`decode_body` for the rest. After the header::

    u32        t0: the first frame's timestamp (ms)
    ceil(N/8)  no-pose bitmap, bit i (least significant first) set: frame i is all-NaN
    69 bytes   Rice parameters k (0..15), one nibble per group, low nibble first
    R bytes    remainder stream: each value's low k bits, LSB first, values in order
    rest       unary stream: each value's high part h as h zero bits then a one bit

Values, in order, in 137 groups (each group one k):
  0      N - 1 timestamp deltas minus 1 (unsigned);
  1..4   the first pose frame, channel c (x, y, z, visibility), 33 landmarks, zig-zag q;
  5..136 one group per series s = landmark * 4 + channel: the M - 1 zig-zag differences
         of q between consecutive pose frames (M = frames with a pose).

``q = rint(x / STEPS[c])`` in float64, the grid of the replay codec's ``q16delta`` with
its default bounds (``storage/replay_codec.py``), and a value decodes to
``float32(q * STEPS[c])``. The live metrics are computed on exactly that reconstruction
(:meth:`storage.replay.ReplayWriter.append`), so a batch's metrics are the same sent as
v1 or v2. Decoding is vectorised: remainder offsets are a prefix sum of the k's; the
unary parts are the gaps between the one bits. Any fault raises
:class:`~domain.errors.BatchError`, and nothing is allocated beyond a small multiple of
the body's own size.
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


def quantise(frames: np.ndarray) -> np.ndarray:
    """``rint(x / step)`` of (n, 33, 4) float32 frames as (n, 132) float64 (NaN stays)."""
    x = np.asarray(frames, dtype=np.float32).reshape(len(frames), SERIES).astype(np.float64)
    with np.errstate(invalid="ignore"):
        return np.rint(x / _STEP_S)


def dequantise(q: np.ndarray) -> np.ndarray:
    """(m, 132) integer grid values -> float32 values, as the decoder returns them."""
    return (q.astype(np.float64) * _STEP_S).astype(np.float32)


def _zigzag(v: np.ndarray) -> np.ndarray:
    return (v << 1) ^ (v >> 63)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return (z >> 1) ^ -(z & 1)


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
    rows = [np.diff(t64)[None, :] - 1]  # group 0; then 1..4 and 5..136 if m >= 1
    if m:
        rows.append(_zigzag(qi[0].reshape(LANDMARKS, CHANNELS).T))  # (4, 33)
        rows.append(_zigzag(np.diff(qi, axis=0).T))  # (132, m - 1)
    row_ks = [_best_k(r) for r in rows]
    ks = np.zeros(2 * K_BYTES, dtype=np.int64)
    used = np.concatenate(row_ks)
    ks[: len(used)] = used
    values = np.concatenate([r.ravel() for r in rows])
    kv = np.concatenate([np.repeat(k, r.shape[1]) for k, r in zip(row_ks, rows, strict=True)])
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
    bitmap = np.unpackbits(buf[pos:pos + nb], bitorder="little")
    if bitmap[n:].any():
        raise BatchError("bad_padding", "no-pose bitmap has bits set past the frame count")
    nopose = bitmap[:n].astype(bool)
    pos += nb
    kb = buf[pos:pos + K_BYTES]
    ks = np.empty(2 * K_BYTES, dtype=np.int64)
    ks[0::2] = kb & 15
    ks[1::2] = kb >> 4
    if ks[GROUPS:].any():
        raise BatchError("bad_padding", "the Rice parameter table's last nibble is not 0")
    pos += K_BYTES
    m = n - int(nopose.sum())
    counts = np.empty(GROUPS, dtype=np.int64)
    counts[0] = n - 1
    counts[1:1 + CHANNELS] = LANDMARKS if m else 0
    counts[1 + CHANNELS:] = max(m - 1, 0)
    total = int(counts.sum())
    kv = np.repeat(ks[:GROUPS], counts)
    ends = np.cumsum(kv)
    rbits = int(ends[-1]) if total else 0
    rlen = (rbits + 7) // 8
    if len(data) < pos + rlen:
        raise BatchError("truncated", f"the remainder stream needs {rlen} bytes, "
                         f"{len(data) - pos} are left")
    rbuf = np.zeros(rlen + 4, dtype=np.uint8)
    rbuf[:rlen] = buf[pos:pos + rlen]
    if rbits % 8 and rbuf[rlen - 1] >> (rbits % 8):
        raise BatchError("bad_padding", "the remainder stream's padding bits are not 0")
    off = ends - kv
    byte = off >> 3
    win = (rbuf[byte].astype(np.int64) | (rbuf[byte + 1].astype(np.int64) << 8)
           | (rbuf[byte + 2].astype(np.int64) << 16))
    rem = (win >> (off & 7)) & ((1 << kv) - 1)
    pos += rlen
    ubits = np.unpackbits(buf[pos:], bitorder="little")
    ones = np.flatnonzero(ubits)
    if len(ones) < total:
        raise BatchError("truncated", f"the unary stream holds {len(ones)} of the {total} "
                         "values the header and bitmap declare")
    used = (int(ones[total - 1]) + 8) // 8 if total else 0
    if len(ones) > total:
        raise BatchError("count_mismatch", f"the unary stream holds {len(ones)} values, "
                         f"the header and bitmap declare {total}")
    if len(data) - pos > used:
        raise BatchError("trailing_bytes", f"{len(data) - pos - used} bytes after the last "
                         "value")
    high = np.diff(ones, prepend=-1) - 1
    values = (high << kv) | rem
    t_ms = _timestamps(t0, values[: n - 1])
    frames = np.full((n, SERIES), np.nan, dtype=np.float32)
    if m:
        frames[~nopose] = dequantise(_grid(values[n - 1:], m))
    return t_ms, frames.reshape(n, LANDMARKS, CHANNELS)


def _timestamps(t0: int, deltas_minus_1: np.ndarray) -> np.ndarray:
    t = np.empty(len(deltas_minus_1) + 1, dtype=np.int64)
    t[0] = t0
    np.cumsum(deltas_minus_1 + 1, out=t[1:])
    t[1:] += t0
    if t[-1] > _T_MAX:
        raise BatchError("timestamp_out_of_range", f"timestamps run to {int(t[-1])} ms, "
                         f"past 2**32 - 1")
    return t.astype(np.uint32)


def _grid(values: np.ndarray, m: int) -> np.ndarray:
    """(m, 132) int64 grid values from the first-frame and delta groups."""
    q = np.empty((m, SERIES), dtype=np.int64)
    q[0] = _unzigzag(values[:SERIES]).reshape(CHANNELS, LANDMARKS).T.ravel()
    if m > 1:
        q[1:] = _unzigzag(values[SERIES:]).reshape(SERIES, m - 1).T
    np.cumsum(q, axis=0, out=q)
    coords = q[:, ~_IS_VIS]
    if coords.size and np.abs(coords).max() >= COORD_Q_LIMIT:
        raise BatchError("coordinate_out_of_range", f"a coordinate's grid value reaches "
                         f"2**23 (about {COORD_Q_LIMIT * STEPS[0]:.0f} units)")
    vis = q[:, _IS_VIS]
    if vis.min() < 0 or vis.max() > VIS_Q_MAX:
        raise BatchError("visibility_out_of_range", "visibility must be within [0, 1]")
    return q
