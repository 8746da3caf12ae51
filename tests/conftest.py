"""Shared fixtures for every test module. The test rules are in ``tests/README.md``.

Helpers live in ``tests/support/`` (never in a test module, never here); this file
only provides fixtures: ``settings`` below, and through ``pytest_plugins`` the
Postgres (:mod:`tests.support.pg`), S3 (:mod:`tests.support.s3`) and NATS
(:mod:`tests.support.nats`) fixtures.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from telemetry.config import Settings

pytest_plugins = ["tests.support.pg", "tests.support.s3", "tests.support.nats"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return dataclasses.replace(
        Settings(), host="127.0.0.1", port=0, data_dir=tmp_path, idle_timeout_s=30.0,
        gap_timeout_s=2.0, shutdown_deadline_s=10.0, pseudonym_key=b"k" * 32,
        # Most tests need no Postgres; the end-to-end ones turn the sink on.
        sink="none",
        # Tests stream faster than real time; the rate limit has its own tests.
        max_batches_per_s=1000.0,
    )
