"""A fresh clone stands alone: no code reads the folder beside the checkout
(``../shared``), and the data the tests and benchmarks read is in the repository, small,
with its source noted."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.data import PUSHUP

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "node_modules", "__pycache__", ".hypothesis", ".ruff_cache",
        "build", ".telemetry-data"}
CODE = {".py", ".js", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".json"}
# "../shared", ".parent / 'shared'", "'shared' / 'data'": a path into the sibling folder
SIBLING = re.compile(r"""\.\./shared\b|\.parent\s*/\s*["']shared\b|["']shared["']\s*/""")


def _code_files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if SKIP & set(rel.parts) or not path.is_file():
            continue
        if path.suffix in CODE or path.name in {"Dockerfile", "run"}:
            out.append(path)
    return out


def test_no_code_reads_the_folder_beside_the_checkout() -> None:
    files = _code_files()
    assert ROOT / "dev.py" in files and Path(__file__) in files  # the walk sees the code
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for p in files if p != Path(__file__)
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if SIBLING.search(line)]
    assert hits == [], "code reads ../shared:\n" + "\n".join(hits)


def test_the_pose_recordings_are_in_the_repository() -> None:
    labels = json.loads((PUSHUP / "labels.json").read_text())
    clips = sorted(p.stem for p in PUSHUP.glob("*.npz"))
    assert clips == sorted(labels)  # every clip labelled, every label has its clip
    assert {"correct108", "correct118"} <= set(clips)  # the browser tests' recording
    size = sum(p.stat().st_size for p in PUSHUP.iterdir())
    assert size < 2_000_000, f"{size} bytes of test data: keep it small"
    source = (PUSHUP / "SOURCE.md").read_text()
    assert "riyer8/cs231n-pushfit" in source and "MediaPipe Pose 0.10.14" in source
    assert all(f"{name}.npz" in source for name in clips)  # each listed with its hash
