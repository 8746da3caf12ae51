"""A real S3 server (moto in server mode) on a loopback port, and the AWS environment
every S3 client of the tests runs with: dummy credentials, no shared AWS config, no
instance metadata, no proxy for loopback.

Fixtures (registered by ``tests/conftest.py``): ``s3_server`` (session: one server with
the test bucket), ``s3_prefix`` (a fresh key prefix per test), ``s3_client`` (a boto3
client, closed after the test). :class:`MotoServer` is the server itself, on a fixed
port, for tests that stop and restart it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

BUCKET = "restartix-telemetry-test"
REGION = "us-east-1"

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def use_aws_env(mp: pytest.MonkeyPatch) -> None:
    """Put :data:`AWS_ENV` in this process's environment (and drop ``AWS_PROFILE``)
    until ``mp`` is undone."""
    for var, value in AWS_ENV.items():
        mp.setenv(var, value)
    mp.delenv("AWS_PROFILE", raising=False)


def s3_client(endpoint_url: str, region: str = REGION, service: str = "s3") -> Any:
    """A fresh real boto3 client against ``endpoint_url`` (close it after use)."""
    import boto3  # here: most test runs never touch S3

    return boto3.session.Session().client(service, endpoint_url=endpoint_url,
                                          region_name=region)


class MotoServer:
    """moto's S3 server on 127.0.0.1:``port`` (0: the kernel's pick, known after
    :meth:`start`), with ``bucket`` created on each start. It can be stopped and
    started again; its in-memory state is lost on stop. Start and stop block: call
    them in a thread from async code."""

    def __init__(self, port: int = 0, bucket: str = BUCKET) -> None:
        self.port, self.bucket = port, bucket
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        return s3_client(self.url)

    def start(self) -> None:
        from moto.server import ThreadedMotoServer  # here: a slow import

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = int(self.server.get_host_and_port()[1])
        client = self.client()
        try:
            client.create_bucket(Bucket=self.bucket)
        finally:
            client.close()

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()
            # ThreadedMotoServer.stop() shuts the loop down but leaves the
            # listening socket open; close it so no ResourceWarning escapes.
            wsgi = getattr(server, "_server", None)
            if wsgi is not None:
                wsgi.server_close()

    def get(self, key: str) -> bytes:
        client = self.client()
        try:
            obj = client.get_object(Bucket=self.bucket, Key=key)
            with obj["Body"] as body:
                return bytes(body.read())
        finally:
            client.close()


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    region: str

    def client(self, service: str = "s3") -> Any:
        """A fresh real boto3 client against the server (close it after use)."""
        return s3_client(self.endpoint_url, self.region, service)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto in server mode on 127.0.0.1:<free port>, with the test bucket created
    through real boto3.  Dummy credentials only; no shared AWS config is read."""
    with pytest.MonkeyPatch.context() as mp:
        use_aws_env(mp)
        server = MotoServer()
        try:
            server.start()
            yield S3Server(server.url, BUCKET, REGION)
        finally:
            server.stop()


@pytest.fixture
def s3_prefix() -> str:
    """A fresh key prefix so tests sharing the session bucket never collide."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(name="s3_client")
def s3_client_fixture(s3_server: S3Server) -> Iterator[Any]:
    client = s3_server.client()
    try:
        yield client
    finally:
        client.close()
