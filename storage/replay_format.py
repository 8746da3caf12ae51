"""Replay blob format: constants, record layouts, the header and the decoded replay.

The layout is described in :mod:`storage.replay` and ``docs/replay-format.md``; the
writer (:mod:`storage.replay`) and the reader (:mod:`storage.replay_reader`) share
what is here. Values only: nothing here does I/O or awaits.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

MAGIC: Final = b"RXREPLAY"
FORMAT_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)
DEFAULT_ENCODING: Final = "q16delta"
SPACES: Final = ("image", "world")
# zlib window: 4 KB. Z_RLE (below) only looks one byte back, so the window does not
# change the output's size (1.523 MB for a 10-minute session with 4 KB, 1 KB or 512
# bytes), and zlib's state per live session (tracemalloc) would fall from 30 KB to
# 18 KB at 1 KB. But a smaller window slides more often: at 1 KB zlib's slide
# doubled, +3.3 % instructions per acknowledged WebSocket batch for the whole ingest
# path (callgrind, bench/bench_ingest_path.py --child ws 8 30). CPU, not memory,
# limits the sessions a process holds, so the window stays. memLevel 4: below it
# blobs grow 1.5-7 %.
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
# With spill_path, memory holds at most about this much of a live session's replay:
# about 6 s of the default encoding (2.5 KB a second), then a page-cache append.
# 64 KB held 32 KB per session on average, as much as the rest of its state.
SPILL_BYTES: Final = 16 * 1024
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
