"""What a client sends: pose frames and batches, tokens, request headers."""

from __future__ import annotations

import numpy as np

from domain.pose_batch import CONTENT_TYPE, encode_batch
from telemetry.auth import mint_service_token, mint_session_token
from telemetry.config import Settings


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


def auth(token: str, content_type: str | None = CONTENT_TYPE) -> dict[str, str]:
    """A bearer token header, and ``Content-Type`` unless ``content_type`` is None."""
    h = {"Authorization": f"Bearer {token}"}
    if content_type:
        h["Content-Type"] = content_type
    return h


def hdr(token: str, ctype: str = CONTENT_TYPE) -> dict[str, str]:
    """The headers of a pose batch POST (:func:`auth` with a content type)."""
    return auth(token, ctype)
