"""S3BlobStore against a real moto S3 server (server mode, loopback) via real boto3.

Failure injection wraps the real client; S3 itself is never mocked.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import botocore.exceptions as bexc
import numpy as np
import pytest
import trio

from storage.blobs import BlobNotFound, BlobStoreError, BlobVerifyError, blob_key
from storage.replay import ReplayWriter, read_replay
from storage.s3 import MIN_PART_SIZE, S3BlobStore, bucket_name, is_transient
from tests.support.s3 import S3Server


@asynccontextmanager
async def open_store(server: S3Server, prefix: str, **kw: Any) -> AsyncIterator[S3BlobStore]:
    if "client" not in kw:
        kw["endpoint_url"] = server.endpoint_url
        kw["region"] = server.region
    store = S3BlobStore(bucket=server.bucket, prefix=prefix, **kw)
    try:
        yield store
    finally:
        await store.aclose()


def _client_error(code: str, status: int, op: str = "PutObject") -> bexc.ClientError:
    return bexc.ClientError(
        {
            "Error": {"Code": code, "Message": "injected"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        op,
    )


class Wrapped:
    """Delegates to a real boto3 client; ``hooks[name]`` runs before the real call
    (it may raise to inject a failure) and sees the call's kwargs."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: dict[str, int] = {}
        self.hooks: dict[str, Callable[[int, dict[str, Any]], None]] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(**kw: Any) -> Any:
            n = self.calls[name] = self.calls.get(name, 0) + 1
            if name in self.hooks:
                self.hooks[name](n, kw)
            return attr(**kw)

        return call


def _uploads(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    return client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])


# ------------------------------------------------------------------ happy paths
async def test_put_get_exists_with_prefix_and_sse(
    s3_server: S3Server, s3_prefix: str, s3_client: Any
) -> None:
    data = os.urandom(200_000)
    key = blob_key("org1", "sess1")
    async with open_store(s3_server, s3_prefix + "/replays/") as store:
        assert not await store.exists(key)
        info = await store.put(key, data)
        assert (info.key, info.size, info.sha256) == (
            key,
            len(data),
            hashlib.sha256(data).hexdigest(),
        )
        assert await store.exists(key)
        assert await store.get(key) == data
    head = s3_client.head_object(
        Bucket=s3_server.bucket, Key=f"{s3_prefix}/replays/{key}", ChecksumMode="ENABLED"
    )
    assert head["ContentLength"] == len(data)
    assert head["ServerSideEncryption"] == "AES256"
    assert head["Metadata"]["sha256"] == info.sha256
    assert "ChecksumSHA256" in head


async def test_kms_encryption(s3_server: S3Server, s3_prefix: str, s3_client: Any) -> None:
    kms = s3_server.client("kms")
    try:
        key_id = kms.create_key(Description="replays")["KeyMetadata"]["KeyId"]
    finally:
        kms.close()
    async with open_store(s3_server, s3_prefix, kms_key_id=key_id) as store:
        await store.put("o/k.bin.gz", b"secret replay")
        await store.put("o/big.bin.gz", os.urandom(MIN_PART_SIZE + 10))  # multipart too
    for k in ("o/k.bin.gz", "o/big.bin.gz"):
        head = s3_client.head_object(Bucket=s3_server.bucket, Key=f"{s3_prefix}/{k}")
        assert head["ServerSideEncryption"] == "aws:kms"
        assert head["SSEKMSKeyId"].endswith(key_id)


async def test_multipart_upload_for_large_blobs(
    s3_server: S3Server, s3_prefix: str, s3_client: Any
) -> None:
    data = os.urandom(2 * MIN_PART_SIZE + 12345)
    wrapped = Wrapped(s3_client)
    async with open_store(
        s3_server, s3_prefix, client=wrapped, multipart_threshold=MIN_PART_SIZE,
        part_size=MIN_PART_SIZE, verify="get",
    ) as store:  # fmt: skip
        info = await store.put("o/big", data)
        assert await store.get("o/big") == data
    assert info.size == len(data)
    assert wrapped.calls.get("upload_part") == 3 and "put_object" not in wrapped.calls
    head = s3_client.head_object(Bucket=s3_server.bucket, Key=f"{s3_prefix}/o/big")
    assert head["ETag"].strip('"').endswith("-3")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert _uploads(s3_client, s3_server.bucket, s3_prefix) == []


async def test_small_blob_uses_single_put(
    s3_server: S3Server, s3_prefix: str, s3_client: Any
) -> None:
    wrapped = Wrapped(s3_client)
    async with open_store(s3_server, s3_prefix, client=wrapped) as store:
        await store.put("o/small", b"x" * 1000)
    assert wrapped.calls.get("put_object") == 1 and "upload_part" not in wrapped.calls


async def test_a_blob_is_written_once_and_a_second_writer_verifies_it(
    s3_server: S3Server, s3_prefix: str, s3_client: Any
) -> None:
    """Two writers of one session's blob (a retry, or two instances finishing the
    same session): one object version; the second put verifies the same bytes, and
    different bytes are a verify error, never an overwrite."""
    s3_client.put_bucket_versioning(Bucket=s3_server.bucket,
                                    VersioningConfiguration={"Status": "Enabled"})
    try:
        data = os.urandom(50_000)
        key = blob_key("org1", "sess-twice")
        async with open_store(s3_server, s3_prefix + "/") as store:
            first = await store.put(key, data)
            assert await store.put(key, data) == first
            with pytest.raises(BlobVerifyError):
                await store.put(key, os.urandom(50_000))
            assert await store.get(key) == data
        versions = s3_client.list_object_versions(
            Bucket=s3_server.bucket, Prefix=f"{s3_prefix}/{key}").get("Versions", [])
        assert len(versions) == 1
    finally:
        s3_client.put_bucket_versioning(Bucket=s3_server.bucket,
                                        VersioningConfiguration={"Status": "Suspended"})


async def test_missing_keys_and_bad_keys(s3_server: S3Server, s3_prefix: str) -> None:
    async with open_store(s3_server, s3_prefix) as store:
        with pytest.raises(BlobNotFound):
            await store.get("o/nothing")
        assert not await store.exists("o/nothing")
        with pytest.raises(ValueError):
            await store.put("../escape", b"x")


async def test_replay_roundtrip_through_s3(s3_server: S3Server, s3_prefix: str) -> None:
    w = ReplayWriter(org_id="org1", session_id="s1", space="world", encoding="f32delta")
    rng = np.random.default_rng(5)
    frames = rng.normal(size=(300, 33, 4)).astype(np.float32)
    for i in range(0, 300, 30):
        w.append(np.arange(i, i + 30) * 33.3, frames[i : i + 30])
    async with open_store(s3_server, s3_prefix) as store:
        info = await store.put(blob_key("org1", "s1"), w.finish())
        r = read_replay(await store.get(info.key))
    assert np.array_equal(r.frames, frames)


# ------------------------------------------------------------------ retries
async def test_transient_errors_are_retried_with_backoff(
    s3_server: S3Server, s3_prefix: str, s3_client: Any, autojump_clock: trio.abc.Clock
) -> None:
    wrapped = Wrapped(s3_client)
    failures = [
        _client_error("SlowDown", 503),
        bexc.EndpointConnectionError(endpoint_url="http://nowhere"),
        _client_error("InternalError", 500),
    ]

    def flaky(n: int, kw: dict[str, Any]) -> None:
        if n <= len(failures):
            raise failures[n - 1]

    wrapped.hooks["put_object"] = flaky
    async with open_store(s3_server, s3_prefix, client=wrapped, backoff_base=1.0) as store:
        start = trio.current_time()
        info = await store.put("o/k", b"eventually")
        slept = trio.current_time() - start
        assert await store.get("o/k") == b"eventually"
    assert info.size == 10
    assert wrapped.calls["put_object"] == 4
    # delays 1, 2, 4 s, each jittered into [50%, 100%]
    assert 0.5 * (1 + 2 + 4) <= slept


async def test_retries_give_up_after_max_attempts(
    s3_server: S3Server, s3_prefix: str, s3_client: Any, autojump_clock: trio.abc.Clock
) -> None:
    wrapped = Wrapped(s3_client)

    def always(n: int, kw: dict[str, Any]) -> None:
        raise _client_error("ServiceUnavailable", 503)

    wrapped.hooks["put_object"] = always
    async with open_store(s3_server, s3_prefix, client=wrapped, max_attempts=4) as store:
        with pytest.raises(BlobStoreError, match="ServiceUnavailable") as ei:
            await store.put("o/k", b"never")
        assert not await store.exists("o/k")
    assert isinstance(ei.value.__cause__, bexc.ClientError)
    assert wrapped.calls["put_object"] == 4


async def test_permanent_errors_are_not_retried(
    s3_server: S3Server, s3_prefix: str, s3_client: Any
) -> None:
    wrapped = Wrapped(s3_client)

    def denied(n: int, kw: dict[str, Any]) -> None:
        raise _client_error("AccessDenied", 403)

    wrapped.hooks["put_object"] = denied
    async with open_store(s3_server, s3_prefix, client=wrapped) as store:
        with pytest.raises(BlobStoreError, match="AccessDenied"):
            await store.put("o/k", b"x")
    assert wrapped.calls["put_object"] == 1


def test_transient_classification() -> None:
    assert is_transient(_client_error("SlowDown", 503))
    assert is_transient(_client_error("Whatever", 502))
    assert is_transient(bexc.ReadTimeoutError(endpoint_url="x"))
    assert not is_transient(_client_error("NoSuchBucket", 404))
    assert not is_transient(ValueError("x"))


# ------------------------------------------------------------------ multipart failures
async def test_failed_multipart_upload_is_aborted(
    s3_server: S3Server, s3_prefix: str, s3_client: Any
) -> None:
    wrapped = Wrapped(s3_client)

    def fail_second(n: int, kw: dict[str, Any]) -> None:
        if kw["PartNumber"] == 2:
            raise _client_error("AccessDenied", 403, "UploadPart")

    wrapped.hooks["upload_part"] = fail_second
    async with open_store(
        s3_server,
        s3_prefix,
        client=wrapped,
        multipart_threshold=MIN_PART_SIZE,
        part_size=MIN_PART_SIZE,
    ) as store:
        with pytest.raises(BlobStoreError, match="AccessDenied"):
            await store.put("o/big", os.urandom(MIN_PART_SIZE + 1))
        assert not await store.exists("o/big")
    assert wrapped.calls["abort_multipart_upload"] == 1
    assert _uploads(s3_client, s3_server.bucket, s3_prefix) == []


async def test_cancelled_multipart_upload_is_aborted_under_shield(
    s3_server: S3Server, s3_prefix: str, s3_client: Any
) -> None:
    wrapped = Wrapped(s3_client)
    scope = trio.CancelScope()

    def cancel_during_second_part(n: int, kw: dict[str, Any]) -> None:
        if kw["PartNumber"] == 2:
            trio.from_thread.run_sync(scope.cancel)  # cancel while a boto3 call is in flight

    wrapped.hooks["upload_part"] = cancel_during_second_part
    async with open_store(
        s3_server,
        s3_prefix,
        client=wrapped,
        multipart_threshold=MIN_PART_SIZE,
        part_size=MIN_PART_SIZE,
    ) as store:
        with scope:
            await store.put("o/big", os.urandom(2 * MIN_PART_SIZE + 1))
            pytest.fail("put should have been cancelled")
        assert scope.cancelled_caught
        assert not await store.exists("o/big")
    assert wrapped.calls["upload_part"] == 2  # the third part was never sent
    assert wrapped.calls["abort_multipart_upload"] == 1
    assert _uploads(s3_client, s3_server.bucket, s3_prefix) == []


async def test_lost_complete_reply_is_recovered_by_verification(
    s3_server: S3Server, s3_prefix: str, s3_client: Any, autojump_clock: trio.abc.Clock
) -> None:
    wrapped = Wrapped(s3_client)
    real_complete = s3_client.complete_multipart_upload

    def complete_then_drop_reply(n: int, kw: dict[str, Any]) -> None:
        if n == 1:
            real_complete(**kw)  # the server completes the upload ...
            raise bexc.ConnectionClosedError(endpoint_url="x")  # ... but the reply is lost

    wrapped.hooks["complete_multipart_upload"] = complete_then_drop_reply
    data = os.urandom(MIN_PART_SIZE + 7)
    async with open_store(
        s3_server,
        s3_prefix,
        client=wrapped,
        multipart_threshold=MIN_PART_SIZE,
        part_size=MIN_PART_SIZE,
    ) as store:
        info = await store.put("o/big", data)
        assert await store.get("o/big") == data
    assert info.size == len(data)
    assert wrapped.calls["complete_multipart_upload"] == 2


# ------------------------------------------------------------------ verification
async def test_object_replaced_before_verification_raises(
    s3_server: S3Server, s3_prefix: str, s3_client: Any
) -> None:
    wrapped = Wrapped(s3_client)

    def concurrent_writer(n: int, kw: dict[str, Any]) -> None:
        s3_client.put_object(Bucket=kw["Bucket"], Key=kw["Key"], Body=b"someone else's bytes")

    wrapped.hooks["head_object"] = concurrent_writer
    async with open_store(s3_server, s3_prefix, client=wrapped) as store:
        with pytest.raises(BlobVerifyError, match="size 20 != 4"):
            await store.put("o/k", b"mine")


async def test_get_verification_catches_same_size_corruption(
    s3_server: S3Server, s3_prefix: str, s3_client: Any
) -> None:
    """A body swapped for same-size bytes with the metadata kept: HEAD cannot
    tell (moto echoes the declared checksum) but verify="get" and get() can."""
    wrapped = Wrapped(s3_client)
    good = b"A" * 64

    def corrupt(n: int, kw: dict[str, Any]) -> None:
        if n == 1:
            s3_client.put_object(
                Bucket=kw["Bucket"], Key=kw["Key"], Body=b"B" * 64,
                Metadata={"sha256": hashlib.sha256(good).hexdigest()},
            )  # fmt: skip

    wrapped.hooks["get_object"] = corrupt
    async with open_store(s3_server, s3_prefix, client=wrapped, verify="get") as store:
        with pytest.raises(BlobVerifyError, match="downloaded sha256"):
            await store.put("o/k", good)
        with pytest.raises(BlobVerifyError, match="sha256"):
            await store.get("o/k")


async def test_missing_object_after_upload_is_a_verify_error(
    s3_server: S3Server, s3_prefix: str, s3_client: Any
) -> None:
    wrapped = Wrapped(s3_client)
    wrapped.hooks["head_object"] = lambda n, kw: s3_client.delete_object(
        Bucket=kw["Bucket"], Key=kw["Key"]
    )
    async with open_store(s3_server, s3_prefix, client=wrapped) as store:
        with pytest.raises(BlobVerifyError, match="missing"):
            await store.put("o/k", b"x")


# ------------------------------------------------------------------ config & lifecycle
def test_bucket_name_and_validation() -> None:
    assert bucket_name("prod") == "restartix-telemetry-prod"
    assert S3BlobStore.for_env("staging").bucket == "restartix-telemetry-staging"
    with pytest.raises(ValueError):
        bucket_name("Prod_1")
    with pytest.raises(ValueError):
        S3BlobStore(bucket="b", part_size=1024)
    with pytest.raises(ValueError):
        S3BlobStore(bucket="b", prefix="a/../b")


async def test_closed_store_refuses(s3_server: S3Server, s3_prefix: str) -> None:
    async with open_store(s3_server, s3_prefix) as store:
        await store.put("o/k", b"x")
    with pytest.raises(BlobStoreError, match="closed"):
        await store.get("o/k")
