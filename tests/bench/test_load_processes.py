"""``bench/load.py --processes``: several processes per target, each driving its own
sessions, measured as one (real processes on loopback; the bare yardstick, which
starts in a second)."""

from __future__ import annotations

from pathlib import Path

from bench.load import parse_args
from bench.loadreport import label
from bench.loadrun import RunSpec, run


def test_two_processes_share_the_sessions_and_are_measured_together(tmp_path: Path) -> None:
    a = parse_args(["--wait-quiet", "0"])
    results = {}
    for p in (1, 2):
        spec = RunSpec("closed", 4, duration=2.0, warmup=0.5, transport="http", processes=p)
        results[p] = run("bare", spec, a, log_dir=tmp_path, extra_env={}, quiet=True)
    one, two = results[1], results[2]
    assert label(one) == "bare quart-trio http" and label(two) == "bare quart-trio x2 http"
    for r in (one, two):
        assert r.acked_per_s > 0 and r.batch_errors == 0
    # Each process answered its own generator's sessions: both worked for seconds of
    # closed-loop load, not one of them alone.
    cpu = two.extra["process_cpu_s"]
    assert len(cpu) == 2 and min(cpu) > 0.2 * max(cpu) > 0
    # ...and both are sampled: their resident sets add up.
    assert two.idle_rss_kb > 1.6 * one.idle_rss_kb
