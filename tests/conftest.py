"""Shared fixtures: settings, tokens and pose data for every test module."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from domain.pose_batch import encode_batch
from telemetry.auth import mint_service_token, mint_session_token
from telemetry.config import Settings

pytest_plugins = ["tests.pg_fixtures"]


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


def pose_frames(n: int, t0: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` plausible frames 33 ms apart starting at ``t0`` ms."""
    rng = np.random.default_rng(seed)
    t = (t0 + np.arange(n) * 33).astype(np.uint32)
    frames = rng.uniform(0.2, 0.8, size=(n, 33, 4)).astype(np.float32)
    frames[:, :, 3] = rng.uniform(0.8, 1.0, size=(n, 33))
    return t, frames


def batch_body(seq: int, n: int = 30, space: str = "image") -> bytes:
    """Batch ``seq`` of a 30 fps stream: frames at seq*1000 ms onwards."""
    t, f = pose_frames(n, t0=seq * 1000, seed=seq)
    return encode_batch(seq, t, f, space=space, image_width=640, image_height=480)


def session_token(settings: Settings, **kw: object) -> str:
    kw.setdefault("org_id", "org-a")
    kw.setdefault("session_id", "sess-1")
    return mint_session_token(settings, **kw)  # type: ignore[arg-type]


def admin_token(settings: Settings) -> str:
    return mint_service_token(settings)
