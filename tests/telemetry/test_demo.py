"""The demo runs end to end: real service, real HTTP, embedded Postgres."""

from __future__ import annotations

import re

import trio

from telemetry.config import Settings
from telemetry.dev.demo import run_demo


async def test_demo_streams_sessions_and_reads_results_from_postgres(
    settings: Settings,
) -> None:
    lines: list[tuple[float, str]] = []  # (when, line): the demo's output as it came

    def out(line: str) -> None:
        lines.append((trio.current_time(), line))

    rc = await run_demo(Settings(pseudonym_key=b"k" * 32), n=3, seconds=6, seed=3, out=out)
    text = "\n".join(line for _, line in lines)
    assert rc == 0, text
    assert "results from Postgres" in text
    rows = [line.split() for _, line in lines if line.startswith("demo-3-")]
    assert [r[0] for r in rows[:3]] == ["demo-3-0", "demo-3-1", "demo-3-2"]
    ends = [r[9] for r in rows[:3]]
    assert ends == ["client_end", "client_end", "idle_timeout"]
    for r in rows[:2]:
        assert int(r[3]) > 100  # frames
        assert r[10] != "-"  # startup time of the video view

    # A line per session as it progresses, before the results.
    results_at = next(t for t, line in lines if line.startswith("results from"))
    progress = [(t, line.strip()) for t, line in lines if t < results_at]

    def when(pattern: str) -> float:
        found = [t for t, line in progress if re.fullmatch(pattern, line)]
        assert len(found) == 1, (pattern, text)
        return found[0]

    for i in range(3):
        sid = f"demo-3-{i}"
        started = when(rf"{sid}: \w+ \(clinic-[ab]\) started, \d+ s of pose( and a video)?")
        summary = when(rf"{sid}: summary event on the bus \(\w+\)")
        if i < 2:
            halfway = when(rf"{sid}: 5/\d+ s of pose acknowledged")
            ended = when(rf"{sid}: ended, summary stored \(\d+ reps\)")
            # Written when it happened: seconds apart, not all at the end (the
            # event is on the bus before the end call answers).
            assert started + 3 < halfway < ended and halfway < summary, text
        else:
            abandoned = when(rf"{sid}: abandoned after \d+ s; the service ends it when idle")
            assert started + 1 < abandoned < summary, text
    first = min(t for t, _ in progress[1:])
    assert results_at - first > 5, text
