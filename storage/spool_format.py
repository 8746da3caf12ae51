"""The spool's record formats: records, keys, and reading one record back.

Two formats. The *segment record* (magic ``RXG1``, below) is what the spool writes
now: every session's records go into shared segment files, each record tagged with
its key. The *log record* (magic ``RXS1``) is the format of the per-session log
files earlier versions wrote (``org/session.log``); the spool still reads those
(:class:`storage.spool_files.LogReader`) so that a process started on an old data
dir recovers its sessions, and never writes it again.

Log record format (all integers little-endian; header 16 bytes)::

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

Segment record format: the same 16-byte header with magic ``b"RXG1"``, then a body
of L bytes (the CRC covers header bytes 0..11 and the whole body)::

    offset size  field (offsets from the start of the body)
    0      2     u16    key length K
    2      4     u32    generation of the key (0, then +1 after each removal)
    6      8     u64    sequence number of the record within the key's generation
    14     K            the key, ASCII
    14+K   L-14-K       stored payload (zlib-compressed if flag bit 0)

Flag bit 1 marks a *tombstone*: "the key's records of generations <= this one are
removed" (kind 0, no payload). How generations, sequence numbers and tombstones
give per-key order across segments and compaction: :mod:`storage.spool_index`.

Reading a log (``.log``) stops at the first record that is short, has a wrong
magic, an impossible length, unknown flags, a bad CRC or an undecompressable
payload: the file is truncated to the last good record and fsynced, and the cut is
counted (``torn_tails``). A crash can only damage bytes written after the log's
last fsync, and no append returns before its fsync, so nothing acknowledged is cut.
The converse does not hold: a record whose append failed or was in flight at a
crash may survive intact, so whoever replays a log must tolerate records that were
never acknowledged (the session sequencer drops duplicates by sequence number).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Final

from storage import logtags
from storage.journal import Record

MAGIC: Final = b"RXS1"
SEG_MAGIC: Final = b"RXG1"
HEADER: Final = struct.Struct("<4sIHHI")  # magic, length, kind, flags, crc
SEG_PREFIX: Final = struct.Struct("<HIQ")  # key length, generation, sequence number
FLAG_ZLIB: Final = 0x1
FLAG_TOMB: Final = 0x2
MAX_PAYLOAD: Final = 64 * 1024 * 1024
_SEGMENT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RESERVED_SUFFIXES: Final = (".log", ".json", ".tmp")


def encode_record(kind: int, payload: bytes, compress_level: int = 1) -> bytes:
    """One record, header and stored payload (compressed if that is smaller)."""
    flags, stored = pack_payload(payload, compress_level)
    head = HEADER.pack(MAGIC, len(stored), kind, flags, 0)[:12]
    crc = zlib.crc32(stored, zlib.crc32(head))
    return head + struct.pack("<I", crc) + stored


def pack_payload(payload: bytes, compress_level: int) -> tuple[int, bytes]:
    """(flags, stored bytes): compressed if that is smaller."""
    if compress_level > 0 and len(payload) >= 64:
        packed = zlib.compress(payload, compress_level)
        if len(packed) < len(payload):
            return FLAG_ZLIB, packed
    return 0, payload


def encode_seg_record(key: str, gen: int, seq: int, kind: int, payload: bytes,
                      compress_level: int = 1, *, tomb: bool = False) -> bytes:
    """One segment record (header and body); a tombstone if ``tomb``."""
    flags, stored = (FLAG_TOMB, b"") if tomb else pack_payload(payload, compress_level)
    k = key.encode()
    body = SEG_PREFIX.pack(len(k), gen, seq) + k + stored
    head = HEADER.pack(SEG_MAGIC, len(body), kind, flags, 0)[:12]
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + struct.pack("<I", crc) + body


@dataclass(frozen=True)
class SegRecord:
    """A segment record as read back: payload still stored (maybe compressed)."""

    key: str
    gen: int
    seq: int
    kind: int
    flags: int
    stored: bytes
    size: int  # header + body bytes

    @property
    def tomb(self) -> bool:
        return bool(self.flags & FLAG_TOMB)

    def record(self) -> Record:
        """The caller's record; ValueError if the payload does not decompress."""
        if self.flags & FLAG_ZLIB:
            try:
                return Record(self.kind, zlib.decompress(self.stored))
            except zlib.error as e:
                raise ValueError("bad compressed payload") from e
        return Record(self.kind, self.stored)


def _read_frame(f: Any, left: int, magic: bytes,
                max_length: int) -> tuple[tuple[int, int, int, bytes] | None, str | None]:
    """The next record's (kind, flags, length, body) with its CRC checked, or (None,
    problem; None at a clean end). ``left``: bytes from here to the end of the file."""
    head = f.read(HEADER.size)
    if not head:
        return None, None
    if len(head) < HEADER.size:
        return None, "torn header"
    got_magic, length, kind, flags, crc = HEADER.unpack(head)
    if got_magic != magic:
        return None, "bad magic"
    if length > left - HEADER.size or length > max_length:
        return None, "torn payload"
    body = f.read(length)
    if len(body) < length:
        return None, "torn payload"
    if zlib.crc32(body, zlib.crc32(head[:12])) != crc:
        return None, "bad crc"
    return (kind, flags, length, body), None


def read_seg_one(f: Any, left: int) -> tuple[SegRecord | None, str | None]:
    """The next segment record, or (None, problem; None at a clean end). ``left``:
    bytes from here to the end of the file."""
    frame, problem = _read_frame(f, left, SEG_MAGIC, MAX_PAYLOAD + 1024)
    if frame is None:
        return None, problem
    kind, flags, length, body = frame
    if length < SEG_PREFIX.size:
        return None, "torn payload"
    if flags & ~(FLAG_ZLIB | FLAG_TOMB):
        return None, "unknown flags"
    klen, gen, seq = SEG_PREFIX.unpack_from(body)
    if SEG_PREFIX.size + klen > length:
        return None, "bad key length"
    try:
        key = body[SEG_PREFIX.size:SEG_PREFIX.size + klen].decode("ascii")
    except UnicodeDecodeError:
        return None, "bad key"
    stored = body[SEG_PREFIX.size + klen:]
    return SegRecord(key, gen, seq, kind, flags, stored, HEADER.size + length), None


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


def check_append(key: str, kind: int, payload: bytes) -> bytes:
    """The payload as bytes, once ``key``, ``kind`` and its size are valid for a journal
    record; ``ValueError`` otherwise (every journal adapter takes the same records)."""
    check_key(key)
    if not 0 <= kind <= 0xFFFF:
        raise ValueError(f"record kind {kind} outside 0..65535")
    data = bytes(payload)
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"record payload of {len(data)} bytes exceeds {MAX_PAYLOAD}")
    return data


def read_one(f: Any, left: int) -> tuple[tuple[Record, int] | None, str | None]:
    """The next record and its stored length, or (None, problem; None at a clean end)."""
    frame, problem = _read_frame(f, left, MAGIC, MAX_PAYLOAD)
    if frame is None:
        return None, problem
    kind, flags, length, body = frame
    if flags & ~FLAG_ZLIB:
        return None, "unknown flags"
    if flags & FLAG_ZLIB:
        try:
            body = zlib.decompress(body)
        except zlib.error:
            return None, "bad compressed payload"
    return (Record(kind, body), length), None


def tag(key: str) -> str:
    """What log lines carry instead of a key (keys join to a patient in the Core API):
    a keyed digest, see :mod:`storage.logtags`."""
    return logtags.tag("k_", key)
