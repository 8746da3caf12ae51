"""Chunk codecs for the replay blob (see ``docs/replay-format.md``).

Every chunk carries ``n`` frames: ``n`` float64 timestamps and ``n`` frames of
``S = landmarks * channels`` float32 values.  A codec turns one chunk into a
payload (bytes) and back.  Codecs are *stateful* along time: the encoder of
chunk ``k`` predicts from the last frame of chunk ``k - 1`` and the decoder
mirrors that, so chunks must be decoded in order (the whole body is one gzip
stream anyway, so there is no random access to lose).

Encodings (the name is stored in the header as ``encoding``):

``f32``
    Plain little-endian float64 timestamps followed by the float32 frames in
    arrival order (frame, landmark, channel).  Lossless.  The baseline.
``shuffle``
    Lossless.  Timestamps as ``tdelta`` (below).  Frames are transposed to
    channel-major series order ``(channel, landmark, frame)`` and split into
    four byte planes (all least-significant bytes first, then the next ...),
    which lets gzip find the slowly changing exponent/sign bytes.
``f32delta``
    Lossless.  Like ``shuffle`` but each float32 bit pattern is replaced by
    its wrapping uint32 difference from the same series' previous frame,
    zig-zag mapped to unsigned before the byte planes are split.
``q16delta``
    Lossy with a stated bound.  Each channel ``c`` has ``max_error[c]``;
    values are quantised to ``q = rint(x / step[c])`` with
    ``step[c] = 2 * max_error[c] * (1 - 2**-10)``, differenced along time
    per series, zig-zag mapped and stored as uint16 byte planes (uint32 for a
    chunk where any difference does not fit).  The encoder reconstructs every
    value exactly as the decoder will and any value whose reconstruction is
    off by more than ``max_error[c]`` -- non-finite values, values beyond
    ``|q| < 2**30`` -- is stored verbatim as an *exception* (index + raw
    float32 bits).  All-NaN frames (no pose) are a per-chunk bitmap.
    Guarantee: every finite value decodes within ``max_error[c]``; NaN/inf
    values and all-NaN rows decode bit-exactly.

``tdelta`` (timestamps in every encoding except ``f32``): the float64 bit
patterns' wrapping int64 difference from the previous timestamp, zig-zag
mapped, as eight byte planes.  Lossless.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

import numpy as np

ENCODINGS: Final = ("f32", "shuffle", "f32delta", "q16delta")
LOSSLESS: Final = frozenset({"f32", "shuffle", "f32delta"})

QUANT_LIMIT: Final = 2**30  # |q| < this: any two q differ by < 2**31, zig-zag fits a uint32
STEP_MARGIN: Final = 1.0 - 2.0**-10  # keeps q*step within max_error despite float32 rounding
CANONICAL_NAN_BITS: Final = 0x7FC00000  # float32 quiet NaN as produced by numpy / JS


class CodecError(ValueError):
    """A payload is inconsistent with its chunk header (raised while decoding)."""


# --------------------------------------------------------------------------- helpers
def _planes(a: np.ndarray) -> bytes:
    """Byte planes of a little-endian unsigned array, least significant plane first."""
    le = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return le.view(np.uint8).reshape(le.size, le.itemsize).T.tobytes()


def _unplanes(buf: bytes | memoryview, dtype: str, count: int) -> np.ndarray:
    dt = np.dtype(dtype)
    raw = np.frombuffer(buf, dtype=np.uint8, count=count * dt.itemsize)
    return raw.reshape(dt.itemsize, count).T.copy().view(dt).reshape(count)


def _zigzag(d: np.ndarray, bits: int) -> np.ndarray:
    """Signed (wrapping) differences -> unsigned, small magnitudes -> small codes."""
    s = d.view(f"int{bits}") if d.dtype.kind == "u" else d.astype(f"int{bits}", copy=False)
    return ((s << 1) ^ (s >> (bits - 1))).view(f"uint{bits}")


def _unzigzag(z: np.ndarray, bits: int) -> np.ndarray:
    u = z.astype(f"uint{bits}", copy=False)
    return ((u >> 1) ^ (np.zeros_like(u) - (u & 1))).view(f"int{bits}")


def _to_series(a: np.ndarray, landmarks: int, channels: int) -> np.ndarray:
    """(n, S) frame-major -> (channels, landmarks, n) channel-major series, contiguous."""
    n = a.shape[0]
    return np.ascontiguousarray(a.reshape(n, landmarks, channels).transpose(2, 1, 0))


def _from_series(a: np.ndarray, n: int, landmarks: int, channels: int) -> np.ndarray:
    return np.ascontiguousarray(a.reshape(channels, landmarks, n).transpose(2, 1, 0)).reshape(
        n, landmarks * channels
    )


def default_max_error(space: str, channels: int) -> list[float]:
    """Default q16delta bounds: 5e-4 for coordinates (normalised image units or metres)
    and 5e-3 for visibility (the last channel when there are 4)."""
    del space  # same defaults for both spaces; kept in the signature for the docs
    errs = [5e-4] * channels
    if channels == 4:
        errs[3] = 5e-3
    return errs


def steps_for(max_error: Sequence[float]) -> list[float]:
    return [2.0 * float(e) * STEP_MARGIN for e in max_error]


def dequantise(q: np.ndarray, step_s: np.ndarray) -> np.ndarray:
    """The single reconstruction formula shared by encoder (for its check) and decoder."""
    return (q.astype(np.float64) * step_s).astype(np.float32)


# --------------------------------------------------------------------------- codec
class ChunkCodec:
    """Stateful encoder *or* decoder for one stream (use one instance per direction)."""

    def __init__(
        self,
        encoding: str,
        *,
        landmarks: int,
        channels: int,
        max_error: Sequence[float] | None = None,
        step: Sequence[float] | None = None,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
        self.encoding = encoding
        self.landmarks = landmarks
        self.channels = channels
        self.series = landmarks * channels
        self._prev_t = np.zeros(1, dtype=np.uint64)  # arrays, not scalars: wrap silently
        self._prev_bits = np.zeros(self.series, dtype=np.uint32)
        self._prev_q = np.zeros(self.series, dtype=np.int64)
        if encoding == "q16delta":
            if max_error is None or step is None or len(step) != channels:
                raise ValueError("q16delta needs max_error and step per channel")
            self._err_s = np.tile(np.asarray(max_error, dtype=np.float64), landmarks)
            self._step_s = np.tile(np.asarray(step, dtype=np.float64), landmarks)

    # ----- timestamps
    def _enc_t(self, t: np.ndarray) -> bytes:
        bits = t.astype("<f8").view(np.uint64)
        d = np.empty_like(bits)
        np.subtract(bits[:1], self._prev_t, out=d[:1])
        np.subtract(bits[1:], bits[:-1], out=d[1:])
        self._prev_t = bits[-1:].copy()
        return _planes(_zigzag(d, 64))

    def _dec_t(self, buf: memoryview, n: int) -> np.ndarray:
        d = _unzigzag(_unplanes(buf, "<u8", n), 64).view(np.uint64)
        d[:1] += self._prev_t
        bits = np.cumsum(d, dtype=np.uint64)  # wrapping uint64 prefix sum
        self._prev_t = bits[-1:].copy()
        return bits.view("<f8").astype(np.float64)

    def reconstruct(self, frames: np.ndarray) -> np.ndarray:
        """The values the decoder will return for ``frames`` (n, S) float32.

        Lossless encodings return ``frames`` itself. For q16delta each value becomes
        ``dequantise(rint(x / step))`` where that is within the bound, and stays as it
        is otherwise (exceptions are stored verbatim) -- the same rule as the encoder.
        Does not touch the codec's state (``encode_decoded`` does both at once)."""
        if self.encoding in LOSSLESS:
            return frames
        return self._quantise(frames)[2]

    # ----- encode
    def encode(self, t: np.ndarray, frames: np.ndarray) -> bytes:
        """t float64 (n,), frames float32 (n, S); n >= 1. Returns the payload."""
        return self.encode_decoded(t, frames)[0]

    def encode_decoded(self, t: np.ndarray, frames: np.ndarray) -> tuple[bytes, np.ndarray]:
        """Like ``encode``, and also returns the frames exactly as the decoder will
        return them (``frames`` itself for lossless encodings; for q16delta computed
        from the same quantisation as the payload, not a second pass). The session
        actor computes its live metrics on these values, so a replay reproduces
        them exactly."""
        if self.encoding == "f32":
            return t.astype("<f8").tobytes() + frames.astype("<f4").tobytes(), frames
        head = self._enc_t(t)
        bits = frames.view(np.uint32)
        if self.encoding == "shuffle":
            return head + _planes(_to_series(bits, self.landmarks, self.channels)), frames
        if self.encoding == "f32delta":
            d = np.empty_like(bits)
            d[0] = bits[0] - self._prev_bits
            np.subtract(bits[1:], bits[:-1], out=d[1:])
            self._prev_bits = bits[-1].copy()
            body = _planes(_to_series(_zigzag(d, 32), self.landmarks, self.channels))
            return head + body, frames
        payload, decoded = self._enc_q(bits, frames)
        return head + payload, decoded

    def _quantise(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """For (n, S) float32 frames: ``qf`` (n, S) float64, the quantised value where
        ``ok`` and 0.0 elsewhere (integral, never -0.0); ``ok`` (n, S) bool, True where
        ``dequantise(qf)`` is within the bound, or None when that is every value; and
        the decoded frames (n, S) float32: ``dequantise(qf)`` where ok, the input value
        verbatim elsewhere.

        One pass in float64 with the same arithmetic as ``dequantise`` (``qf`` holds
        integers below 2**30, exactly representable, so ``qf * step`` here equals
        ``float64(int64(qf)) * step`` there)."""
        x = frames.astype(np.float64)
        qf = x / self._step_s
        with np.errstate(invalid="ignore"):
            np.rint(qf, out=qf)
            # NaN and inf fail the comparison. Strictly below 2**30 keeps every delta
            # between two quantised values below 2**31 in magnitude, so that its
            # zig-zag code fits the 32-bit delta width.
            ok = np.abs(qf) < QUANT_LIMIT
        if not ok.all():
            qf[~ok] = 0.0
        qf += 0.0  # -0.0 -> +0.0: the decoder's integers have no sign of zero
        r = np.multiply(qf, self._step_s).astype(np.float32)
        with np.errstate(invalid="ignore"):
            err = np.subtract(r, x, out=x)  # float32 - float64 is exact in float64
            ok &= np.abs(err, out=err) <= self._err_s
        if ok.all():
            return qf, None, r
        return qf, ok, np.where(ok, r, frames)

    def _enc_q(self, bits: np.ndarray, frames: np.ndarray) -> tuple[bytes, np.ndarray]:
        n, S = bits.shape
        qf, ok, decoded = self._quantise(frames)
        if ok is None:  # every value quantised: no NaN, so no no-pose row, no exception
            nan_bitmap = bytes((n + 7) // 8)
            exc_idx = exc_bits = np.zeros(0, "<u4")
            q = qf.astype(np.int64)
        else:
            nanrow = (bits == CANONICAL_NAN_BITS).all(axis=1)
            nan_bitmap = np.packbits(nanrow, bitorder="little").tobytes()
            rows = None
            if nanrow.any():  # deltas and exceptions skip the no-pose rows
                rows = np.flatnonzero(~nanrow)
                qf, ok = qf[rows], ok[rows]
            q = qf.astype(np.int64)
            if ok.all():
                exc_idx = exc_bits = np.zeros(0, "<u4")
            else:
                # exceptions keep the series' previous q so they cost no extra deltas
                m = q.shape[0]
                idx = np.where(ok, np.arange(m)[:, None], -1)
                np.maximum.accumulate(idx, axis=0, out=idx)
                held = q[np.maximum(idx, 0), np.arange(S)[None, :]]
                q = np.where(idx >= 0, held, self._prev_q[None, :])
                er, es = np.nonzero(~ok)
                fr = er if rows is None else rows[er]
                exc_idx = (fr.astype(np.uint64) * S + es).astype("<u4")
                exc_bits = bits[fr, es].astype("<u4")
        m = q.shape[0]
        if m:
            d = np.empty_like(q)
            np.subtract(q[0], self._prev_q, out=d[0])
            np.subtract(q[1:], q[:-1], out=d[1:])
            self._prev_q = q[-1].copy()
            z = (d << 1) ^ (d >> 63)  # zig-zag (k = 64); every value is < 2**32
            width = 2 if int(z.max()) < 65536 else 4
            # series order and byte planes in one transposing copy: (m, L, C, W) bytes
            # -> (W, C, L, m)
            zw = z.astype(f"<u{width}").view(np.uint8)
            body = zw.reshape(m, self.landmarks, self.channels, width).transpose(3, 2, 1, 0)
            body = body.tobytes()
        else:
            width, body = 2, b""
        return b"".join(
            (
                nan_bitmap,
                struct.pack("<BI", width, exc_idx.size),
                exc_idx.tobytes(),
                exc_bits.tobytes(),
                body,
            )
        ), decoded

    # ----- decode
    def decode(self, n: int, payload: memoryview) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of ``encode``; raises CodecError if the payload does not fit ``n``."""
        S = self.series
        if self.encoding == "f32":
            _expect(len(payload), n * (8 + 4 * S), "f32 chunk")
            t = np.frombuffer(payload, "<f8", count=n).astype(np.float64)
            f = np.frombuffer(payload, "<f4", count=n * S, offset=8 * n)
            return t, f.astype(np.float32).reshape(n, S)
        if len(payload) < 8 * n:
            raise CodecError(f"chunk payload of {len(payload)} bytes too short for {n} timestamps")
        t = self._dec_t(payload[: 8 * n], n)
        rest = payload[8 * n :]
        if self.encoding == "shuffle":
            _expect(len(rest), 4 * n * S, "shuffle frames")
            s = _unplanes(rest, "<u4", n * S)
            return t, _from_series(s, n, self.landmarks, self.channels).view(np.float32)
        if self.encoding == "f32delta":
            _expect(len(rest), 4 * n * S, "f32delta frames")
            z = _unplanes(rest, "<u4", n * S)
            d = _from_series(_unzigzag(z, 32).view(np.uint32), n, self.landmarks, self.channels)
            d[0] += self._prev_bits
            bits = np.cumsum(d, axis=0, dtype=np.uint32)
            self._prev_bits = bits[-1].copy()
            return t, bits.view(np.float32)
        return t, self._dec_q(n, rest)

    def _dec_q(self, n: int, buf: memoryview) -> np.ndarray:
        S = self.series
        nb = (n + 7) // 8
        if len(buf) < nb + 5:
            raise CodecError("q16delta chunk too short for its NaN bitmap and exception count")
        nanrow = np.unpackbits(np.frombuffer(buf, np.uint8, count=nb), count=n, bitorder="little")
        nanrow = nanrow.astype(bool)
        width, n_exc = struct.unpack_from("<BI", buf, nb)
        if width not in (2, 4):
            raise CodecError(f"q16delta delta width {width} is not 2 or 4")
        rows = np.flatnonzero(~nanrow)
        m = rows.size
        off = nb + 5
        _expect(len(buf) - off, 8 * n_exc + width * m * S, "q16delta exceptions + deltas")
        exc_idx = np.frombuffer(buf, "<u4", count=n_exc, offset=off).astype(np.int64)
        exc_bits = np.frombuffer(buf, "<u4", count=n_exc, offset=off + 4 * n_exc)
        off += 8 * n_exc
        out = np.full((n, S), np.nan, dtype=np.float32)
        if m:
            z = _unplanes(buf[off:], f"<u{width}", m * S).astype(np.uint64)
            d = _from_series(_unzigzag(z, 64), m, self.landmarks, self.channels)
            d[0] += self._prev_q
            q = np.cumsum(d, axis=0)
            self._prev_q = q[-1].copy()
            out[rows] = dequantise(q, self._step_s)
        if n_exc:
            if np.any(np.diff(exc_idx) <= 0) or exc_idx[-1] >= n * S:
                raise CodecError("q16delta exception indices are not increasing within the chunk")
            if nanrow[exc_idx // S].any():
                raise CodecError("q16delta exception points into an all-NaN row")
            out.reshape(-1).view(np.uint32)[exc_idx] = exc_bits
        return out


def _expect(got: int, want: int, what: str) -> None:
    if got != want:
        raise CodecError(f"{what}: payload holds {got} bytes, expected {want}")
