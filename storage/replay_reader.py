"""Reading a replay blob: :func:`read_replay` decodes one of any supported version and
encoding, refusing anything that is not a complete, consistent replay with
:class:`~storage.replay_format.ReplayFormatError`.

Synchronous and CPU-only (never awaits), so there is nothing to cancel.
"""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np

from .replay_codec import ENCODINGS, ChunkCodec, CodecError
from .replay_format import (
    _CHUNK,
    _END,
    _PREFIX,
    _REQUIRED,
    DEFAULT_MAX_DECOMPRESSED,
    MAGIC,
    MAX_HEADER_BYTES,
    SUPPORTED_VERSIONS,
    Replay,
    ReplayFormatError,
    ReplayHeader,
)


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
