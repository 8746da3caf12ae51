"""The demo runs end to end: real service, real HTTP, embedded Postgres."""

from __future__ import annotations

import pytest

from telemetry.config import Settings
from telemetry.demo import run_demo


async def test_demo_streams_sessions_and_reads_results_from_postgres(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = await run_demo(Settings(pseudonym_key=b"k" * 32), n=3, seconds=6, seed=3)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "results from Postgres" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("demo-3-")]
    assert [r[0] for r in rows[:3]] == ["demo-3-0", "demo-3-1", "demo-3-2"]
    ends = [r[9] for r in rows[:3]]
    assert ends == ["client_end", "client_end", "idle_timeout"]
    for r in rows[:2]:
        assert int(r[3]) > 100  # frames
        assert r[10] != "-"  # startup time of the video view
