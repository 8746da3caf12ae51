"""The whole flow across processes, with real parts only:

browser-like client --HTTP--> service --boto3--> S3 (moto server on loopback)
                                       --HTTP bus--> `telemetry sink` (child process)
                                                     --psycopg--> Postgres (RLS)
and `telemetry replay` recomputing the live metrics from the stored blob.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import trio

from actors.replay_metrics import recompute
from domain.pose_batch import CONTENT_TYPE
from storage.pg import Database
from storage.replay import read_replay
from storage.sink import AggregateSink
from telemetry.config import Settings
from telemetry.dev.demo import batches_of
from telemetry.dev.synthetic import generate
from tests.support.payloads import session_token
from tests.support.s3 import S3Server
from tests.support.service import running_service

ROOT = Path(__file__).resolve().parents[1]


async def _start_sink(
    nursery: trio.Nursery, pg_url: str, data_dir: Path
) -> tuple[trio.Process, str]:
    env = {**os.environ, "DATABASE_URL": pg_url, "TELEMETRY_SINK_PORT": "0",
           "TELEMETRY_DATA_DIR": str(data_dir), "TELEMETRY_LOG_LEVEL": "WARNING"}
    proc: trio.Process = await nursery.start(partial(
        trio.run_process, [sys.executable, "-m", "telemetry.cli", "sink"], env=env,
        cwd=str(ROOT), stdout=subprocess.PIPE, check=False))
    assert proc.stdout is not None
    line = b""
    with trio.fail_after(60):
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(1)
            assert chunk, "sink exited before listening"
            line += chunk
    return proc, line.decode().strip().rsplit(" ", 1)[1]


async def test_ingest_to_s3_to_sink_process_to_postgres(
    settings: Settings, s3_server: S3Server, pg_url: str, pg_db: Database,  # noqa: F811
    private_tmp: Path,
) -> None:
    session = generate("bicep_curl", reps=6, seed=11)
    bodies = list(batches_of(session.t_ms, session.frames, random.Random(1)))
    async with trio.open_nursery() as nursery:
        proc, sink_url = await _start_sink(nursery, pg_url, private_tmp)
        cfg = dataclasses.replace(
            settings, blob_store="s3", s3_bucket=s3_server.bucket, s3_prefix="e2e",
            s3_endpoint_url=s3_server.endpoint_url, s3_region=s3_server.region,
            bus="http", bus_url=sink_url + "/internal/v1/events", sink="none",
        )
        async with running_service(cfg) as svc:
            tok = session_token(cfg, org_id="org-a", session_id="e2e-1",
                                exercise={"kind": "bicep_curl", "target_reps": 6})
            headers = {"Authorization": f"Bearer {tok}", "Content-Type": CONTENT_TYPE}
            for body in bodies:
                r = await svc.client.post("/v1/pose/frames", content=body, headers=headers)
                assert r.status_code == 202, r.text
            r = await svc.client.post("/v1/sessions/e2e-1/end", headers=headers)
            assert r.status_code == 200, r.text
            summary = r.json()
            assert summary["published"] is True
            blob = await svc.storage.store.get("org-a/e2e-1.bin.gz")
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await proc.wait()
    assert proc.returncode == 0

    # the object in S3 is the verified blob the summary names
    client = s3_server.client()
    try:
        head = client.head_object(Bucket=s3_server.bucket, Key="e2e/org-a/e2e-1.bin.gz")
    finally:
        client.close()
    assert head["ContentLength"] == summary["blob"]["size"] == len(blob)

    # the rows, written by the other process under RLS
    sink = AggregateSink(pg_db)
    (row,) = await sink.session_rows("org-a")
    assert row["session_id"] == "e2e-1"
    assert row["rep_count"] == summary["reps"]["rep_count"]
    assert await sink.session_rows("org-b") == []

    # support staff's replay recomputes exactly what the live actor computed
    replay = read_replay(blob)
    assert replay.frames.shape[0] == summary["pose"]["frames"]
    again = recompute(replay)
    assert json.loads(json.dumps(again["reps"])) == summary["reps"]
    assert abs(summary["reps"]["rep_count"] - session.true_reps) <= 1
    assert np.isfinite(summary["reps"]["rom_mean_deg"])
    # angles as clinicians read them: a curl's straight arm is near 0° of elbow flexion
    assert summary["reps"]["angle"] == "elbow_flexion"
    assert summary["reps"]["angle_convention"] == "clinical"
    assert all(r["angle"] == "elbow_flexion" and 0.0 <= r["angle_min_deg"] < 45.0
               < r["angle_max_deg"] <= 180.0 for r in summary["reps"]["reps"])
