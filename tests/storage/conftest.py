"""Fixtures for storage tests: a real moto S3 server on a loopback port."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

BUCKET = "restartix-telemetry-test"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    region: str

    def client(self, service: str = "s3") -> Any:
        """A fresh real boto3 client against the server (close it after use)."""
        return boto3.session.Session().client(
            service, endpoint_url=self.endpoint_url, region_name=self.region
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto in server mode on 127.0.0.1:<free port>, with the test bucket created
    through real boto3.  Dummy credentials only; no shared AWS config is read."""
    with pytest.MonkeyPatch.context() as mp:
        for var, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }.items():
            mp.setenv(var, value)
        mp.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            info = S3Server(f"http://{host}:{port}", BUCKET, REGION)
            client = info.client()
            try:
                client.create_bucket(Bucket=BUCKET)
            finally:
                client.close()
            yield info
        finally:
            server.stop()
            # ThreadedMotoServer.stop() shuts the loop down but leaves the
            # listening socket open; close it so no ResourceWarning escapes.
            wsgi = getattr(server, "_server", None)
            if wsgi is not None:
                wsgi.server_close()


@pytest.fixture
def s3_prefix() -> str:
    """A fresh key prefix so tests sharing the session bucket never collide."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_client(s3_server: S3Server) -> Iterator[Any]:
    client = s3_server.client()
    try:
        yield client
    finally:
        client.close()
