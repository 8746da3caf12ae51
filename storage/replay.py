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
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .replay_codec import (
    ENCODINGS,
    LOSSLESS,
    ChunkCodec,
    default_max_error,
    steps_for,
)
from .replay_format import (
    _CHUNK,
    _END,
    _PREFIX,
    DEFAULT_ENCODING,
    DEFAULT_MAX_DECOMPRESSED,
    DEFAULT_STRATEGY,
    FORMAT_VERSION,
    MAGIC,
    MAX_CHUNK_FRAMES,
    MAX_HEADER_BYTES,
    SPACES,
    SPILL_BYTES,
    STRATEGIES,
    SUPPORTED_VERSIONS,
    ZLIB_MEMLEVEL,
    ZLIB_WBITS,
    Replay,
    ReplayFormatError,
    ReplayHeader,
)
from .replay_reader import read_replay

# The format's names and the reader stay importable from here, where they always were.
__all__ = [
    "DEFAULT_ENCODING",
    "DEFAULT_MAX_DECOMPRESSED",
    "DEFAULT_STRATEGY",
    "ENCODINGS",
    "FORMAT_VERSION",
    "LOSSLESS",
    "MAGIC",
    "MAX_CHUNK_FRAMES",
    "MAX_HEADER_BYTES",
    "Replay",
    "ReplayFormatError",
    "ReplayHeader",
    "ReplayWriter",
    "SPACES",
    "SPILL_BYTES",
    "STRATEGIES",
    "SUPPORTED_VERSIONS",
    "ZLIB_MEMLEVEL",
    "ZLIB_WBITS",
    "read_replay",
]


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
        # A 4 KB window and memLevel 4 keep zlib's state near 30 KB per live
        # session (the defaults take about 260 KB); see ZLIB_WBITS for the sizes.
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
        # A page-cache append of <= SPILL_BYTES every few seconds per session:
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
