"""Blob store interface: filesystem and in-memory stores."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import trio

from storage.blobs import (
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    BlobVerifyError,
    FilesystemBlobStore,
    MemoryBlobStore,
    blob_key,
    check_key,
)
from storage.replay import ReplayWriter, read_replay


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------ keys
def test_blob_key() -> None:
    assert blob_key("org_1", "9f1c2a.b-3") == "org_1/9f1c2a.b-3.bin.gz"


@pytest.mark.parametrize(
    ("org", "sess"),
    [("", "s"), ("o", ""), ("..", "s"), (".", "s"), ("o/x", "s"), ("o", "../s"),
     ("o", "s\n"), ("o", "ß"), (".hidden", "s"), ("o", "x" * 129), ("o", "a b")],
)  # fmt: skip
def test_blob_key_rejects_unsafe_ids(org: str, sess: str) -> None:
    with pytest.raises(ValueError):
        blob_key(org, sess)


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "a/../b", "..", "a//b", "a/", "./a", "a\\b", "a\x00b", "a/./b", "k" * 1025],
)
def test_check_key_rejects_escaping_keys(key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)


# ------------------------------------------------------------------ filesystem store
async def test_fs_put_get_exists_roundtrip(tmp_path: Path) -> None:
    store: BlobStore = FilesystemBlobStore(tmp_path / "blobs", trio.CapacityLimiter(2))
    data = os.urandom(100_000)
    key = blob_key("org1", "sess1")
    assert not await store.exists(key)
    info = await store.put(key, data)
    assert info == BlobInfo(key, len(data), hashlib.sha256(data).hexdigest())
    assert await store.exists(key)
    assert await store.get(key) == data
    assert (tmp_path / "blobs" / "org1" / "sess1.bin.gz").read_bytes() == data
    # idempotent overwrite, then a different object under the same key
    assert await store.put(key, data) == info
    assert (await store.put(key, b"v2")).size == 2
    assert await store.get(key) == b"v2"
    assert _files(tmp_path / "blobs") == ["org1/sess1.bin.gz"]  # no temp files left
    await store.aclose()


async def test_fs_missing_and_escaping_keys(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = FilesystemBlobStore(root)
    with pytest.raises(BlobNotFound):
        await store.get("org/none.bin.gz")
    await store.put("org/a", b"x")
    with pytest.raises(BlobNotFound):  # a path through a file, not a directory
        await store.get("org/a/b")
    for bad in ("../outside", "/etc/passwd", "org/../../outside", "org/./x"):
        with pytest.raises(ValueError):
            await store.put(bad, b"x")
        with pytest.raises(ValueError):
            await store.get(bad)
    assert os.listdir(tmp_path) == ["root"]
    assert not await store.exists("org")  # a directory is not a blob


async def test_fs_put_error_is_wrapped(tmp_path: Path) -> None:
    (tmp_path / "root").write_bytes(b"a file where the root directory should be")
    store = FilesystemBlobStore(tmp_path / "root")
    with pytest.raises(BlobStoreError, match="writing a blob failed") as ei:
        await store.put("o/k", b"data")
    assert isinstance(ei.value.__cause__, OSError)
    # the key (it names org and session) is an attribute, not in the logged message
    assert ei.value.key == "o/k" and "o/k" not in str(ei.value)
    assert str(tmp_path) not in str(ei.value)


class _CorruptingDisk(FilesystemBlobStore):
    def _read_back(self, path: Path) -> bytes:
        data = path.read_bytes()
        return data[:-1] + bytes([data[-1] ^ 1])


async def test_fs_verify_mismatch_raises(tmp_path: Path) -> None:
    store = _CorruptingDisk(tmp_path)
    with pytest.raises(BlobVerifyError, match="read back as 5 bytes"):
        await store.put("o/k", b"hello")


class _BlockingDisk(FilesystemBlobStore):
    """The worker thread signals when it runs and waits for permission to go on."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.started = threading.Event()
        self.release = threading.Event()

    def _read_back(self, path: Path) -> bytes:
        self.started.set()
        assert self.release.wait(10)
        return super()._read_back(path)


async def test_fs_cancel_during_write_waits_for_the_thread(tmp_path: Path) -> None:
    store = _BlockingDisk(tmp_path)
    data = os.urandom(50_000)
    infos: list[BlobInfo] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def cancel_when_writing() -> None:
                await trio.to_thread.run_sync(store.started.wait)
                scope.cancel()  # the put's thread is mid-way: already renamed
                store.release.set()

            nursery.start_soon(cancel_when_writing)
            infos.append(await store.put("o/k", data))
            await trio.lowlevel.checkpoint()
            pytest.fail("the cancellation should be delivered at the next checkpoint")
    assert scope.cancelled_caught
    # the thread was not abandoned: put finished (verified) despite the cancel,
    # the object is complete and no temp file is left
    assert infos[0].size == len(data)
    assert _files(tmp_path) == ["o/k"]
    assert (tmp_path / "o" / "k").read_bytes() == data


async def test_fs_cancel_before_thread_starts_writes_nothing(tmp_path: Path) -> None:
    limiter = trio.CapacityLimiter(1)
    store = FilesystemBlobStore(tmp_path, limiter)
    async with limiter:  # every worker slot is busy
        with trio.move_on_after(0.1) as cs:
            await store.put("o/k", b"data")
    assert cs.cancelled_caught
    assert _files(tmp_path) == []


class _CountingDisk(FilesystemBlobStore):
    def __init__(self, root: Path, limiter: trio.CapacityLimiter) -> None:
        super().__init__(root, limiter)
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def _read_back(self, path: Path) -> bytes:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        threading.Event().wait(0.02)
        with self.lock:
            self.running -= 1
        return super()._read_back(path)


async def test_fs_concurrent_puts_respect_limiter(tmp_path: Path) -> None:
    store = _CountingDisk(tmp_path, trio.CapacityLimiter(2))
    async with trio.open_nursery() as nursery:
        for i in range(12):
            nursery.start_soon(store.put, f"o/s{i}", bytes([i]) * 1000)
    assert store.peak == 2  # threads did overlap, but never beyond the limiter
    assert len(_files(tmp_path / "o")) == 12
    assert all([await store.get(f"o/s{i}") == bytes([i]) * 1000 for i in range(12)])


async def test_fs_closed_store_refuses(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    await store.aclose()
    with pytest.raises(BlobStoreError, match="closed"):
        await store.put("o/k", b"x")


async def test_replay_through_fs_store(tmp_path: Path) -> None:
    w = ReplayWriter(org_id="org1", session_id="s1", space="image")
    rng = np.random.default_rng(0)
    for i in range(10):
        w.append(np.arange(30) + 30.0 * i, rng.random((30, 33, 4), dtype=np.float32))
    store = FilesystemBlobStore(tmp_path)
    info = await store.put(blob_key("org1", "s1"), w.finish())
    r = read_replay(await store.get(info.key))
    assert r.header.frame_count == 300 and r.header.session_id == "s1"


# ------------------------------------------------------------------ memory store
async def test_memory_store_roundtrip_and_failures() -> None:
    store = MemoryBlobStore()
    info = await store.put("o/k", b"abc")
    assert info.sha256 == hashlib.sha256(b"abc").hexdigest()
    assert await store.get("o/k") == b"abc" and await store.exists("o/k")
    with pytest.raises(BlobNotFound):
        await store.get("o/missing")

    store.fail_puts = 2
    for _ in range(2):
        with pytest.raises(BlobStoreError, match="injected"):
            await store.put("o/f", b"x")
    assert not await store.exists("o/f")
    await store.put("o/f", b"x")  # the third attempt goes through

    store.corrupt_puts = 1
    with pytest.raises(BlobVerifyError):
        await store.put("o/c", b"payload")
    assert store.objects["o/c"] != b"payload"
    await store.put("o/c", b"payload")
    assert store.objects["o/c"] == b"payload"
    assert store.put_calls == 6

    with pytest.raises(ValueError):
        await store.put("../x", b"x")


async def test_memory_store_cancelled_put_stores_nothing(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryBlobStore()
    store.put_delay = 10.0
    with trio.move_on_after(5) as cs:
        await store.put("o/k", b"x")
    assert cs.cancelled_caught and not await store.exists("o/k")
    store.put_error = OSError("disk on fire")
    store.fail_puts = 1
    store.put_delay = 0
    with pytest.raises(OSError, match="disk on fire"):
        await store.put("o/k", b"x")
