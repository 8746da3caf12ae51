"""What a service left in its data directory: outbox, spool, blobs."""

from __future__ import annotations

from pathlib import Path


def outbox_pending(data_dir: Path) -> list[str]:
    pending = data_dir / "outbox" / "pending"
    return sorted(p.name for p in pending.glob("*.json")) if pending.is_dir() else []


def spool_keys(data_dir: Path) -> list[str]:
    """Session logs left in the spool, as ``org/session`` (excludes kept summaries).
    Asks the spool (a read-only scan): its records share segment files."""
    from storage.spool import Spool

    root = data_dir / "spool"
    if not root.is_dir():
        return []
    return [k for k in Spool(root).log_keys() if not k.startswith("ended/")]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) \
        if root.is_dir() else []
