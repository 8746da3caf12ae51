"""The tags that storage's log lines and error messages carry instead of keys.

A spool key (``{org_id}/{session_id}``) or an outbox event id names a session, and
session ids join to a patient in the Core API, so they never appear in a log line.
The tag that stands for one is keyed: HMAC-SHA256 with the service's pseudonym key
(:func:`configure`, called once at start-up), so that nobody holding the list of
session ids can recompute it, and rotating the key unlinks old tags from new ones,
as it does for the ``s_`` pseudonyms. Until configured (tools, tests), the key is
random per process.

Synchronous and pure apart from the key; nothing here can fail or be cancelled.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_key: bytes = secrets.token_bytes(32)


def configure(key: bytes) -> None:
    """Key the tags with ``key`` (the pseudonym key) from now on."""
    global _key
    if not key:
        raise ValueError("the log tag key must not be empty")
    _key = bytes(key)


def tag(prefix: str, value: str) -> str:
    """``prefix`` and 12 hex digits of the keyed digest of ``value``."""
    mac = hmac.new(_key, f"{prefix}{value}".encode(), hashlib.sha256)
    return prefix + mac.hexdigest()[:12]
