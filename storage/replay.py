"""Replay blob: the compressed pose recording of one session.

Byte-level format, encodings and measured sizes: ``docs/replay-format.md``.
In short, the blob is gzip (RFC 1952; two members, which every gzip reader
concatenates) of::

    b"RXREPLAY" | u16 version | u32 header_len | header JSON (UTF-8)
    { b"C" | u32 n_frames | u32 payload_len | payload }*      # one per <= 1024 frames
    b"E" | u32 frame_count

The first member is the header section, written by :meth:`ReplayWriter.finish`
once the frame count is known; the second member is the body, compressed
incrementally by :meth:`ReplayWriter.append` as batches arrive, so a live
session holds only compressed bytes plus zlib's fixed-size state.

Everything here is synchronous, CPU-only and never awaits, so there is nothing
to cancel: a Trio task calling ``append`` is not interrupted half-way, and a
failed ``append`` (bad shape, ...) raises before touching the writer's state.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from .replay_codec import (
    ENCODINGS,
    LOSSLESS,
    ChunkCodec,
    CodecError,
    default_max_error,
    steps_for,
)

__all__ = [
    "DEFAULT_ENCODING",
    "DEFAULT_STRATEGY",
    "ENCODINGS",
    "FORMAT_VERSION",
    "LOSSLESS",
    "Replay",
    "ReplayFormatError",
    "ReplayHeader",
    "ReplayWriter",
    "STRATEGIES",
    "read_replay",
]

MAGIC: Final = b"RXREPLAY"
FORMAT_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)
DEFAULT_ENCODING: Final = "q16delta"
SPACES: Final = ("image", "world")
ZLIB_WBITS: Final = 12
ZLIB_MEMLEVEL: Final = 4
# zlib strategy for the body. Z_RLE (matches of distance 1 only: runs) fits the
# byte planes of small deltas; on the 30-minute benchmark session it halves zlib's
# CPU per batch against level 6 for a 3-3.5% larger blob, and beats level 1 on
# both counts (docs/replay-format.md). Any strategy gives a standard gzip stream.
DEFAULT_STRATEGY: Final = zlib.Z_RLE
STRATEGIES: Final = {
    "default": zlib.Z_DEFAULT_STRATEGY,
    "filtered": zlib.Z_FILTERED,
    "huffman": zlib.Z_HUFFMAN_ONLY,
    "rle": zlib.Z_RLE,
    "fixed": zlib.Z_FIXED,
}
SPILL_BYTES: Final = 64 * 1024  # with spill_path, memory holds at most about this much
MAX_CHUNK_FRAMES: Final = 1024  # appends are split so working buffers stay bounded
MAX_HEADER_BYTES: Final = 1 << 20
DEFAULT_MAX_DECOMPRESSED: Final = 1 << 31

_PREFIX = struct.Struct("<8sHI")
_CHUNK = struct.Struct("<cII")
_END = struct.Struct("<cI")
_REQUIRED = {
    "version": int,
    "org_id": str,
    "session_id": str,
    "space": str,
    "landmarks": int,
    "channels": int,
    "frame_count": int,
    "encoding": str,
    "encoding_params": dict,
    "meta": dict,
}


class ReplayFormatError(ValueError):
    """The blob is not a readable replay: corrupt or truncated gzip, bad magic,
    unsupported version, inconsistent header or chunk.  The message says which
    and where (byte offset into the decompressed stream)."""


@dataclass(frozen=True)
class ReplayHeader:
    version: int
    org_id: str
    session_id: str
    space: str
    landmarks: int
    channels: int
    frame_count: int
    encoding: str
    encoding_params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def max_error(self) -> list[float] | None:
        """Per-channel absolute error bound, or None for a lossless encoding."""
        e = self.encoding_params.get("max_error")
        return None if e is None else [float(v) for v in e]


@dataclass(frozen=True)
class Replay:
    header: ReplayHeader
    t_ms: np.ndarray  # float64 (T,)
    frames: np.ndarray  # float32 (T, landmarks, channels); all-NaN row = no pose


def _gzip_member(data: bytes, level: int) -> bytes:
    z = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip wrapper, mtime 0
    return z.compress(data) + z.flush()


class ReplayWriter:
    """Incremental replay encoder for one session (not thread-safe; one owner).

    ``encoding`` is one of :data:`ENCODINGS`; ``max_error`` (q16delta only) is
    a bound per channel -- a float for all channels or a sequence of
    ``channels`` floats -- defaulting to 5e-4 for coordinates and 5e-3 for
    visibility.  ``level`` is the zlib level for both gzip members and
    ``strategy`` the zlib strategy of the body (one of :data:`STRATEGIES`' values;
    with the default ``Z_RLE`` any level from 1 to 9 compresses the body the same
    way, ``zlib.Z_DEFAULT_STRATEGY`` gives zlib's usual level-driven matching).

    ``spill_path``: where compressed output goes once more than
    :data:`SPILL_BYTES` of it is held, so a live session's memory does not grow
    with its length. The file is appended to (the caller creates its directory and
    deletes it after :meth:`finish`); an I/O error there raises ``OSError`` from
    :meth:`append`/:meth:`finish`.
    """

    def __init__(
        self,
        *,
        org_id: str,
        session_id: str,
        space: str,
        meta: dict[str, Any] | None = None,
        encoding: str = DEFAULT_ENCODING,
        landmarks: int = 33,
        channels: int = 4,
        level: int = 6,
        strategy: int = DEFAULT_STRATEGY,
        spill_path: Path | None = None,
        max_error: float | Sequence[float] | None = None,
    ) -> None:
        for name, v in (("org_id", org_id), ("session_id", session_id)):
            if not isinstance(v, str) or not v:
                raise ValueError(f"{name} must be a non-empty string")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
        if not (isinstance(landmarks, int) and isinstance(channels, int)):
            raise TypeError("landmarks and channels must be int")
        if landmarks < 1 or channels < 1 or landmarks * channels > 4096:
            raise ValueError("need 1 <= landmarks*channels <= 4096")
        if not 0 <= level <= 9:
            raise ValueError("level must be 0..9")
        if type(strategy) is not int or strategy not in STRATEGIES.values():
            raise ValueError(f"strategy must be a zlib strategy constant, got {strategy!r}")
        params: dict[str, Any] = {}
        if encoding == "q16delta":
            errs = _max_error_list(max_error, space, channels)
            params = {"max_error": errs, "step": steps_for(errs)}
        elif max_error is not None:
            raise ValueError(f"max_error only applies to q16delta, not the lossless {encoding!r}")
        self._header: dict[str, Any] = {
            "format": "restartix-replay",
            "version": FORMAT_VERSION,
            "org_id": org_id,
            "session_id": session_id,
            "space": space,
            "landmarks": landmarks,
            "channels": channels,
            "frame_count": 0,
            "encoding": encoding,
            "encoding_params": params,
            # a deep copy that also fails now, not at finish(), on non-JSON meta
            "meta": json.loads(json.dumps(meta or {}, allow_nan=False)),
        }
        if not isinstance(self._header["meta"], dict):
            raise TypeError("meta must be a dict")
        self._codec = ChunkCodec(
            encoding,
            landmarks=landmarks,
            channels=channels,
            max_error=params.get("max_error"),
            step=params.get("step"),
        )
        self._level = level
        # A 4 KB window and memLevel 4 keep zlib's state near 24 KB per live session
        # (the defaults take about 260 KB); on q16delta pose data the output size was
        # the same within 1% (measured on a 7,462-frame synthetic session).
        self._z: Any = zlib.compressobj(
            level, zlib.DEFLATED, 16 + ZLIB_WBITS, ZLIB_MEMLEVEL, strategy
        )
        self._parts: list[bytes] = []
        self._held = 0
        self._spill_path = spill_path
        self._spilled = 0
        self._nbytes = 0
        self._frames = 0
        self._raw_nbytes = 0
        self._blob: bytes | None = None
        self._released = False

    @property
    def encoding(self) -> str:
        return str(self._header["encoding"])

    @property
    def frame_count(self) -> int:
        return self._frames

    @property
    def nbytes(self) -> int:
        """Compressed bytes held: the gzip output produced so far (the whole blob
        after finish()).  zlib additionally keeps a fixed ~24 KB of state and
        a little not-yet-emitted input, which is bounded and not counted."""
        return self._nbytes

    @property
    def memory_nbytes(self) -> int:
        """Compressed bytes held in memory (not yet spilled to ``spill_path``)."""
        return self._held

    @property
    def raw_nbytes(self) -> int:
        """What the appended data would take uncompressed (float64 t + float32 frames)."""
        return self._raw_nbytes

    @property
    def finished(self) -> bool:
        return self._blob is not None or self._released

    def append(self, t_ms: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """Encode and compress a batch: ``t_ms`` (n,) numbers, ``frames`` (n, L, C)
        float32 (other real dtypes are converted to float32).  Validation happens
        first; on ValueError/TypeError nothing has been written.

        Returns the frames exactly as :func:`read_replay` will decode them (the input
        itself for lossless encodings), so callers can compute on what is stored."""
        if self.finished:
            raise RuntimeError("ReplayWriter.append() after finish()")
        t = np.asarray(t_ms)
        f = np.asarray(frames)
        if t.dtype.kind not in "uif" or f.dtype.kind not in "uif":
            raise TypeError(f"t_ms and frames must be real numbers, got {t.dtype} and {f.dtype}")
        L, C = self._header["landmarks"], self._header["channels"]
        if t.ndim != 1 or f.shape != (t.shape[0], L, C):
            raise ValueError(
                f"expected t_ms (n,) and frames (n, {L}, {C}); got {t.shape}, {f.shape}"
            )
        n = t.shape[0]
        if n == 0:
            return np.asarray(f, dtype=np.float32)
        t64 = np.ascontiguousarray(t, dtype=np.float64)
        f32 = np.ascontiguousarray(f, dtype=np.float32).reshape(n, L * C)
        decoded = []
        for s in range(0, n, MAX_CHUNK_FRAMES):
            e = min(n, s + MAX_CHUNK_FRAMES)
            payload, dec = self._codec.encode_decoded(t64[s:e], f32[s:e])
            # one compress call per chunk rather than two (header, payload): same bytes
            self._emit(_CHUNK.pack(b"C", e - s, len(payload)) + payload)
            decoded.append(dec)
        self._frames += n
        self._raw_nbytes += n * (8 + 4 * L * C)
        out = decoded[0] if len(decoded) == 1 else np.concatenate(decoded)
        return out.reshape(n, L, C)

    def _emit(self, raw: bytes) -> None:
        out = self._z.compress(raw)
        if out:
            self._parts.append(out)
            self._nbytes += len(out)
            self._held += len(out)
            if self._spill_path is not None and self._held >= SPILL_BYTES:
                self._spill()

    def _spill(self) -> None:
        # A page-cache append of <= SPILL_BYTES every few tens of seconds per session:
        # cheap enough inline. Not fsynced: after a crash the replay is rebuilt from
        # the spool's records, not from this file.
        assert self._spill_path is not None
        with open(self._spill_path, "ab") as fh:
            fh.writelines(self._parts)
        self._spilled += self._held
        self._parts.clear()
        self._held = 0

    def finish(self) -> bytes:
        """Close the stream and return the complete blob (idempotent: a second
        call returns the same bytes).  The writer then refuses appends."""
        if self._released:
            raise RuntimeError("ReplayWriter.finish() after release()")
        if self._blob is None:
            self._emit(_END.pack(b"E", self._frames))
            tail = self._z.flush()
            self._header["frame_count"] = self._frames
            hjson = json.dumps(self._header, allow_nan=False, separators=(",", ":")).encode()
            head = _gzip_member(
                _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hjson)) + hjson, self._level
            )
            body: list[bytes] = []
            if self._spilled:
                assert self._spill_path is not None
                with open(self._spill_path, "rb") as fh:
                    body.append(fh.read())
                if len(body[0]) != self._spilled:
                    # not the path: it is built from the org and session ids
                    raise OSError(f"the replay spill file holds {len(body[0])} bytes, "
                                  f"expected {self._spilled}")
            self._blob = b"".join([head, *body, *self._parts, tail])
            self._parts.clear()
            self._held = 0
            self._z = None
            self._nbytes = len(self._blob)
        return self._blob

    def release(self) -> None:
        """Forget the finished blob (the caller has stored it), so that a finished
        session does not hold megabytes while it waits to publish. The writer then
        refuses ``append`` and ``finish``; its counters stay readable."""
        if self._blob is None:
            raise RuntimeError("ReplayWriter.release() before finish()")
        self._blob = None
        self._released = True


def _max_error_list(
    max_error: float | Sequence[float] | None, space: str, channels: int
) -> list[float]:
    if max_error is None:
        errs = default_max_error(space, channels)
    elif isinstance(max_error, int | float):
        errs = [float(max_error)] * channels
    else:
        errs = [float(v) for v in max_error]
    if len(errs) != channels or not all(math.isfinite(e) and 0 < e <= 1e3 for e in errs):
        raise ValueError(f"max_error needs {channels} finite values in (0, 1000], got {errs}")
    return errs


# --------------------------------------------------------------------------- reader
def _gunzip(data: bytes, limit: int) -> bytes:
    """Concatenated gzip members -> bytes, with precise errors."""
    if not data:
        raise ReplayFormatError("empty blob")
    out: list[bytes] = []
    total = 0
    pos = 0
    member = 0
    while pos < len(data):
        member += 1
        if data[pos : pos + 2] != b"\x1f\x8b":
            what = "not a gzip stream" if member == 1 else f"garbage after gzip member {member - 1}"
            raise ReplayFormatError(f"{what} at blob offset {pos} (bytes {data[pos : pos + 4]!r})")
        d = zlib.decompressobj(31)
        buf = memoryview(data)[pos:]
        try:
            while True:
                chunk = d.decompress(buf, limit - total + 1)
                total += len(chunk)
                out.append(chunk)
                if total > limit:
                    raise ReplayFormatError(f"decompressed size exceeds limit of {limit} bytes")
                if d.eof or not d.unconsumed_tail:
                    break
                buf = memoryview(d.unconsumed_tail)
        except zlib.error as e:
            raise ReplayFormatError(
                f"corrupt gzip member {member} at blob offset {pos}: {e}"
            ) from e
        if not d.eof:
            raise ReplayFormatError(
                f"truncated blob: gzip member {member} (from offset {pos}) ends before its "
                f"end-of-stream marker; blob is {len(data)} bytes"
            )
        pos = len(data) - len(d.unused_data)
    return b"".join(out)


def _parse_header(raw: bytes) -> tuple[ReplayHeader, int]:
    if len(raw) < _PREFIX.size:
        raise ReplayFormatError(f"stream of {len(raw)} bytes is shorter than the replay prefix")
    magic, version, hlen = _PREFIX.unpack_from(raw, 0)
    if magic != MAGIC:
        raise ReplayFormatError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version not in SUPPORTED_VERSIONS:
        raise ReplayFormatError(
            f"unsupported replay format version {version} (this reader supports "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    end = _PREFIX.size + hlen
    if hlen > MAX_HEADER_BYTES or end > len(raw):
        raise ReplayFormatError(f"header length {hlen} runs past the stream ({len(raw)} bytes)")
    try:
        h = json.loads(raw[_PREFIX.size : end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReplayFormatError(f"header JSON is invalid: {e}") from e
    if not isinstance(h, dict):
        raise ReplayFormatError("header JSON is not an object")
    for key, typ in _REQUIRED.items():
        if not isinstance(h.get(key), typ) or isinstance(h.get(key), bool):
            raise ReplayFormatError(f"header field {key!r} missing or not {typ.__name__}")
    if h["version"] != version:
        raise ReplayFormatError(f"header JSON version {h['version']} != binary version {version}")
    if h["encoding"] not in ENCODINGS:
        raise ReplayFormatError(f"unknown encoding {h['encoding']!r} in header")
    if h["landmarks"] < 1 or h["channels"] < 1 or h["landmarks"] * h["channels"] > 4096:
        raise ReplayFormatError("header landmarks/channels out of range")
    if h["frame_count"] < 0:
        raise ReplayFormatError("header frame_count is negative")
    if h["encoding"] == "q16delta":
        p = h["encoding_params"]
        for k in ("max_error", "step"):
            v = p.get(k)
            ok = isinstance(v, list) and len(v) == h["channels"]
            if not ok or not all(
                isinstance(x, int | float) and math.isfinite(x) and x > 0 for x in v
            ):
                raise ReplayFormatError(
                    f"q16delta header needs {h['channels']} positive {k} values"
                )
    hdr = ReplayHeader(**{k: h[k] for k in _REQUIRED})
    return hdr, end


def read_replay(data: bytes, *, max_decompressed: int = DEFAULT_MAX_DECOMPRESSED) -> Replay:
    """Decode a replay blob of any supported version and encoding.

    Returns ``t_ms`` float64 (T,) and ``frames`` float32 (T, L, C).  Lossless
    encodings return the appended float32 values bit for bit; q16delta returns
    every finite value within the header's ``max_error`` of the original and
    non-finite values (NaN rows included) bit for bit.  Raises
    ReplayFormatError for anything that is not a complete, consistent replay;
    ``max_decompressed`` bounds memory on hostile input.
    """
    raw = _gunzip(bytes(data), max_decompressed)
    hdr, pos = _parse_header(raw)
    L, C = hdr.landmarks, hdr.channels
    p = hdr.encoding_params
    codec = ChunkCodec(
        hdr.encoding, landmarks=L, channels=C, max_error=p.get("max_error"), step=p.get("step")
    )
    view = memoryview(raw)
    ts: list[np.ndarray] = []
    fs: list[np.ndarray] = []
    count = 0
    while True:
        if pos >= len(raw):
            raise ReplayFormatError(f"body ends at byte {pos} without an end record (truncated)")
        tag = raw[pos : pos + 1]
        if tag == b"E":
            if pos + _END.size > len(raw):
                raise ReplayFormatError(f"end record at byte {pos} is cut short")
            (n_end,) = struct.unpack_from("<I", raw, pos + 1)
            pos += _END.size
            if pos != len(raw):
                raise ReplayFormatError(f"{len(raw) - pos} stray bytes after the end record")
            if n_end != count or hdr.frame_count != count:
                raise ReplayFormatError(
                    f"frame count mismatch: chunks hold {count}, end record says {n_end}, "
                    f"header says {hdr.frame_count}"
                )
            break
        if tag != b"C":
            raise ReplayFormatError(f"unknown record tag {tag!r} at byte {pos}")
        if pos + _CHUNK.size > len(raw):
            raise ReplayFormatError(f"chunk header at byte {pos} is cut short")
        _, n, plen = _CHUNK.unpack_from(raw, pos)
        start = pos + _CHUNK.size
        if n < 1 or start + plen > len(raw):
            raise ReplayFormatError(
                f"chunk at byte {pos}: {n} frames, {plen}-byte payload overruns"
            )
        try:
            t, f = codec.decode(n, view[start : start + plen])
        except CodecError as e:
            raise ReplayFormatError(f"chunk at byte {pos} ({hdr.encoding}): {e}") from e
        ts.append(t)
        fs.append(f.reshape(n, L, C))
        count += n
        pos = start + plen
    t_all = np.concatenate(ts) if ts else np.zeros(0, np.float64)
    f_all = np.concatenate(fs) if fs else np.zeros((0, L, C), np.float32)
    return Replay(header=hdr, t_ms=t_all, frames=f_all)
