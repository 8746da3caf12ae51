"""The outbox's directory: one durable file per pending event, and where failed ones go.

Files under the outbox's ``root``::

    pending/<name>.json    {"v": 1, "seq": <ns>, "event_id": ..., "event": {...}}
    pending/.<name>.tmp    only after a crash mid-publish; removed on start-up
    dead/<name>.json       given up: the same document plus "attempts" and "last_error"
    dead/<name>.corrupt    a pending file that did not parse (cannot happen short of
                           disk corruption: files are renamed into place)

``<name>`` is :func:`event_file_name` of the event id. Every method here blocks (the
:class:`~storage.outbox.Outbox` calls them in worker threads) and raises ``OSError``
for a disk error unless it says otherwise; nothing here awaits, so nothing here is
cancelled half-way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from storage import logtags
from storage.fsutil import fsync_dir

# The outbox's logger: these lines belong to it.
log = logging.getLogger("telemetry.outbox")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def event_file_name(event_id: str) -> str:
    """The file-safe, collision-free name of an event id (no suffix)."""
    safe = _UNSAFE.sub("_", event_id)[:80].lstrip("._-") or "e"
    return f"{safe}.{hashlib.sha256(event_id.encode()).hexdigest()[:16]}"


def log_tag(name: str) -> str:
    """What log lines carry instead of an event's file name (event ids name
    sessions): a keyed digest, see :mod:`storage.logtags`."""
    return logtags.tag("e_", name)


class OutboxDir:
    """The ``pending/`` and ``dead/`` directories under ``root`` (created, owner-only,
    on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pending = root / "pending"
        self.dead = root / "dead"
        self._ready = False

    def ensure(self) -> None:
        if not self._ready:
            for d in (self.pending, self.dead):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_dir(self.root)
            self._ready = True

    def write_pending(self, name: str, doc: bytes) -> None:
        self.ensure()
        _atomic_write(self.pending, name + ".json", doc)

    def read_pending(self, name: str) -> Mapping[str, Any]:
        """The event of a pending file. ``FileNotFoundError`` if it was removed;
        ValueError, KeyError or TypeError if it does not parse."""
        doc = json.loads((self.pending / f"{name}.json").read_bytes())
        event = doc["event"]
        if not isinstance(event, dict):
            raise TypeError("event is not an object")
        return event

    def delete_pending(self, name: str) -> None:
        """Remove a delivered event's file (already gone is fine)."""
        _unlink(self.pending / f"{name}.json")

    def bury(self, name: str, attempts: int, error: str) -> None:
        """Move a pending event to dead/ with its attempts and last error."""
        src = self.pending / f"{name}.json"
        doc = json.loads(src.read_bytes())
        doc.update(attempts=attempts, last_error=error[:2000])
        _atomic_write(self.dead, name + ".json", json.dumps(doc).encode())
        _unlink(src)

    def quarantine(self, name: str) -> None:
        """Move an unparsable pending file to dead/; if that fails it stays where it
        is and is found again at the next start. Never raises OSError."""
        with contextlib.suppress(OSError):
            os.replace(self.pending / f"{name}.json", self.dead / f"{name}.corrupt")
            fsync_dir(self.dead)
            fsync_dir(self.pending)

    def load(self) -> tuple[list[tuple[str, int, Mapping[str, Any]]], int]:
        """``(name, seq, event)`` of every pending event, sorted by seq (then name), and
        how many files did not parse; stale temp files removed, unparsable files
        moved to dead/."""
        self.ensure()
        found: list[tuple[str, int, Mapping[str, Any]]] = []
        corrupt = 0
        for path in self.pending.iterdir():
            if path.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            if not path.name.endswith(".json"):
                continue
            name = path.name[: -len(".json")]
            try:
                doc = json.loads(path.read_bytes())
                seq = int(doc["seq"])
                event = doc["event"]
                if not isinstance(event, dict):
                    raise TypeError("event is not an object")
            except (ValueError, KeyError, TypeError):
                log.error("outbox event %s does not parse; moved to dead/", log_tag(name))
                self.quarantine(name)
                corrupt += 1
                continue
            found.append((name, seq, event))
        found.sort(key=lambda f: (f[1], f[0]))
        return found, corrupt


def _atomic_write(directory: Path, filename: str, data: bytes) -> None:
    """temp file, fsync, rename onto ``filename``, fsync the directory."""
    tmp = directory / f".{filename}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:  # events carry patient ids: owner-only files
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / filename)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
