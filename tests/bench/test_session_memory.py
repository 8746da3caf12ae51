"""bench.bench_session_memory runs and reports a per-session figure and its sites."""

from __future__ import annotations

import re

from bench import bench_session_memory


def test_reports_traced_memory_per_live_session(capsys):
    assert bench_session_memory.main(["--sessions", "3", "--batches", "6", "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    m = re.match(r"3 live sessions x 6 batches \(POST, in process\): ([\d.]+) KB traced", out[0])
    assert m, out
    # a live session holds at least its replay's zlib state (about 18 KB)
    assert 10.0 < float(m.group(1)) < 1000.0
    assert len(out) == 4 and all(" KB " in line for line in out[1:])
