"""The binary pose batch (``application/x-restartix-pose``): encoder and strict decoder.

Byte layout (little-endian), specified in ``docs/pose-batch-format.md``::

    offset size  field
    0      4     magic b"RXPB"
    4      1     version (1, or 2: see domain/pose_batch_v2.py)
    5      1     space: 0 = normalised image coordinates, 1 = world metres
    6      1     landmark count (33)
    7      1     channels (4: x, y, z, visibility)
    8      4     u32 batch sequence number within the session (first batch is 0)
    12     2     u16 frame count N (>= 1)
    14     2     u16 image width in pixels (0 = unknown)
    16     2     u16 image height in pixels (0 = unknown)
    18     2     reserved, must be 0
    20     N*532 frames: u32 timestamp (ms since session start), then 33*4 float32

:func:`decode_batch` raises :class:`BatchError` naming the first fault it finds. It
never trusts a count in the header before checking it against the body length, so
a hostile header cannot make it allocate more than the body it was given.

Version 2 (:mod:`domain.pose_batch_v2`: quantised deltas, about 1/7 of the bytes)
shares the header; :func:`decode_batch` accepts both and returns the same
:class:`PoseBatch`; :func:`encode_batch_v2` writes it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from domain import pose_batch_v2
from domain.errors import BatchError

MAGIC = b"RXPB"
VERSION = 1
VERSION_2 = pose_batch_v2.VERSION_2
VERSIONS = (VERSION, VERSION_2)
CONTENT_TYPE = "application/x-restartix-pose"
HEADER = struct.Struct("<4sBBBBIHHHH")
LANDMARKS = 33
CHANNELS = 4
SPACES = ("image", "world")
FRAME_DTYPE = np.dtype([("t", "<u4"), ("v", "<f4", (LANDMARKS, CHANNELS))])
FRAME_BYTES = FRAME_DTYPE.itemsize  # 532
# Visibility is a probability; a little slack for float rounding in clients.
_VIS_MIN, _VIS_MAX = -1e-3, 1.0 + 1e-3
# Coordinates far outside any plausible range mean a broken client, not a pose.
_COORD_LIMIT = 1e4


def _float32_inside(lo: float, hi: float) -> tuple[np.float32, np.float32]:
    """The float32 bounds closest to ``[lo, hi]`` from inside: a float32 between them
    is within ``[lo, hi]`` whether it is compared in float32 or in float64."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    if float(lo32) < lo:
        lo32 = np.nextafter(lo32, np.float32(np.inf))
    if float(hi32) > hi:
        hi32 = np.nextafter(hi32, np.float32(-np.inf))
    return lo32, hi32


# Per value of a frame (x, y, z, visibility for each landmark), the range that
# :func:`_check_values` accepts for certain: the fast path's bounds. NaN and +/-inf
# fail both comparisons.
_VIS_LO, _VIS_HI = _float32_inside(_VIS_MIN, _VIS_MAX)
_LOWER = np.tile(np.array([-_COORD_LIMIT] * 3 + [_VIS_LO], dtype=np.float32), LANDMARKS)
_UPPER = np.tile(np.array([_COORD_LIMIT] * 3 + [_VIS_HI], dtype=np.float32), LANDMARKS)


@dataclass(frozen=True, eq=False)
class PoseBatch:
    seq: int
    space: str
    t_ms: np.ndarray  # uint32 (n,)
    frames: np.ndarray  # float32 (n, 33, 4); a row all-NaN means "no pose detected"
    image_width: int = 0
    image_height: int = 0

    @property
    def n(self) -> int:
        return int(self.t_ms.shape[0])

    @property
    def first_t(self) -> int:
        return int(self.t_ms[0])

    @property
    def last_t(self) -> int:
        return int(self.t_ms[-1])


def _header(version: int, seq: int, n: int, space: str, width: int, height: int) -> bytes:
    """The header both versions share."""
    return HEADER.pack(MAGIC, version, SPACES.index(space), LANDMARKS, CHANNELS, seq, n,
                       width, height, 0)


def encode_batch(
    seq: int,
    t_ms: np.ndarray,
    frames: np.ndarray,
    *,
    space: str = "image",
    image_width: int = 0,
    image_height: int = 0,
) -> bytes:
    """Pack frames into a batch body. Used by the demo, tests and benchmarks.

    Raises ``ValueError`` for timestamps that do not fit a u32 of whole ms."""
    n = len(t_ms)
    t = np.asarray(t_ms)
    if n and (t.min() < 0 or t.max() > 0xFFFFFFFF or not np.array_equal(t, np.rint(t))):
        raise ValueError("timestamps must be whole ms in [0, 2**32)")
    header = _header(VERSION, seq, n, space, image_width, image_height)
    body = np.empty(n, dtype=FRAME_DTYPE)
    body["t"] = np.asarray(t_ms, dtype=np.uint32)
    body["v"] = np.asarray(frames, dtype=np.float32)
    return header + body.tobytes()


def encode_batch_v2(
    seq: int,
    t_ms: np.ndarray,
    frames: np.ndarray,
    *,
    space: str = "image",
    image_width: int = 0,
    image_height: int = 0,
) -> bytes:
    """Pack frames into a version 2 body (quantised: see :mod:`domain.pose_batch_v2`).

    Raises ``ValueError`` if the batch is not representable in v2 (then send v1)."""
    header = _header(VERSION_2, seq, len(t_ms), space, image_width, image_height)
    return header + pose_batch_v2.encode_body(t_ms, frames)


def decode_batch(data: bytes, *, max_frames: int) -> PoseBatch:
    """Parse and validate one batch body; raise :class:`BatchError` on any fault."""
    if len(data) < HEADER.size:
        raise BatchError("truncated", f"body is {len(data)} bytes, shorter than the "
                         f"{HEADER.size}-byte header")
    magic, version, space, landmarks, channels, seq, n, width, height, reserved = (
        HEADER.unpack_from(data)
    )
    if magic != MAGIC:
        raise BatchError("bad_magic", f"magic is {magic!r}, expected {MAGIC!r}")
    if version not in VERSIONS:
        raise BatchError("unsupported_version", f"version {version} is not supported "
                         f"(supported: {', '.join(map(str, VERSIONS))})")
    if space >= len(SPACES):
        raise BatchError("bad_space", f"coordinate space {space} is not 0 (image) or 1 (world)")
    if landmarks != LANDMARKS:
        raise BatchError("bad_landmark_count", f"landmark count is {landmarks}, expected "
                         f"{LANDMARKS}")
    if channels != CHANNELS:
        raise BatchError("bad_channel_count", f"channel count is {channels}, expected "
                         f"{CHANNELS}")
    if reserved != 0:
        raise BatchError("bad_reserved", "reserved header field must be 0")
    if n == 0:
        raise BatchError("empty_batch", "frame count is 0")
    if n > max_frames:
        raise BatchError("too_many_frames", f"frame count {n} exceeds the cap of {max_frames}")
    if version == VERSION_2:
        _check_image_size(width, height)
        t_ms, frames = pose_batch_v2.decode_body(data, n)
        return PoseBatch(seq, SPACES[space], t_ms, frames, width, height)
    expected = HEADER.size + n * FRAME_BYTES
    if len(data) != expected:
        raise BatchError(
            "length_mismatch" if len(data) > expected else "truncated",
            f"header says {n} frames ({expected} bytes) but body is {len(data)} bytes",
        )
    _check_image_size(width, height)
    rec = np.frombuffer(data, dtype=FRAME_DTYPE, offset=HEADER.size, count=n)
    t_ms = rec["t"].copy()
    frames = rec["v"].copy()
    if n > 1 and not (t_ms[1:] > t_ms[:-1]).all():
        i = int(np.argmax(t_ms[1:] <= t_ms[:-1])) + 1
        raise BatchError("non_monotonic_timestamps", f"frame {i} timestamp {int(t_ms[i])} ms "
                         f"is not after frame {i - 1} ({int(t_ms[i - 1])} ms)")
    _check_values(frames)
    return PoseBatch(seq, SPACES[space], t_ms, frames, width, height)


def _check_image_size(width: int, height: int) -> None:
    if (width == 0) != (height == 0):
        raise BatchError("bad_image_size", "image width and height must both be set or both 0")


def _check_values(frames: np.ndarray) -> None:
    """Raise :class:`BatchError` for the first fault in ``frames`` (n, 33, 4).

    A frame is all-NaN (no pose) or all finite, with coordinates within
    +/-``_COORD_LIMIT`` and visibility within ``[_VIS_MIN, _VIS_MAX]``. A valid batch
    is confirmed in one vectorised pass: every value against its bounds (NaN and
    +/-inf fail), then, only if some values failed, a check that they fill whole
    all-NaN rows. Anything not confirmed goes to :func:`_find_fault`, which names the
    fault (or accepts the batch: the fast bounds are a hair inside the real ones, see
    :func:`_float32_inside`).
    """
    flat = frames.reshape(len(frames), -1)
    ok = np.greater_equal(flat, _LOWER)
    np.logical_and(ok, np.less_equal(flat, _UPPER), out=ok)
    if ok.all():  # the common case: no NaN, nothing out of range
        return
    # Valid if every row with a value out of bounds is a no-pose row (all NaN).
    if np.isnan(flat[~ok.all(axis=1)]).all():
        return
    _find_fault(frames)


def _find_fault(frames: np.ndarray) -> None:
    """The full check, fault by fault in a fixed order: the first one found is
    raised. Returns normally if there is none."""
    flat = frames.reshape(len(frames), -1)
    nan = np.isnan(flat)
    nan_rows = nan.all(axis=1)
    partial = nan.any(axis=1) & ~nan_rows
    if partial.any():
        i = int(np.argmax(partial))
        raise BatchError("nan_values", f"frame {i} has NaN in some values; a frame is either "
                         "fully finite or all-NaN (no pose detected)")
    good = frames[~nan_rows]
    if good.size == 0:
        return
    if not np.isfinite(good).all():
        raise BatchError("infinite_values", "frames contain +/-inf values")
    if np.abs(good[:, :, :3]).max() > _COORD_LIMIT:
        raise BatchError("coordinate_out_of_range", f"a coordinate exceeds +/-{_COORD_LIMIT:g}")
    vis = good[:, :, 3]
    if vis.min() < _VIS_MIN or vis.max() > _VIS_MAX:
        raise BatchError("visibility_out_of_range", "visibility must be within [0, 1]")
