"""The durable spool: real files in tmp dirs, real fsync (or an injected one).

Records live in shared segment files (``.segments/*.seg``); the per-session logs
(``org/session.log``) of the earlier layout are still read (migration tests)."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import storage.spool_files
import storage.spool_index
from storage.spool import (
    HEADER,
    MAGIC,
    Record,
    Spool,
    SpoolClosed,
    SpoolError,
    SpoolFull,
    encode_record,
)
from storage.spool_format import SEG_MAGIC, encode_seg_record
from tests.support.ready import poll


@asynccontextmanager
async def running(root: Path, **kw: object) -> AsyncIterator[Spool]:
    """A spool with its committer running; cancelled on exit."""
    spool = Spool(root, **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(spool.run)
        yield spool
        nursery.cancel_scope.cancel()


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def pose_like(i: int, n: int = 16_000) -> bytes:
    """Incompressible bytes, reproducible from ``i`` (a pose batch is mostly float
    mantissas, which zlib barely shrinks)."""
    return random.Random(i).randbytes(n)


def log_file(root: Path, key: str) -> Path:
    """A log of the old per-session layout."""
    return root / f"{key}.log"


def segments(root: Path) -> list[Path]:
    return sorted((root / ".segments").glob("*.seg"))


def seg_bytes(root: Path) -> int:
    total = 0
    for p in segments(root):
        with contextlib.suppress(FileNotFoundError):  # a compaction deleted it meanwhile
            total += p.stat().st_size
    return total


def rec_size(key: str, payload: bytes) -> int:
    """On-disk size of an uncompressed segment record."""
    return 16 + 14 + len(key) + len(payload)


async def until(cond: Callable[[], bool]) -> None:
    await poll(cond, 5, 0.01)


# ------------------------------------------------------------------ format
def test_record_format_is_as_documented() -> None:
    raw = encode_record(7, b"x" * 1000)
    magic, length, kind, flags, crc = HEADER.unpack(raw[:16])
    assert (magic, kind, flags) == (MAGIC, 7, 1)  # compressible: zlib flag
    assert length == len(raw) - 16 and length < 1000
    assert crc == zlib.crc32(raw[16:], zlib.crc32(raw[:12]))
    assert zlib.decompress(raw[16:]) == b"x" * 1000
    plain = encode_record(3, os.urandom(500))  # would grow: stored as is
    assert struct.unpack_from("<H", plain, 10)[0] == 0 and len(plain) == 516
    assert encode_record(1, b"x" * 1000, compress_level=0)[10:12] == b"\0\0"


@pytest.mark.parametrize("key", ["", "/a", "a/", "a//b", "../a", "a/..", ".a", "a b", "a\\b",
                                 "a/b/c/d/e", "a.log/b", "x" * 129, "a/b.json", 7])
async def test_unsafe_keys_rejected(tmp_path: Path, key: object) -> None:
    async with running(tmp_path) as spool:
        with pytest.raises(ValueError):
            await spool.append(key, 1, b"p")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            spool.read(key)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == [".segments"] and segments(tmp_path) == []


# ------------------------------------------------------------------ basics
async def test_roundtrip_kinds_and_compression(tmp_path: Path) -> None:
    recs = [Record(1, pose_like(0)), Record(2, b'{"a": 1}' * 500), Record(65535, b""),
            Record(0, b"tiny")]
    async with running(tmp_path) as spool:
        for r in recs:
            await spool.append("org-a/sess-1", r.kind, r.payload)
        assert spool.bytes_used == seg_bytes(tmp_path)
        s = spool.stats()
        assert s["records"] == 4 and s["sessions"] == 1 and s["fsyncs"] >= 1
    raw = sum(rec_size("org-a/sess-1", r.payload) for r in recs)
    (seg,) = segments(tmp_path)
    assert seg.stat().st_mode & 0o077 == 0  # patient data
    assert (tmp_path / ".segments").stat().st_mode & 0o077 == 0
    assert seg.stat().st_size < raw - 3000  # JSON compressed
    assert not (tmp_path / "org-a").exists()  # no file per session
    assert Spool(tmp_path).read("org-a/sess-1") == recs


async def test_compress_false_stores_as_is(tmp_path: Path) -> None:
    text = b'{"event": "timeupdate"}' * 200
    async with running(tmp_path) as spool:
        await spool.append("o/raw", 1, text, compress=False)
        await spool.append("o/packed", 1, text)
    s = spool.stats()
    assert s["bytes"] < 2 * rec_size("o/raw", b"") + len(text) + len(text) // 10
    assert s["bytes"] > rec_size("o/raw", text)
    assert Spool(tmp_path).read("o/raw") == Spool(tmp_path).read("o/packed") == [Record(1, text)]


async def test_append_needs_running_committer(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(SpoolClosed):
        await spool.append("o/s", 1, b"x")
    async with running(tmp_path) as spool:
        await spool.append("o/s", 1, b"x")
    with pytest.raises(SpoolClosed):  # stopped
        await spool.append("o/s", 1, b"x")
    with pytest.raises(RuntimeError):
        await spool.run()


async def test_group_commit_serves_many_sessions_per_fsync_round(tmp_path: Path) -> None:
    n = 300
    async with running(tmp_path, fsync_interval_s=0.02) as spool:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(spool.append, f"org-{i % 3}/sess-{i}", 1, pose_like(i, 2000))
        # the same session appending concurrently: one fsync per round for its file
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(spool.append, "org-0/busy", 2, pose_like(i, 500))
        s = spool.stats()
    assert s["records"] == n + 50
    assert s["rounds"] <= 10, s  # far fewer rounds than appends
    assert s["records_per_round"] >= 35
    # one fsync per round for every session: the shared segment (plus the segment
    # directory once, when the segment was created)
    assert s["fsyncs"] <= s["rounds"] + 2, s
    reader = Spool(tmp_path)
    assert len(reader.keys()) == n + 1
    assert len(reader.read("org-0/busy")) == 50
    assert reader.read("org-2/sess-5") == [Record(1, pose_like(5, 2000))]


async def test_rounds_are_rate_limited(tmp_path: Path) -> None:
    async with running(tmp_path, fsync_interval_s=0.1) as spool:
        t0 = trio.current_time()
        for i in range(4):  # sequential: each waits for its own round
            await spool.append("o/s", 1, b"%d" % i)
        elapsed = trio.current_time() - t0
    assert elapsed >= 0.29  # rounds 2..4 each waited for the interval
    assert spool.stats()["rounds"] == 4


# ------------------------------------------------------------------ fsync injection
async def test_append_returns_only_after_its_fsync(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    synced: list[str] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        gate.wait(10)
        real_fsync(fd)
        synced.append(_fd_path(fd))

    async with running(tmp_path) as spool:
        monkeypatch.setattr(os, "fsync", slow_fsync)
        done = trio.Event()

        async def appender() -> None:
            await spool.append("o/s", 1, b"payload")
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(appender)
            await trio.sleep(0.3)
            assert not done.is_set()  # written, maybe, but not fsynced: no answer yet
            assert synced == []
            gate.set()
        assert done.is_set()
    assert any(p.endswith(".seg") for p in synced)
    assert any(p == str(tmp_path / ".segments") for p in synced)  # new file: directory fsynced


async def test_failed_fsync_refuses_record_and_rolls_back(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    failures = {"left": 0}

    def flaky_fsync(fd: int) -> None:
        if failures["left"] and _fd_path(fd).endswith(".seg"):
            failures["left"] -= 1
            raise OSError(errno.EIO, "injected fsync failure")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky_fsync)
    async with running(tmp_path) as spool:
        await spool.append("o/s", 1, b"first")
        size = seg_bytes(tmp_path)
        failures["left"] = 1
        with pytest.raises(SpoolError, match="injected"):
            await spool.append("o/s", 1, b"refused")
        assert seg_bytes(tmp_path) == size  # rolled back
        assert spool.bytes_used == size
        await spool.append("o/s", 1, b"third")
        assert spool.stats()["failed"] == 1
    assert [r.payload for r in Spool(tmp_path).read("o/s")] == [b"first", b"third"]


class _Disk:
    """``storage.spool_files``'s view of :mod:`os` with a failing write (of a record
    carrying ``marker``) and, with ``no_truncate``, a failing cut-back."""

    def __init__(self, marker: bytes) -> None:
        self.marker, self.no_truncate = marker, False

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def write(self, fd: int, data: object) -> int:
        if self.marker in bytes(data):  # type: ignore[call-overload]
            os.write(fd, bytes(data)[:20])  # a torn record is left behind  # type: ignore[call-overload]
            raise OSError(errno.EIO, "disk says no")
        return os.write(fd, data)  # type: ignore[call-overload]

    def ftruncate(self, fd: int, size: int) -> None:
        if self.no_truncate:
            raise OSError(errno.EIO, "cannot cut")
        os.ftruncate(fd, size)


async def test_unrecoverable_write_breaks_its_key_other_sessions_fine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = _Disk(b"o/bad")
    monkeypatch.setattr(storage.spool_files, "os", disk)
    async with running(tmp_path) as spool:
        await spool.append("o/good", 1, b"g0")
        async with trio.open_nursery() as nursery:  # one round: the cut works
            nursery.start_soon(spool.append, "o/good", 1, b"g1")

            async def bad() -> None:
                with pytest.raises(SpoolError, match="disk says no"):
                    await spool.append("o/bad", 1, b"b")

            nursery.start_soon(bad)
        await spool.append("o/good", 1, b"g2")
        disk.no_truncate = True
        with pytest.raises(SpoolError):  # the torn bytes cannot be cut: key broken
            await spool.append("o/bad", 1, b"b")
        with pytest.raises(SpoolError, match="broken"):
            await spool.append("o/bad", 1, b"again")
        disk.no_truncate = False
        before = len(segments(tmp_path))
        await spool.append("o/good", 1, b"g3")  # goes to a new segment, past the torn bytes
        assert len(segments(tmp_path)) == before + 1
        disk.marker = b"\xff" * 64  # nothing fails any more
        await spool.remove("o/bad")  # removing clears it
        await spool.append("o/bad", 1, b"fresh")
    assert [r.payload for r in Spool(tmp_path).read("o/good")] == [b"g0", b"g1", b"g2", b"g3"]
    assert [r.payload for r in Spool(tmp_path).read("o/bad")] == [b"fresh"]
    async with running(tmp_path) as spool:  # start-up cuts the abandoned torn tail
        assert spool.torn_tails == 1
        assert [r.payload for r in await spool.aread("o/good")] == [b"g0", b"g1", b"g2", b"g3"]


async def test_errors_name_no_key_and_no_path(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Spool errors are logged with their tracebacks, and keys (``org/session``)
    join to a patient: the key is an attribute, never in the message, and an OSError
    is told by errno and strerror, without the file name it carries."""
    real_open = os.open
    key = "org-Q7TZ/sess-Q7TZ"

    real_write = os.write

    def full_disk(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT and "Q7TZ" in os.fspath(path):  # a new file on a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        return real_open(path, flags, mode)

    def full_write(fd: int, data: bytes) -> int:
        if b"Q7TZ" in bytes(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), _fd_path(fd))
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", full_disk)
    monkeypatch.setattr(os, "write", full_write)
    async with running(tmp_path) as spool:
        attempts = (lambda: spool.append(key, 1, b"x"),
                    lambda: spool.set_state(key, {"step": "upload"}))
        for attempt in attempts:
            with pytest.raises(SpoolError) as ei:
                await attempt()
            assert ei.value.key == key
            assert "Q7TZ" not in str(ei.value) and str(tmp_path) not in str(ei.value)
            assert str(ei.value).endswith(f"failed: [Errno {errno.ENOSPC}] "
                                          f"{os.strerror(errno.ENOSPC)}")
            assert isinstance(ei.value.__cause__, OSError)  # the full story, for code
        with pytest.raises(ValueError) as bad:
            await spool.append("org-Q7TZ/.sess", 1, b"x")
        assert "Q7TZ" not in str(bad.value)


async def test_failed_directory_fsync_fails_new_segment_until_it_succeeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    fail_dirs = {"on": True}

    def dir_failing(fd: int) -> None:
        if fail_dirs["on"] and os.path.isdir(_fd_path(fd)):
            raise OSError(errno.EIO, "injected directory fsync failure")
        real_fsync(fd)

    async with running(tmp_path) as spool:
        monkeypatch.setattr(os, "fsync", dir_failing)
        with pytest.raises(SpoolError, match="directory"):
            await spool.append("o/new", 1, b"1")  # the new segment's entry is not durable
        with pytest.raises(SpoolError, match="directory"):
            await spool.append("o/old", 1, b"y")  # same segment, still unsynced
        fail_dirs["on"] = False
        await spool.append("o/new", 1, b"2")  # the retried directory fsync succeeds
        await spool.append("o/old", 1, b"z")
        assert spool.stats()["failed"] == 2
    # refused records may survive (never acknowledged; the client resends)
    assert [r.payload for r in Spool(tmp_path).read("o/new")] == [b"1", b"2"]


# ------------------------------------------------------------------ torn tails (old layout)
def _write_log(path: Path, payloads: list[bytes]) -> list[int]:
    """Write records directly; the end offset of each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ends, data = [], b""
    for i, p in enumerate(payloads):
        data += encode_record(i, p)
        ends.append(len(data))
    path.write_bytes(data)
    return ends


def _truncate_to(n: int) -> Callable[[bytes, list[int]], bytes]:
    return lambda data, ends: data[: ends[1] + n]


def _flip(offset_from_end: int) -> Callable[[bytes, list[int]], bytes]:
    def f(data: bytes, ends: list[int]) -> bytes:
        i = len(data) - offset_from_end
        return data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:]
    return f


@pytest.mark.parametrize("damage", [
    pytest.param(_truncate_to(3), id="torn-header"),
    pytest.param(_truncate_to(16), id="header-only"),
    pytest.param(_truncate_to(500), id="torn-payload"),
    pytest.param(_flip(1), id="flipped-payload-byte"),
    pytest.param(lambda d, e: d[: e[1]] + b"XXS1" + d[e[1] + 4:], id="bad-magic"),
    pytest.param(lambda d, e: d[: e[1] + 4] + b"\xff\xff\xff\x7f" + d[e[1] + 8:], id="huge-len"),
    pytest.param(lambda d, e: d[: e[1] + 10] + b"\x04\x00" + d[e[1] + 12:], id="unknown-flag"),
])
def test_torn_or_corrupt_tail_is_cut_and_counted(tmp_path: Path, damage: Callable) -> None:
    path = log_file(tmp_path, "org/s")
    payloads = [pose_like(i, 2000) for i in range(3)]
    ends = _write_log(path, payloads)
    path.write_bytes(damage(path.read_bytes(), ends))
    spool = Spool(tmp_path)
    records = spool.read("org/s")
    assert [r.payload for r in records] == payloads[:2]
    assert path.stat().st_size == ends[1]  # cut back to the last good record
    assert spool.torn_tails == 1 and spool.stats()["torn_bytes"] > 0
    assert Spool(tmp_path).read("org/s") == records  # idempotent: nothing more to cut
    assert Spool(tmp_path).torn_tails == 0


def test_garbage_after_last_record_is_cut(tmp_path: Path) -> None:
    path = log_file(tmp_path, "org/s")
    ends = _write_log(path, [b"a" * 100, b"b" * 100])
    with path.open("ab") as f:
        f.write(b"\0" * 4096)  # e.g. a preallocated tail after power loss
    spool = Spool(tmp_path)
    assert [r.payload for r in spool.read("org/s")] == [b"a" * 100, b"b" * 100]
    assert path.stat().st_size == ends[-1] and spool.torn_tails == 1


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=8), cut=st.floats(0, 1))
def test_any_truncation_keeps_exactly_the_whole_records(tmp_path_factory: pytest.TempPathFactory,
                                                       sizes: list[int], cut: float) -> None:
    root = tmp_path_factory.mktemp("spool")
    path = log_file(root, "o/s")
    payloads = [bytes([i]) * n for i, n in enumerate(sizes)]
    ends = _write_log(path, payloads)
    keep = int(cut * ends[-1])
    with path.open("r+b") as f:
        f.truncate(keep)
    whole = sum(1 for e in ends if e <= keep)
    spool = Spool(root)
    assert [r.payload for r in spool.read("o/s")] == payloads[:whole]
    assert spool.torn_tails == (0 if keep in (0, *ends) else 1)


async def test_recovered_log_continues_after_cut(tmp_path: Path) -> None:
    async with running(tmp_path) as spool:
        for i in range(3):
            await spool.append("org/s", 1, b"rec%d" % i)
    (path,) = segments(tmp_path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 2)
    async with running(tmp_path) as spool:
        assert [r.payload for r in await spool.aread("org/s")] == [b"rec0", b"rec1"]
        assert spool.torn_tails == 1
        assert spool.bytes_used == seg_bytes(tmp_path)
        await spool.append("org/s", 1, b"rec3")
    assert [r.payload for r in Spool(tmp_path).read("org/s")] == [b"rec0", b"rec1", b"rec3"]


# ------------------------------------------------------------------ budget
async def test_spool_full_before_queuing_anything(tmp_path: Path) -> None:
    rec = pose_like(0, 1000)
    big = rec_size("o/a", rec)
    async with running(tmp_path, max_bytes=3 * big + 50, compress_level=0) as spool:
        for _ in range(3):
            await spool.append("o/a", 1, rec)
        used = spool.bytes_used
        with pytest.raises(SpoolFull):
            await spool.append("o/b", 1, rec)
        assert spool.bytes_used == used == seg_bytes(tmp_path)
        await spool.append("o/b", 1, b"small")  # what still fits is taken
        await spool.remove("o/a")
        # o/a's records are dead; compaction (between rounds) moves o/b's record
        # out and deletes the segment, tombstone and all
        await until(lambda: spool.bytes_used == rec_size("o/b", b"small"))
        assert seg_bytes(tmp_path) == spool.bytes_used
        assert spool.stats()["compacted_bytes"] == rec_size("o/b", b"small")
        await spool.append("o/b", 1, rec)
    reopened = Spool(tmp_path, max_bytes=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(reopened.run)
        assert reopened.bytes_used == rec_size("o/b", b"small") + big  # from the files
        with pytest.raises(SpoolFull):
            await reopened.append("o/c", 1, b"x")
        nursery.cancel_scope.cancel()


async def test_concurrent_appends_reserve_budget(tmp_path: Path) -> None:
    size = rec_size("o/s00", pose_like(0, 100))
    async with running(tmp_path, max_bytes=10 * size, compress_level=0) as spool:
        outcomes: list[str] = []

        async def one(i: int) -> None:
            try:
                await spool.append(f"o/s{i:02d}", 1, pose_like(i, 100))
                outcomes.append("ok")
            except SpoolFull:
                outcomes.append("full")

        async with trio.open_nursery() as nursery:
            for i in range(15):
                nursery.start_soon(one, i)
        assert outcomes.count("ok") == 10 and outcomes.count("full") == 5
        assert spool.bytes_used == 10 * size


# ------------------------------------------------------------------ state and removal
async def test_state_is_replaced_atomically(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(tmp_path) as spool:
        assert spool.get_state("o/s") is None
        await spool.append("o/s", 1, b"x")
        await spool.set_state("o/s", {"step": "blob_verified", "blob": {"size": 3}})
        assert spool.get_state("o/s") == {"step": "blob_verified", "blob": {"size": 3}}

        def broken_replace(src: object, dst: object) -> None:
            raise OSError(errno.ENOSPC, "injected")

        monkeypatch.setattr(os, "replace", broken_replace)
        with pytest.raises(SpoolError):
            await spool.set_state("o/s", {"step": "event_queued"})
        monkeypatch.undo()
        assert spool.get_state("o/s") == {"step": "blob_verified", "blob": {"size": 3}}
        assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["s.state.json"]
        await spool.set_state("o/s", {"step": "event_queued"})
        assert spool.get_state("o/s") == {"step": "event_queued"}
        with pytest.raises(TypeError):
            await spool.set_state("o/s", {"x": object()})
    # a crash mid-write leaves only a temp file, which never shows as the state
    (tmp_path / "o" / ".s.state.json.tmp").write_bytes(b'{"step": "half')
    spool = Spool(tmp_path)
    assert spool.get_state("o/s") == {"step": "event_queued"}
    async with running(tmp_path):
        pass
    assert not (tmp_path / "o" / ".s.state.json.tmp").exists()  # cleaned at start-up


def test_unparsable_state_reads_as_none_and_is_counted(tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "s.state.json").write_bytes(b"\x00garbage")
    spool = Spool(tmp_path)
    assert spool.get_state("o/s") is None
    assert spool.stats()["corrupt_states"] == 1


async def test_keys_survive_reopen_and_remove(tmp_path: Path) -> None:
    async with running(tmp_path) as spool:
        for key in ("org-a/s1", "org-a/s2", "org-b/s1", "flat"):
            await spool.append(key, 1, b"x")
        await spool.set_state("org-c/only-state", {"step": "event_queued"})
        await spool.remove("org-a/s2")
        await spool.remove("never-existed")
    (tmp_path / "org-a").mkdir()
    (tmp_path / "org-a" / "notes.txt").write_text("foreign")
    assert Spool(tmp_path).keys() == ["flat", "org-a/s1", "org-b/s1", "org-c/only-state"]
    async with running(tmp_path) as spool:
        assert spool.stats()["sessions"] == 3
        await spool.remove("org-c/only-state")
        assert "org-c/only-state" not in spool.keys()


async def test_ops_on_one_key_apply_in_order_within_a_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real_fsync = os.fsync
    first = {"seg": True}

    def gated(fd: int) -> None:
        if _fd_path(fd).endswith(".seg") and first["seg"]:
            first["seg"] = False
            gate.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", gated)
    async with running(tmp_path, fsync_threads=1) as spool:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spool.append, "o/blocker", 1, b"b")  # round 1 hangs in fsync
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(spool.append, "o/s", 1, b"old")  # round 2, in this order:
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(spool.set_state, "o/s", {"n": 1})
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(spool.remove, "o/s")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(spool.append, "o/s", 2, b"new")
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        assert spool.stats()["rounds"] == 2
    assert Spool(tmp_path).read("o/s") == [Record(2, b"new")]
    assert Spool(tmp_path).get_state("o/s") is None


# ------------------------------------------------------------------ cancellation
async def test_stopping_never_reports_false_durability(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real_fsync = os.fsync

    def gated(fd: int) -> None:
        gate.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", gated)
    spool = Spool(tmp_path)
    results: dict[str, object] = {}

    async def append(name: str) -> None:
        try:
            await spool.append(f"o/{name}", 1, name.encode())
            results[name] = "durable"
        except SpoolClosed as e:
            results[name] = e

    async def release_later() -> None:
        await trio.sleep(0.1)
        assert not results  # nobody was answered while the round was in its thread
        gate.set()

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            await nursery.start(spool.run)
            outer.start_soon(append, "inflight")
            await trio.testing.wait_all_tasks_blocked()  # round 1 is in its fsync
            outer.start_soon(append, "queued")
            await trio.testing.wait_all_tasks_blocked()
            outer.start_soon(release_later)  # the in-flight thread then finishes
            nursery.cancel_scope.cancel()  # stop the committer mid-round
    assert results["inflight"] == "durable"
    assert isinstance(results["queued"], SpoolClosed)
    assert [r.payload for r in Spool(tmp_path).read("o/inflight")] == [b"inflight"]
    assert Spool(tmp_path).read("o/queued") == []


async def test_cancelled_append_not_yet_committed_is_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real_fsync = os.fsync

    def gated(fd: int) -> None:
        gate.wait(10)
        real_fsync(fd)

    async with running(tmp_path) as spool:
        monkeypatch.setattr(os, "fsync", gated)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spool.append, "o/first", 1, b"1")
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(0.05) as scope:
                await spool.append("o/second", 1, b"2" * 1000)
            assert scope.cancelled_caught
            used = spool.bytes_used
            gate.set()
        assert used < 1000  # its reservation was released at once
        await spool.append("o/third", 1, b"3")  # a later round runs without it
    assert Spool(tmp_path).read("o/second") == []
    assert Spool(tmp_path).keys() == ["o/first", "o/third"]


async def test_read_refuses_a_key_with_queued_operations(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (gate.wait(10), real_fsync(fd)))
    async with running(tmp_path) as spool:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spool.append, "o/s", 1, b"1")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(RuntimeError, match="busy"):
                spool.read("o/s")
            gate.set()
        assert spool.read("o/s") == [Record(1, b"1")]


async def _collect(into: list[list[Record]], read: Awaitable[list[Record]]) -> None:
    into.append(await read)


async def test_a_read_never_meets_a_compaction_step_deleting_its_segment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up recovery reads logs (aread, a worker thread) while the committer
    runs: a removal completes a round, the committer plans a compaction step while
    nobody is reading, and the next key's read must not take positions in the
    segment that step copies away and deletes. The read's thread is held until the
    step has ended (as if scheduled late), which made it fail with
    FileNotFoundError when aread did not wait for the step."""
    import storage.spool as spool_module

    go, step_done = threading.Event(), threading.Event()
    real_step = Spool._upkeep_thread

    def step(self: Spool, *args: object) -> None:
        go.wait(10)  # held until the read has begun
        try:
            real_step(self, *args)  # type: ignore[arg-type]
        finally:
            step_done.set()

    real_read = spool_module.read_key

    def late_read(*args: object) -> list[Record]:
        step_done.wait(10)
        return real_read(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(Spool, "_upkeep_thread", step)
    monkeypatch.setattr(spool_module, "read_key", late_read)
    async with running(tmp_path, segment_bytes=4096) as spool:
        async with trio.open_nursery() as nursery:  # one round: A's and B's in segment 1
            nursery.start_soon(spool.append, "org-a/A", 1, b"a" * 100)
            for i in range(8):
                nursery.start_soon(functools.partial(
                    spool.append, "org-a/B", 2, bytes([i]) * 2000, compress=False))
        await spool.remove("org-a/B")  # segment 1 is now mostly dead: a step is due
        assert not step_done.is_set()  # the step is in flight as the read begins
        got: list[list[Record]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _collect(got, spool.aread("org-a/A")))
            await trio.testing.wait_all_tasks_blocked()
            go.set()
        assert got == [[Record(1, b"a" * 100)]]
        assert spool.stats()["segments_deleted"] >= 1  # it did delete segment 1
        await spool.append("org-a/A", 1, b"more")  # the key is writable again
        assert await spool.aread("org-a/A") == [Record(1, b"a" * 100), Record(1, b"more")]


# ------------------------------------------------------------------ the shared segment log
def _write_segment(root: Path, sid: int, records: list[bytes]) -> Path:
    path = root / ".segments" / f"{sid:012d}.seg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(records))
    return path


def test_segment_record_format_is_as_documented() -> None:
    raw = encode_seg_record("org/s", 3, 9, 7, b"x" * 1000)
    magic, length, kind, flags, crc = HEADER.unpack(raw[:16])
    assert (magic, kind, flags) == (SEG_MAGIC, 7, 1) and length == len(raw) - 16
    assert crc == zlib.crc32(raw[16:], zlib.crc32(raw[:12]))
    assert struct.unpack_from("<HIQ", raw, 16) == (5, 3, 9) and raw[30:35] == b"org/s"
    assert zlib.decompress(raw[35:]) == b"x" * 1000
    tomb = encode_seg_record("org/s", 4, 0, 0, b"", tomb=True)
    assert HEADER.unpack(tomb[:16])[3] == 2 and len(tomb) == 16 + 14 + 5


async def test_many_sessions_share_one_fsync_per_round_and_keep_their_order(
        tmp_path: Path) -> None:
    """Interleaved appends of many keys over many rounds and rolled segments: every
    key reads back in its own order, before and after a restart."""
    n, per = 60, 12
    async with running(tmp_path, segment_bytes=8 * 1024, fsync_interval_s=0.002) as spool:
        async def session(i: int) -> None:
            for r in range(per):
                await spool.append(f"org-{i % 4}/s{i}", r, pose_like(i * 100 + r, 300 + i))
                await trio.sleep(random.Random(i * 7 + r).random() * 0.005)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(session, i)
        s = spool.stats()
        assert s["records"] == n * per and s["records_per_round"] > 4
        # one segment fsync per round, plus a directory fsync per new segment
        assert s["fsyncs"] <= s["rounds"] + s["segments"] + s["segments_deleted"] + 1, s
        assert len(segments(tmp_path)) > 3  # rolled
    expected = {f"org-{i % 4}/s{i}": [Record(r, pose_like(i * 100 + r, 300 + i))
                                       for r in range(per)] for i in range(n)}
    reader = Spool(tmp_path)
    assert reader.keys() == sorted(expected)
    assert all(reader.read(k) == v for k, v in expected.items())
    async with running(tmp_path) as spool:
        assert spool.stats()["sessions"] == n
        for k, v in expected.items():
            assert await spool.aread(k) == v
        await spool.append("org-1/s1", 99, b"after restart")
    assert Spool(tmp_path).read("org-1/s1") == [*expected["org-1/s1"], Record(99, b"after restart")]


@pytest.mark.parametrize("damage", [
    pytest.param(lambda d: d[:-3], id="torn-payload"),
    pytest.param(lambda d: d[:-(16 + 14 + 5 + 200) + 7], id="torn-header"),
    pytest.param(lambda d: d[:-1] + bytes([d[-1] ^ 1]), id="bad-crc"),
    pytest.param(lambda d: d + b"\0" * 4096, id="zeros-after"),
])
async def test_torn_tail_in_a_shared_segment_is_cut_at_start_up(
        tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    recs = [encode_seg_record(f"o/s{i % 3}", 0, i // 3, 1, pose_like(i, 200), 0)
            for i in range(9)]
    path = _write_segment(tmp_path, 1, recs)
    intact = b"".join(recs[:-1])
    path.write_bytes(damage(path.read_bytes()))
    zeros = path.stat().st_size > len(b"".join(recs))
    assert [r.payload for r in Spool(tmp_path).read("o/s1")] == \
        [pose_like(i, 200) for i in (1, 4, 7)]  # a reader that does not own it: no cut
    async with running(tmp_path) as spool:
        assert spool.torn_tails == 1
        assert path.stat().st_size == (len(b"".join(recs)) if zeros else len(intact))
        last_gone = not zeros
        assert [r.payload for r in await spool.aread("o/s2")] == \
            [pose_like(i, 200) for i in ((2, 5) if last_gone else (2, 5, 8))]
        assert [r.payload for r in await spool.aread("o/s0")] == [pose_like(i, 200)
                                                                  for i in (0, 3, 6)]
        await spool.append("o/s2", 1, b"new")  # goes to a new segment, after the cut
    assert Spool(tmp_path).read("o/s2")[-1] == Record(1, b"new")
    async with running(tmp_path) as spool:
        assert spool.torn_tails == 0  # nothing more to cut


async def test_removal_deletes_dead_segments_and_never_resurrects_a_key(
        tmp_path: Path) -> None:
    async with running(tmp_path, segment_bytes=2000, compress_level=0) as spool:
        for i in range(6):  # old session's records spread over several segments
            await spool.append("o/old", 1, pose_like(i, 700))
            await spool.append("o/live", 1, b"l%d" % i)
        await spool.set_state("o/old", {"step": "publish"})
        assert len(segments(tmp_path)) >= 3
        await spool.remove("o/old")
        assert spool.get_state("o/old") is None and "o/old" not in spool.keys()
        # every segment is now mostly dead: compacted and deleted between rounds
        await spool.append("o/live", 1, b"l6")
        await until(lambda: spool.stats()["live_bytes"] * 2 + 2000 >= spool.bytes_used)
        assert spool.stats()["segments_deleted"] >= 1
        await until(lambda: spool.bytes_used == seg_bytes(tmp_path))  # once it settles
        await spool.remove("o/live")
        await spool.append("o/next", 1, b"n")
        await until(lambda: len(segments(tmp_path)) == 1)
    async with running(tmp_path) as spool:
        assert spool.keys() == ["o/next"]  # neither removed key came back
        assert await spool.aread("o/old") == [] and await spool.aread("o/live") == []
        await spool.append("o/old", 1, b"reused")  # a key can start over
    assert Spool(tmp_path).read("o/old") == [Record(1, b"reused")]


def test_generations_and_compaction_copies_read_back_once(tmp_path: Path) -> None:
    """Start-up rules: a tombstone hides the generations up to its own, in any
    segment; a record copied by a compaction that a crash cut short is read once."""
    k = "o/s"
    _write_segment(tmp_path, 1, [encode_seg_record(k, 0, 0, 1, b"gen0-a"),
                                 encode_seg_record(k, 0, 1, 1, b"gen0-b"),
                                 encode_seg_record("o/t", 0, 0, 1, b"t0"),
                                 encode_seg_record("o/t", 0, 1, 1, b"t1")])
    _write_segment(tmp_path, 2, [encode_seg_record(k, 0, 0, 0, b"", tomb=True),
                                 encode_seg_record(k, 1, 0, 1, b"gen1-a"),
                                 encode_seg_record("o/t", 0, 1, 1, b"t1"),  # copies
                                 encode_seg_record("o/t", 0, 2, 1, b"t2")])
    _write_segment(tmp_path, 3, [encode_seg_record(k, 1, 1, 1, b"gen1-b"),
                                 encode_seg_record("o/t", 0, 0, 1, b"t0")])
    spool = Spool(tmp_path)
    assert [r.payload for r in spool.read(k)] == [b"gen1-a", b"gen1-b"]
    assert [r.payload for r in spool.read("o/t")] == [b"t0", b"t1", b"t2"]


@pytest.mark.parametrize("copy_step", [None, 1500], ids=["default-step", "small-steps"])
async def test_disk_use_stays_bounded_as_sessions_come_and_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy_step: int | None) -> None:
    if copy_step is not None:  # a segment compacted over several steps
        monkeypatch.setattr(storage.spool_index, "COPY_STEP", copy_step)
    seg = 16 * 1024
    async with running(tmp_path, segment_bytes=seg, compress_level=0,
                       fsync_interval_s=0.001) as spool:
        peak_ratio = 0.0

        async def session(i: int) -> None:
            for r in range(8 + i % 5):
                await spool.append(f"o/s{i}", 1, pose_like(i * 31 + r, 500))
            if i % 4:  # most end; one in four stays live
                await spool.remove(f"o/s{i}")

        for wave in range(6):
            async with trio.open_nursery() as nursery:
                for i in range(wave * 20, wave * 20 + 20):
                    nursery.start_soon(session, i)
            await trio.sleep(0.05)  # compaction runs between rounds
            s = spool.stats()
            peak_ratio = max(peak_ratio, (s["bytes_used"] - 2 * seg) / max(1, s["live_bytes"]))
        assert peak_ratio <= 2.0, spool.stats()
        live = [f"o/s{i}" for i in range(120) if i % 4 == 0]
        assert spool.log_keys() == sorted(live)
    reader = Spool(tmp_path)
    for i in range(0, 120, 4):
        assert [r.payload for r in reader.read(f"o/s{i}")] == \
            [pose_like(i * 31 + r, 500) for r in range(8 + i % 5)]


# ------------------------------------------------------------------ the old layout
async def test_old_layout_is_recovered_continued_and_removed(tmp_path: Path) -> None:
    """A data dir written by the per-session layout (one ``.log`` per session, the
    ``RXS1`` format, state files): its sessions are found, replayed, continued in
    the segments, and removed with their old files."""
    _write_log(log_file(tmp_path, "org-a/s1"), [b"a0", b"a1" * 100])
    ends = _write_log(log_file(tmp_path, "org-a/s2"), [b"b0", b"b1"])
    with log_file(tmp_path, "org-a/s2").open("ab") as f:
        f.write(encode_record(5, b"torn")[:9])  # the crash that ended the old process
    _write_log(log_file(tmp_path, "org-b/s3"), [b"c0"])
    (tmp_path / "org-b" / "s3.state.json").write_text('{"step": "upload"}')
    (tmp_path / "ended" / "org-c").mkdir(parents=True)
    (tmp_path / "ended" / "org-c" / "s4.state.json").write_text('{"summary": {}}')
    async with running(tmp_path) as spool:
        assert await spool.sessions() == ["ended/org-c/s4", "org-a/s1", "org-a/s2",
                                          "org-b/s3"]
        assert spool.stats()["sessions"] == 3
        assert spool.bytes_used == sum(log_file(tmp_path, k).stat().st_size
                                       for k in ("org-a/s1", "org-a/s2", "org-b/s3"))
        assert await spool.replay("org-a/s1") == [Record(0, b"a0"), Record(1, b"a1" * 100)]
        assert [r.payload for r in await spool.replay("org-a/s2")] == [b"b0", b"b1"]
        assert spool.torn_tails == 1 and log_file(tmp_path, "org-a/s2").stat().st_size == ends[1]
        assert await spool.state("org-b/s3") == {"step": "upload"}
        await spool.append("org-a/s1", 2, b"a2")  # carried on in the segments
        await spool.remove("org-b/s3")
        assert not log_file(tmp_path, "org-b/s3").exists()
        assert spool.get_state("org-b/s3") is None
    async with running(tmp_path) as spool:
        assert spool.log_keys() == ["org-a/s1", "org-a/s2"]
        assert [r.payload for r in await spool.aread("org-a/s1")] == [b"a0", b"a1" * 100, b"a2"]
        await spool.remove("org-a/s1")
        assert not log_file(tmp_path, "org-a/s1").exists()
    assert Spool(tmp_path).keys() == ["ended/org-c/s4", "org-a/s2"]


async def test_old_layout_log_of_a_removed_key_is_deleted_at_start_up(tmp_path: Path) -> None:
    """A crash between a removal's tombstone and the deletion of the key's old log:
    the next start finishes the removal instead of bringing the key back."""
    _write_log(log_file(tmp_path, "o/gone"), [b"old"])
    _write_log(log_file(tmp_path, "o/kept"), [b"kept"])
    _write_segment(tmp_path, 1, [encode_seg_record("o/gone", 0, 0, 0, b"", tomb=True)])
    assert Spool(tmp_path).log_keys() == ["o/kept"]  # a read-only view agrees
    async with running(tmp_path) as spool:
        assert spool.log_keys() == ["o/kept"]
        assert await spool.aread("o/gone") == []
    assert not log_file(tmp_path, "o/gone").exists()
    assert Spool(tmp_path).read("o/kept") == [Record(0, b"kept")]


async def test_failed_fsync_fails_the_whole_round_and_puts_each_key_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One fsync covers a round, so its failure fails every key in it: a removal in
    it did not happen (the key keeps its records, in memory as on disk), and the
    keys carry on."""
    real_fsync = os.fsync
    fail = {"left": 0}

    def flaky(fd: int) -> None:
        if fail["left"] and _fd_path(fd).endswith(".seg"):
            fail["left"] -= 1
            raise OSError(errno.EIO, "injected")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky)
    async with running(tmp_path, fsync_interval_s=0.05) as spool:
        await spool.append("o/r", 1, b"r0")
        await spool.append("o/s", 1, b"s0")
        fail["left"] = 1
        outcomes: dict[str, str] = {}

        async def attempt(name: str, op: Callable[[], object]) -> None:
            try:
                await op()  # type: ignore[misc]
                outcomes[name] = "ok"
            except SpoolError:
                outcomes[name] = "failed"

        async with trio.open_nursery() as nursery:  # one round
            nursery.start_soon(attempt, "remove", lambda: spool.remove("o/r"))
            nursery.start_soon(attempt, "append", lambda: spool.append("o/s", 1, b"s1"))
        assert outcomes == {"remove": "failed", "append": "failed"}
        assert spool.log_keys() == ["o/r", "o/s"]
        assert spool.read("o/r") == [Record(1, b"r0")]
        await spool.append("o/s", 1, b"s2")
        await spool.remove("o/r")
    reader = Spool(tmp_path)
    assert reader.log_keys() == ["o/s"]
    assert [r.payload for r in reader.read("o/s")] == [b"s0", b"s2"]


_CHILD = """
import sys, trio
from pathlib import Path
from storage.spool import Spool

async def main(root):
    spool = Spool(Path(root), segment_bytes=64 * 1024, compress_level=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(spool.run)

        async def session(i):
            for r in range(100000):
                await spool.append(f"o/s{i}", 1, b"%d:%d:" % (i, r) + b"x" * (200 + 37 * i))
                print(i, r, flush=True)  # acknowledged

        for i in range(24):
            nursery.start_soon(session, i)

trio.run(main, sys.argv[1])
"""


def test_killed_mid_write_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """A real process appending for 24 sessions into the shared segments, SIGKILLed
    mid-write: at the next start every acknowledged record is there, each session
    in order, whatever was torn is cut, and appends carry on."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "spool"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert proc.stdout is not None
    acked: dict[int, int] = {}
    for line in proc.stdout:
        i, r = map(int, line.split())
        acked[i] = r
        if sum(acked.values()) > 3000:
            break
    time.sleep(0.01)  # mid-round, most likely
    proc.send_signal(signal.SIGKILL)
    with proc.stdout:
        for line in proc.stdout.read().splitlines():  # acknowledged before the kill
            i, r = map(int, line.split())
            acked[i] = max(acked.get(i, -1), r)
    proc.wait()

    async def recover() -> None:
        async with running(root) as spool:
            for i, last in acked.items():
                got = [r.payload.split(b":")[:2] for r in await spool.aread(f"o/s{i}")]
                assert len(got) >= last + 1  # never-acknowledged ones may be there too
                assert got == [[b"%d" % i, b"%d" % r] for r in range(len(got))]
            await spool.append("o/s0", 1, b"after")
        assert Spool(root).read("o/s0")[-1] == Record(1, b"after")

    trio.run(recover)
