"""The spool's log format: records, keys, and reading one record back.

Record format (all integers little-endian; header 16 bytes)::

    offset size  field
    0      4     magic  b"RXS1"
    4      4     u32    stored payload length L (after compression)
    8      2     u16    kind (the caller's record type)
    10     2     u16    flags: bit 0 = payload is zlib-compressed (zlib.compress format);
                        other bits must be 0
    12     4     u32    CRC-32 (zlib.crc32, ISO-HDLC polynomial) of bytes 0..11 then
                        the L stored payload bytes
    16     L            stored payload

CRC-32C would be the usual choice but needs a third-party package; the stdlib CRC-32
is as strong for this purpose and costs ~6 us per 16 KB here. A payload of 64 bytes
or more is stored compressed (zlib, level ``compress_level``, default 1; 0 = never)
if that makes it smaller, unless ``append(..., compress=False)``. Compression runs in
the committer's worker threads, not on the event loop.

Reading (:meth:`Spool.read`) stops at the first record that is short, has a wrong
magic, an impossible length, unknown flags, a bad CRC or an undecompressable
payload: the file is truncated to the last good record and fsynced, and the cut is
counted (``torn_tails``). A crash can only damage bytes written after the log's
last fsync, and no append returns before its fsync, so nothing acknowledged is cut.
The converse does not hold: a record whose append failed or was in flight at a
crash may survive intact, so whoever replays a log must tolerate records that were
never acknowledged (the session sequencer drops duplicates by sequence number).
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from typing import Any, Final

from storage.journal import Record

MAGIC: Final = b"RXS1"
HEADER: Final = struct.Struct("<4sIHHI")  # magic, length, kind, flags, crc
FLAG_ZLIB: Final = 0x1
MAX_PAYLOAD: Final = 64 * 1024 * 1024
_SEGMENT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RESERVED_SUFFIXES: Final = (".log", ".json", ".tmp")


def encode_record(kind: int, payload: bytes, compress_level: int = 1) -> bytes:
    """One record, header and stored payload (compressed if that is smaller)."""
    flags, stored = 0, payload
    if compress_level > 0 and len(payload) >= 64:
        packed = zlib.compress(payload, compress_level)
        if len(packed) < len(payload):
            flags, stored = FLAG_ZLIB, packed
    head = HEADER.pack(MAGIC, len(stored), kind, flags, 0)[:12]
    crc = zlib.crc32(stored, zlib.crc32(head))
    return head + struct.pack("<I", crc) + stored


def check_key(key: str) -> list[str]:
    parts = key.split("/") if isinstance(key, str) else []
    if not 1 <= len(parts) <= 4 or any(
        not _SEGMENT.fullmatch(p) or p.endswith(_RESERVED_SUFFIXES) for p in parts
    ):
        raise ValueError(
            "bad spool key: want 1-4 '/'-separated segments of A-Z a-z 0-9 . _ - "
            "(not starting with . _ -, not ending in .log/.json/.tmp)"
        )
    return parts


def read_one(f: Any, left: int) -> tuple[tuple[Record, int] | None, str | None]:
    """The next record and its stored length, or (None, problem; None at a clean end)."""
    head = f.read(HEADER.size)
    if not head:
        return None, None
    if len(head) < HEADER.size:
        return None, "torn header"
    magic, length, kind, flags, crc = HEADER.unpack(head)
    if magic != MAGIC:
        return None, "bad magic"
    if length > left - HEADER.size or length > MAX_PAYLOAD:
        return None, "torn payload"
    body = f.read(length)
    if len(body) < length:
        return None, "torn payload"
    if zlib.crc32(body, zlib.crc32(head[:12])) != crc:
        return None, "bad crc"
    if flags & ~FLAG_ZLIB:
        return None, "unknown flags"
    if flags & FLAG_ZLIB:
        try:
            body = zlib.decompress(body)
        except zlib.error:
            return None, "bad compressed payload"
    return (Record(kind, body), length), None


def tag(key: str) -> str:
    """What log lines carry instead of a key: keys join to a patient in the Core API."""
    return "k_" + hashlib.sha256(key.encode()).hexdigest()[:12]
