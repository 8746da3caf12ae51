"""S3 blob store (boto3) for production replays.

* One boto3 client per store, created lazily in a worker thread on first use
  (or passed in as ``client``).  Every boto3 call runs in
  ``trio.to_thread.run_sync(..., limiter=limiter)``; the limiter's token count
  also sizes botocore's connection pool.  botocore's own retries are switched
  off: :meth:`S3BlobStore._call` retries transient failures (connection
  errors, timeouts, 5xx, throttling) up to ``max_attempts`` with exponential
  backoff and jitter, sleeping with ``trio.sleep`` (so Trio's autojump clock
  drives it in tests).
* Encryption: ``ServerSideEncryption="aws:kms"`` with ``SSEKMSKeyId`` when
  ``kms_key_id`` is set, else ``"AES256"``.
* Blobs larger than ``multipart_threshold`` go up as a multipart upload in
  ``part_size`` parts (>= 5 MiB, the S3 minimum), one part at a time.
* Integrity: every PUT / UploadPart sends ``ChecksumAlgorithm="SHA256"`` with
  the precomputed ``ChecksumSHA256`` -- real S3 recomputes it and rejects a
  mismatching body -- and the object's full SHA-256 is stored as user metadata
  ``x-amz-meta-sha256`` (a multipart object's S3 checksum is only a
  checksum-of-part-checksums).  After writing, ``put`` verifies with HEAD
  (``ChecksumMode=ENABLED``): ContentLength, the metadata SHA-256, the S3
  ``ChecksumSHA256`` when returned (full for a single PUT, composite for
  multipart) and, with KMS configured, that the object is ``aws:kms``
  encrypted.  ``verify="get"`` additionally downloads the object and hashes
  it.  Note that moto, used in the tests, *records* the declared checksum
  instead of recomputing it, so against moto the checks prove the stored
  object is the one written (size, metadata hash) but not that the server
  validated the bytes; on AWS the server does.

Cancellation: boto3 calls run in threads that are never abandoned, so a
cancellation takes effect once the call in flight returns (bounded by
botocore's connect/read timeouts), at the next checkpoint -- before the next
boto3 call or retry sleep.  A put cancelled after its upload but before its
verification raises ``Cancelled`` with the object already stored.  A cancelled or failed
multipart upload is aborted under a shielded scope of at most 5 s; if that
abort cannot complete, the parts linger until the bucket's
AbortIncompleteMultipartUpload lifecycle rule removes them (configure one).
A single PUT is atomic: after cancellation the key holds the old object or
the complete new one.  ``put`` is idempotent, so the caller retries.
Errors: BlobNotFound, BlobVerifyError, or BlobStoreError chaining the boto
exception; ``trio.Cancelled`` is never caught.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import random
import re
from collections.abc import Callable
from contextlib import closing
from typing import Any, Final, Literal, TypeVar

import botocore.exceptions as bexc
import trio

from .blobs import BlobInfo, BlobNotFound, BlobStore, BlobStoreError, BlobVerifyError, check_key
from .s3_errors import NOT_FOUND_CODES as _NOT_FOUND
from .s3_errors import error_code as _code
from .s3_errors import is_transient
from .s3_errors import safe_reason as _reason

__all__ = ["MIN_PART_SIZE", "S3BlobStore", "bucket_name", "is_transient"]

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_PART_SIZE: Final = 5 * 1024 * 1024
MAX_PARTS: Final = 10_000
CLEANUP_TIMEOUT: Final = 5.0


def bucket_name(env: str) -> str:
    """The per-environment bucket: ``restartix-telemetry-{env}``."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", env or ""):
        raise ValueError(f"environment name {env!r} is not usable in a bucket name")
    return f"restartix-telemetry-{env}"


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class S3BlobStore(BlobStore):
    """See the module docstring for retries, integrity and cancellation."""

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        region: str | None = None,
        endpoint_url: str | None = None,
        kms_key_id: str | None = None,
        multipart_threshold: int = 8 * 1024 * 1024,
        max_attempts: int = 5,
        limiter: trio.CapacityLimiter | None = None,
        client: Any = None,
        part_size: int = 8 * 1024 * 1024,
        backoff_base: float = 0.2,
        backoff_max: float = 10.0,
        verify: Literal["head", "get"] = "head",
    ) -> None:
        if not bucket:
            raise ValueError("bucket is required")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be >= {MIN_PART_SIZE} (S3 minimum)")
        if multipart_threshold < 1:
            raise ValueError("multipart_threshold must be >= 1")
        if verify not in ("head", "get"):
            raise ValueError("verify must be 'head' or 'get'")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.region = region
        self.endpoint_url = endpoint_url
        self.kms_key_id = kms_key_id
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.verify = verify
        self.limiter = limiter or trio.CapacityLimiter(10)
        self._client = client
        self._owns_client = client is None
        self._client_lock = trio.Lock()
        self._closed = False
        self._rng = random.Random()

    @classmethod
    def for_env(cls, env: str, **kwargs: Any) -> S3BlobStore:
        return cls(bucket=bucket_name(env), **kwargs)

    # ------------------------------------------------------------ plumbing
    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        tokens = self.limiter.total_tokens
        pool = int(tokens) if isinstance(tokens, int) else 10
        cfg = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},  # we retry ourselves
            max_pool_connections=max(1, pool),
            connect_timeout=10,
            read_timeout=60,
        )
        return boto3.session.Session().client(
            "s3", region_name=self.region, endpoint_url=self.endpoint_url, config=cfg
        )

    async def _get_client(self) -> Any:
        if self._closed:
            raise BlobStoreError("blob store is closed")
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    try:
                        self._client = await trio.to_thread.run_sync(
                            self._make_client, limiter=self.limiter
                        )
                    except bexc.BotoCoreError as e:
                        raise BlobStoreError(f"creating the S3 client: {_reason(e)}") from e
        return self._client

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt + 1``: ``base * 2**attempt`` capped
        at ``backoff_max``, times a uniform jitter in [0.5, 1]."""
        return min(self.backoff_max, self.backoff_base * 2**attempt) * self._rng.uniform(0.5, 1.0)

    async def _call(self, what: str, fn: Callable[[], T], *, attempts: int | None = None) -> T:
        """Run ``fn`` (which makes boto3 calls) in a thread, retrying transient errors.
        ``what`` names the operation for the log, never the object (keys hold ids)."""
        attempts = attempts or self.max_attempts
        for attempt in range(attempts):
            try:
                return await trio.to_thread.run_sync(fn, limiter=self.limiter)
            except Exception as e:
                if not is_transient(e) or attempt + 1 >= attempts:
                    raise
                delay = self.backoff(attempt)
                log.warning(
                    "s3 %s failed (%s); retry %d/%d in %.2fs",
                    what,
                    _reason(e),
                    attempt + 1,
                    attempts - 1,
                    delay,
                )
                await trio.sleep(delay)
        raise AssertionError("unreachable")

    def _key(self, key: str) -> str:
        check_key(key)
        return self.prefix + key

    def _sse(self) -> dict[str, str]:
        if self.kms_key_id:
            return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.kms_key_id}
        return {"ServerSideEncryption": "AES256"}

    # ------------------------------------------------------------ API
    async def put(self, key: str, data: bytes) -> BlobInfo:
        """Upload, then verify.  BlobVerifyError if the stored object does not
        match; BlobStoreError (boto exception chained) for other failures.

        Written at most once: the upload is conditional (``If-None-Match: *``), so a
        second writer of the same key (a retry whose first reply was lost, or in a
        fleet an instance finishing a session another one also finished) stores
        nothing and verifies the object already there, which must hold the same
        bytes (a blob is a pure function of the session's acknowledged batches)."""
        full = self._key(key)
        data = bytes(data)
        client = await self._get_client()
        digest = await trio.to_thread.run_sync(lambda: hashlib.sha256(data).digest())
        info = BlobInfo(key, len(data), digest.hex())
        common: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full,
            "Metadata": {"sha256": info.sha256},
            "ContentType": "application/octet-stream",
            **self._sse(),
        }
        try:
            if len(data) > self.multipart_threshold:
                expect_checksum = await self._put_multipart(client, common, data)
            else:
                expect_checksum = _b64(digest)
                await self._call(
                    "PutObject",
                    lambda: client.put_object(
                        Body=data,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=expect_checksum,
                        IfNoneMatch="*",
                        **common,
                    ),
                )
        except bexc.ClientError as e:
            if _code(e) != "PreconditionFailed":
                raise BlobStoreError(f"uploading to s3://{self.bucket}: {_reason(e)}",
                                     key=key) from e
            # Stored already: the verification below says whether it is these bytes
            # (by size and sha256; its ChecksumSHA256 may be of other part sizes).
            expect_checksum = ""
        except bexc.BotoCoreError as e:
            raise BlobStoreError(f"uploading to s3://{self.bucket}: {_reason(e)}",
                                 key=key) from e
        await self._verify(client, key, full, info, expect_checksum)
        return info

    async def _put_multipart(self, client: Any, common: dict[str, Any], data: bytes) -> str:
        """Multipart upload; returns the expected composite ChecksumSHA256.
        Aborts the upload (shielded, <= 5 s) on any error or cancellation."""
        full = common["Key"]
        part_size = max(self.part_size, math.ceil(len(data) / MAX_PARTS))
        created = await self._call(
            "CreateMultipartUpload",
            lambda: client.create_multipart_upload(ChecksumAlgorithm="SHA256", **common),
        )
        upload_id = created["UploadId"]
        ids = {"Bucket": self.bucket, "Key": full, "UploadId": upload_id}
        digests: list[bytes] = []
        try:
            parts: list[dict[str, Any]] = []
            for number, off in enumerate(range(0, len(data), part_size), start=1):
                chunk = data[off : off + part_size]
                d = await trio.to_thread.run_sync(lambda c=chunk: hashlib.sha256(c).digest())
                digests.append(d)
                resp = await self._call(
                    f"UploadPart #{number}",
                    lambda c=chunk, n=number, s=_b64(d): client.upload_part(
                        Body=c, PartNumber=n, ChecksumAlgorithm="SHA256", ChecksumSHA256=s, **ids
                    ),
                )
                parts.append(
                    {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": _b64(d)}
                )
            tries = 0

            def complete() -> None:
                nonlocal tries
                tries += 1
                try:
                    client.complete_multipart_upload(MultipartUpload={"Parts": parts},
                                                     IfNoneMatch="*", **ids)
                except bexc.ClientError as e:
                    # an earlier attempt whose reply was lost already completed it;
                    # verification decides whether the object is right
                    if not (tries > 1 and _code(e) == "NoSuchUpload"):
                        raise

            await self._call("CompleteMultipartUpload", complete)
        except BaseException:
            with trio.move_on_after(CLEANUP_TIMEOUT) as cs:
                cs.shield = True
                try:
                    await self._call(
                        "AbortMultipartUpload",
                        lambda: client.abort_multipart_upload(**ids),
                        attempts=3,
                    )
                except Exception as e:
                    log.warning("s3 abort of multipart upload %s failed: %s", upload_id,
                                _reason(e))
            if cs.cancelled_caught:
                log.warning("s3 abort of multipart upload %s timed out", upload_id)
            raise
        return f"{_b64(hashlib.sha256(b''.join(digests)).digest())}-{len(digests)}"

    async def _verify(self, client: Any, key: str, full: str, info: BlobInfo,
                      checksum: str) -> None:
        def head() -> tuple[dict[str, Any], str | None]:
            if self.verify == "get":
                r = client.get_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED")
                with closing(r["Body"]) as body:
                    return r, hashlib.sha256(body.read()).hexdigest()
            return client.head_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED"), None

        where = f"object in s3://{self.bucket}"
        try:
            h, body_sha = await self._call("verify", head)
        except bexc.ClientError as e:
            if _code(e) in _NOT_FOUND:
                raise BlobVerifyError(f"{where} is missing right after upload", key=key) from e
            raise BlobStoreError(f"verifying {where}: {_reason(e)}", key=key) from e
        except bexc.BotoCoreError as e:
            raise BlobStoreError(f"verifying {where}: {_reason(e)}", key=key) from e
        problems = []
        if h.get("ContentLength") != info.size:
            problems.append(f"size {h.get('ContentLength')} != {info.size}")
        meta_sha = (h.get("Metadata") or {}).get("sha256")
        if meta_sha != info.sha256:
            problems.append(f"metadata sha256 {meta_sha} != {info.sha256}")
        if body_sha is not None and body_sha != info.sha256:
            problems.append(f"downloaded sha256 {body_sha} != {info.sha256}")
        got = h.get("ChecksumSHA256")
        if checksum and got is not None and got.split("-")[0] != checksum.split("-")[0]:
            problems.append(f"ChecksumSHA256 {got} != {checksum}")
        if self.kms_key_id and h.get("ServerSideEncryption") != "aws:kms":
            problems.append(f"encryption {h.get('ServerSideEncryption')!r} is not aws:kms")
        if problems:
            raise BlobVerifyError(f"{where} does not match what was written: {'; '.join(problems)}",
                                  key=key)

    async def get(self, key: str) -> bytes:
        """Download; checks the bytes against the stored metadata SHA-256
        (BlobVerifyError on mismatch).  BlobNotFound if the key is missing."""
        full = self._key(key)
        client = await self._get_client()

        def fetch() -> tuple[bytes, dict[str, str]]:
            r = client.get_object(Bucket=self.bucket, Key=full)
            with closing(r["Body"]) as body:
                return body.read(), r.get("Metadata") or {}

        try:
            data, meta = await self._call("GetObject", fetch)
        except bexc.ClientError as e:
            if _code(e) in _NOT_FOUND:
                raise BlobNotFound(key) from e
            raise BlobStoreError(f"downloading from s3://{self.bucket}: {_reason(e)}",
                                 key=key) from e
        except bexc.BotoCoreError as e:
            raise BlobStoreError(f"downloading from s3://{self.bucket}: {_reason(e)}",
                                 key=key) from e
        want = meta.get("sha256")
        if want is not None:
            got = await trio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
            if got != want:
                raise BlobVerifyError(f"object in s3://{self.bucket}: sha256 {got} != stored "
                                      f"{want}", key=key)
        return data

    async def exists(self, key: str) -> bool:
        full = self._key(key)
        client = await self._get_client()
        try:
            await self._call(
                "HeadObject", lambda: client.head_object(Bucket=self.bucket, Key=full)
            )
        except bexc.ClientError as e:
            if _code(e) in _NOT_FOUND:
                return False
            raise BlobStoreError(f"checking s3://{self.bucket}: {_reason(e)}", key=key) from e
        except bexc.BotoCoreError as e:
            raise BlobStoreError(f"checking s3://{self.bucket}: {_reason(e)}", key=key) from e
        return True

    async def aclose(self) -> None:
        """Close the client's connection pool if this store created the client
        (shielded, <= 5 s, so it also runs from a cancelled scope)."""
        if self._closed:
            return
        self._closed = True
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            with trio.move_on_after(CLEANUP_TIMEOUT) as cs:
                cs.shield = True
                await trio.to_thread.run_sync(client.close, limiter=self.limiter)
